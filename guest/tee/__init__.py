"""TEE access in the reference guest: configfs-tsm reports, SNP reports, TDX quotes.

What other guest code needs for initdata is :func:`bound_field`: the evidence field the host
set at launch (SNP ``HOST_DATA``, TDX ``MRCONFIGID``), read through configfs-tsm. The agent
compares it with the initdata digest fitted to the field's size (``guest.agent.initdata.verify``
with ``protocols.initdata.fit_digest``, the one fitting rule host and guest share). Platforms
without such a field (``sample``: coco-dev) bind nothing: ``bound_field`` returns None there, as
upstream's sample attester does.

Never imports shim; imports no third-party package (the agent imports it before serving).
"""

from __future__ import annotations

import enum

from guest.tee.tsm import TsmError, TsmReports

__all__ = ["Tee", "TeeError", "bound_field", "detect"]


class Tee(enum.Enum):
    SAMPLE = "sample"  # no TEE (coco-dev): trustee's sample attester
    SNP = "snp"
    TDX = "tdx"


PROVIDERS = {"sev_guest": Tee.SNP, "tdx_guest": Tee.TDX}


class TeeError(RuntimeError):
    """The TEE could not be reached or answered something unusable."""


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
    # the parsers load here, with the first report: the agent detects the TEE before it
    # listens, and a guest without one never needs them
    from guest.tee.snp import SnpReport
    from guest.tee.tdx import TdxQuote

    try:
        if tee is Tee.SNP:
            return SnpReport.parse(raw).host_data
        return TdxQuote.parse(raw).mrconfigid
    except ValueError as err:
        raise TeeError(f"unusable {tee.value} report: {err}") from err

