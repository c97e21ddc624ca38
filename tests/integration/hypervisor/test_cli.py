"""`coco-shim check` and `coco-shim vm` as an operator runs them (real processes, this host)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypervisor.config import load_profile
from hypervisor.profile import HybridVsock, VmInstance, build_command_line
from tests import envinfo

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[3] / "firmware-configs"
REPO = Path(__file__).resolve().parents[3]


def coco_shim(*args: str, env_extra: dict[str, str] | None = None,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "shim.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def test_check_reports_tcg_only_no_tee_hybrid_vsock() -> None:
    vdv = str(envinfo.load().vhost_device_vsock)
    result = coco_shim("check", env_extra={"COCO_VHOST_DEVICE_VSOCK": vdv})
    print(result.stdout)
    assert result.returncode == 0, result.stderr
    assert "Summary: TCG only, no TEE, hybrid vsock\n" in result.stdout
    assert "failed to set MSR" in result.stdout  # KVM judged by a real boot probe
    as_json = coco_shim("check", "--json", env_extra={"COCO_VHOST_DEVICE_VSOCK": vdv})
    doc = json.loads(as_json.stdout)
    assert doc["summary"] == "TCG only, no TEE, hybrid vsock"
    assert doc["kvm_usable"]["ok"] is False
    assert doc["verdict"] == {"ok": True, "accel": "tcg", "vsock": "hybrid", "problems": []}
    assert doc["qemu"]["tee_types"]["sev-snp-guest"] is None


def test_check_snp_profile_cannot_run_here(tmp_path: Path) -> None:
    root = envinfo.load().qemu_sid_root
    guest = Path("/tmp") / f"coco-cli-{os.getpid()}"
    (root / guest.relative_to("/")).mkdir()
    try:
        for f in ("vmlinuz-confidential", "initrd-confidential.img"):
            (root / guest.relative_to("/") / f).touch()
        result = coco_shim("check", "--profile", str(CONFIGS / "qemu-snp.toml"),
                           "--qemu-root", str(root), "--var", f"guest_image_dir={guest}")
    finally:
        for leftover in (root / guest.relative_to("/")).iterdir():
            leftover.unlink()
        (root / guest.relative_to("/")).rmdir()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "QEMU /usr/bin/qemu-system-x86_64 (version 11.1" in result.stdout
    assert "host lacks snp" in result.stdout


def test_check_bad_profile_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[hypervisor]\ntee = "none"\nqemu_path = "/usr/bin/qemu-system-x86_64"\n'
                   "vcpus = \"two\"\n")
    result = coco_shim("check", "--profile", str(bad))
    assert result.returncode == 2
    assert f"{bad}: hypervisor.vcpus: must be of type int, got str (value 'two')" in result.stderr


def _none_guest(tmp_path: Path) -> Path:
    guest = tmp_path / "guest"
    guest.mkdir()
    (guest / "vmlinuz").touch()
    (guest / "initrd.img").touch()
    return guest


def test_vm_print_cmdline_is_the_profile_argv(tmp_path: Path) -> None:
    guest = _none_guest(tmp_path)
    result = coco_shim("vm", "--profile", str(CONFIGS / "qemu-none.toml"), "--var",
                       f"guest_image_dir={guest}", "--accel", "tcg", "--print-cmdline",
                       "--run-root", "/run/x", "--name", "dbg")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    profile = load_profile(CONFIGS / "qemu-none.toml", variables={"guest_image_dir": str(guest)})
    run_dir = Path("/run/x/dbg-XXXXXX")
    expected = build_command_line(profile, VmInstance(
        run_dir=run_dir, name="dbg", accel="tcg",
        vsock=HybridVsock(run_dir / "vhu.sock"))).to_argv()
    assert lines == expected
    assert lines[lines.index("-append") + 1] == (
        "console=ttyS0 quiet panic=1 tsc=reliable nowatchdog sysctl.vm.compaction_proactiveness=0")


def test_vm_print_cmdline_only_imports_hypervisor_and_stdlib(tmp_path: Path) -> None:
    guest = _none_guest(tmp_path)
    code = (
        "import sys, shim.cli.main\n"
        f"shim.cli.main.main(['vm', '--profile', {str(CONFIGS / 'qemu-none.toml')!r}, '--var', "
        f"'guest_image_dir={guest}', '--print-cmdline'])\n"
        # protocols.initdata is standard library only (the profile may name an initdata file)
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('grpc', 'google', 'pyroute2') or m.startswith('protocols.') "
        "and m != 'protocols.initdata' or m.startswith('shim.') "
        "and m not in ('shim.cli', 'shim.cli.main'))\n"
        "print('IMPORTED', bad, file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=30)
    assert "IMPORTED []" in result.stderr, result.stderr


def test_vm_boots_and_stops_cleanly_on_ctrl_c(tmp_path: Path, initrd_plain: Path) -> None:
    env = envinfo.load()
    profile = tmp_path / "dev.toml"
    profile.write_text(
        (CONFIGS / "qemu-none.toml").read_text()
        .replace('kernel = "{guest_image_dir}/vmlinuz"', f'kernel = "{env.kernel}"')
        .replace('initrd = "{guest_image_dir}/initrd.img"', f'initrd = "{initrd_plain}"')
        .replace("memory_mib = 512", "memory_mib = 256"))
    run_root, logs = tmp_path / "run", tmp_path / "logs"
    proc = subprocess.Popen(
        [sys.executable, "-m", "shim.cli", "vm", "--profile", str(profile), "--accel", "tcg",
         "--run-root", str(run_root), "--log-dir", str(logs), "--powerdown-timeout", "0.5",
         "--vhost-device-vsock", str(env.vhost_device_vsock)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("VM running: pid "), line
        qemu_pid = int(line.split()[3].rstrip(","))
        deadline = time.monotonic() + 30
        while "COCO-GUEST-READY" not in _read(logs / "console.log"):
            assert time.monotonic() < deadline, "guest did not boot"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=20) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "VM exited: shutdown: host-qmp-quit" in rest
    assert not Path(f"/proc/{qemu_pid}").exists()
    assert list(run_root.iterdir()) == []


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
