"""Exact QEMU argv for every TEE profile and architecture, and every invariant violation."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest

import hypervisor
from hypervisor.cmdline import (
    Arch,
    Bios,
    NinePShare,
    Pflash,
    ReducedPrivileges,
    UnixSocketAddress,
    VirtioBlk,
    VirtioFsShare,
    VirtioNetTap,
    VsockSocketAddress,
)
from hypervisor.errors import InvariantError
from hypervisor.profile import (
    HybridVsock,
    KernelVsock,
    RuntimeProfile,
    SevParams,
    SnpParams,
    TdxParams,
    TeeKind,
    VmInstance,
    build_command_line,
)

RUN = Path("/run/vm")
AMDSEV = Bios(Path("/fw/OVMF.amdsev.fd"))
TDVF = Bios(Path("/fw/OVMF.inteltdx.fd"))
HOST_DATA = bytes(range(32))


def profile(tee: TeeKind, **kw: object) -> RuntimeProfile:
    # TEE guests get no console (the host must not read them): no console= either.
    base: dict[str, object] = dict(
        name=tee.value, tee=tee, qemu=Path("/usr/bin/qemu-system-x86_64"),
        kernel=Path("/g/vmlinuz"), initrd=Path("/g/initrd"),
        kernel_params="panic=1" if tee.confidential else "console=ttyS0",
        vcpus=2, memory_mib=2048,
    )
    base.update(kw)
    return RuntimeProfile(**base)  # type: ignore[arg-type]


PROFILES: dict[str, RuntimeProfile] = {
    "none": profile(TeeKind.NONE, accel="tcg"),
    "sev": profile(TeeKind.SEV, firmware=AMDSEV,
                   tee_params=SevParams(cbitpos=47, reduced_phys_bits=1)),
    "sev-es": profile(TeeKind.SEV_ES, firmware=AMDSEV,
                      tee_params=SevParams(cbitpos=47, reduced_phys_bits=1)),
    "snp": profile(TeeKind.SNP, firmware=AMDSEV,
                   tee_params=SnpParams(cbitpos=51, reduced_phys_bits=1, host_data=HOST_DATA)),
    "tdx": profile(TeeKind.TDX, firmware=TDVF,
                   tee_params=TdxParams(mrconfigid=bytes(48),
                                        quote_generation_socket=VsockSocketAddress(2, 4050))),
    "s390-pv": profile(TeeKind.S390_PV, arch=Arch.S390X, initrd=None, kernel_params="",
                       qemu=Path("/usr/bin/qemu-system-s390x")),
    "pef": profile(TeeKind.PEF, arch=Arch.PPC64, qemu=Path("/usr/bin/qemu-system-ppc64")),
}

COMMON_HEAD = ("-name coco -no-user-config -nodefaults -display none "
               "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny")
COMMON_TAIL = "-qmp unix:/run/vm/qmp.sock,server=on,wait=off -no-reboot -S"
DISK = "-drive if=none,id=drive-disk0,file=/d.img,format=raw,cache=none,aio=threads"
SERIAL_X86 = ("-chardev file,id=console0,path=/run/vm/console.pipe "
              "-device isa-serial,chardev=console0")
SEV_OBJ = "sev-guest,id=sev0,cbitpos=47,reduced-phys-bits=1,policy={},kernel-hashes=on,{}"
SNP_OBJ = ("sev-snp-guest,id=snp0,cbitpos=51,reduced-phys-bits=1,policy=0x30000,"
           "kernel-hashes=on,host-data=AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
TDX_OBJ = ('{"qom-type":"tdx-guest","id":"tdx0","sept-ve-disable":true,"mrconfigid":"'
           + "A" * 64 + '","quote-generation-socket":{"type":"vsock","cid":"2","port":"4050"}}')
X86_BOOT = "-kernel /g/vmlinuz -initrd /g/initrd -append console=ttyS0"
TEE_BOOT = "-kernel /g/vmlinuz -initrd /g/initrd -append panic=1"
KVSOCK_PCI = "-device vhost-vsock-pci,id=vsock0,guest-cid=7,vhostfd=9,iommu_platform=on"
BLK_PCI_IOMMU = "-device virtio-blk-pci,id=disk0,drive=drive-disk0,iommu_platform=on"

EXPECTED = {
    "none": f"""
        /usr/bin/qemu-system-x86_64 {COMMON_HEAD}
        -machine q35,memory-backend=mem -accel tcg -cpu max -smp 2 -m 2048M
        -object memory-backend-memfd,id=mem,size=2048M,share=on
        {X86_BOOT} {SERIAL_X86}
        {DISK} -device virtio-blk-pci,id=disk0,drive=drive-disk0
        -chardev socket,id=char-vsock0,path=/run/vm/vhu.sock
        -device vhost-user-vsock-pci,id=vsock0,chardev=char-vsock0
        {COMMON_TAIL}""",
    "sev": f"""
        /usr/bin/qemu-system-x86_64 {COMMON_HEAD}
        -machine q35,confidential-guest-support=sev0,smm=off -accel kvm -cpu EPYC-v4
        -smp 2 -m 2048M
        -object {SEV_OBJ.format("0x1", "legacy-vm-type=off")}
        -bios /fw/OVMF.amdsev.fd {TEE_BOOT}
        {DISK} {BLK_PCI_IOMMU} {KVSOCK_PCI} {COMMON_TAIL}""",
    "sev-es": f"""
        /usr/bin/qemu-system-x86_64 {COMMON_HEAD}
        -machine q35,confidential-guest-support=sev0,smm=off -accel kvm -cpu EPYC-v4
        -smp 2 -m 2048M
        -object {SEV_OBJ.format("0x5", "legacy-vm-type=off")}
        -bios /fw/OVMF.amdsev.fd {TEE_BOOT}
        {DISK} {BLK_PCI_IOMMU} {KVSOCK_PCI} {COMMON_TAIL}""",
    "snp": f"""
        /usr/bin/qemu-system-x86_64 {COMMON_HEAD}
        -machine q35,confidential-guest-support=snp0,smm=off
        -accel kvm,kernel-irqchip=split -cpu EPYC-v4 -smp 2 -m 2048M
        -object {SNP_OBJ}
        -bios /fw/OVMF.amdsev.fd {TEE_BOOT}
        {DISK} {BLK_PCI_IOMMU} {KVSOCK_PCI} {COMMON_TAIL}""",
    "tdx": f"""
        /usr/bin/qemu-system-x86_64 {COMMON_HEAD}
        -machine q35,confidential-guest-support=tdx0,smm=off,pic=off
        -accel kvm,kernel-irqchip=split -cpu host -smp 2 -m 2048M
        -object {TDX_OBJ}
        -bios /fw/OVMF.inteltdx.fd {TEE_BOOT}
        {DISK} {BLK_PCI_IOMMU} {KVSOCK_PCI} {COMMON_TAIL}""",
    "s390-pv": f"""
        /usr/bin/qemu-system-s390x {COMMON_HEAD}
        -machine s390-ccw-virtio,confidential-guest-support=pv0 -accel kvm -cpu host
        -smp 2 -m 2048M -object s390-pv-guest,id=pv0 -kernel /g/vmlinuz
        {DISK} -device virtio-blk-ccw,id=disk0,drive=drive-disk0,iommu_platform=on
        -device vhost-vsock-ccw,id=vsock0,guest-cid=7,vhostfd=9,iommu_platform=on
        {COMMON_TAIL}""",
    "pef": f"""
        /usr/bin/qemu-system-ppc64 {COMMON_HEAD}
        -machine pseries,confidential-guest-support=pef0 -accel kvm -smp 2 -m 2048M
        -object pef-guest,id=pef0 -kernel /g/vmlinuz -initrd /g/initrd -append panic=1
        {DISK} {BLK_PCI_IOMMU} {KVSOCK_PCI} {COMMON_TAIL}""",
}


def instance(name: str, **kw: object) -> VmInstance:
    vsock = HybridVsock(RUN / "vhu.sock") if name == "none" else KernelVsock(7, 9)
    base: dict[str, object] = dict(run_dir=RUN, vsock=vsock,
                                   disks=(VirtioBlk("disk0", Path("/d.img")),))
    base.update(kw)
    return VmInstance(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_exact_argv(name: str) -> None:
    argv = build_command_line(PROFILES[name], instance(name)).to_argv()
    assert argv == EXPECTED[name].split()


def test_every_tee_has_a_profile_case() -> None:
    assert {t.value for t in TeeKind} == set(PROFILES)


def test_append_with_spaces_and_extra_params_is_one_argument() -> None:
    p = replace(PROFILES["none"], kernel_params="console=ttyS0 quiet")
    argv = build_command_line(p, instance("none", extra_kernel_params="agent.log=debug")
                              ).to_argv()
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet agent.log=debug"


def test_none_without_vsock_has_no_shared_memory_backend() -> None:
    argv = build_command_line(PROFILES["none"], instance("none", vsock=None)).to_argv()
    assert "-object" not in argv
    assert argv[argv.index("-machine") + 1] == "q35"


def test_comma_in_path_is_escaped() -> None:
    p = replace(PROFILES["none"], kernel=Path("/g/a,b"))
    argv = build_command_line(p, instance("none", run_dir=Path("/r,x"), vsock=None)).to_argv()
    assert "unix:/r,,x/qmp.sock,server=on,wait=off" in argv
    assert "file,id=console0,path=/r,,x/console.pipe" in argv


def test_kvm_none_uses_host_cpu_and_tdx_unix_quote_socket() -> None:
    argv = build_command_line(replace(PROFILES["none"], accel="kvm"),
                              instance("none", vsock=None)).to_argv()
    assert argv[argv.index("-cpu") + 1] == "host"
    tdx = replace(PROFILES["tdx"], tee_params=TdxParams(
        quote_generation_socket=UnixSocketAddress(Path("/run/qgs.sock"))))
    argv = build_command_line(tdx, instance("tdx")).to_argv()
    obj = argv[argv.index("-object") + 1]
    assert '"quote-generation-socket":{"type":"unix","path":"/run/qgs.sock"}' in obj


def test_sev_geometry_from_probe_when_profile_has_none() -> None:
    p = replace(PROFILES["snp"], tee_params=SnpParams())
    argv = build_command_line(p, instance("snp", sev_cbitpos=47, sev_reduced_phys_bits=1)
                              ).to_argv()
    assert argv[argv.index("-object") + 1].startswith(
        "sev-snp-guest,id=snp0,cbitpos=47,reduced-phys-bits=1,policy=0x30000,kernel-hashes=on")
    with pytest.raises(InvariantError, match="cbitpos and reduced_phys_bits are unknown"):
        build_command_line(p, instance("snp"))


def test_kernel_hashes_off_without_direct_boot() -> None:
    p = replace(PROFILES["snp"], kernel=None, initrd=None)
    argv = build_command_line(p, instance("snp")).to_argv()
    assert "kernel-hashes=off" in argv[argv.index("-object") + 1]
    assert "-kernel" not in argv


# --- invariants: each violation is refused, and the error names the conflict ----------------

S = PROFILES
VIOLATIONS: list[tuple[str, RuntimeProfile, dict[str, object], str]] = [
    ("snp-tcg", replace(S["snp"], accel="tcg"), {}, "need accelerator kvm, got 'tcg'"),
    ("tdx-mem-hotplug", replace(S["tdx"], memory_slots=4, max_memory_mib=8192), {},
     "memory hotplug"),
    ("snp-cpu-hotplug", replace(S["snp"], max_vcpus=8), {},
     "CPU hotplug (max_vcpus=8 > vcpus=2)"),
    ("sev-9p", S["sev"], {"shares": (NinePShare("fs0", "share", Path("/s")),)},
     "shared filesystems"),
    ("snp-virtiofs", S["snp"], {"shares": (VirtioFsShare("fs0", "share", Path("/v.sock")),)},
     "shared filesystems"),
    ("snp-hybrid-vsock", S["snp"], {"vsock": HybridVsock(RUN / "vhu.sock")}, "hybrid vsock"),
    ("tdx-profile-hybrid", replace(S["tdx"], vsock="hybrid"), {}, 'vsock = "hybrid"'),
    ("snp-free-page-reporting", replace(S["snp"], free_page_reporting=True), {},
     "hypervisor.free_page_reporting: (no-balloon) virtio-balloon would hand the guest's "
     "private pages"),
    ("sev-es-bit-in-sev", replace(S["sev"], tee_params=SevParams(policy=0x5, cbitpos=47,
                                                                reduced_phys_bits=1)),
     {}, "sets the SEV-ES bit 0x4: use profile sev-es"),
    ("sev-es-without-bit", replace(S["sev-es"], tee_params=SevParams(policy=0x1, cbitpos=47,
                                                                    reduced_phys_bits=1)),
     {}, "lacks the SEV-ES bit 0x4"),
    ("sev-no-firmware", replace(S["sev"], firmware=None), {}, "needs OVMF firmware"),
    ("sev-hashes-no-kernel", replace(S["sev"], kernel=None, initrd=None,
                                     tee_params=SevParams(cbitpos=47, reduced_phys_bits=1,
                                                          kernel_hashes=True)),
     {}, "kernel_hashes needs direct kernel boot"),
    ("snp-host-data-31", replace(S["snp"], tee_params=SnpParams(
        cbitpos=51, reduced_phys_bits=1, host_data=bytes(31))),
     {}, "host_data must be exactly 32 bytes, got 31"),
    ("snp-policy-bit17", replace(S["snp"], tee_params=SnpParams(
        policy=0x10000, cbitpos=51, reduced_phys_bits=1)),
     {}, "must set reserved bit 17"),
    ("snp-pflash", replace(S["snp"], firmware=Pflash(Path("/fw/CODE.fd"))), {},
     "pflash does not work with SNP"),
    ("snp-id-block-alone", replace(S["snp"], tee_params=SnpParams(
        cbitpos=51, reduced_phys_bits=1, id_block=bytes(96))), {}, "id_block and id_auth"),
    ("snp-id-block-95", replace(S["snp"], tee_params=SnpParams(
        cbitpos=51, reduced_phys_bits=1, id_block=bytes(95), id_auth=bytes(4096))), {},
     "id_block must be exactly 96 bytes, got 95"),
    ("snp-id-auth-big", replace(S["snp"], tee_params=SnpParams(
        cbitpos=51, reduced_phys_bits=1, id_block=bytes(96), id_auth=bytes(4097))), {},
     "id_auth must be at most 4096 bytes"),
    ("tdx-named-cpu", replace(S["tdx"], cpu_model="Skylake-Server"), {}, "TDX needs -cpu host"),
    ("tdx-pflash", replace(S["tdx"], firmware=Pflash(Path("/fw/CODE.fd"))), {}, "(no pflash)"),
    ("tdx-mrconfigid-32", replace(S["tdx"], tee_params=TdxParams(mrconfigid=bytes(32))), {},
     "mrconfigid must be exactly 48 bytes, got 32"),
    ("tdx-mrowner", replace(S["tdx"], tee_params=TdxParams(mrowner=bytes(1))), {},
     "mrowner must be exactly 48 bytes"),
    ("snp-on-ppc", replace(S["snp"], arch=Arch.PPC64), {}, "snp exists only on x86_64"),
    ("pef-on-x86", replace(S["pef"], arch=Arch.X86_64), {}, "pef exists only on ppc64"),
    ("s390-wrong-machine", replace(S["s390-pv"], machine_type="q35"), {},
     "machine 'q35' is not a s390-ccw-virtio machine"),
    ("s390-initrd", replace(S["s390-pv"], initrd=Path("/g/initrd")), {},
     "initrd must be inside it"),
    ("s390-params", replace(S["s390-pv"], kernel_params="quiet"), {},
     "kernel parameters must be inside it"),
    ("s390-named-cpu", replace(S["s390-pv"], cpu_model="z14"), {}, "s390-pv needs -cpu host"),
    ("snp-with-sev-params", replace(S["snp"], tee_params=SevParams(cbitpos=1,
                                                                  reduced_phys_bits=1)),
     {}, "snp needs SnpParams, got SevParams"),
    ("none-with-params", replace(S["none"], tee_params=SnpParams()), {},
     "none takes no TEE parameters"),
    ("auto-accel-at-launch", replace(S["none"], accel="auto"), {},
     "accelerator must be kvm or tcg at launch"),
]


@pytest.mark.parametrize(("case", "prof", "vm_kw", "conflict"), VIOLATIONS,
                         ids=[v[0] for v in VIOLATIONS])
def test_invariant_violation_names_the_conflict(
    case: str, prof: RuntimeProfile, vm_kw: dict[str, object], conflict: str
) -> None:
    name = prof.tee.value
    with pytest.raises(InvariantError) as info:
        build_command_line(prof, instance(name, **vm_kw))
    assert conflict in str(info.value)
    assert info.value.profile == name


def test_all_conflicts_are_reported_together() -> None:
    bad = replace(S["snp"], accel="tcg", max_vcpus=4)
    with pytest.raises(InvariantError) as info:
        build_command_line(bad, instance("snp"))
    assert "accelerator kvm" in str(info.value) and "CPU hotplug" in str(info.value)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_pod_nic_is_a_tap_fd_virtio_net_on_every_profile(name: str) -> None:
    """Pod networking is the same for TEEs: the tap fd's virtio-net, on the profile's
    transport, with VIRTIO_F_ACCESS_PLATFORM when the guest is confidential."""
    nic = VirtioNetTap("net0", 11, "02:42:c6:12:00:02")
    argv = build_command_line(PROFILES[name], instance(name, nics=(nic,))).to_argv()
    transport = "ccw" if name == "s390-pv" else "pci"
    device = (f"virtio-net-{transport},id=net0,netdev=netdev-net0,mac=02:42:c6:12:00:02"
              + (",iommu_platform=on" if PROFILES[name].tee.confidential else ""))
    assert ["-netdev", "tap,id=netdev-net0,fd=11", "-device", device] == argv[
        argv.index("-netdev"):argv.index("-netdev") + 4]


def test_free_page_reporting_adds_the_balloon_on_the_none_profile() -> None:
    device = "virtio-balloon-pci,id=balloon0,free-page-reporting=on"
    argv = build_command_line(replace(S["none"], free_page_reporting=True),
                              instance("none")).to_argv()
    assert argv[argv.index(device) - 1] == "-device"
    plain = build_command_line(S["none"], instance("none")).to_argv()
    assert not any("balloon" in a for a in plain)


def test_a_vm_with_a_host_share_runs_qemu_unprivileged_and_without_setuid() -> None:
    """The dev profile's 9p share: QEMU is exec'd through the nosuid seccomp wrapper, then
    setpriv (nobody:nogroup, four capabilities), whatever prefix a test adds between;
    a VM without a share keeps QEMU first."""
    share = NinePShare("share0", "kataShared", Path("/run/pod/shared"))
    line = build_command_line(S["none"], instance("none", shares=(share,)))
    assert line.run_as == ReducedPrivileges()
    argv = line.to_argv(("chroot", "/root"))
    qemu = argv.index("/usr/bin/qemu-system-x86_64")
    caps = "-all,+chown,+dac_override,+dac_read_search,+fowner"
    assert argv[:qemu] == [
        sys.executable, "-I", "-S", str(Path(hypervisor.__file__).with_name("nosuid.py")),
        "chroot", "/root",
        "/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
        "--no-new-privs", f"--inh-caps={caps}", f"--ambient-caps={caps}",
        f"--bounding-set={caps}", "--pdeathsig=KILL", "--"]
    assert argv[qemu:] == replace(line, run_as=None).to_argv()  # QEMU's own argv unchanged
    plain = build_command_line(S["none"], instance("none"))
    assert plain.run_as is None
    assert plain.to_argv()[0] == "/usr/bin/qemu-system-x86_64"
    assert plain.to_argv(("chroot", "/root"))[:3] == ["chroot", "/root",
                                                       "/usr/bin/qemu-system-x86_64"]
