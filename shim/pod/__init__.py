"""The pod: one VM's whole life (:mod:`shim.pod.pod`), its boot script, the agent facade, rootfs
strategies, the guest spec, host mounts."""
