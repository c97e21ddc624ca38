"""OCI images built locally for the guest-pull tests, written as OCI archives for skopeo.

Every image is reproducible (fixed mtimes, gzip without timestamps). The set:

- ``busybox``: the static busybox layer (tests/support/images.py), ``Cmd ["sh"]``;
- ``layered``: busybox (gzip) + a zstd layer adding /data and /opq + an uncompressed layer with
  the whiteout ``data/.wh.gone`` and the opaque marker ``opq/.wh..wh..opq`` (shares busybox's
  base layer);
- ``multiarch``: an index with linux/amd64 and linux/arm64 manifests, each with a marker layer
  writing /platform;
- ``named-user``: passwd/group declaring ``app`` (1234:2345, also in group ``extra`` 3456),
  ``User "app"``, ``Entrypoint ["id"]``, ``WorkingDir /home/app``, an ``Env`` entry;
- ``large``: busybox + one layer holding ``size`` bytes of incompressible data (the benchmark's
  ≥ 64 MiB image).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import random
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.images import _layer as busybox_layer_tar

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class TarBuilder:
    """A layer tar assembled entry by entry (fixed mtimes, root owner unless told)."""

    raw: io.BytesIO = field(default_factory=io.BytesIO)
    _tar: tarfile.TarFile | None = None

    def __post_init__(self) -> None:
        self._tar = tarfile.open(  # noqa: SIM115 - closed by bytes()
            fileobj=self.raw, mode="w", format=tarfile.PAX_FORMAT
        )

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> TarBuilder:
        info.mtime = info.mtime or 0
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return self

    def dir(self, name: str, mode: int = 0o755, *, uid: int = 0, gid: int = 0) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, gid
        return self._add(info)

    def file(self, name: str, data: bytes | str, mode: int = 0o644, *, uid: int = 0,
             gid: int = 0, pax: dict[str, str] | None = None) -> TarBuilder:
        body = data.encode() if isinstance(data, str) else data
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.uid, info.gid = len(body), mode, uid, gid
        if pax:
            info.pax_headers = dict(pax)
        return self._add(info, body)

    def symlink(self, name: str, target: str) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        return self._add(info)

    def hardlink(self, name: str, target: str) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type, info.linkname = tarfile.LNKTYPE, target
        return self._add(info)

    def device(self, name: str, kind: bytes = tarfile.CHRTYPE) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type, info.devmajor, info.devminor, info.mode = kind, 1, 3, 0o666
        return self._add(info)

    def fifo(self, name: str) -> TarBuilder:
        info = tarfile.TarInfo(name)
        info.type, info.mode = tarfile.FIFOTYPE, 0o644
        return self._add(info)

    def whiteout(self, name: str) -> TarBuilder:
        return self.file(name, b"", 0o600)

    def bytes(self) -> bytes:
        assert self._tar is not None
        self._tar.close()
        return self.raw.getvalue()


@dataclass(frozen=True)
class Layer:
    tar: bytes
    blob: bytes
    media_type: str

    @classmethod
    def gzip(cls, tar: bytes, level: int = 6) -> Layer:
        return cls(tar, gzip.compress(tar, compresslevel=level, mtime=0), LAYER_GZIP)

    @classmethod
    def zstd(cls, tar: bytes) -> Layer:
        blob = subprocess.run(["zstd", "-q", "-c", "-3"], input=tar, capture_output=True,
                              check=True).stdout
        return cls(tar, blob, LAYER_ZSTD)

    @classmethod
    def plain(cls, tar: bytes) -> Layer:
        return cls(tar, tar, LAYER_TAR)

    @property
    def digest(self) -> str:
        return sha256(self.blob)

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)


@dataclass(frozen=True)
class Image:
    layers: tuple[Layer, ...]
    config: dict[str, object]
    architecture: str = "amd64"

    def config_bytes(self) -> bytes:
        return json.dumps({
            "architecture": self.architecture, "os": "linux",
            "config": self.config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]},
        }, sort_keys=True).encode()

    def manifest_bytes(self) -> bytes:
        config = self.config_bytes()
        return json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha256(config), "size": len(config)},
            "layers": [{"mediaType": layer.media_type, "digest": layer.digest,
                        "size": len(layer.blob)} for layer in self.layers],
        }, sort_keys=True).encode()

    def blobs(self) -> dict[str, bytes]:
        out = {layer.digest: layer.blob for layer in self.layers}
        config = self.config_bytes()
        out[sha256(config)] = config
        manifest = self.manifest_bytes()
        out[sha256(manifest)] = manifest
        return out

    @property
    def manifest_digest(self) -> str:
        return sha256(self.manifest_bytes())


def write_oci_archive(dest: Path, images: list[Image], *, index: bool = False) -> Path:
    """An OCI image-layout tar holding one image, or (``index``) an image index of several
    platforms, as the only entry of ``index.json``."""
    blobs: dict[str, bytes] = {}
    for image in images:
        blobs.update(image.blobs())
    if index:
        nested = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": image.manifest_digest,
                           "size": len(image.manifest_bytes()),
                           "platform": {"architecture": image.architecture, "os": "linux"}}
                          for image in images],
        }, sort_keys=True).encode()
        blobs[sha256(nested)] = nested
        top = {"mediaType": OCI_INDEX, "digest": sha256(nested), "size": len(nested)}
    else:
        (image,) = images
        top = {"mediaType": OCI_MANIFEST, "digest": image.manifest_digest,
               "size": len(image.manifest_bytes())}
    layout = json.dumps({"schemaVersion": 2, "manifests": [top]}, sort_keys=True).encode()
    with tarfile.open(dest, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", layout)
        for digest, data in sorted(blobs.items()):
            add(f"blobs/sha256/{digest.removeprefix('sha256:')}", data)
    return dest


_BUSYBOX: Layer | None = None


def busybox_layer() -> Layer:
    global _BUSYBOX
    if _BUSYBOX is None:
        _BUSYBOX = Layer.gzip(busybox_layer_tar())
    return _BUSYBOX


def busybox() -> Image:
    return Image((busybox_layer(),), {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"})


def layered() -> Image:
    adds = (TarBuilder().dir("data").file("data/keep", "kept\n").file("data/gone", "gone\n")
            .dir("opq").file("opq/old1", "old\n").dir("opq/sub").file("opq/sub/old2", "old\n")
            .bytes())
    hides = (TarBuilder().dir("data").whiteout("data/.wh.gone").dir("opq")
             .whiteout("opq/.wh..wh..opq").file("opq/new", "new\n").bytes())
    return Image((busybox_layer(), Layer.zstd(adds), Layer.plain(hides)),
                 {"Env": ["PATH=/bin", "FROM_IMAGE=layered"], "Cmd": ["sh"]})


def multiarch() -> list[Image]:
    out = []
    for arch in ("amd64", "arm64"):
        marker = TarBuilder().file("platform", f"{arch}\n").bytes()
        out.append(Image((busybox_layer(), Layer.gzip(marker)),
                         {"Env": ["PATH=/bin"], "Cmd": ["cat", "/platform"]}, architecture=arch))
    return out


NAMED_USER_PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:app:/home/app:/bin/sh\n"
NAMED_USER_GROUP = "root:x:0:\nappgrp:x:2345:\nextra:x:3456:root,app\n"


def named_user() -> Image:
    files = (TarBuilder().dir("etc").file("etc/passwd", NAMED_USER_PASSWD)
             .file("etc/group", NAMED_USER_GROUP).dir("home")
             .dir("home/app", 0o700, uid=1234, gid=2345).bytes())
    return Image((busybox_layer(), Layer.gzip(files)),
                 {"Env": ["PATH=/bin", "GREETING=from-image"], "User": "app",
                  "Entrypoint": ["id"], "WorkingDir": "/home/app"})


def large(size: int = 64 << 20, seed: int = 11) -> Image:
    data = random.Random(seed).randbytes(size)
    payload = TarBuilder().file("payload.bin", data).bytes()
    return Image((busybox_layer(), Layer.gzip(payload, level=1)),
                 {"Env": ["PATH=/bin"], "Cmd": ["sh"]})
