"""How a :class:`~hypervisor.measure.launch.Measurement` is shown: text, JSON, RVPS messages.

RVPS (trustee's reference value provider) takes a message ``{"version": "0.1.0", "type":
"sample", "payload": base64(JSON {name: [values]})}`` (``rvps-tool register --path FILE``);
the names are those trustee's default attestation policies read from ``data.reference``:
``snp_launch_measurement``, ``mr_td``, and here ``snp_host_data`` / ``mr_config_id`` /
``init_data`` for the initdata binding.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
from pathlib import Path

from hypervisor.measure.errors import MeasureError
from hypervisor.measure.launch import FileInput, Measurement
from hypervisor.profile import TeeKind

RVPS_MESSAGE_VERSION = "0.1.0"
# Values a KBS compares evidence with; policies and descriptions stay out of the payload.
RVPS_NAMES = ("snp_launch_measurement", "snp_host_data", "mr_td", "mr_config_id", "init_data")


def _file(label: str, item: FileInput | None) -> str:
    if item is None:
        return f"  {label:<16} none"
    where = "" if item.host_path == item.path else f" (read from {item.host_path})"
    return f"  {label:<16} {item.path}{where}\n  {'':<16} sha256 {item.sha256}"


def render_text(m: Measurement) -> str:
    i = m.inputs
    lines = [f"Launch measurement of {i.profile} (tee {i.tee.value}), {i.vcpus} vCPU"
             + ("s" if i.vcpus != 1 else ""), "Inputs (from the QEMU command line the launch "
             "uses)", _file("firmware", i.firmware), _file("kernel", i.kernel),
             _file("initrd", i.initrd),
             f"  {'cmdline':<16} " + ("none (no direct kernel boot)" if i.append is None
                                      else repr(i.append)),
             f"  {'kernel hashes':<16} " + (
                 "n/a (TDVF measures kernel, initrd and command line into RTMRs)"
                 if i.kernel_hashes is None else "on" if i.kernel_hashes else "off"),
             f"  {'vcpus':<16} {i.vcpus}"]
    if i.cpu_model is not None:
        sig = "" if m.cpu_signature is None else f" (signature {m.cpu_signature:#x})"
        lines.append(f"  {'cpu model':<16} {i.cpu_model}{sig}")
    if m.guest_features is not None:
        lines.append(f"  {'guest features':<16} {m.guest_features:#x}")
    if i.initdata is not None:
        lines.append(f"  {'initdata':<16} {i.initdata.algorithm} "
                     f"{i.initdata.digest().hex()}")
    lines.append("Results")
    for v in m.values:
        lines.append(f"  {v.name:<24} {v.value}")
        lines.append(f"  {'':<24} ({v.meaning})")
    for note in m.notes:
        lines.append(f"Note: {note}")
    if m.reference_command is not None:
        lines.append("Reference tool on the same inputs: " + shlex.join(m.reference_command))
    return "\n".join(lines) + "\n"


def render_json(m: Measurement) -> str:
    return json.dumps(m.to_json(), indent=2) + "\n"


def rvps_payload(m: Measurement) -> dict[str, list[str]]:
    return {v.name: [v.value] for v in m.values if v.name in RVPS_NAMES}


def rvps_message(m: Measurement) -> dict[str, str]:
    payload = json.dumps(rvps_payload(m), indent=None, sort_keys=True)
    return {"version": RVPS_MESSAGE_VERSION, "type": "sample",
            "payload": base64.b64encode(payload.encode()).decode()}


def rvps_file_name(m: Measurement) -> str:
    """One file per pod shape: profile, vCPUs, initdata digest (when any)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", Path(m.inputs.profile).stem) or "profile"
    name = f"{stem}-{m.inputs.vcpus}vcpu"
    if m.inputs.initdata is not None:
        name += f"-initdata-{m.inputs.initdata.digest().hex()[:12]}"
    return name + ".json"


def write_rvps(m: Measurement, directory: Path) -> Path:
    """Write the RVPS message for this pod shape; refuse TEEs trustee does not verify."""
    if m.inputs.tee not in (TeeKind.SNP, TeeKind.TDX):
        raise MeasureError(f"no reference values for {m.inputs.tee.value}: trustee verifies "
                           "snp and tdx evidence (nothing reads a SEV/SEV-ES launch digest)")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / rvps_file_name(m)
    path.write_text(json.dumps(rvps_message(m), indent=2) + "\n")
    return path
