"""Network namespaces that tests make (and always remove): a pod netns whose ``eth0`` is a veth
to a peer netns. Addresses only in the benchmarking range 198.18.0.0/15."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/var/run/netns")


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def ip_json(netns: str, *args: str) -> list[dict[str, Any]]:
    out = sh("ip", "-n", netns, "-j", *args)
    return list(json.loads(out or "[]"))


def tc_json(netns: str, *args: str) -> list[dict[str, Any]]:
    out = sh("tc", "-n", netns, "-j", *args)
    return list(json.loads(out or "[]"))


@dataclass(frozen=True)
class VethPair:
    pod: str  # netns names
    peer: str
    pod_ip: str
    peer_ip: str
    prefix: int = 24

    @property
    def pod_path(self) -> Path:
        return NETNS_DIR / self.pod

    def link(self, name: str = "eth0") -> dict[str, Any]:
        (found,) = ip_json(self.pod, "link", "show", "dev", name)
        return found

    def pod_links(self) -> list[str]:
        return [str(link["ifname"]) for link in ip_json(self.pod, "link", "show")]

    def ingress_qdiscs(self) -> list[str]:
        return [str(q["dev"]) for q in tc_json(self.pod, "qdisc", "show")
                if q.get("kind") == "ingress"]

    def filters(self, device: str = "eth0") -> str:
        return sh("tc", "-n", self.pod, "filter", "show", "dev", device, "ingress", check=False)


@contextlib.contextmanager
def veth_pair(subnet: int = 0, mtu: int = 1500) -> Iterator[VethPair]:
    """Pod netns with ``eth0`` 198.18.<subnet>.2/24 (default route via .1, one permanent
    neighbour) wired to a peer netns holding ``peer0`` 198.18.<subnet>.1/24."""
    tag = uuid.uuid4().hex[:8]
    pair = VethPair(pod=f"coco-pod-{tag}", peer=f"coco-peer-{tag}",
                    pod_ip=f"198.18.{subnet}.2", peer_ip=f"198.18.{subnet}.1")
    try:
        sh("ip", "netns", "add", pair.pod)
        sh("ip", "netns", "add", pair.peer)
        sh("ip", "link", "add", "eth0", "netns", pair.pod, "mtu", str(mtu), "type", "veth",
           "peer", "name", "peer0", "netns", pair.peer, "mtu", str(mtu))
        sh("ip", "-n", pair.pod, "addr", "add", f"{pair.pod_ip}/24", "dev", "eth0")
        sh("ip", "-n", pair.peer, "addr", "add", f"{pair.peer_ip}/24", "dev", "peer0")
        for ns, dev in ((pair.pod, "eth0"), (pair.peer, "peer0"), (pair.pod, "lo"),
                        (pair.peer, "lo")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", pair.pod, "route", "add", "default", "via", pair.peer_ip)
        sh("ip", "-n", pair.pod, "neigh", "add", f"198.18.{subnet}.9", "lladdr",
           "02:00:00:00:00:09", "dev", "eth0", "nud", "permanent")
        yield pair
    finally:
        for ns in (pair.pod, pair.peer):
            sh("ip", "netns", "del", ns, check=False)


def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


@contextlib.contextmanager
def host_link(subnet: int, mtu: int = 1500) -> Iterator[VethPair]:
    """A peer netns wired to the host's own namespace: ``peer0`` 198.18.<subnet>.1/24 there,
    the host end 198.18.<subnet>.2/24 (named ``cocoh<tag>``) here, and the peer's default
    route back through the host, so anything the host routes (a CNI bridge's pods, with the
    host forwarding) reaches the peer and is answered. ``pod`` is the host end's name."""
    tag = uuid.uuid4().hex[:8]
    host_end = f"cocoh{tag}"
    pair = VethPair(pod=host_end, peer=f"coco-peer-{tag}", pod_ip=f"198.18.{subnet}.2",
                    peer_ip=f"198.18.{subnet}.1")
    try:
        sh("ip", "netns", "add", pair.peer)
        sh("ip", "link", "add", host_end, "mtu", str(mtu), "type", "veth", "peer", "name",
           "peer0", "netns", pair.peer, "mtu", str(mtu))
        sh("ip", "addr", "add", f"{pair.pod_ip}/24", "dev", host_end)
        sh("ip", "-n", pair.peer, "addr", "add", f"{pair.peer_ip}/24", "dev", "peer0")
        sh("ip", "link", "set", host_end, "up")
        for dev in ("peer0", "lo"):
            sh("ip", "-n", pair.peer, "link", "set", dev, "up")
        sh("ip", "-n", pair.peer, "route", "add", "default", "via", pair.pod_ip)
        yield pair
    finally:
        sh("ip", "netns", "del", pair.peer, check=False)  # takes the veth (both ends) along
        sh("ip", "link", "del", host_end, check=False)
