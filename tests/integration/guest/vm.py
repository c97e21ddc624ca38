"""A throwaway QEMU (TCG) VM running the reference guest image, for tests and the benchmark.

Independent of the project's hypervisor package on purpose: it launches vhost-device-vsock and
qemu-system-x86_64 itself and cleans both up (processes, sockets, temp dir) on exit. Like the
hypervisor package, it dials the agent only after the guest announced it (the ready port, see
hypervisor/vsock.py): a CONNECT while the guest starts its vsock device can stall
vhost-device-vsock for good.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hypervisor.cmdline import VirtioBalloon

QEMU = "/usr/bin/qemu-system-x86_64"
AGENT_PORT = 1024
READY_PORT = 1029  # hypervisor.vsock.GUEST_READY_PORT: the guest's "my agent listens"


@dataclass(frozen=True)
class Share9p:
    tag: str
    path: Path


@dataclass(frozen=True)
class Disk:
    path: Path  # raw image
    pci_slot: int  # on the root bus, so Kata's PCI path is f"{pci_slot:02x}"


@dataclass
class GuestVM:
    kernel: Path
    initrd: Path
    vhost_device_vsock: Path
    shares: tuple[Share9p, ...] = ()
    disks: tuple[Disk, ...] = ()
    nic_mac: str | None = None  # a virtio-net NIC on an isolated backend (restrict=on)
    tap: str | None = None  # ... or on this tap device (in ``netns``), instead
    netns: str | None = None  # run QEMU in this named network namespace
    memory_mib: int = 512
    cpus: int = 2
    append: str = ""
    balloon: bool = False  # virtio-balloon with free page reporting, as the dev profile has
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="coco-guest-vm-")))
    vhost: subprocess.Popen[bytes] | None = None
    qemu: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    ready_listener: socket.socket | None = None
    ready_at: float | None = None  # monotonic time of the guest's announcement

    @property
    def vsock_uds(self) -> Path:
        return self.workdir / "vsock.sock"

    @property
    def ready_socket(self) -> Path:
        """Where vhost-device-vsock delivers the guest's connection to host port READY_PORT."""
        return self.workdir / f"vsock.sock_{READY_PORT}"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    def qemu_argv(self) -> list[str]:
        mem = f"{self.memory_mib}M"
        argv = [
            QEMU,
            "-accel", "tcg",
            "-m", mem,
            "-smp", str(self.cpus),
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-machine", "q35,memory-backend=mem",
            "-cpu", "max",
            "-chardev", f"socket,id=c0,path={self.workdir / 'vhu.sock'}",
            "-device", "vhost-user-vsock-pci,chardev=c0",
            "-kernel", str(self.kernel),
            "-initrd", str(self.initrd),
            "-append",
            f"console=ttyS0 panic=-1 quiet coco.agent.ready_port={READY_PORT} {self.append}"
            .strip(),
            "-nographic", "-no-reboot",
            "-serial", f"file:{self.console_log}",
            "-monitor", "none",
            "-nodefaults",
        ]  # fmt: skip
        for index, share in enumerate(self.shares):
            argv += [
                "-fsdev", f"local,id=fs{index},path={share.path},security_model=none",
                "-device", f"virtio-9p-pci,fsdev=fs{index},mount_tag={share.tag}",
            ]  # fmt: skip
        for index, disk in enumerate(self.disks):
            argv += [
                "-drive", f"file={disk.path},if=none,id=disk{index},format=raw",
                "-device", f"virtio-blk-pci,drive=disk{index},addr={disk.pci_slot:#x}",
            ]  # fmt: skip
        if self.balloon:
            argv += VirtioBalloon().to_argv()
        if self.nic_mac is not None and self.tap is not None:
            argv += [
                "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=net0,mac={self.nic_mac}",
            ]  # fmt: skip
        elif self.nic_mac is not None:
            argv += [
                "-netdev", "user,id=net0,restrict=on",
                "-device", f"virtio-net-pci,netdev=net0,mac={self.nic_mac}",
            ]  # fmt: skip
        return argv

    def start(self) -> None:
        vhu = self.workdir / "vhu.sock"
        self.vhost = subprocess.Popen(
            [
                str(self.vhost_device_vsock),
                "--vm",
                f"guest-cid=3,socket={vhu},uds-path={self.vsock_uds}",
            ],
            stdout=(self.workdir / "vhost.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while not vhu.exists():
            if self.vhost.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vhost-device-vsock did not start: {self.logs()}")
            time.sleep(0.02)
        self.ready_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ready_listener.bind(str(self.ready_socket))
        self.ready_listener.listen(4)
        self.started_at = time.monotonic()
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.qemu = subprocess.Popen(
            [*prefix, *self.qemu_argv()],
            stdin=subprocess.DEVNULL,
            stdout=(self.workdir / "qemu.log").open("wb"),
            stderr=subprocess.STDOUT,
        )

    def wait_agent_ready(self, timeout: float = 120.0) -> float:
        """Until the guest announced its agent; seconds since QEMU started. Idempotent."""
        if self.ready_at is not None:
            return self.ready_at - self.started_at
        assert self.ready_listener is not None, "start() first"
        deadline = time.monotonic() + timeout
        while True:
            if self.qemu is not None and self.qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited ({self.qemu.returncode}): {self.logs()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the guest did not announce its agent within {timeout} s\n"
                                   f"{self.logs()}")
            self.ready_listener.settimeout(min(left, 0.5))
            try:
                conn, _ = self.ready_listener.accept()
            except TimeoutError:
                continue
            self.ready_at = time.monotonic()
            conn.close()
            return self.ready_at - self.started_at

    def connect(self, port: int = AGENT_PORT, timeout: float = 120.0) -> socket.socket:
        """A connected hybrid-vsock stream to the guest port (after the guest announced its
        agent; retried a few times if the first attempts fail)."""
        deadline = time.monotonic() + timeout
        self.wait_agent_ready(timeout)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.qemu is not None and self.qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited ({self.qemu.returncode}): {self.logs()}")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(5)
                sock.connect(str(self.vsock_uds))
                sock.sendall(f"CONNECT {port}\n".encode())
                line = b""
                while not line.endswith(b"\n"):
                    chunk = sock.recv(1)
                    if not chunk:
                        raise ConnectionError("closed during CONNECT")
                    line += chunk
                if not line.startswith(b"OK"):
                    raise ConnectionError(line.decode(errors="replace"))
                sock.settimeout(None)
                return sock
            except OSError as err:
                last = err
                sock.close()
                time.sleep(0.1)
        raise TimeoutError(f"guest port {port} not reachable: {last}\n{self.logs()}")

    def wait_exit(self, timeout: float) -> int:
        assert self.qemu is not None
        return self.qemu.wait(timeout=timeout)

    def logs(self) -> str:
        parts = []
        for name in ("console.log", "qemu.log", "vhost.log"):
            path = self.workdir / name
            if path.exists():
                text = path.read_text(errors="replace")[-6000:]
                parts.append(f"--- {name} ---\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.ready_listener is not None:
            self.ready_listener.close()
        for proc in (self.qemu, self.vhost):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_vm(vm: GuestVM) -> Iterator[GuestVM]:
    try:
        vm.start()
        yield vm
    except Exception:
        print(vm.logs())
        raise
    finally:
        vm.stop()
