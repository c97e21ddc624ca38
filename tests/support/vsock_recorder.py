"""A transparent recorder on the hybrid-vsock socket between the shim and vhost-device-vsock.

Test-side only: the product is untouched. The shim finds vhost-device-vsock through
``$COCO_VHOST_DEVICE_VSOCK`` (hypervisor/probe.py); the test points that at a wrapper
(:func:`write_wrapper`) which

1. runs the real ``vhost-device-vsock`` with ``uds-path=<path>.rec`` instead of ``<path>``;
2. listens on ``<path>`` itself, so the shim connects to the wrapper, and relays every
   connection to the real socket byte for byte (``CONNECT <port>`` handshake included);
3. appends what each direction carried to ``<record dir>/<pod>.<n>.to-guest`` and
   ``.to-host`` (one pair per connection; ``<pod>`` is the run directory's name), flushed as
   it passes, so the recording is complete when the connection closes;
4. relays the connections the guest opens to a host port P the same way: the backend dials
   ``<path>.rec_P``, the wrapper forwards to ``<path>_P`` where the host listens (the
   agent's ready announcement), recorded as ``<pod>.guest-port-P.*``.

SIGTERM (the shim's stop) ends the real backend, then the wrapper; the real backend also
gets SIGKILL from the kernel if the wrapper dies (PR_SET_PDEATHSIG), so nothing outlives a
pod. The recording's files are plain byte streams: scan them with tests.support.secret_scan.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[2]
CHUNK = 1 << 16
PR_SET_PDEATHSIG = 1
# A backend's socket file appears at bind(), before its listen(): a connection in between is
# refused, so the relay dials again within this bound (the backend is still starting).
DIAL_BOUND = 10.0


def write_wrapper(path: Path, real: Path, record_dir: Path) -> Path:
    """An executable that stands in for ``real`` and records into ``record_dir``."""
    record_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.support.vsock_recorder import main\n"
        f"sys.exit(main([{str(real)!r}, {str(record_dir)!r}, *sys.argv[1:]]))\n")
    path.chmod(0o755)
    return path


def recordings(record_dir: Path) -> list[Path]:
    """Every recorded stream, sorted."""
    return sorted(p for p in record_dir.iterdir() if p.suffix in (".to-guest", ".to-host"))


def rewrite_vm_option(argv: list[str]) -> tuple[list[str], Path]:
    """The backend's argv with ``uds-path`` moved aside, and the original uds path."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg != "--vm":
            continue
        fields = out[i + 1].split(",")
        for j, field in enumerate(fields):
            key, _, value = field.partition("=")
            if key == "uds-path":
                fields[j] = f"uds-path={value}.rec"
                out[i + 1] = ",".join(fields)
                return out, Path(value)
    raise SystemExit(f"vsock recorder: no uds-path in --vm option: {argv}")


def listen_at(path: Path) -> socket.socket:
    """A unix listener that appears at ``path`` already listening: bound beside it, then
    renamed into place (a client that sees the file never meets a refusing socket)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        listener.bind(str(staging))
        listener.listen(16)
        os.rename(staging, path)
    except OSError:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        raise
    return listener


def dial(path: Path) -> socket.socket:
    """Connect to ``path``, again while it refuses (bound, not yet listening) or is not there
    yet, up to DIAL_BOUND."""
    deadline = time.monotonic() + DIAL_BOUND
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
        except OSError:
            sock.close()
            raise


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Relay:
    """Accepts on the shim's socket; each connection is two pump threads to the real one."""

    def __init__(self, real_uds: Path, record_dir: Path, pod: str) -> None:
        self.real_uds = real_uds
        self.record_dir = record_dir
        self.pod = pod
        self.count = 0

    def accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                host, _ = listener.accept()
            except OSError:  # closed: the wrapper is stopping
                return
            self.count += 1
            threading.Thread(target=self.connection, args=(host, self.count),
                             daemon=True).start()

    def connection(self, host: socket.socket, number: int) -> None:
        stem = self.record_dir / f"{self.pod}.{os.getpid()}.{number}"
        try:
            guest = dial(self.real_uds)
        except OSError:
            host.close()
            return
        with open(f"{stem}.to-guest", "ab") as to_guest, open(f"{stem}.to-host", "ab") as to_host:
            pumps = [threading.Thread(target=self.pump, args=(host, guest, to_guest)),
                     threading.Thread(target=self.pump, args=(guest, host, to_host))]
            for pump in pumps:
                pump.start()
            for pump in pumps:
                pump.join()
        host.close()
        guest.close()

    @staticmethod
    def pump(source: socket.socket, sink: socket.socket, record: BinaryIO) -> None:
        try:
            while chunk := source.recv(CHUNK):
                record.write(chunk)
                record.flush()
                sink.sendall(chunk)
        except OSError:
            pass
        # Either side closing ends the connection, as it would without the relay.
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def relay_guest_initiated(uds: Path, record_dir: Path,
                          known: dict[Path, socket.socket]) -> dict[Path, socket.socket]:
    """Connections the guest opens to host port P reach ``<uds-path>_P``: the backend now
    dials ``<uds>.rec_P``, so relay (and record) each ``<uds>_P`` the host listens on."""
    found = {}
    for target in uds.parent.glob(f"{uds.name}_*"):
        port = target.name.removeprefix(f"{uds.name}_")
        front = uds.parent / f"{uds.name}.rec_{port}"
        if not port.isdigit() or front in known:
            continue
        listener = listen_at(front)
        relay = Relay(target, record_dir, f"{uds.parent.name}.guest-port-{port}")
        threading.Thread(target=relay.accept_loop, args=(listener,), daemon=True).start()
        found[front] = listener
    return found


def serve(real: Path, record_dir: Path, argv: list[str]) -> int:
    backend_argv, uds = rewrite_vm_option(argv)
    real_uds = Path(f"{uds}.rec")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _sig, _frame: stop.set())
    backend = subprocess.Popen([str(real), *backend_argv], preexec_fn=_die_with_parent)
    listener: socket.socket | None = None
    reverse: dict[Path, socket.socket] = {}
    try:
        reverse.update(relay_guest_initiated(uds, record_dir, reverse))
        # Listen only once the real backend's socket is there (each connection still dials
        # it again while it refuses: bound, not yet listening), and appear already
        # listening: the shim dials as soon as the file exists.
        while not real_uds.exists() and backend.poll() is None and not stop.is_set():
            stop.wait(0.005)
        listener = listen_at(uds)
        relay = Relay(real_uds, record_dir, uds.parent.name)
        threading.Thread(target=relay.accept_loop, args=(listener,), daemon=True).start()
        while not stop.is_set() and backend.poll() is None:
            reverse.update(relay_guest_initiated(uds, record_dir, reverse))
            stop.wait(0.05)
    finally:
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if backend.poll() is None:
            backend.terminate()
            try:
                backend.wait(timeout=5)
            except subprocess.TimeoutExpired:
                backend.kill()
                backend.wait()
        for path, sock in reverse.items():
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for path in (uds, real_uds):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
    return 0 if stop.is_set() else (backend.returncode or 0)


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vsock-recorder")
    parser.add_argument("real", type=Path)
    parser.add_argument("record_dir", type=Path)
    known, rest = parser.parse_known_args(args)
    return serve(known.real, known.record_dir, rest)
