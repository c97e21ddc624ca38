"""The guest's content-addressed image cache and the per-container overlay directories.

Layout under the work directory (0700: nothing but the agent reaches the unpacked layers, so
their setuid programs are usable only inside a container)::

    layers/<algorithm>/<hex>/fs       one unpacked layer, named by its compressed digest
    layers/<algorithm>/<hex>/diff_id  the digest of its uncompressed tar
    blobs/<algorithm>/<hex>           small verified blobs (image configs)
    staging/<random>/                 a layer being unpacked (renamed into layers/ when verified)
    containers/<container id>/        upper/ and work/ of that container's overlay

A layer directory exists only once its blob and its diff ID were verified, so its presence is
the cache hit: two containers of one image, or two images sharing a base, fetch it once.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from guest.agent.errors import AlreadyExists
from guest.image_pull.digest import Digest


class LayerStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        for sub in ("layers", "blobs", "staging", "containers"):
            (self.root / sub).mkdir(exist_ok=True, mode=0o700)
        shutil.rmtree(self.root / "staging", ignore_errors=True)  # leftovers of a crash
        (self.root / "staging").mkdir(exist_ok=True, mode=0o700)

    # -- layers ------------------------------------------------------------------------------

    def _layer(self, digest: Digest) -> Path:
        return self.root / "layers" / digest.algorithm / digest.hex

    def layer(self, digest: Digest) -> Path | None:
        """The unpacked layer's directory, if cached."""
        path = self._layer(digest) / "fs"
        return path if path.is_dir() else None

    def layer_diff_id(self, digest: Digest) -> str:
        return (self._layer(digest) / "diff_id").read_text().strip()

    def stage(self) -> Path:
        """A fresh staging directory with an empty ``fs/``."""
        path = Path(tempfile.mkdtemp(dir=self.root / "staging"))
        (path / "fs").mkdir(mode=0o755)
        return path

    def commit_layer(self, digest: Digest, staged: Path, diff_id: Digest) -> Path:
        """Move a verified staging directory into the cache; return its ``fs/``."""
        (staged / "diff_id").write_text(f"{diff_id}\n")
        target = self._layer(digest)
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            os.rename(staged, target)
        except OSError:
            if self.layer(digest) is None:
                raise
            shutil.rmtree(staged, ignore_errors=True)  # another pull committed it first
        return target / "fs"

    def layers(self) -> list[Digest]:
        out = []
        for algorithm_dir in sorted((self.root / "layers").iterdir()):
            for entry in sorted(algorithm_dir.iterdir()):
                out.append(Digest(algorithm_dir.name, entry.name))
        return out

    # -- small blobs -------------------------------------------------------------------------

    def _blob(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def read_blob(self, digest: Digest) -> bytes | None:
        try:
            return self._blob(digest).read_bytes()
        except FileNotFoundError:
            return None

    def write_blob(self, digest: Digest, data: bytes) -> None:
        path = self._blob(digest)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{id(data)}")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    # -- per-container overlay directories ---------------------------------------------------

    def container_dirs(self, container_id: str) -> tuple[Path, Path]:
        """(upper, work) made fresh for a container; AlreadyExists if it has them."""
        base = self.root / "containers" / container_id
        try:
            base.mkdir(mode=0o700)
        except FileExistsError as err:
            raise AlreadyExists(f"container {container_id} already has an image rootfs") from err
        upper, work = base / "upper", base / "work"
        upper.mkdir(mode=0o755)
        work.mkdir(mode=0o700)
        return upper, work

    def remove_container_dirs(self, container_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root / "containers" / container_id)

    def container_ids(self) -> list[str]:
        return sorted(p.name for p in (self.root / "containers").iterdir())

    def staging_entries(self) -> list[str]:
        return sorted(p.name for p in (self.root / "staging").iterdir())
