"""The guest's root filesystem image: one read-only file shared by every pod of the node.

The guest image builder (``guest/image``) writes it as an EROFS filesystem followed by its
dm-verity hash tree, and beside it ``<image>.verity``: the tree's parameters (JSON). The
profile attaches the file as a read-only virtio-blk disk (``/dev/vda`` in the guest) and tells
the guest's stage-1 init (the tiny initramfs, ``packaging/guest-image/init-root``) how to
mount it with one kernel parameter:

* ``coco.root=blk``: mounted as is (development profile);
* ``coco.root=verity:BLOCKS:HASHBLOCK:ROOTHASH:SALT``: through dm-verity (every confidential
  profile). The parameter is part of the kernel command line, which the launch measurement
  covers (SNP kernel-hashes, TDX RTMR), so the root hash is measured with it: a host that
  changes one byte of the image makes the guest read an I/O error, never other bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_HEX64 = re.compile(r"[0-9a-f]{64}")
VERITY_SUFFIX = ".verity"


class RootImageError(ValueError):
    """A verity file that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class VerityRoot:
    """dm-verity parameters of a root image (4 KiB blocks, sha256, no superblock)."""

    data_blocks: int
    hash_start_block: int
    root_hash: str
    salt: str

    def __post_init__(self) -> None:
        if self.data_blocks <= 0 or self.hash_start_block < self.data_blocks:
            raise RootImageError(f"data_blocks {self.data_blocks} / hash_start_block "
                                 f"{self.hash_start_block}: the hash tree must follow the data")
        for name in ("root_hash", "salt"):
            if not _HEX64.fullmatch(getattr(self, name)):
                raise RootImageError(f"{name} must be 64 lowercase hex digits (sha256)")

    @classmethod
    def from_file(cls, path: Path) -> VerityRoot:
        """Read the builder's ``<image>.verity`` (JSON)."""
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RootImageError(f"{path}: cannot read the root image's verity parameters: "
                                 f"{err}") from err
        if not isinstance(doc, dict):
            raise RootImageError(f"{path}: not a JSON object")
        if doc.get("hash") != "sha256" or doc.get("block_size") != 4096:
            raise RootImageError(f"{path}: only sha256 over 4096-byte blocks is supported, got "
                                 f"hash={doc.get('hash')!r} block_size={doc.get('block_size')!r}")
        try:
            return cls(int(doc["data_blocks"]), int(doc["hash_start_block"]),
                       str(doc["root_hash"]), str(doc["salt"]))
        except KeyError as err:
            raise RootImageError(f"{path}: missing {err.args[0]!r}") from err
        except RootImageError as err:
            raise RootImageError(f"{path}: {err}") from err

    def kernel_param(self) -> str:
        return (f"coco.root=verity:{self.data_blocks}:{self.hash_start_block}:"
                f"{self.root_hash}:{self.salt}")


def verity_file(image: Path) -> Path:
    """Where the builder writes an image's verity parameters."""
    return image.with_name(image.name + VERITY_SUFFIX)


@dataclass(frozen=True)
class RootImage:
    """The root image a profile attaches; ``verity`` None mounts it unchecked (development)."""

    path: Path
    verity: VerityRoot | None = None

    def kernel_param(self) -> str:
        return "coco.root=blk" if self.verity is None else self.verity.kernel_param()
