"""The drop-in ``coco-shim install`` writes is loaded by the real containerd 2.1.9 and 1.7.24:
``containerd --config <config.toml importing it> config dump`` shows every runtime handler, and
the settings of the main config survive where containerd merges (2.x)."""

from __future__ import annotations

import io
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from shim.cli.install import DROPIN, HANDLERS, PROFILE_DIR, install
from tests.support.containerd import START_TIMEOUT, bin_dir_for

pytestmark = pytest.mark.integration

CASES = [("2.1.9", "2", "io.containerd.cri.v1.runtime"),
         ("1.7.24", "1.7", "io.containerd.grpc.v1.cri")]


def config_dump(containerd_version: str, config: Path) -> dict[str, Any]:
    binary = bin_dir_for(containerd_version) / "containerd"
    if not binary.exists():
        pytest.fail(f"{binary} missing: run `make env` (scripts/setup-env.sh)")
    result = subprocess.run([str(binary), "--config", str(config), "config", "dump"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return tomllib.loads(result.stdout)


@pytest.mark.parametrize(("containerd_version", "version", "plugin"), CASES)
def test_dropin_is_loaded_by_containerd(tmp_path: Path, containerd_version: str, version: str,
                                       plugin: str) -> None:
    prefix = tmp_path / "prefix"
    install(prefix, version, out=io.StringIO())  # type: ignore[arg-type]
    config_version = 3 if version == "2" else 2
    main = tmp_path / "config.toml"
    # A main config the way an operator has one: it imports the drop-in directory.
    main.write_text(f'version = {config_version}\nroot = "{tmp_path / "root"}"\n'
                    f'state = "{tmp_path / "state"}"\n'
                    f'imports = ["{(prefix / DROPIN).parent}/*.toml"]\n'
                    f'[grpc]\n  address = "{tmp_path / "c.sock"}"\n')
    dump = config_dump(containerd_version, main)
    runtimes = dump["plugins"][plugin]["containerd"]["runtimes"]
    for handler in HANDLERS:
        runtime = runtimes[handler.name]
        assert runtime["runtime_type"] == "io.containerd.coco.v2"
        assert runtime["options"]["ConfigPath"] == str(prefix / PROFILE_DIR / handler.profile)
        assert runtime["pod_annotations"] == ["io.katacontainers.*"]
        if version == "2":
            assert runtime["sandboxer"] == "podsandbox"
    # The default handler stays (1.7's CRI plugin refuses to load without it).
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"
    assert cri_plugin_status(containerd_version, main, tmp_path / "c.sock") == "ok"


def cri_plugin_status(containerd_version: str, config: Path, address: Path) -> str:
    """Start containerd with ``config`` and ask it how its CRI plugin loaded."""
    bin_dir = bin_dir_for(containerd_version)
    with subprocess.Popen([str(bin_dir / "containerd"), "--config", str(config)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not address.exists():
                assert proc.poll() is None, f"containerd exited {proc.returncode}"
                assert time.monotonic() < deadline, "containerd did not start"
                time.sleep(0.02)
            listing = subprocess.run([str(bin_dir / "ctr"), "--address", str(address),
                                      "plugins", "ls"], capture_output=True, text=True,
                                     timeout=60, check=True).stdout
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    for line in listing.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "io.containerd.grpc.v1" and fields[1] == "cri":
            return fields[-1]
    raise AssertionError(f"no CRI plugin in:\n{listing}")


def test_containerd2_keeps_the_main_configs_cri_settings(tmp_path: Path) -> None:
    """2.x merges imported tables key by key: the drop-in only adds handlers."""
    prefix = tmp_path / "prefix"
    install(prefix, "2", out=io.StringIO())
    main = tmp_path / "config.toml"
    main.write_text(
        f"version = 3\nroot = '{tmp_path / 'root'}'\nstate = '{tmp_path / 'state'}'\n"
        f"imports = ['{(prefix / DROPIN).parent}/*.toml']\n"
        "[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = 'example/pause:1'\n"
        "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n"
        "  SystemdCgroup = true\n")
    dump = config_dump("2.1.9", main)
    assert dump["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == \
        "example/pause:1"
    runtimes = dump["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
    assert runtimes["runc"]["options"]["SystemdCgroup"] is True
    assert {h.name for h in HANDLERS} <= set(runtimes)
