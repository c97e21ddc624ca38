"""Initdata (Confidential Containers convention): decode, validate, digest, deliver.

Shared by the host (the shim and ``hypervisor`` bind it to the launch) and the guest (which reads
the disk and checks the digest against the TEE's evidence), so this module uses the standard
library only and imports nothing of ours.

The document is TOML::

    version = "0.1.0"
    algorithm = "sha384"          # sha256 | sha384 | sha512
    [data]
    "aa.toml" = '''...'''          # every value a string
    "policy.rego" = '''...'''

* Pod annotation ``io.katacontainers.config.hypervisor.cc_init_data``: standard base64 of the
  gzip of those TOML bytes (:func:`decode_annotation`).
* Digest: the algorithm over the exact TOML bytes (another encoding of the same data is another
  digest), fitted to the TEE field by truncating or zero-padding at the end
  (:meth:`Initdata.fitted`): SNP ``host_data`` 32 bytes, TDX ``mrconfigid`` 48 bytes.
* Disk (a raw read-only virtio-blk image): ``initdata`` (8 bytes), the gzip length as u64
  little-endian, the gzip bytes, zeros up to a multiple of 512 (:meth:`Initdata.disk_image`,
  :func:`parse_disk_image`).

Sizes are bounded before anything is inflated: a gzip bomb is refused after at most
``MAX_TOML_BYTES + 1`` bytes of output.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hashlib
import struct
import tomllib
import types
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

VERSION = "0.1.0"
ALGORITHMS = ("sha256", "sha384", "sha512")
ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"

# Kubernetes caps all annotations of an object at 256 KiB together: no gzip can be larger.
MAX_GZIP_BYTES = 256 * 1024
MAX_TOML_BYTES = 1024 * 1024
MAX_ANNOTATION_CHARS = 4 * ((MAX_GZIP_BYTES + 2) // 3)

DISK_MAGIC = b"initdata"
DISK_HEADER = struct.Struct("<8sQ")
DISK_SECTOR = 512

# TEE evidence fields the digest is fitted to.
SNP_HOST_DATA_BYTES = 32
TDX_MRCONFIGID_BYTES = 48
CCA_PERSONALIZATION_BYTES = 64


class InitdataError(ValueError):
    """Initdata refused; ``problem`` says why in words an operator can act on."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(f"initdata: {problem}")


class InitdataEncodingError(InitdataError):
    """Not standard base64, not a gzip stream, or not UTF-8 text."""


class InitdataSizeError(InitdataError):
    """Larger than the bounds, compressed or decompressed."""


class InitdataTomlError(InitdataError):
    """The decompressed bytes are not a TOML document."""


class InitdataVersionError(InitdataError):
    """``version`` missing or not ``0.1.0``."""


class InitdataAlgorithmError(InitdataError):
    """``algorithm`` missing or not sha256/sha384/sha512."""


class InitdataDataError(InitdataError):
    """``[data]`` missing, not a table, or holding something other than strings."""


class InitdataDiskError(InitdataError):
    """A disk image without the magic, or whose length field does not fit the image."""


def fit_digest(digest: bytes, length: int) -> bytes:
    """Truncate at the end, or zero-pad at the end, to ``length`` bytes."""
    if length <= 0:
        raise ValueError(f"field length must be positive, got {length}")
    return digest[:length].ljust(length, b"\0")


@dataclass(frozen=True, eq=False)
class Initdata:
    """A validated initdata document: the exact TOML bytes and the gzip they travel in."""

    toml: bytes
    gzip: bytes
    version: str
    algorithm: str
    data: Mapping[str, str]

    def digest(self) -> bytes:
        """The algorithm over the exact TOML bytes (32, 48 or 64 bytes)."""
        return hashlib.new(self.algorithm, self.toml).digest()

    def fitted(self, length: int) -> bytes:
        """The digest fitted to a TEE field of ``length`` bytes."""
        return fit_digest(self.digest(), length)

    def disk_image(self) -> bytes:
        """The raw disk the guest reads: magic, u64 LE gzip length, gzip, zeros to 512."""
        body = DISK_HEADER.pack(DISK_MAGIC, len(self.gzip)) + self.gzip
        return body + bytes(-len(body) % DISK_SECTOR)


def decode_annotation(value: str) -> Initdata:
    """The annotation value: standard base64 of gzip of the TOML document."""
    text = value.strip()
    if not text:
        raise InitdataEncodingError("annotation value is empty")
    if len(text) > MAX_ANNOTATION_CHARS:
        raise InitdataSizeError(f"annotation value is {len(text)} characters, more than the "
                                f"{MAX_ANNOTATION_CHARS} a {MAX_GZIP_BYTES}-byte gzip needs")
    try:
        compressed = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InitdataEncodingError(f"annotation value is not standard base64: {err}") from err
    return from_gzip(compressed)


