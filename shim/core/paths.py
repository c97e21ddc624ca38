"""Where the shim keeps things on the host: sockets, per-shim state, pod run directories.

Each root can be moved by an environment variable (tests, hosts with an unusual layout).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

DEFAULT_SOCKET_DIR: Final = "/run/containerd/s"
# Two separate trees: ``state/<namespace>/<id>`` can never meet ``pods/<pod key>`` (with one
# root, a containerd namespace named like a pod key, or "vm", shared a directory with pods).
DEFAULT_STATE_DIR: Final = "/run/coco-shim/state"
DEFAULT_RUN_ROOT: Final = "/run/coco-shim/pods"
# Node-wide boot admission (shim/pod/admission.py): one tree for every daemon of the node,
# beside the pods' (never inside: everything under the run root is a pod's).
DEFAULT_BOOT_SLOTS_DIR: Final = "/run/coco-shim/boot-slots"
SOCKET_DIR_ENV: Final = "COCO_SHIM_SOCKET_DIR"
STATE_DIR_ENV: Final = "COCO_SHIM_STATE_DIR"
RUN_ROOT_ENV: Final = "COCO_SHIM_RUN_DIR"
BOOT_SLOTS_ENV: Final = "COCO_SHIM_BOOT_SLOTS_DIR"


def sha256_hex(data: bytes) -> str:
    """SHA-256 of ``data`` in hex, from CPython's built-in module when it has one: ``hashlib``
    loads OpenSSL's libcrypto and initialises BLAKE2 (≈ 3 ms of every ``start``) for a digest
    the built-in module computes just as well."""
    try:
        from _sha256 import sha256  # type: ignore[import-not-found]  # CPython 3.11 (3.12: _sha2)
    except ImportError:
        from hashlib import sha256
    digest: str = sha256(data).hexdigest()
    return digest


def socket_dir() -> Path:
    return Path(os.environ.get(SOCKET_DIR_ENV) or DEFAULT_SOCKET_DIR)


def state_root() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def state_dir(namespace: str, task_id: str) -> Path:
    """Per-shim state: what ``delete`` needs to clean up after a dead daemon."""
    return state_root() / namespace / task_id


def private_root(root: Path) -> Path:
    """``root`` as a directory only root can enter (0700), made if missing."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    if root.stat().st_mode & 0o077:
        os.chmod(root, 0o700)
    return root


def run_root() -> Path:
    return Path(os.environ.get(RUN_ROOT_ENV) or DEFAULT_RUN_ROOT)


def boot_slots_dir() -> Path:
    return Path(os.environ.get(BOOT_SLOTS_ENV) or DEFAULT_BOOT_SLOTS_DIR)


def pod_key(namespace: str, sandbox_id: str) -> str:
    """A short name for a pod: CRI sandbox ids are 64 characters, and the vsock/QMP sockets
    under the pod's run directory must fit a unix socket path (107 bytes)."""
    return sha256_hex(f"{namespace}/{sandbox_id}".encode())[:16]


def pod_run_dir(namespace: str, sandbox_id: str) -> Path:
    """The pod VM's run directory (sockets, logs, the rootfs share)."""
    return run_root() / pod_key(namespace, sandbox_id)
