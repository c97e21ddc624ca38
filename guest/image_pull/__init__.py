"""Guest pull: container images fetched, verified and unpacked inside the guest.

The reference agent's ``image_guest_pull`` storage driver (Kata's contract) lands here. The host
never mounts, shares or reads a container's root filesystem: the agent resolves the image
reference itself, talks to the registry (OCI distribution API), verifies every blob against its
digest, unpacks layers safely into a content-addressed cache and mounts the container's rootfs
as an overlay of those layers.

Modules: :mod:`.reference` (image names), :mod:`.config` (the guest's pull settings, shaped like
the confidential-data-hub ``[image]`` section), :mod:`.digest` (verifying streams),
:mod:`.registry` (the distribution client: auth, TLS, redirects), :mod:`.unpack` (hostile-tar-safe
layer extraction), :mod:`.store` (the layer cache), :mod:`.users` and :mod:`.imagespec` (the image
config applied to the container's OCI spec), :mod:`.pause` (the baked-in pause bundle) and
:mod:`.puller` (the storage handler tying them together).

This package never imports the host side (``shim``); its errors are the agent's typed errors.
"""
