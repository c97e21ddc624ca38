"""Initdata in the guest: find the disk the host attached, check it, bind it to the TEE's evidence
and hand its files to the guest components, all before the agent serves anything.

The disk (Confidential Containers layout, written by the host): bytes 0-7 ``initdata``, bytes
8-15 the little-endian u64 length of a gzip stream, the stream, zeros up to a multiple of 512.
The stream holds a TOML document: ``version = "0.1.0"``, ``algorithm`` one of sha256 / sha384 /
sha512, and a ``[data]`` table of strings (``aa.toml``, ``cdh.toml``, ``policy.rego``, …).

Binding: the digest is the algorithm over the exact TOML bytes, cut or zero-padded at the end to
the TEE's field (SNP ``HOSTDATA``, 32 bytes; TDX ``MRCONFIGID``, 48 bytes), which the host set
at launch and which the hardware reports in the attestation evidence. A mismatch, or a non-zero
field with no initdata disk at all (the host withheld it), is a refusal: the agent does not
serve, the VM powers off (see :mod:`guest.agent.__main__` for how the host learns why).

Then ``aa.toml``, ``cdh.toml``, ``policy.rego`` (those present) and the whole ``initdata.toml``
are written under :data:`OUTPUT_DIR`, and the policy becomes the agent policy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tomllib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

MAGIC = b"initdata"
HEADER = struct.Struct("<8sQ")  # magic, length of the gzip stream
MAX_GZIP = 4 << 20  # bytes of gzip stream read from the disk
MAX_TOML = 16 << 20  # bytes it may decompress to (a gzip bomb stops here)
VERSION = "0.1.0"
ALGORITHMS: dict[str, Callable[[bytes], hashlib._Hash]] = {
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}
WELL_KNOWN = ("aa.toml", "cdh.toml", "policy.rego")
OUTPUT_DIR = Path("/run/confidential-containers/initdata")
DISK_PREFIXES = ("vd", "sd")  # virtio-blk, virtio-scsi


class InitdataError(Exception):
    """Initdata the guest must not start with; the message says why."""


class EvidenceSource(Protocol):
    """What the TEE reports about this guest (the attestation package provides the real one)."""

    @property
    def platform(self) -> str | None:
        """``snp``, ``tdx``, …; None when the guest runs on no TEE."""

    def init_data_field(self) -> bytes | None:
        """The evidence field initdata is bound to (SNP HOSTDATA, TDX MRCONFIGID); None on no
        TEE or on a TEE without such a field (SEV, SEV-ES, s390x SE, PEF)."""


class NoTee:
    """No TEE: nothing to bind initdata to (development and coco-dev guests)."""

    platform = None

    def init_data_field(self) -> bytes | None:
        return None


@dataclass(frozen=True)
class Initdata:
    toml: bytes  # the exact document: the digest is over these bytes
    algorithm: str
    data: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the device it came from

    @property
    def digest(self) -> bytes:
        return ALGORITHMS[self.algorithm](self.toml).digest()

    @property
    def policy(self) -> str | None:
        return self.data.get("policy.rego")


def fit(digest: bytes, size: int) -> bytes:
    """The digest as the TEE field holds it: cut, or zero-padded, at the end."""
    return digest[:size].ljust(size, b"\0")


def find_disk(sys_block: Path = Path("/sys/class/block"), dev: Path = Path("/dev")) -> Path | None:
    """The vd*/sd* block device that starts with the initdata magic; two are a refusal."""
    try:
        names = sorted(os.listdir(sys_block))
    except FileNotFoundError:
        return None
    found = []
    for name in names:
        if not name.startswith(DISK_PREFIXES):
            continue
        path = dev / name
        try:
            with path.open("rb") as disk:
                if disk.read(len(MAGIC)) == MAGIC:
                    found.append(path)
        except OSError as err:
            log.debug("initdata scan: %s unreadable: %s", path, err)
    if len(found) > 1:
        raise InitdataError(f"more than one initdata disk: {', '.join(map(str, found))}")
    if found:
        log.info("initdata disk: %s", found[0])
    return found[0] if found else None


def read_disk(path: Path) -> bytes:
    """The TOML document on an initdata disk (bounded: no gzip bomb gets through)."""
    try:
        with path.open("rb") as disk:
            header = disk.read(HEADER.size)
            if len(header) < HEADER.size:
                raise InitdataError(f"{path}: {len(header)} bytes, shorter than the header")
            magic, length = HEADER.unpack(header)
            if magic != MAGIC:
                raise InitdataError(f"{path}: no initdata magic")
            if not 0 < length <= MAX_GZIP:
                raise InitdataError(
                    f"{path}: gzip length {length} outside 1..{MAX_GZIP} bytes"
                )
            stream = disk.read(length)
    except OSError as err:
        raise InitdataError(f"{path}: {err.strerror or err}") from err
    if len(stream) < length:
        raise InitdataError(f"{path}: gzip stream truncated ({len(stream)} of {length} bytes)")
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        document = inflater.decompress(stream, MAX_TOML + 1)
    except zlib.error as err:
        raise InitdataError(f"{path}: not a gzip stream: {err}") from err
    if len(document) > MAX_TOML or inflater.unconsumed_tail:
        raise InitdataError(f"{path}: initdata decompresses beyond {MAX_TOML} bytes")
    if not inflater.eof:
        raise InitdataError(f"{path}: gzip stream truncated")
    if inflater.unused_data.strip(b"\0"):
        raise InitdataError(f"{path}: data after the gzip stream")
    return document


def parse(document: bytes, source: str = "") -> Initdata:
    """Validate the TOML document (version, algorithm, a table of strings)."""
    try:
        doc = tomllib.loads(document.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise InitdataError(f"initdata is not a TOML document: {err}") from err
    version = doc.get("version")
    if version != VERSION:
        raise InitdataError(f"initdata version {version!r} is not supported (only {VERSION!r})")
    algorithm = doc.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise InitdataError(
            f"initdata algorithm {algorithm!r} is not one of {', '.join(ALGORITHMS)}"
        )
    data = doc.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise InitdataError("initdata [data] must be a table of strings")
    return Initdata(toml=document, algorithm=algorithm, data=dict(data), source=source)


def verify(initdata: Initdata | None, evidence: EvidenceSource) -> None:
    """Refuse initdata that does not match what the TEE reports (or a withheld disk)."""
    field_value = evidence.init_data_field()
    if field_value is None:
        return
    what = {"snp": "HOSTDATA", "tdx": "MRCONFIGID"}.get(evidence.platform or "", "init-data")
    if initdata is None:
        if any(field_value):
            raise InitdataError(
                f"the TEE's {what} is {field_value.hex()} but no initdata disk was found: "
                "the host withheld the initdata it launched the guest with"
            )
        return
    expected = fit(initdata.digest, len(field_value))
    if expected != field_value:
        raise InitdataError(
            f"initdata digest mismatch: {initdata.algorithm} of the initdata on "
            f"{initdata.source or 'the disk'} gives {expected.hex()}, the TEE's {what} "
            f"(set at launch) is {field_value.hex()}"
        )


def write_out(initdata: Initdata, directory: Path = OUTPUT_DIR) -> list[Path]:
    """``aa.toml``, ``cdh.toml``, ``policy.rego`` (those present) and ``initdata.toml``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    written = []
    files = [(k, initdata.data[k].encode()) for k in WELL_KNOWN if k in initdata.data]
    for name, content in [*files, ("initdata.toml", initdata.toml)]:
        path = directory / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        written.append(path)
    return written


def load(device: Path | None, evidence: EvidenceSource) -> Initdata | None:
    """Read and check the initdata on ``device`` (None: there is none) against ``evidence``.
    Raises InitdataError when the guest must not start; :func:`write_out` follows once the
    agent has accepted it all (its policy compiles)."""
    initdata = parse(read_disk(device), str(device)) if device is not None else None
    verify(initdata, evidence)
    if initdata is not None:
        log.info(
            "initdata from %s: %s %s, files: %s",
            initdata.source,
            initdata.algorithm,
            initdata.digest.hex(),
            ", ".join(sorted(initdata.data)),
        )
    return initdata


__all__ = [
    "MAGIC",
    "OUTPUT_DIR",
    "EvidenceSource",
    "Initdata",
    "InitdataError",
    "NoTee",
    "find_disk",
    "fit",
    "load",
    "parse",
    "read_disk",
    "verify",
    "write_out",
]
