"""A packet capture of one interface during a test: tcpdump (Debian bookworm's) in the
interface's network namespace, the whole packets written to a pcap file.

The proof scans the pcap's bytes for the secret's plaintext spellings: the KBS answers over
TLS with a JWE to a key only the guest holds, so nothing readable may cross the pod's wire.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.envinfo import require

TCPDUMP = Path("/usr/bin/tcpdump")
INSTALL = "apt-get install -y tcpdump"
READY_TIMEOUT = 10.0


@contextlib.contextmanager
def capture(pcap: Path, interface: str, netns: str | None = None,
            expression: tuple[str, ...] = ()) -> Iterator[Path]:
    """Capture ``interface`` (in named netns ``netns``, or the host's; ``any`` also sees
    interfaces made later, such as a pod's veth) into ``pcap`` while the block runs, keeping
    the packets the pcap-filter ``expression`` selects; the file is complete when the block
    ends."""
    require(TCPDUMP, INSTALL)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    stderr = pcap.with_suffix(".log")
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [*prefix, str(TCPDUMP), "-i", interface, "-n", "-s", "0", "-U", "-w", str(pcap),
             "--immediate-mode", *expression], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while b"listening on" not in stderr.read_bytes():
            if proc.poll() is not None:
                raise AssertionError(f"tcpdump on {interface} exited {proc.returncode}: "
                                     f"{stderr.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"tcpdump on {interface} not listening after "
                                     f"{READY_TIMEOUT}s")
            time.sleep(0.02)
        yield pcap
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=READY_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def packet_count(pcap: Path) -> int:
    """Packets in a capture (tcpdump reading it back)."""
    out = subprocess.run([str(TCPDUMP), "-r", str(pcap), "-n", "-q"], capture_output=True,
                         check=True, timeout=60)
    return len(out.stdout.splitlines())
