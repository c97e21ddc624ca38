"""Attestation agent and confidential data hub of the reference guest (never imports shim).

- :mod:`.config`   — ``aa.toml`` / ``cdh.toml`` from initdata (upstream key names)
- :mod:`.attesters` — evidence for ``sample`` (coco-dev), SNP and TDX (configfs-tsm)
- :mod:`.client`   — trustee's KBS protocol 0.4.0 (auth → attest → resource, JWE to our key)
- :mod:`.cdh`      — resources, sealed secrets, registry credentials for the guest puller
- :mod:`.server`   — ``http://127.0.0.1:8006/cdh/resource/<repo>/<type>/<tag>`` for containers
- :mod:`.components` — start all of the above from the initdata directory (the agent's hook)

Everything here is imported lazily by the agent, only when initdata names a KBS.
"""