def from_gzip(compressed: bytes) -> Initdata:
    """A gzip stream of the TOML document (bounded on both sides)."""
    if len(compressed) > MAX_GZIP_BYTES:
        raise InitdataSizeError(f"gzip stream is {len(compressed)} bytes, more than "
                                f"{MAX_GZIP_BYTES}")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip framing only
    try:
        toml = inflater.decompress(compressed, MAX_TOML_BYTES + 1)
    except zlib.error as err:
        raise InitdataEncodingError(f"not a valid gzip stream: {err}") from err
    if len(toml) > MAX_TOML_BYTES or inflater.unconsumed_tail:
        raise InitdataSizeError(f"decompressed document exceeds {MAX_TOML_BYTES} bytes "
                                "(refused without inflating the rest)")
    if not inflater.eof:
        raise InitdataEncodingError("gzip stream is truncated")
    if inflater.unused_data:
        raise InitdataEncodingError(f"{len(inflater.unused_data)} bytes follow the gzip stream")
    return _parse(toml, compressed)


def from_toml(toml: bytes) -> Initdata:
    """A TOML document given as bytes (an operator's file); gzipped reproducibly (mtime 0)."""
    if len(toml) > MAX_TOML_BYTES:
        raise InitdataSizeError(f"document is {len(toml)} bytes, more than {MAX_TOML_BYTES}")
    compressed = gzip.compress(toml, compresslevel=9, mtime=0)
    if len(compressed) > MAX_GZIP_BYTES:
        raise InitdataSizeError(f"gzip of the document is {len(compressed)} bytes, more than "
                                f"{MAX_GZIP_BYTES}")
    return _parse(toml, compressed)


def parse_disk_image(image: bytes) -> Initdata:
    """The guest side: a disk image (or its leading bytes) back to a validated document."""
    if len(image) < DISK_HEADER.size:
        raise InitdataDiskError(f"image is {len(image)} bytes, shorter than its "
                                f"{DISK_HEADER.size}-byte header")
    magic, length = DISK_HEADER.unpack_from(image)
    if magic != DISK_MAGIC:
        raise InitdataDiskError(f"no initdata magic (first bytes {magic!r})")
    if length > MAX_GZIP_BYTES:
        raise InitdataSizeError(f"disk says the gzip is {length} bytes, more than "
                                f"{MAX_GZIP_BYTES}")
    end = DISK_HEADER.size + length
    if end > len(image):
        raise InitdataDiskError(f"disk says the gzip is {length} bytes but only "
                                f"{len(image) - DISK_HEADER.size} follow the header")
    return from_gzip(image[DISK_HEADER.size:end])


def _parse(toml: bytes, compressed: bytes) -> Initdata:
    try:
        text = toml.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InitdataEncodingError(f"document is not UTF-8 text: {err}") from err
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InitdataTomlError(f"document is not valid TOML: {err}") from err
    version = doc.get("version")
    if version != VERSION:
        shown = "missing" if version is None else f"{version!r}"
        raise InitdataVersionError(f"version must be {VERSION!r}, got {shown}")
    algorithm = doc.get("algorithm")
    if algorithm not in ALGORITHMS:
        shown = "missing" if algorithm is None else f"{algorithm!r}"
        raise InitdataAlgorithmError(f"algorithm must be one of {', '.join(ALGORITHMS)}, "
                                     f"got {shown}")
    data = doc.get("data")
    if data is None:
        raise InitdataDataError("[data] table is missing")
    if not isinstance(data, dict):
        raise InitdataDataError(f"data must be a table, got {type(data).__name__}")
    for key, item in data.items():
        if not isinstance(item, str):
            raise InitdataDataError(f"data.{key!r} must be a string, got "
                                    f"{type(item).__name__}")
    return Initdata(toml=toml, gzip=compressed, version=version, algorithm=str(algorithm),
                    data=types.MappingProxyType(dict(data)))


__all__ = [
    "ALGORITHMS",
    "ANNOTATION",
    "SNP_HOST_DATA_BYTES",
    "TDX_MRCONFIGID_BYTES",
    "Initdata",
    "InitdataAlgorithmError",
    "InitdataDataError",
    "InitdataDiskError",
    "InitdataEncodingError",
    "InitdataError",
    "InitdataSizeError",
    "InitdataTomlError",
    "InitdataVersionError",
    "decode_annotation",
    "fit_digest",
    "from_gzip",
    "from_toml",
    "parse_disk_image",
]
