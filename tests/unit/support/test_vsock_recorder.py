"""The hybrid-vsock recorder relays byte for byte and records both directions; it stops its
backend on SIGTERM and removes its sockets. The backend here is a stand-in that serves the
hybrid-vsock handshake and echoes (the real vhost-device-vsock needs a VM: the proof's e2e
test uses it)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.vsock_recorder import recordings, rewrite_vm_option, write_wrapper

WAIT = 10.0

# The stand-in listens a while after its socket file appears (bind, then listen), as a
# loaded backend may: the recorder must neither drop a connection made in between nor let
# the test meet its own socket before it listens.
FAKE_BACKEND = textwrap.dedent("""\
    import os, socket, sys, threading, time
    opts = dict(f.split("=", 1) for f in sys.argv[sys.argv.index("--vm") + 1].split(","))
    open(opts["socket"], "w").close()  # stands for the vhost-user socket
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(opts["uds-path"]); time.sleep(0.3); srv.listen()
    def serve(conn):
        f = conn.makefile("rb")
        port = f.readline().split()[1]
        conn.sendall(b"OK " + port + b"\\n")
        while data := f.read1(4096):
            conn.sendall(data[::-1])
        conn.close()
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
    """)


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_rewrite_moves_only_the_uds_path() -> None:
    argv, uds = rewrite_vm_option(
        ["--vm", "guest-cid=3,socket=/r/vhu.sock,uds-path=/r/vsock.sock"])
    assert argv == ["--vm", "guest-cid=3,socket=/r/vhu.sock,uds-path=/r/vsock.sock.rec"]
    assert uds == Path("/r/vsock.sock")
    with pytest.raises(SystemExit, match="no uds-path"):
        rewrite_vm_option(["--vm", "guest-cid=3"])


def test_relays_and_records_both_directions(tmp_path: Path) -> None:
    fake = tmp_path / "fake-backend"
    fake.write_text(f"#!{sys.executable}\n{FAKE_BACKEND}")
    fake.chmod(0o755)
    run = tmp_path / "podrun"
    run.mkdir()
    records = tmp_path / "rec"
    wrapper = write_wrapper(tmp_path / "vhost-device-vsock", fake, records)
    proc = subprocess.Popen([str(wrapper), "--vm", f"guest-cid=3,socket={run}/vhu.sock,"
                             f"uds-path={run}/vsock.sock"], start_new_session=True)
    try:
        wait_for(run / "vsock.sock")
        payload = os.urandom(200_000)
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(str(run / "vsock.sock"))
            sock.sendall(b"CONNECT 1024\n")
            got = b""
            while not got.endswith(b"\n"):
                got += sock.recv(1)
            assert got == b"OK 1024\n"
            sock.sendall(payload)
            back = b""
            while len(back) < len(payload):
                back += sock.recv(65536)
        assert back  # the echo answers chunk by chunk, each reversed
        deadline = time.monotonic() + WAIT
        while True:
            streams = {p.suffix: p.read_bytes() for p in recordings(records)}
            if len(streams.get(".to-guest", b"")) == 13 + len(payload) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert streams[".to-guest"] == b"CONNECT 1024\n" + payload
        assert streams[".to-host"] == b"OK 1024\n" + back
        assert all(p.name.startswith("podrun.") for p in recordings(records))

        # Guest-initiated: the host listens on <uds>_<port>; the backend (here: this test)
        # dials <uds>.rec_<port>, which the recorder relays and records.
        with socket.socket(socket.AF_UNIX) as host_port:
            host_port.bind(str(run / "vsock.sock_1025"))
            host_port.listen()
            wait_for(run / "vsock.sock.rec_1025")
            with socket.socket(socket.AF_UNIX) as guest:
                guest.settimeout(WAIT)
                guest.connect(str(run / "vsock.sock.rec_1025"))
                guest.sendall(b"READY 1024\n")
                host_port.settimeout(WAIT)
                conn, _ = host_port.accept()
                with conn:
                    got = b""
                    while not got.endswith(b"\n"):
                        got += conn.recv(64)
                    assert got == b"READY 1024\n"
        deadline = time.monotonic() + WAIT
        while not any(p.name.startswith("podrun.guest-port-1025") and p.read_bytes()
                      for p in recordings(records)):
            assert time.monotonic() < deadline, "guest-initiated bytes not recorded"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
        assert not (run / "vsock.sock").exists()
        assert not (run / "vsock.sock.rec").exists()
        # the backend is gone with the wrapper
        left = subprocess.run(["pgrep", "-f", str(fake)], capture_output=True, check=False)
        assert left.stdout == b""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
