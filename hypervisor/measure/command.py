"""``coco-shim measure``: the operator command, behind the thin registration in the shim's CLI."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from hypervisor.config import load_profile
from hypervisor.errors import HypervisorError
from hypervisor.initdata import load_initdata_file
from hypervisor.measure import report
from hypervisor.measure.launch import measure
from protocols.initdata import InitdataError


def run_measure(profile_path: Path, *, variables: Mapping[str, str], qemu_root: Path,
                vcpus: int | None, initdata_file: Path | None, as_json: bool,
                rvps_dir: Path | None, out: TextIO, err: TextIO) -> int:
    """Print the measurement (text or JSON), optionally write the RVPS message; 0, or 2 with
    the cause on ``err``."""
    try:
        profile = load_profile(profile_path, variables=variables, qemu_root=qemu_root)
        doc = None
        if initdata_file is not None:
            doc = load_initdata_file(initdata_file)
        elif profile.initdata is not None:
            doc = load_initdata_file(profile.initdata)
        result = measure(profile, vcpus=vcpus, initdata=doc)
        written = None if rvps_dir is None else report.write_rvps(result, rvps_dir)
    except (HypervisorError, InitdataError) as error:
        print(f"coco-shim measure: {error}", file=err)
        return 2
    out.write(report.render_json(result) if as_json else report.render_text(result))
    if written is not None:
        print(f"coco-shim measure: reference values written to {written}", file=err)
    return 0
