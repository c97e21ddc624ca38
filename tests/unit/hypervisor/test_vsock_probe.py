"""Guest CID allocation (ioctl faked), hybrid-vsock handshake, host probe and verdicts."""

from __future__ import annotations

import asyncio
import errno
import random
import shutil
import stat
import struct
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.errors import VsockError
from hypervisor.probe import Fact, QemuCapabilities, assess, probe_host
from hypervisor.profile import RuntimeProfile, SnpParams, TeeKind
from hypervisor.vsock import (
    VHOST_VSOCK_SET_GUEST_CID,
    HybridVsockBackend,
    allocate_guest_cid,
    hybrid_connect,
    hybrid_connect_blocking,
)


def test_cid_allocation_retries_on_eaddrinuse(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    device = tmp_path / "vhost-vsock"
    device.touch()
    tried: list[int] = []

    def fake_ioctl(fd: int, request: int, arg: bytes) -> bytes:
        assert request == VHOST_VSOCK_SET_GUEST_CID == 0x4008AF60
        cid = struct.unpack("=Q", arg)[0]
        tried.append(cid)
        if len(tried) < 3:
            raise OSError(errno.EADDRINUSE, "in use")
        return arg

    monkeypatch.setattr("fcntl.ioctl", fake_ioctl)
    got = allocate_guest_cid(device, rng=random.Random(7))
    try:
        assert got.cid == tried[-1] and len(tried) == 3
        assert tried[1] == tried[0] + 1 and tried[0] >= 3
        assert got.fd >= 0
    finally:
        got.close()
    assert got.fd == -1


def test_cid_allocation_other_errors_and_exhaustion(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    device = tmp_path / "vhost-vsock"
    device.touch()

    def busy(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EADDRINUSE, "in use")

    monkeypatch.setattr("fcntl.ioctl", busy)
    with pytest.raises(VsockError, match="no free guest CID after 4 attempts"):
        allocate_guest_cid(device, attempts=4)

    def denied(fd: int, request: int, arg: bytes) -> bytes:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr("fcntl.ioctl", denied)
    with pytest.raises(VsockError, match=r"VHOST_VSOCK_SET_GUEST_CID .*Operation not permitted"):
        allocate_guest_cid(device)
    with pytest.raises(VsockError, match="cannot open"):
        allocate_guest_cid(tmp_path / "absent")


async def test_hybrid_connect_handshake(tmp_path: Path) -> None:
    sock = tmp_path / "vsock.sock"

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if line == b"CONNECT 1024\n":
            writer.write(b"OK 1073741824\n")
            writer.write(await reader.readexactly(4))
        else:
            writer.write(b"")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(backend, str(sock))
    async with server:
        reader, writer = await hybrid_connect(sock, 1024)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        writer.close()
        with pytest.raises(VsockError, match=r"CONNECT 1025 .* refused"):
            await hybrid_connect(sock, 1025)
        blocking = await asyncio.to_thread(hybrid_connect_blocking, sock, 1024)
        blocking.close()


def test_probe_host_reads_sysfs_and_device_nodes(tmp_path: Path) -> None:
    amd = tmp_path / "sys/module/kvm_amd/parameters"
    amd.mkdir(parents=True)
    (amd / "sev").write_text("Y\n")
    (amd / "sev_es").write_text("Y\n")
    (amd / "sev_snp").write_text("N\n")
    (tmp_path / "dev").mkdir()
    for node in ("kvm", "sev", "vhost-vsock"):
        (tmp_path / "dev" / node).touch()
    host = probe_host(tmp_path)
    assert host.sev.ok and host.sev_es.ok and not host.snp.ok
    assert host.tee(TeeKind.SEV).ok and not host.tee(TeeKind.SNP).ok
    assert "sev_snp = N" in host.snp.detail
    assert host.vhost_vsock.ok and not host.vhost_net.ok and not host.tdx.ok
    assert host.tee(TeeKind.NONE).ok


def _qemu(**tee_types: list[str] | None) -> QemuCapabilities:
    types: dict[str, list[str] | None] = {"sev-guest": None, "sev-snp-guest": None,
                                          "tdx-guest": None}
    types.update({k.replace("_", "-"): v for k, v in tee_types.items()})
    return QemuCapabilities("/usr/bin/qemu", "11.1.3", types, None, "KVM not enabled")


NONE = RuntimeProfile(name="n", tee=TeeKind.NONE, qemu=Path("/q"), kernel=None, accel="auto")
SNP_PROPS = ["cbitpos", "reduced-phys-bits", "policy", "kernel-hashes", "host-data"]


def test_assess_none_profile_here(tmp_path: Path) -> None:
    host = probe_host(tmp_path)  # empty tree: nothing
    verdict = assess(NONE, host, _qemu(), Fact(False, "MSR"), Path("/vdv"))
    assert (verdict.ok, verdict.accel, verdict.vsock) == (True, "tcg", "hybrid")
    no_backend = assess(NONE, host, _qemu(), Fact(False, "MSR"), None)
    assert not no_backend.ok and "vhost-device-vsock not found" in no_backend.problems[0]
    kvm_needed = assess(replace(NONE, accel="kvm"), host, _qemu(), Fact(False, "MSR"), None)
    assert "needs KVM: MSR" in kvm_needed.problems


def test_assess_snp_profile(tmp_path: Path) -> None:
    amd = tmp_path / "sys/module/kvm_amd/parameters"
    amd.mkdir(parents=True)
    (amd / "sev_snp").write_text("Y")
    (tmp_path / "dev").mkdir()
    for node in ("sev", "vhost-vsock"):
        (tmp_path / "dev" / node).touch()
    snp = replace(NONE, tee=TeeKind.SNP, accel="kvm", vsock="kernel",
                  tee_params=SnpParams(cbitpos=51, reduced_phys_bits=1))
    host = probe_host(tmp_path)
    ok = assess(snp, host, _qemu(sev_snp_guest=SNP_PROPS), Fact(True, "ok"), None)
    assert ok.ok and ok.vsock == "kernel"
    old_qemu = assess(snp, host, _qemu(), Fact(True, "ok"), None)
    assert old_qemu.problems == ["QEMU 11.1.3 has no sev-snp-guest object type"]
    lacking = assess(replace(snp, tee_params=SnpParams(cbitpos=51, reduced_phys_bits=1,
                                                       host_data=bytes(32))),
                     host, _qemu(sev_snp_guest=["cbitpos"]), Fact(True, "ok"), None)
    assert "lacks ['host-data', 'kernel-hashes', 'policy', 'reduced-phys-bits']" in \
        lacking.problems[0]
    no_tee = assess(snp, probe_host(tmp_path / "empty"), _qemu(sev_snp_guest=SNP_PROPS),
                    Fact(True, "ok"), None)
    assert any(p.startswith("host lacks snp") for p in no_tee.problems)


FAKE_VHOST_DEVICE_VSOCK = """#!{python}
import socket, sys, time
opts = dict(kv.split("=", 1) for kv in sys.argv[2].split(","))
sock = socket.socket(socket.AF_UNIX)
sock.bind(opts["socket"])
sock.listen(1)
time.sleep(60)
"""


async def test_hybrid_backend_awaits_the_guests_announcement(tmp_path: Path) -> None:
    """The ready socket listens (0600) before QEMU could start; the guest's connection there
    (vhost-device-vsock's form of a guest connect to host port 1029) is the announcement."""
    binary = tmp_path / "vhost-device-vsock"
    binary.write_text(FAKE_VHOST_DEVICE_VSOCK.format(python=sys.executable))
    binary.chmod(0o755)
    run = Path(tempfile.mkdtemp(prefix="coco-hv-"))  # short: unix socket paths
    backend = HybridVsockBackend(binary, run)
    await backend.start()
    try:
        assert backend.kernel_params == "coco.agent.ready_port=1029"
        assert backend.ready_socket == run / "vsock.sock_1029"
        assert stat.S_IMODE(backend.ready_socket.stat().st_mode) == 0o600
        waiting = asyncio.ensure_future(backend.wait_guest_ready())
        await asyncio.sleep(0.1)
        assert not waiting.done() and not backend.guest_ready
        _, writer = await asyncio.open_unix_connection(str(backend.ready_socket))
        writer.write(b"READY 1024\n")
        await writer.drain()
        async with asyncio.timeout(5):
            await waiting
        writer.close()
        assert backend.guest_ready and backend.ready_line == "READY 1024"
        await backend.wait_guest_ready()  # idempotent
    finally:
        await backend.stop()
    assert not backend.ready_socket.exists() and not backend.uds_path.exists()
    shutil.rmtree(run)
    without = HybridVsockBackend(binary, tmp_path, ready_port=None)
    assert without.kernel_params == "" and without.ready_socket is None
    with pytest.raises(VsockError, match="not awaited"):
        await without.wait_guest_ready()
