"""Pod networking domain (shim/network.py) against a fake netlink: plan, wire with rollback,
unwire, EBUSY retries, the guest requests, and where the netns comes from."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest

from shim.core.errors import FailedPrecondition, InvalidArgument
from shim.network import tcfilter as network
from shim.network.tcfilter import (
    FAMILY_V4,
    FAMILY_V6,
    IpAddress,
    Link,
    Neighbor,
    PodNetwork,
    Route,
    dns_of,
    guest_requests,
    netns_of,
    plan,
    unwire,
    wire,
)

LO = Link(1, "lo", "loopback", "", 65536)
ETH0 = Link(2, "eth0", "veth", "02:42:c6:12:00:02", 1450)
ETH1 = Link(3, "eth1", "veth", "02:42:c6:12:01:02", 1500)


class FakeNetlink:
    """Records every change; ``fail`` maps an operation name to the error it raises (once per
    entry in the list)."""

    def __init__(self, links: list[Link], fail: Mapping[str, list[OSError]] | None = None,
                 addresses: Mapping[str, list[IpAddress]] | None = None,
                 routes: list[Route] | None = None,
                 neighbors: list[Neighbor] | None = None) -> None:
        self._links = list(links)
        self.fail = {k: list(v) for k, v in (fail or {}).items()}
        self._addresses = dict(addresses or {})
        self._routes = list(routes or [])
        self._neighbors = list(neighbors or [])
        self.taps: dict[str, tuple[str, int]] = {}
        self.ingress: set[str] = set()
        self.redirects: set[tuple[str, str]] = set()
        self.calls: list[str] = []
        self.fds: list[int] = []

    def _maybe_fail(self, op: str) -> None:
        self.calls.append(op)
        errors = self.fail.get(op)
        if errors:
            raise errors.pop(0)

    def links(self) -> list[Link]:
        taps = [Link(100 + i, name, "tun", mac, mtu)
                for i, (name, (mac, mtu)) in enumerate(sorted(self.taps.items()))]
        return self._links + taps

    def addresses(self, link: Link) -> list[IpAddress]:
        return self._addresses.get(link.name, [])

    def routes(self, links: Mapping[int, str]) -> list[Route]:
        return [r for r in self._routes if r.device in links.values()]

    def neighbors(self, links: Mapping[int, str]) -> list[Neighbor]:
        return [n for n in self._neighbors if n.device in links.values()]

    def create_tap(self, name: str, mac: str, mtu: int) -> int:
        self._maybe_fail("create_tap")
        self.taps[name] = (mac, mtu)
        fd = os.open(os.devnull, os.O_RDONLY)
        self.fds.append(fd)
        return fd

    def add_ingress(self, device: str) -> None:
        self._maybe_fail("add_ingress")
        if device in self.ingress:
            raise OSError(errno.EEXIST, "exists")
        self.ingress.add(device)

    def add_redirect(self, device: str, to_device: str) -> None:
        self._maybe_fail("add_redirect")
        assert device in self.ingress
        self.redirects.add((device, to_device))

    def delete_ingress(self, device: str) -> None:
        self._maybe_fail("delete_ingress")
        self.ingress.discard(device)
        self.redirects = {r for r in self.redirects if r[0] != device}

    def delete_link(self, name: str) -> None:
        self._maybe_fail("delete_link")
        if self.taps.pop(name, None) is not None:
            self.ingress.discard(name)
            self.redirects = {r for r in self.redirects if name not in r}

    def clean(self) -> bool:
        return not self.taps and not self.ingress and not self.redirects


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_plan_wires_veths_skips_loopback_and_names_taps() -> None:
    assert [(link.name, tap) for link, tap in plan([ETH1, LO, ETH0])] == [
        ("eth0", "tap0_eth0"), ("eth1", "tap1_eth1")]


def test_tap_names_fit_ifnamsiz() -> None:
    long = Link(2, "averylongname", "veth", "02:00:00:00:00:01", 1500)
    (_, tap), = plan([long])
    assert tap == "tap0_averylongn" and len(tap) == 15


@pytest.mark.parametrize("kind", ["dummy", "bridge", "macvlan", ""])
def test_plan_refuses_unwirable_kinds_naming_the_interface(kind: str) -> None:
    odd = Link(4, "odd0", kind, "02:00:00:00:00:04", 1500)
    with pytest.raises(InvalidArgument, match="interface odd0 is a"):
        plan([LO, ETH0, odd])


def test_wire_makes_tap_qdiscs_and_redirects_both_ways() -> None:
    fake = FakeNetlink(
        [LO, ETH0],
        addresses={"eth0": [IpAddress(FAMILY_V4, "198.18.0.2", 24),
                            IpAddress(FAMILY_V6, "fe80::42:c6ff:fe12:2", 64),
                            IpAddress(FAMILY_V6, "2001:db8::2", 64)]},
        routes=[Route("", "198.18.0.1", "eth0", "", 0, FAMILY_V4),
                Route("198.18.0.0/24", "", "eth0", "198.18.0.2", 253, FAMILY_V4),
                Route("fe80::/64", "", "eth0", "", 0, FAMILY_V6)],
        neighbors=[Neighbor("198.18.0.9", "02:00:00:00:00:09", "eth0", 0x80),
                   Neighbor("198.18.0.1", "02:00:00:00:00:01", "eth0", 0x02)])
    pod, fds = wire(fake, "/var/run/netns/pod")
    try:
        assert fake.taps == {"tap0_eth0": ("02:42:c6:12:00:02", 1450)}
        assert fake.ingress == {"eth0", "tap0_eth0"}
        assert fake.redirects == {("eth0", "tap0_eth0"), ("tap0_eth0", "eth0")}
        assert len(fds) == 1 and fd_open(fds[0])
        (endpoint,) = pod.endpoints
        assert endpoint.addresses == (IpAddress(FAMILY_V4, "198.18.0.2", 24),
                                      IpAddress(FAMILY_V6, "2001:db8::2", 64))
        assert [r.dest for r in pod.routes] == ["", "198.18.0.0/24"]  # no link-local route
        assert [n.address for n in pod.neighbors] == ["198.18.0.9"]  # permanent only
        unwire(fake, pod)
        assert fake.clean()
        unwire(fake, pod)  # idempotent
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("op", ["create_tap", "add_ingress", "add_redirect"])
def test_wire_failure_rolls_back_everything(op: str) -> None:
    # The second interface fails: the first one's tap, qdiscs and filters must go too.
    fake = FakeNetlink([LO, ETH0, ETH1])
    calls_before_second = {"create_tap": 1, "add_ingress": 2, "add_redirect": 2}[op]
    original = getattr(fake, op)
    count = {"n": 0}

    def failing(*args: object) -> object:
        count["n"] += 1
        if count["n"] > calls_before_second:
            raise OSError(errno.EPERM, f"{op} refused")
        return original(*args)

    setattr(fake, op, failing)
    with pytest.raises(OSError, match="refused"):
        wire(fake, "/var/run/netns/pod")
    assert fake.clean(), (fake.taps, fake.ingress, fake.redirects)
    assert fake.fds and not any(fd_open(fd) for fd in fake.fds)


def test_unwirable_interface_creates_nothing() -> None:
    fake = FakeNetlink([LO, ETH0, Link(5, "dummy0", "dummy", "02:00:00:00:00:05", 1500)])
    with pytest.raises(InvalidArgument, match="dummy0 is a dummy"):
        wire(fake, "/var/run/netns/pod")
    assert fake.clean() and "create_tap" not in fake.calls


def test_ebusy_is_retried_other_errors_are_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "BUSY_PAUSE", 0.0)
    fake = FakeNetlink([ETH0], fail={"add_ingress": [OSError(errno.EBUSY, "busy")] * 3})
    _, fds = wire(fake, "/ns")
    for fd in fds:
        os.close(fd)
    assert fake.calls.count("add_ingress") == 2 + 3
    fake = FakeNetlink([ETH0], fail={"add_ingress": [OSError(errno.EEXIST, "exists")]})
    with pytest.raises(OSError, match="exists"):
        wire(fake, "/ns")
    assert fake.calls.count("add_ingress") == 1 and fake.clean()


def test_ebusy_retries_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(network, "BUSY_PAUSE", 0.0)
    fake = FakeNetlink([ETH0], fail={"create_tap": [OSError(errno.EBUSY, "busy")] * 50})
    with pytest.raises(OSError, match="busy"):
        wire(fake, "/ns")
    assert fake.calls.count("create_tap") == network.BUSY_ATTEMPTS


def test_a_netns_carrying_another_pods_taps_is_refused_not_rewired() -> None:
    """Our taps die with their last fd: one that exists belongs to a live pod VM."""
    fake = FakeNetlink([LO, ETH0])
    fake.taps["tap0_eth0"] = ("02:42:c6:12:00:02", 1450)
    fake.ingress |= {"eth0", "tap0_eth0"}
    fake.redirects |= {("eth0", "tap0_eth0"), ("tap0_eth0", "eth0")}
    before = (dict(fake.taps), set(fake.ingress), set(fake.redirects))
    with pytest.raises(FailedPrecondition, match=r"network namespace /ns already carries "
                                                 r"tap0_eth0 of another pod's VM"):
        wire(fake, "/ns")
    assert (fake.taps, fake.ingress, fake.redirects) == before
    assert not {"create_tap", "delete_link", "delete_ingress"} & set(fake.calls)


def test_unwire_tries_everything_then_raises_the_first_error() -> None:
    fake = FakeNetlink([ETH0, ETH1])
    pod, fds = wire(fake, "/ns")
    for fd in fds:
        os.close(fd)
    fake.fail["delete_ingress"] = [OSError(errno.EPERM, "nope")]
    with pytest.raises(OSError, match="nope"):
        unwire(fake, pod)
    assert not fake.taps and fake.ingress == {"eth0"}


def test_pod_network_json_round_trip() -> None:
    fake = FakeNetlink([ETH0], addresses={"eth0": [IpAddress(FAMILY_V4, "198.18.0.2", 24)]},
                       routes=[Route("", "198.18.0.1", "eth0", "", 0, FAMILY_V4)],
                       neighbors=[Neighbor("198.18.0.9", "02:00:00:00:00:09", "eth0", 0x80)])
    pod, fds = wire(fake, "/ns")
    for fd in fds:
        os.close(fd)
    assert PodNetwork.from_json(pod.to_json()) == pod
    assert json.loads(pod.to_json())["endpoints"][0]["tap"] == "tap0_eth0"


def test_guest_requests_carry_name_mac_mtu_addresses_routes_neighbours() -> None:
    pod = PodNetwork(
        netns="/ns",
        endpoints=(network.Endpoint("eth0", "02:42:c6:12:00:02", 1450, "tap0_eth0",
                                    (IpAddress(FAMILY_V4, "198.18.0.2", 24),
                                     IpAddress(FAMILY_V6, "2001:db8::2", 64))),),
        routes=(Route("", "198.18.0.1", "eth0", "", 0, FAMILY_V4),),
        neighbors=(Neighbor("198.18.0.9", "02:00:00:00:00:09", "eth0", 0x80),))
    requests = guest_requests(pod)
    (iface,) = requests.interfaces
    assert (iface.name, iface.device, iface.hwAddr, iface.mtu) == (
        "eth0", "eth0", "02:42:c6:12:00:02", 1450)
    assert [(a.family, a.address, a.mask) for a in iface.IPAddresses] == [
        (0, "198.18.0.2", "24"), (1, "2001:db8::2", "64")]
    (route,) = requests.routes
    assert (route.dest, route.gateway, route.device) == ("", "198.18.0.1", "eth0")
    (neighbor,) = requests.neighbors
    assert (neighbor.toIPAddress.address, neighbor.lladdr, neighbor.device, neighbor.state) == (
        "198.18.0.9", "02:00:00:00:00:09", "eth0", 0x80)
    empty = guest_requests(PodNetwork("/ns"))
    assert empty.interfaces == [] and empty.routes == [] and empty.neighbors == []


def spec_with_netns(path: str | None) -> dict[str, object]:
    entry: dict[str, str] = {"type": "network"}
    if path is not None:
        entry["path"] = path
    return {"linux": {"namespaces": [{"type": "pid"}, entry]}}


def test_netns_of(tmp_path: Path) -> None:
    ns = tmp_path / "podns"
    ns.touch()
    assert netns_of(spec_with_netns(str(ns)), "pod1") == ns
    assert netns_of(spec_with_netns(None), "pod1") is None  # a new, empty netns: no NIC
    assert netns_of({"linux": {"namespaces": [{"type": "pid"}]}}, "pod1") is None
    assert netns_of({}, "pod1") is None
    with pytest.raises(FailedPrecondition, match=f"pod pod1: network namespace {tmp_path}/gone"):
        netns_of(spec_with_netns(str(tmp_path / "gone")), "pod1")
    with pytest.raises(InvalidArgument, match="not absolute"):
        netns_of(spec_with_netns("relative/ns"), "pod1")


def test_dns_of_reads_the_resolv_conf_mount(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 198.18.0.53\n\nsearch example.test\n")
    spec = {"mounts": [{"destination": "/etc/hosts", "source": "/x"},
                       {"destination": "/etc/resolv.conf", "source": str(resolv)}]}
    assert dns_of(spec) == ["nameserver 198.18.0.53", "search example.test"]
    assert dns_of({}) == []
    assert dns_of({"mounts": [{"destination": "/etc/resolv.conf",
                               "source": str(tmp_path / "none")}]}) == []


def test_the_daemon_side_does_not_import_pyroute2() -> None:
    """pyroute2 lives in the helper process only (habit 10, and the daemon's RSS)."""
    code = ("import sys, shim.daemon.main, shim.pod.boot, shim.network.tcfilter,"
            " shim.network.helper;"
            "shim.pod.boot.default_networking();"
            "print(sorted(m for m in sys.modules if m.startswith('pyroute2')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[3])
    assert out.stdout.strip() == "[]"
