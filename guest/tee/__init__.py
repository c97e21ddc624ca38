"""TEE access in the reference guest: configfs-tsm reports, SNP reports, TDX quotes.

The one function other guest code needs for initdata is :func:`check_initdata`: given the
platform and the initdata digest it reads the evidence field the host set at launch (SNP
``HOST_DATA``, TDX ``MRCONFIGID``) through configfs-tsm and raises :class:`InitdataMismatch`
unless it equals the digest fitted to that field (truncated or zero-padded at the end, as the
host did). :func:`bound_field` returns the raw field; :func:`fit_digest` the expected bytes.
Platforms without such a field (``sample``: coco-dev) bind nothing: ``bound_field`` returns
None there and ``check_initdata`` passes, as upstream's sample attester does.

Never imports shim; imports no third-party package (the agent imports it before serving).
"""

from __future__ import annotations

import enum

from guest.tee.snp import HOST_DATA_SIZE, SnpReport
from guest.tee.tdx import MRCONFIGID_SIZE, TdxQuote
from guest.tee.tsm import TsmError, TsmReports

__all__ = [
    "InitdataMismatch",
    "Tee",
    "TeeError",
    "bound_field",
    "check_initdata",
    "detect",
    "fit_digest",
]


class Tee(enum.Enum):
    SAMPLE = "sample"  # no TEE (coco-dev): trustee's sample attester
    SNP = "snp"
    TDX = "tdx"


PROVIDERS = {"sev_guest": Tee.SNP, "tdx_guest": Tee.TDX}
FIELD_NAMES = {Tee.SNP: "SNP HOST_DATA", Tee.TDX: "TDX MRCONFIGID"}
FIELD_SIZES = {Tee.SNP: HOST_DATA_SIZE, Tee.TDX: MRCONFIGID_SIZE}


class TeeError(RuntimeError):
    """The TEE could not be reached or answered something unusable."""


class InitdataMismatch(TeeError):
    """The evidence's bound field does not carry the initdata digest."""


def detect(tsm: TsmReports | None = None) -> Tee:
    """The platform this guest runs on: the configfs-tsm provider, else ``sample``."""
    tsm = tsm or TsmReports()
    if not tsm.available():
        return Tee.SAMPLE
    try:
        provider = tsm.provider()
    except TsmError as err:
        raise TeeError(str(err)) from err
    tee = PROVIDERS.get(provider)
    if tee is None:
        raise TeeError(f"unsupported configfs-tsm provider {provider!r}")
    return tee


def report(tee: Tee, report_data: bytes, tsm: TsmReports | None = None) -> bytes:
    """The raw report (SNP) or quote (TDX) binding report_data, through configfs-tsm."""
    if tee is Tee.SAMPLE:
        raise TeeError("the sample platform has no hardware report")
    tsm = tsm or TsmReports()
    try:
        made = tsm.report(report_data)
    except TsmError as err:
        raise TeeError(str(err)) from err
    if PROVIDERS.get(made.provider) is not tee:
        raise TeeError(f"configfs-tsm provider is {made.provider!r}, not one for {tee.value}")
    return made.outblob


def bound_field(tee: Tee, tsm: TsmReports | None = None) -> bytes | None:
    """SNP HOST_DATA (32 bytes) or TDX MRCONFIGID (48 bytes); None on ``sample``."""
    if tee is Tee.SAMPLE:
        return None
    raw = report(tee, b"", tsm)
    try:
        if tee is Tee.SNP:
            return SnpReport.parse(raw).host_data
        return TdxQuote.parse(raw).mrconfigid
    except ValueError as err:
        raise TeeError(f"unusable {tee.value} report: {err}") from err


def fit_digest(tee: Tee, digest: bytes) -> bytes:
    """The digest as the host put it in the field: truncated or zero-padded at the end."""
    size = FIELD_SIZES[tee]
    return digest[:size].ljust(size, b"\0")


def check_initdata(tee: Tee, digest: bytes, tsm: TsmReports | None = None) -> None:
    """Raise InitdataMismatch unless the evidence's bound field equals the fitted digest."""
    actual = bound_field(tee, tsm)
    if actual is None:
        return
    expected = fit_digest(tee, digest)
    if actual != expected:
        raise InitdataMismatch(
            f"initdata digest does not match the evidence: {FIELD_NAMES[tee]} is "
            f"{actual.hex()}, the initdata gives {expected.hex()}"
        )

