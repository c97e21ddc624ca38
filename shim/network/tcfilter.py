"""Pod networking, tcfilter model: the pod's network namespace (made by CNI) reaches the VM.

For each veth in the pod's netns we create a tap beside it with the veth's MAC and MTU, give
both an ingress qdisc and a u32 match-all filter whose action is ``mirred egress redirect`` to
the other, and hand the tap's fd to QEMU (virtio-net with the veth's MAC). The guest then
learns the veth's addresses, the routes through it and the permanent ARP neighbours
(UpdateInterface, UpdateRoutes, AddARPNeighbors), so the VM *is* the pod's network endpoint.

This module is the domain: the plan (which links are wired, tap names), wire/unwire with
rollback through the :class:`Netlink` seam (a fake in unit tests, pyroute2 in
:mod:`shim.network.helper`), and the JSON form in which the helper process reports what it did.
It imports nothing heavy: the shim daemon never loads pyroute2 (the helper process does).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from shim.core.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

IFNAMSIZ = 15  # usable characters of a Linux interface name
WIRABLE_KINDS = frozenset({"veth"})  # what CNI plugins (bridge, ptp, ...) put in a pod netns
SKIPPED_KINDS = frozenset({"loopback"})
FAMILY_V4, FAMILY_V6 = 0, 1  # Kata types.IPFamily
NUD_PERMANENT = 0x80
BUSY_ATTEMPTS = 10
BUSY_PAUSE = 0.05

T = TypeVar("T")


@dataclass(frozen=True)
class IpAddress:
    family: int  # FAMILY_V4 | FAMILY_V6
    address: str
    prefix: int


@dataclass(frozen=True)
class Link:
    """A link as netlink reports it; ``kind`` is IFLA_INFO_KIND, or "loopback" for lo."""

    index: int
    name: str
    kind: str
    mac: str
    mtu: int


@dataclass(frozen=True)
class Route:
    dest: str  # "198.18.0.0/24"; "" is the default route
    gateway: str
    device: str
    source: str
    scope: int
    family: int


@dataclass(frozen=True)
class Neighbor:
    address: str
    mac: str
    device: str
    state: int
    flags: int = 0


@dataclass(frozen=True)
class Endpoint:
    """One wired interface: the veth the guest NIC impersonates, and its tap."""

    name: str
    mac: str
    mtu: int
    tap: str
    addresses: tuple[IpAddress, ...] = ()


@dataclass(frozen=True)
class PodNetwork:
    """What the pod's netns looks like, as the guest must see it."""

    netns: str
    endpoints: tuple[Endpoint, ...] = ()
    routes: tuple[Route, ...] = ()
    neighbors: tuple[Neighbor, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PodNetwork:
        doc = json.loads(text)
        return cls(
            netns=str(doc["netns"]),
            endpoints=tuple(
                Endpoint(name=e["name"], mac=e["mac"], mtu=int(e["mtu"]), tap=e["tap"],
                         addresses=tuple(IpAddress(**a) for a in e["addresses"]))
                for e in doc["endpoints"]),
            routes=tuple(Route(**r) for r in doc["routes"]),
            neighbors=tuple(Neighbor(**n) for n in doc["neighbors"]))


class Netlink(Protocol):
    """The netlink operations wiring needs, all inside the pod's netns. Removals are
    idempotent (a missing link or qdisc is not an error); failures raise OSError with errno."""

    def links(self) -> list[Link]: ...

    def addresses(self, link: Link) -> list[IpAddress]: ...

    def routes(self, links: Mapping[int, str]) -> list[Route]: ...

    def neighbors(self, links: Mapping[int, str]) -> list[Neighbor]: ...

    def create_tap(self, name: str, mac: str, mtu: int) -> int:
        """Create tap ``name`` (up, with this MAC and MTU); return its open queue fd."""
        ...

    def add_ingress(self, device: str) -> None: ...

    def add_redirect(self, device: str, to_device: str) -> None:
        """u32 match-all filter on ``device``'s ingress, action mirred egress redirect."""
        ...

    def delete_ingress(self, device: str) -> None: ...

    def delete_link(self, name: str) -> None: ...


# --- the plan ---------------------------------------------------------------------------------


def tap_name(index: int, device: str) -> str:
    return f"tap{index}_{device}"[:IFNAMSIZ]


def plan(links: Sequence[Link]) -> list[tuple[Link, str]]:
    """Which links get a tap (and its name). Loopback is skipped, taps we made are left to
    :func:`wire` (which refuses them); any other kind than veth is refused, naming the link."""
    wired: list[tuple[Link, str]] = []
    for link in sorted(links, key=lambda item: item.index):
        if link.kind in SKIPPED_KINDS or is_our_tap(link, links):
            continue
        if link.kind not in WIRABLE_KINDS:
            raise InvalidArgument(
                f"pod network: interface {link.name} is a {link.kind or 'device of unknown kind'}"
                f"; only {', '.join(sorted(WIRABLE_KINDS))} interfaces can be wired to the VM")
        if not link.mac:
            raise InvalidArgument(f"pod network: interface {link.name} has no MAC address")
        wired.append((link, tap_name(len(wired), link.name)))
    return wired


def is_our_tap(link: Link, links: Sequence[Link]) -> bool:
    """A tap named like ours for a link of this netns (a pod VM already uses the netns)."""
    if link.kind != "tun" or not link.name.startswith("tap"):
        return False
    return any(link.name == tap_name(i, other.name) for other in links for i in range(len(links)))


def retry_busy(what: str, action: Callable[..., T], *args: Any) -> T:
    """Run ``action``; retry only while the kernel answers EBUSY (e.g. a qdisc being torn down
    by a concurrent RTNL user), a bounded number of times."""
    for attempt in range(1, BUSY_ATTEMPTS + 1):
        try:
            return action(*args)
        except OSError as err:
            if err.errno != errno.EBUSY or attempt == BUSY_ATTEMPTS:
                raise
            log.debug("%s: busy, retrying (%d/%d)", what, attempt, BUSY_ATTEMPTS)
            time.sleep(BUSY_PAUSE * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def wire(netlink: Netlink, netns: str) -> tuple[PodNetwork, list[int]]:
    """Make a tap per wirable link with redirects both ways; return the pod network and the
    tap fds (in endpoint order). On any failure everything made so far is removed."""
    links = netlink.links()
    chosen = plan(links)
    # Our taps are not persistent: one that exists is held open by a live QEMU (or helper), so
    # this netns is another pod's. Refused, never rewired under that pod.
    taken = [link.name for link in links if is_our_tap(link, links)]
    if taken:
        raise FailedPrecondition(f"pod network: network namespace {netns} already carries "
                                 f"{', '.join(taken)} of another pod's VM")
    by_index = {link.index: link.name for link, _ in chosen}
    fds: list[int] = []
    with ExitStack() as undo:
        endpoints: list[Endpoint] = []
        for link, tap in chosen:
            retry_busy(f"reset ingress of {link.name}", netlink.delete_ingress, link.name)
            fd = retry_busy(f"create tap {tap}", netlink.create_tap, tap, link.mac, link.mtu)
            fds.append(fd)
            undo.callback(os.close, fd)
            undo.callback(_quietly, netlink.delete_link, tap)
            for device, peer in ((link.name, tap), (tap, link.name)):
                retry_busy(f"ingress qdisc on {device}", netlink.add_ingress, device)
                undo.callback(_quietly, netlink.delete_ingress, device)
                retry_busy(f"redirect {device} -> {peer}", netlink.add_redirect, device, peer)
            addresses = tuple(a for a in netlink.addresses(link) if not _link_local(a))
            endpoints.append(Endpoint(name=link.name, mac=link.mac, mtu=link.mtu, tap=tap,
                                      addresses=addresses))
        routes = tuple(r for r in netlink.routes(by_index) if not _link_local_route(r))
        neighbors = tuple(n for n in netlink.neighbors(by_index)
                          if n.state & NUD_PERMANENT and n.mac)
        undo.pop_all()
    return PodNetwork(netns=netns, endpoints=tuple(endpoints), routes=routes,
                      neighbors=neighbors), fds


def unwire(netlink: Netlink, network: PodNetwork) -> None:
    """Remove what :func:`wire` made: idempotent; the first real failure is raised after
    every removal was tried."""
    first: OSError | None = None
    for endpoint in network.endpoints:
        for action, name in ((netlink.delete_ingress, endpoint.name),
                             (netlink.delete_link, endpoint.tap)):
            try:
                retry_busy(f"remove {name}", action, name)
            except OSError as err:
                log.warning("pod network: removing %s: %s", name, err)
                first = first or err
    if first is not None:
        raise first


def _quietly(action: Callable[[str], None], name: str) -> None:
    try:
        action(name)
    except OSError as err:
        log.warning("pod network rollback: %s: %s", name, err)


def _link_local(address: IpAddress) -> bool:
    return ipaddress.ip_address(address.address).is_link_local and address.family == FAMILY_V6


def _link_local_route(route: Route) -> bool:
    if not route.dest:
        return False
    network = ipaddress.ip_network(route.dest, strict=False)
    return network.is_link_local or network.is_multicast


@dataclass
class WiredNetwork:
    """A wired pod netns as the daemon holds it: the description and the tap fds (ours to
    close once QEMU holds its copies)."""

    network: PodNetwork
    tap_fds: list[int]

    def close_fds(self) -> None:
        """Give up our copies of the tap fds (QEMU holds its own once launched)."""
        fds, self.tap_fds = self.tap_fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


class PodNetworking(Protocol):
    """The daemon's seam: wire a pod netns (tap fds for QEMU) and unwire it. The default is
    :class:`shim.network.helper.HelperNetworking` (a helper process with pyroute2)."""

    async def setup(self, netns: Path) -> WiredNetwork: ...

    async def teardown(self, wired: WiredNetwork) -> None:
        """Close our tap fds and remove what setup made; idempotent."""
        ...


# --- where the netns comes from, and what the guest is told ------------------------------------


def netns_of(spec: Mapping[str, Any], sandbox_id: str) -> Path | None:
    """The pod's network namespace path from the OCI spec (``linux.namespaces`` network entry
    with a path: CRI, or ``ctr run --with-ns network:<path>``). None when the pod has no
    netns of its own to join (no entry, or a new empty one): the VM then gets no NIC."""
    linux = spec.get("linux")
    namespaces = linux.get("namespaces") if isinstance(linux, Mapping) else None
    for entry in namespaces or ():
        if not isinstance(entry, Mapping) or entry.get("type") != "network":
            continue
        path = entry.get("path")
        if not path:
            return None
        netns = Path(str(path))
        if not netns.is_absolute():
            raise InvalidArgument(f"pod {sandbox_id}: network namespace path {path!r} is not "
                                  "absolute")
        if not netns.exists():
            raise FailedPrecondition(f"pod {sandbox_id}: network namespace {netns} does not "
                                     "exist")
        return netns
    return None


def dns_of(spec: Mapping[str, Any]) -> list[str]:
    """The lines of the resolv.conf the runtime prepared for the pod (CRI bind-mounts one
    onto /etc/resolv.conf), for CreateSandbox's ``dns``; [] when there is none."""
    for entry in spec.get("mounts") or ():
        if isinstance(entry, Mapping) and entry.get("destination") == "/etc/resolv.conf":
            try:
                text = Path(str(entry.get("source", ""))).read_text()
            except OSError:
                return []
            return [line for line in text.splitlines() if line.strip()]
    return []


@dataclass
class GuestRequests:
    """What the guest is told of the pod's network, in agent protocol messages."""

    interfaces: list[Any] = field(default_factory=list)  # types.Interface, one per endpoint
    routes: list[Any] = field(default_factory=list)  # types.Route
    neighbors: list[Any] = field(default_factory=list)  # types.ARPNeighbor


def guest_requests(network: PodNetwork) -> GuestRequests:
    from protocols.api.kata import types_pb2

    requests = GuestRequests()
    for endpoint in network.endpoints:
        requests.interfaces.append(types_pb2.Interface(
            device=endpoint.name, name=endpoint.name, hwAddr=endpoint.mac, mtu=endpoint.mtu,
            IPAddresses=[types_pb2.IPAddress(family=a.family,  # type: ignore[arg-type]
                                             address=a.address, mask=str(a.prefix))
                         for a in endpoint.addresses]))
    requests.routes = [
        types_pb2.Route(dest=r.dest, gateway=r.gateway, device=r.device, source=r.source,
                        scope=r.scope, family=r.family)  # type: ignore[arg-type]
        for r in network.routes]
    requests.neighbors = [
        types_pb2.ARPNeighbor(
            toIPAddress=types_pb2.IPAddress(
                family=FAMILY_V6 if ":" in n.address else FAMILY_V4,  # type: ignore[arg-type]
                address=n.address, mask=""),
            device=n.device, lladdr=n.mac, state=n.state, flags=n.flags)
        for n in network.neighbors]
    return requests
