"""vsock devices for the guest agent channel.

* Kernel vhost-vsock: open ``/dev/vhost-vsock``, claim a guest CID with the
  ``VHOST_VSOCK_SET_GUEST_CID`` ioctl, hand the fd to QEMU. The only form for confidential
  guests (no shared guest memory).
* Hybrid vsock: a supervised ``vhost-device-vsock`` process serves virtio-vsock over
  vhost-user; the host reaches guest port P by writing ``CONNECT P`` on its unix socket.
  Needs shared guest memory, so only for non-confidential profiles; chosen automatically when
  ``/dev/vhost-vsock`` is absent.
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

from hypervisor.errors import VsockError
from hypervisor.timeouts import TIMEOUTS, Timeouts

VHOST_VSOCK_DEVICE = Path("/dev/vhost-vsock")
VHOST_VSOCK_SET_GUEST_CID = 0x4008AF60  # _IOW(VHOST_VIRTIO, 0x60, __u64)
FIRST_GUEST_CID = 3  # 0-2 are reserved (hypervisor, local, host)
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
                 log_path: Path | None = None, timeouts: Timeouts = TIMEOUTS) -> None:
        self.binary = binary
        self.guest_cid = guest_cid
        self.vhost_user_socket = run_dir / "vhu.sock"
        self.uds_path = run_dir / "vsock.sock"
        self.log_path = log_path or run_dir / "vhost-device-vsock.log"
        self._timeouts = timeouts
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def argv(self) -> list[str]:
        return [str(self.binary), "--vm",
                f"guest-cid={self.guest_cid},socket={self.vhost_user_socket},"
                f"uds-path={self.uds_path}"]

    async def start(self, on_spawn: Callable[[int], None] | None = None) -> None:
        """Spawn the backend (``on_spawn`` gets its pid at once) and wait for its socket."""
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                      0o600)
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv(), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
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
        for path in (self.vhost_user_socket, self.uds_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


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
