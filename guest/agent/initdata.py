"""Initdata in the guest: find the disk the host attached, check it, bind it to the TEE's evidence
and hand its files to the guest components, all before the agent serves anything.

The format (disk layout, bounds, TOML validation, digest, fitting) is :mod:`protocols.initdata`,
shared with the host that wrote the disk; this module finds the disk, reads it (at most the
header and the largest gzip the format allows), and decides whether the guest may start.

Binding: the digest, fitted to the TEE's field (SNP ``HOSTDATA``, 32 bytes; TDX ``MRCONFIGID``,
48 bytes), must equal that field, which the host set at launch and the hardware reports in the
attestation evidence. A mismatch, or a non-zero field with no initdata disk at all (the host
withheld it), is a refusal: the agent does not serve, the VM powers off (see
:mod:`guest.agent.__main__` for how the host learns why).

Then ``aa.toml``, ``cdh.toml``, ``policy.rego`` (those present) and the whole ``initdata.toml``
are written under :data:`OUTPUT_DIR`, and the policy becomes the agent policy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from protocols import initdata as format_

log = logging.getLogger(__name__)

# protocols.initdata's DISK_MAGIC (a test keeps them equal): the format module (TOML, gzip,
# hashes) is imported only once a disk is found, off the boot path of a guest without one.
MAGIC = b"initdata"
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


class Initdata(NamedTuple):
    """A validated initdata document and the device it came from."""

    document: format_.Initdata
    source: str = ""

    @property
    def toml(self) -> bytes:
        return self.document.toml

    @property
    def algorithm(self) -> str:
        return self.document.algorithm

    @property
    def data(self) -> dict[str, str]:
        return dict(self.document.data)

    @property
    def digest(self) -> bytes:
        return self.document.digest()

    @property
    def policy(self) -> str | None:
        return self.document.data.get("policy.rego")


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


def read_disk(path: Path) -> Initdata:
    """The validated document on an initdata disk (reads at most header + largest gzip)."""
    from protocols import initdata as format_

    try:
        with path.open("rb") as disk:
            image = disk.read(format_.DISK_HEADER.size + format_.MAX_GZIP_BYTES)
    except OSError as err:
        raise InitdataError(f"initdata on {path}: {err.strerror or err}") from err
    try:
        return Initdata(format_.parse_disk_image(image), str(path))
    except format_.InitdataError as err:
        raise InitdataError(f"initdata on {path}: {err.problem}") from err


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
    from protocols import initdata as format_

    expected = format_.fit_digest(initdata.digest, len(field_value))
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
    initdata = read_disk(device) if device is not None else None
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
    "load",
    "read_disk",
    "verify",
    "write_out",
]
