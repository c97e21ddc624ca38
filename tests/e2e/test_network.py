"""Pod networking end to end: ``ctr run --with-ns network:<pod netns>`` → the shim wires the
netns's veth to a tap (tc redirect) → virtio-net in the VM. The container sees the veth's IP on
eth0 (and its hostname and resolv.conf), reaches an HTTP server in a peer netns, and serves one
(busybox httpd) that the peer reaches; afterwards no tap, qdisc, filter, netns, QEMU or shim
is left. One VM boot per containerd version; the bad-input cases boot none."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import RUNTIME, CocoContainerd, describe
from tests.support.containerd import coco_processes
from tests.support.images import BUSYBOX_REF
from tests.support.netns import VethPair, netns_exists, sh, veth_pair

pytestmark = pytest.mark.e2e
BUSYBOX = "/bin/busybox"
PEER_PORT = 8080


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def ctr_argv(coco: CocoContainerd, *args: str) -> list[str]:
    return [str(coco.cd.bin_dir / "ctr"), "--address", str(coco.cd.address),
            "--namespace", "default", *args]


@contextlib.contextmanager
def peer_http_server(pair: VethPair, root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "index.html").write_text("hello-from-peer\n")
    server = subprocess.Popen(
        ["ip", "netns", "exec", pair.peer, sys.executable, "-m", "http.server", "--bind",
         pair.peer_ip, "--directory", str(root), str(PEER_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while "hello-from-peer" not in peer_fetch(pair, f"http://{pair.peer_ip}:{PEER_PORT}/"):
            assert time.monotonic() < deadline, "peer HTTP server did not come up"
            time.sleep(0.1)
        yield
    finally:
        server.kill()
        server.wait()


def peer_fetch(pair: VethPair, url: str, timeout: float = 10) -> str:
    """busybox wget from the peer netns ("" on failure). No -T: busybox 1.35's static wget
    crashes with it; the subprocess timeout bounds the wait instead."""
    try:
        done = subprocess.run(["ip", "netns", "exec", pair.peer, BUSYBOX, "wget", "-q", "-O-",
                               url], capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout.decode(errors="replace")


def read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} from the container in {timeout} s: {seen!r}")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                raise AssertionError(f"container output ended before {marker!r}: {seen!r}")
            seen += chunk
    return seen


def assert_netns_clean(pair: VethPair) -> None:
    assert [n for n in pair.pod_links() if n.startswith("tap")] == [], pair.pod_links()
    assert pair.ingress_qdiscs() == []
    assert "mirred" not in pair.filters("eth0")


def wait_no_processes(coco: CocoContainerd, cid: str, timeout: float = 60) -> None:
    """No shim daemon or QEMU of this pod is left (they carry the container id)."""
    def mine() -> list[int]:
        found = []
        for pid in coco_processes(coco.base):
            with contextlib.suppress(OSError):
                if cid.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
        return found

    deadline = time.monotonic() + timeout
    while (left := mine()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, describe(left)


def test_container_talks_both_ways_through_the_pod_netns(coco: CocoContainerd) -> None:
    cid = name("net")
    with veth_pair(subnet=20) as pair, peer_http_server(pair, coco.base / "peer-www"):
        resolv = coco.base / f"{cid}-resolv.conf"
        resolv.write_text("nameserver 198.18.20.53\n")
        script = (
            "ip addr show eth0; ip route; hostname; cat /etc/resolv.conf; "
            f"timeout 30 wget -q -O- http://{pair.peer_ip}:{PEER_PORT}/ || echo WGET-FAILED; "
            "mkdir -p /tmp/www && echo hello-from-guest > /tmp/www/index.html && "
            "echo HTTPD-READY && exec httpd -f -p 80 -h /tmp/www")
        proc = subprocess.Popen(
            ctr_argv(coco, "run", "--runtime", RUNTIME, "--rm", "--with-ns",
                     f"network:{pair.pod_path}", "--hostname", "netpod", "--mount",
                     f"type=bind,src={resolv},dst=/etc/resolv.conf,options=rbind:ro",
                     BUSYBOX_REF, cid, "sh", "-c", script),
            env=coco.cd.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            seen = read_until(proc, b"HTTPD-READY", timeout=180).decode(errors="replace")
            assert f"inet {pair.pod_ip}/24" in seen, seen
            assert "hello-from-peer" in seen, seen
            assert f"default via {pair.peer_ip}" in seen, seen
            assert "\nnetpod\n" in seen and "nameserver 198.18.20.53" in seen, seen

            deadline = time.monotonic() + 60
            while "hello-from-guest" not in peer_fetch(pair, f"http://{pair.pod_ip}:80/"):
                assert time.monotonic() < deadline, "guest httpd unreachable from the peer"
                time.sleep(0.5)

            coco.ctr("task", "kill", "--signal", "SIGKILL", cid)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                coco.ctr("task", "kill", "--signal", "SIGKILL", cid, check=False)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=30)
                proc.kill()
                proc.wait()
            coco.ctr("task", "rm", "-f", cid, check=False)
            coco.ctr("container", "rm", cid, check=False)
        wait_no_processes(coco, cid)
        assert_netns_clean(pair)
        pod_ns = pair.pod
    assert not netns_exists(pod_ns)


def test_bad_pod_netns_is_refused_with_its_name(coco: CocoContainerd) -> None:
    missing = "/var/run/netns/coco-no-such-netns"
    out = coco.run(name("nons"), "true", check=False,
                   flags=("--rm", "--with-ns", f"network:{missing}"))
    assert out.returncode != 0
    assert f"network namespace {missing} does not exist".encode() in out.stderr, out.stderr

    with veth_pair(subnet=21) as pair:
        sh("ip", "-n", pair.pod, "link", "add", "br0", "type", "bridge")
        cid = name("br")
        out = coco.run(cid, "true", check=False,
                       flags=("--rm", "--with-ns", f"network:{pair.pod_path}"))
        assert out.returncode != 0
        assert b"interface br0 is a bridge" in out.stderr, out.stderr
        coco.ctr("container", "rm", cid, check=False)
        wait_no_processes(coco, cid)
        assert_netns_clean(pair)
