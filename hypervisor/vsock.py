"""vsock devices for the guest agent channel.

* Kernel vhost-vsock: open ``/dev/vhost-vsock``, claim a guest CID with the
  ``VHOST_VSOCK_SET_GUEST_CID`` ioctl, hand the fd to QEMU. The only form for confidential
  guests (no shared guest memory).
* Hybrid vsock: a supervised ``vhost-device-vsock`` process serves virtio-vsock over
  vhost-user; the host reaches guest port P by writing ``CONNECT P`` on its unix socket.
  Needs shared guest memory, so only for non-confidential profiles; chosen automatically when
  ``/dev/vhost-vsock`` is absent.

Hybrid vsock has one trap: vhost-device-vsock (0.3.0, Debian's) stops serving for good when a
host connection reaches it while the guest driver is starting the device (guest memory known,
RX ring not yet set up): its vring worker fails on the half-configured ring and exits, and
every later ``CONNECT`` hangs unanswered (and the guest's own connections to the host go
nowhere either). A host that dials while the guest boots hits that window now and then: 1 pod
in 74 here before; 6 boots of 17 with four dialers CONNECTing every 2 ms from QEMU's start, 2 of
6 with ``bench/boot_loop.py --hammer 4``; 0 of 200 with the announcement below. So the
guest says when its agent listens: it connects to the host (CID 2) on
:data:`GUEST_READY_PORT`, which vhost-device-vsock turns into a connection to
``<uds_path>_<port>``, where :class:`HybridVsockBackend` listens from before QEMU starts. Dial
only after :meth:`HybridVsockBackend.wait_guest_ready`: by then the device is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import random
import signal
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hypervisor.caplog import CappedLog
from hypervisor.errors import VsockError
from hypervisor.lifeline import die_with_parent
from hypervisor.timeouts import TIMEOUTS, Timeouts

VHOST_VSOCK_DEVICE = Path("/dev/vhost-vsock")
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60  # _IOW(VHOST_VIRTIO, 0x60, __u64)
FIRST_GUEST_CID = 3  # 0-2 are reserved (hypervisor, local, host)
GUEST_READY_PORT = 1029  # host port the guest connects to once its agent listens (hybrid)
GUEST_READY_PARAM = "coco.agent.ready_port"  # kernel parameter telling the guest that port
READY_LINE_MAX = 64
MAX_GUEST_CID = 0xFFFFFFFF - 1  # U32_MAX is VMADDR_CID_ANY


@dataclass
class GuestCid:
    """An open /dev/vhost-vsock fd owning ``cid``; close it when QEMU is gone."""

    cid: int
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def allocate_guest_cid(
    device: Path = VHOST_VSOCK_DEVICE,
    *,
    attempts: int = 64,
    rng: random.Random | None = None,
) -> GuestCid:
    """Claim a free guest CID, starting from a random one and retrying on EADDRINUSE."""
    rng = rng or random.Random()
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise VsockError(f"cannot open {device}: {err.strerror}") from err
    start = rng.randint(FIRST_GUEST_CID, 0x7FFFFFFF)
    try:
        for i in range(attempts):
            cid = FIRST_GUEST_CID + (start - FIRST_GUEST_CID + i) % (MAX_GUEST_CID - 2)
            try:
                fcntl.ioctl(fd, VHOST_VSOCK_SET_GUEST_CID, struct.pack("=Q", cid))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    continue
                raise VsockError(f"VHOST_VSOCK_SET_GUEST_CID {cid}: {err.strerror}") from err
            os.set_inheritable(fd, True)
            return GuestCid(cid, fd)
        raise VsockError(f"no free guest CID after {attempts} attempts from {start}")
    except BaseException:
        os.close(fd)
        raise


def kernel_vsock_available(device: Path = VHOST_VSOCK_DEVICE) -> bool:
    return device.exists()


class HybridVsockBackend:
    """A supervised ``vhost-device-vsock`` serving one VM."""

    def __init__(self, binary: Path, run_dir: Path, guest_cid: int = 3,
                 log_path: Path | None = None, timeouts: Timeouts = TIMEOUTS,
                 ready_port: int | None = GUEST_READY_PORT) -> None:
        self.binary = binary
        self.guest_cid = guest_cid
        self.vhost_user_socket = run_dir / "vhu.sock"
        self.uds_path = run_dir / "vsock.sock"
        self.log_path = log_path or run_dir / "vhost-device-vsock.log"
        self._timeouts = timeouts
        self.ready_port = ready_port
        # vhost-device-vsock's name for guest-initiated connections to host port P.
        self.ready_socket = None if ready_port is None else run_dir / f"vsock.sock_{ready_port}"
        self.ready_line = ""  # what the guest said when it announced its agent
        self._ready_listener: socket.socket | None = None
        self._ready = False
        self._proc: asyncio.subprocess.Process | None = None
        self._log: CappedLog | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def argv(self) -> list[str]:
        return [str(self.binary), "--vm",
                f"guest-cid={self.guest_cid},socket={self.vhost_user_socket},"
                f"uds-path={self.uds_path}"]

    async def start(self, on_spawn: Callable[[int], None] | None = None) -> None:
        """Spawn the backend (``on_spawn`` gets its pid at once) and wait for its socket."""
        argv = die_with_parent(self.argv(), VsockError)  # dies with us (hypervisor.lifeline)
        self._log = CappedLog(self.log_path)  # it logs what the guest's vsock traffic does
        log = self._log.pipe()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                umask=0o077, start_new_session=True,
            )
        finally:
            os.close(log)
        if on_spawn is not None:
            on_spawn(self._proc.pid)
        bound = self._timeouts.vhost_user_socket
        try:
            async with asyncio.timeout(bound):
                while not self.vhost_user_socket.exists():
                    if self._proc.returncode is not None:
                        raise VsockError(f"vhost-device-vsock exited with status "
                                         f"{self._proc.returncode}: {self._log_tail()}")
                    await asyncio.sleep(0.01)
        except TimeoutError as err:
            await self.stop()
            raise VsockError(f"vhost-device-vsock did not create {self.vhost_user_socket} "
                             f"within {bound}s") from err
        except Exception:
            await self.stop()
            raise
        if self.ready_socket is not None:
            try:
                self._ready_listener = _listen_unix(self.ready_socket)
            except OSError as err:
                await self.stop()
                raise VsockError(f"cannot listen on {self.ready_socket}: {err.strerror}") from err

    @property
    def kernel_params(self) -> str:
        """What the guest must be told to announce its agent (empty: no announcement)."""
        return "" if self.ready_port is None else f"{GUEST_READY_PARAM}={self.ready_port}"

    @property
    def guest_ready(self) -> bool:
        return self._ready

    async def wait_guest_ready(self) -> None:
        """Until the guest has announced that its agent listens (no deadline: callers own it).

        The first connection on the ready socket is the announcement; its first line (``READY
        <agent port>``) is kept in :attr:`ready_line`.
        """
        if self._ready:
            return
        listener = self._ready_listener
        if listener is None:
            raise VsockError("the guest's ready announcement is not awaited on this backend "
                             "(no ready port, or the backend is stopped)")
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        with conn:
            try:
                async with asyncio.timeout(self._timeouts.guest_ready_line):
                    line = await _read_line(conn, READY_LINE_MAX)
            except (TimeoutError, OSError):
                line = b""  # the connection itself is the announcement
        self.ready_line = line.decode(errors="replace").strip()
        self._ready = True
        listener.close()
        self._ready_listener = None

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-500:].strip()
        return ""

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bound; idempotent."""
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self._timeouts.quit):
                    await proc.wait()
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._proc = None
        if self._log is not None:
            self._log.close()
        if self._ready_listener is not None:
            self._ready_listener.close()
            self._ready_listener = None
        for path in (self.vhost_user_socket, self.uds_path, self.ready_socket):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _listen_unix(path: Path) -> socket.socket:
    """A non-blocking listening unix socket at ``path``, mode 0600 before anyone can connect."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(4)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise
    return sock


async def _read_line(conn: socket.socket, limit: int) -> bytes:
    conn.setblocking(False)
    loop = asyncio.get_running_loop()
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = await loop.sock_recv(conn, limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


async def hybrid_connect(uds_path: Path, port: int,
                         bound: float = TIMEOUTS.hybrid_connect,
                         ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a stream to guest vsock ``port`` through a hybrid-vsock unix socket."""
    async with asyncio.timeout(bound):
        reader, writer = await asyncio.open_unix_connection(str(uds_path))
        try:
            writer.write(f"CONNECT {port}\n".encode())
            await writer.drain()
            line = await reader.readline()
        except Exception:
            writer.close()
            raise
    if not line.startswith(b"OK "):
        writer.close()
        raise VsockError(f"CONNECT {port} via {uds_path} refused: {line!r}")
    return reader, writer


def hybrid_connect_blocking(uds_path: Path, port: int,
                            timeout: float = TIMEOUTS.hybrid_connect) -> socket.socket:
    """Synchronous variant of :func:`hybrid_connect` (for tools and debugging)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(uds_path))
        sock.sendall(f"CONNECT {port}\n".encode())
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                break
            line += chunk
    except Exception:
        sock.close()
        raise
    if not line.startswith(b"OK "):
        sock.close()
        raise VsockError(f"CONNECT {port} via {uds_path} refused: {line!r}")
    return sock
