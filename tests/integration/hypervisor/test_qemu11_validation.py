"""Every shipped profile against real QEMU 11.1 (Debian sid root, run through chroot).

* The generated command line passes QEMU's own option parsing and stops only at the hardware
  step (no SEV/SNP/TDX-capable KVM here; the ppc64 build has no KVM at all).
* Every property we emit exists in ``qom-list-properties`` for its type.
* s390x is checked structurally: that build has no ``s390-pv-guest`` type on x86.
* A wrong value is refused by our code before QEMU runs.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.config import load_profile, parse_profile
from hypervisor.errors import InvariantError, ProbeError
from hypervisor.initdata import write_disk
from hypervisor.profile import KernelVsock, RuntimeProfile, VmInstance, build_command_line
from hypervisor.vm import LaunchOptions, launch_vm
from protocols import initdata
from tests import envinfo
from tests.integration.hypervisor.sidqemu import (
    guest_dir,
    mounts_under,
    option_groups,
    qmp_none_machine,
    run_in_root,
)

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[3] / "firmware-configs"

# What QEMU 11.1 prints here when it reaches the hardware step, per profile.
HARDWARE_STEP = {
    "qemu-snp": r"vm-type SEV-SNP not supported by KVM|sev-snp-guest: KVM required",
    "qemu-tdx": r"vm-type TDX not supported by KVM|tdx-guest: KVM required",
    "qemu-sev": r"SEV: host kernel does not support requested KVM_X86_SEV_VM VM type"
                r"|Failed to open /dev/sev",
    "qemu-sev-es": r"SEV: host kernel does not support requested KVM_X86_SEV_ES_VM VM type"
                   r"|Failed to open /dev/sev",
    "qemu-pef": r"PEF requires KVM",
}
# Anything that means our command line was wrong rather than the host lacking hardware.
PARSE_ERRORS = re.compile(r"Invalid parameter|Property '.*' not found|is missing|"
                          r"invalid object type|Parameter '.*' expects|unknown|deprecated|"
                          r"could not|not a valid", re.IGNORECASE)


@pytest.fixture(scope="module")
def root() -> Path:
    return envinfo.load().qemu_sid_root


def load(name: str, root: Path, guest: Path) -> RuntimeProfile:
    return load_profile(CONFIGS / f"{name}.toml", variables={"guest_image_dir": str(guest)},
                        qemu_root=root)


def argv_for(profile: RuntimeProfile, vhost_fd: int, guest: Path) -> list[str]:
    vm = VmInstance(run_dir=guest / "run", vsock=KernelVsock(3, vhost_fd))
    return build_command_line(profile, vm).to_argv()


@pytest.mark.parametrize("name", sorted(HARDWARE_STEP))
def test_profile_passes_option_parsing_and_stops_at_hardware(name: str, root: Path) -> None:
    fd = os.open("/dev/null", os.O_RDWR)  # stands in for the /dev/vhost-vsock fd
    try:
        with guest_dir(root) as guest:
            argv = argv_for(load(name, root, guest), fd, guest)
            if name == "qemu-pef":
                # The ppc64 build on x86 has no KVM accelerator at all; TCG reaches the
                # PEF check instead (same option parsing).
                argv[argv.index("-accel") + 1] = "tcg"
            result = run_in_root(root, argv, pass_fds=[fd])
    finally:
        os.close(fd)
    print(f"{name}: exit {result.returncode}: {result.stderr.strip()}")
    assert result.returncode == 1
    assert re.search(HARDWARE_STEP[name], result.stderr), result.stderr
    assert not PARSE_ERRORS.search(result.stderr), result.stderr
    assert mounts_under(root) == []


async def _check_properties(root: Path, binary: str,
                            groups: list[tuple[str, str, set[str]]]) -> list[str]:
    problems = []
    async with qmp_none_machine(root, binary) as qmp:
        machines = {m["name"]: m for m in await qmp.execute("query-machines")}
        aliases = {m["alias"]: n for n, m in machines.items() if "alias" in m}
        for opt, qom_type, keys in groups:
            typename = qom_type
            if opt == "-machine":
                typename = f"{aliases.get(qom_type, qom_type)}-machine"
            elif opt == "-accel":
                if not keys:
                    continue  # ppc64/s390x builds on x86 have no kvm-accel type at all
                typename = f"{qom_type}-accel"
            props = {p["name"] for p in
                     await qmp.execute("qom-list-properties", {"typename": typename})}
            missing = keys - props
            if missing:
                problems.append(f"{opt} {typename}: no property {sorted(missing)}")
    return problems


@pytest.mark.parametrize("name", ["qemu-snp", "qemu-tdx", "qemu-sev", "qemu-sev-es",
                                  "qemu-pef", "qemu-none"])
async def test_every_emitted_property_exists(name: str, root: Path) -> None:
    with guest_dir(root) as guest:
        profile = load(name, root, guest)
        vm = VmInstance(run_dir=Path("/tmp/coco-run"), accel="tcg" if name == "qemu-none" else None,
                        vsock=KernelVsock(3, 9))
        argv = build_command_line(profile, vm).to_argv()
    binary = Path(argv[0]).name
    groups = option_groups(argv)
    assert {g[0] for g in groups} == {"-machine", "-accel", "-object", "-device"} - (
        {"-object"} if name == "qemu-none" else set())
    assert await _check_properties(root, binary, groups) == []


async def test_s390_pv_profile_structurally(root: Path) -> None:
    with guest_dir(root) as guest:
        profile = load("qemu-se", root, guest)
        argv = argv_for(profile, 9, guest)
    groups = option_groups(argv)
    assert ("-object", "s390-pv-guest", set()) in groups
    assert argv[argv.index("-cpu") + 1] == "host"
    virtio = [g for g in groups if g[0] == "-device" and g[1].endswith("-ccw")]
    assert virtio and all("iommu_platform" in keys for _, _, keys in virtio)
    async with qmp_none_machine(root, "qemu-system-s390x") as qmp:
        types = {t["name"] for t in await qmp.execute("qom-list-types")}
        # Only built where s390x KVM exists: absent here, as documented.
        assert "s390-pv-guest" not in types
    rest = [g for g in groups if g[1] != "s390-pv-guest"]
    assert await _check_properties(root, "qemu-system-s390x", rest) == []


INITDATA = b'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"aa.toml" = "x"\n'


@pytest.mark.parametrize(("name", "field"), [("qemu-snp", "host-data"),
                                             ("qemu-tdx", "mrconfigid")])
async def test_initdata_binding_passes_qemu_11(name: str, field: str, root: Path) -> None:
    """host-data (SNP, 32 bytes) / mrconfigid (TDX, 48 bytes) from initdata, plus the read-only
    initdata disk: QEMU 11.1 parses them, knows every property, stops only at the hardware."""
    doc = initdata.from_toml(INITDATA)
    fd = os.open("/dev/null", os.O_RDWR)
    try:
        with guest_dir(root) as guest:
            vm = VmInstance(run_dir=guest / "run", vsock=KernelVsock(3, fd), initdata=doc)
            argv = build_command_line(load(name, root, guest), vm).to_argv()
            write_disk(root / vm.initdata_disk.relative_to("/"), doc)
            result = run_in_root(root, argv, pass_fds=[fd])
    finally:
        os.close(fd)
    bound = base64.b64encode(doc.fitted(32 if field == "host-data" else 48)).decode()
    obj = argv[argv.index("-object") + 1]
    assert (f"{field}={bound}" in obj) if field == "host-data" else (
        f'"{field}":"{bound}"' in obj)
    assert "id=drive-initdata" in " ".join(argv)
    print(f"{name}: exit {result.returncode}: {result.stderr.strip()}")
    assert result.returncode == 1
    assert re.search(HARDWARE_STEP[name], result.stderr), result.stderr
    assert not PARSE_ERRORS.search(result.stderr), result.stderr
    assert await _check_properties(root, "qemu-system-x86_64", option_groups(argv)) == []


HOST_DATA_31 = '[snp]\nhost_data = "' + base64.b64encode(bytes(31)).decode() + '"\n'


def test_wrong_value_refused_before_qemu_runs(root: Path, tmp_path: Path) -> None:
    text = (CONFIGS / "qemu-snp.toml").read_text().replace("[snp]\n", HOST_DATA_31)
    with guest_dir(root) as guest:
        profile = parse_profile(text, "qemu-snp-bad.toml",
                                variables={"guest_image_dir": str(guest)}, qemu_root=root)
        with pytest.raises(InvariantError, match="host_data must be exactly 32 bytes, got 31"):
            argv_for(profile, 9, guest)


async def test_launch_refuses_wrong_value_without_spawning(root: Path, tmp_path: Path) -> None:
    # vsock stays "kernel": the refusal comes before any CID is allocated.
    text = (CONFIGS / "qemu-snp.toml").read_text().replace("[snp]\n", HOST_DATA_31)
    with guest_dir(root) as guest:
        profile = parse_profile(text, "qemu-snp-bad.toml",
                                variables={"guest_image_dir": str(guest)}, qemu_root=root)
        with pytest.raises(InvariantError, match="host_data"):
            await launch_vm(profile, LaunchOptions(run_root=tmp_path / "run",
                                                   argv_prefix=("chroot", str(root))))
    assert not (tmp_path / "run").exists()  # refused before anything was created


async def test_missing_sev_geometry_is_probed_and_failure_named(root: Path,
                                                                tmp_path: Path) -> None:
    # The geometry probe runs before vsock is set up, so "kernel" needs no /dev/vhost-vsock.
    text = (CONFIGS / "qemu-snp.toml").read_text().replace("cbitpos = 51\n", "").replace(
        "reduced_phys_bits = 1\n", "")
    with guest_dir(root) as guest:
        profile = parse_profile(text, "qemu-snp-probe.toml",
                                variables={"guest_image_dir": str(guest)}, qemu_root=root)
        with pytest.raises(ProbeError, match=r"query-sev-capabilities: .*KVM"):
            await launch_vm(profile, LaunchOptions(run_root=tmp_path / "run",
                                                   argv_prefix=("chroot", str(root))))
    assert not (tmp_path / "run").exists()


async def test_none_profile_boots_on_qemu_11(root: Path, initrd_plain: Path) -> None:
    """The development profile is not only parsed but booted by QEMU 11.1 (TCG)."""
    import shutil

    from hypervisor.caplog import CappedLog
    from hypervisor.vm import QemuVm

    env = envinfo.load()
    with guest_dir(root) as guest:
        host_guest = root / guest.relative_to("/")
        shutil.copy(env.kernel, host_guest / "vmlinuz")
        shutil.copy(initrd_plain, host_guest / "initrd.img")
        profile = replace(load("qemu-none", root, guest), memory_mib=256,
                          kernel_params="console=ttyS0 panic=-1 coco.mode=poweroff")
        run_inside = guest / "run"
        argv = build_command_line(profile, VmInstance(run_dir=run_inside, accel="tcg")).to_argv()
        vm = QemuVm(["chroot", str(root), *argv], host_guest / "run",
                    qmp_socket=host_guest / "run" / "qmp.sock",
                    stderr_log=host_guest / "stderr.log")
        # The console chardev writes into a FIFO that the launcher drains (capped).
        console_log = CappedLog(host_guest / "run" / "console.log")
        console_log.fifo(host_guest / "run" / "console.pipe")
        try:
            await vm.start()
            try:
                version = await vm.execute("query-version")
                assert (version["qemu"]["major"], version["qemu"]["minor"]) == (11, 1)
                async with asyncio.timeout(60):
                    reason = await vm.wait()
            finally:
                await vm.aclose()
        finally:
            console_log.close()
        console = (host_guest / "run" / "console.log").read_text()
    assert (reason.kind, reason.detail, reason.clean) == ("shutdown", "guest-shutdown", True)
    assert "COCO-GUEST-READY" in console
