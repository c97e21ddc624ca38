"""Each option group renders its own argv; the package never imports the shim."""

from __future__ import annotations

import ast
from pathlib import Path

from hypervisor.cmdline import (
    Accel,
    Arch,
    DirectBoot,
    Machine,
    MemfdBackend,
    Memory,
    NinePShare,
    Pflash,
    SerialConsole,
    Smp,
    TdxGuest,
    UnixSocketAddress,
    VhostUserVsock,
    VirtioBalloon,
    VirtioBlk,
    VirtioFsShare,
    VirtioNetTap,
    opts,
)

PACKAGE = Path(__file__).resolve().parents[3] / "hypervisor"


def test_opts_skips_none_renders_bools_and_escapes_commas() -> None:
    assert opts("x", ("a", None), ("b", True), ("c", False), ("d", "p,q")) == "x,b=on,c=off,d=p,,q"


def test_machine_accel_cpu_memory() -> None:
    assert Machine("q35", smm=False, pic=False, memory_backend="mem").to_argv() == [
        "-machine", "q35,smm=off,pic=off,memory-backend=mem"]
    assert Accel("kvm", "split").to_argv() == ["-accel", "kvm,kernel-irqchip=split"]
    assert Smp(2, 4).to_argv() == ["-smp", "2,maxcpus=4"]
    assert Memory(1024, slots=2, max_mib=4096).to_argv() == ["-m", "1024M,slots=2,maxmem=4096M"]
    assert MemfdBackend("mem", 512).to_argv() == [
        "-object", "memory-backend-memfd,id=mem,size=512M,share=on"]


def test_firmware_and_boot() -> None:
    assert Pflash(Path("/c.fd"), Path("/v.fd")).to_argv() == [
        "-drive", "if=pflash,format=raw,unit=0,file=/c.fd,readonly=on",
        "-drive", "if=pflash,format=raw,unit=1,file=/v.fd"]
    assert DirectBoot(Path("/k")).to_argv() == ["-kernel", "/k"]


def test_devices() -> None:
    assert VirtioBlk("d0", Path("/img"), readonly=True, transport="ccw",
                     iommu_platform=True).to_argv() == [
        "-drive", "if=none,id=drive-d0,file=/img,format=raw,readonly=on,cache=none,aio=threads",
        "-device", "virtio-blk-ccw,id=d0,drive=drive-d0,iommu_platform=on"]
    assert VirtioNetTap("net0", 5, "02:00:00:00:00:01", vhost_fd=6).to_argv() == [
        "-netdev", "tap,id=netdev-net0,fd=5,vhost=on,vhostfd=6",
        "-device", "virtio-net-pci,id=net0,netdev=netdev-net0,mac=02:00:00:00:00:01"]
    assert VirtioNetTap("net0", 5, "02:00:00:00:00:01").to_argv()[1] == "tap,id=netdev-net0,fd=5"
    assert VhostUserVsock("v0", Path("/r/vhu.sock")).to_argv() == [
        "-chardev", "socket,id=char-v0,path=/r/vhu.sock",
        "-device", "vhost-user-vsock-pci,id=v0,chardev=char-v0"]
    assert NinePShare("fs0", "share", Path("/s")).to_argv() == [
        "-fsdev", "local,id=fsdev-fs0,path=/s,security_model=none",
        "-device", "virtio-9p-pci,id=fs0,fsdev=fsdev-fs0,mount_tag=share"]
    assert VirtioFsShare("fs1", "share", Path("/v.sock")).to_argv() == [
        "-chardev", "socket,id=char-fs1,path=/v.sock",
        "-device", "vhost-user-fs-pci,id=fs1,chardev=char-fs1,tag=share"]
    assert VirtioBalloon().to_argv() == [
        "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on"]
    assert VirtioBalloon(transport="ccw").to_argv()[1].startswith("virtio-balloon-ccw,")
    assert SerialConsole(Path("/c.log"), Arch.S390X).to_argv()[-1] == "sclpconsole,chardev=console0"
    assert SerialConsole(Path("/c.log"), Arch.PPC64).to_argv()[-1] == "spapr-vty,chardev=console0"


def test_tdx_json_object() -> None:
    argv = TdxGuest("tdx0", sept_ve_disable=False, mrowner=bytes(48), attributes=1,
                    quote_generation_socket=UnixSocketAddress(Path("/q.sock"))).to_argv()
    assert argv == ["-object",
                    '{"qom-type":"tdx-guest","id":"tdx0","sept-ve-disable":false,"mrowner":"'
                    + "A" * 64 + '","quote-generation-socket":{"type":"unix","path":"/q.sock"},'
                    '"attributes":1}']


def test_hypervisor_never_imports_shim() -> None:
    for source in PACKAGE.rglob("*.py"):  # measure/ too
        tree = ast.parse(source.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "shim" or n.startswith("shim.") for n in names), source
