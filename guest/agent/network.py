"""Guest networking (UpdateInterface, UpdateRoutes, ARP neighbours, listings) over rtnetlink
(:mod:`guest.agent.netlink`): no `ip` process per step, which under TCG cost the guest ≈ 50 ms
each (≈ 0.6 s for a CRI pod's interface, routes and neighbours).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

from guest.agent.errors import AgentError, InvalidArgument, NotFound, RuntimeFailure

if TYPE_CHECKING:
    from guest.agent.netlink import LinkInfo, Netlink

FAMILY_V4, FAMILY_V6 = 0, 1  # types.IPFamily


class Address(NamedTuple):
    family: int
    address: str
    mask: str  # prefix length as text, as Kata sends it


class Interface(NamedTuple):
    device: str
    name: str
    addresses: tuple[Address, ...] = ()
    mtu: int = 0
    hw_addr: str = ""
    raw_flags: int = 0
    type: str = ""


class Route(NamedTuple):
    dest: str = ""  # "" is the default route
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0
    family: int = FAMILY_V4
    flags: int = 0
    mtu: int = 0


class Neighbor(NamedTuple):
    address: str
    device: str
    lladdr: str
    state: int = 0
    flags: int = 0


def prefix_length(mask: str, family: int) -> int:
    if not mask:
        return 32 if family == FAMILY_V4 else 128
    if mask.isdigit():
        return int(mask)
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
    except ValueError as err:
        raise InvalidArgument(f"bad netmask {mask!r}") from err


_FAMILIES = {FAMILY_V4: socket.AF_INET, FAMILY_V6: socket.AF_INET6}
_KATA_FAMILY: dict[int, int] = {socket.AF_INET: FAMILY_V4, socket.AF_INET6: FAMILY_V6}


def _failure(what: str, err: OSError) -> AgentError:
    if err.errno == errno.ENODEV:
        return NotFound(f"{what}: {err.strerror}")
    if err.errno == errno.EINVAL:
        return InvalidArgument(f"{what}: {err.strerror}")
    return RuntimeFailure(f"{what}: {err.strerror or err}")


def _netlink() -> Netlink:
    """A rtnetlink socket; :mod:`guest.agent.netlink` is imported at the first network RPC
    (a pod without networking never needs it: ≈ 10 % of the machinery's import time)."""
    from guest.agent.netlink import Netlink

    return Netlink()


@dataclass
class Network:
    """The guest's links, addresses, routes and neighbours, over rtnetlink (one socket per
    RPC, in the agent's network namespace)."""

    netlink: Callable[[], Netlink] = field(default_factory=lambda: _netlink)

    @staticmethod
    def _indexes(nl: Netlink) -> dict[str, int]:
        return {link.name: link.index for link in nl.links()}

    def _device_for(self, nl: Netlink, interface: Interface) -> LinkInfo:
        """The guest link an Interface means: by MAC, else by name, else by device."""
        links = nl.links()
        if interface.hw_addr:
            for link in links:
                if link.hw_addr.lower() == interface.hw_addr.lower():
                    return link
        for candidate in (interface.name, interface.device):
            for link in links:
                if candidate and link.name == candidate:
                    return link
        raise NotFound(f"no guest interface matches {interface.hw_addr or interface.name!r}")

    def _interfaces(self, nl: Netlink) -> list[Interface]:
        addresses: dict[int, list[Address]] = {}
        for found in nl.addresses():
            addresses.setdefault(found.index, []).append(
                Address(_KATA_FAMILY[found.family], found.address, str(found.prefix_length))
            )
        return [
            Interface(
                device=link.name,
                name=link.name,
                addresses=tuple(addresses.get(link.index, [])),
                mtu=link.mtu,
                hw_addr=link.hw_addr,
                raw_flags=link.flags,
            )
            for link in nl.links()
        ]

    async def list_interfaces(self) -> list[Interface]:
        with self.netlink() as nl:
            try:
                return self._interfaces(nl)
            except OSError as err:
                raise _failure("list interfaces", err) from err

    async def update_interface(self, interface: Interface) -> Interface:
        """Down, rename and MTU, addresses replaced, up; the interface as it is then."""
        with self.netlink() as nl:
            link = self._device_for(nl, interface)
            name = interface.name or link.name
            what = f"update interface {link.name}"
            try:
                nl.set_link(link.index, up=False)
                if name != link.name or interface.mtu:
                    nl.set_link(
                        link.index,
                        mtu=interface.mtu,
                        name=name if name != link.name else "",
                    )
                for old in nl.addresses():
                    if old.index == link.index:
                        nl.delete_address(link.index, old.address, old.prefix_length)
                for address in interface.addresses:
                    prefix = prefix_length(address.mask, address.family)
                    nl.add_address(link.index, address.address, prefix)
                nl.set_link(link.index, up=True)
                current = self._interfaces(nl)
            except OSError as err:
                raise _failure(what, err) from err
            except ValueError as err:
                raise InvalidArgument(f"{what}: {err}") from err
        for found in current:
            if found.name == name:
                return found
        raise NotFound(f"interface {name} vanished")

    def _routes(self, nl: Netlink, indexes: dict[str, int]) -> list[Route]:
        names = {index: name for name, index in indexes.items()}
        routes = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for found in nl.routes(family):
                routes.append(
                    Route(
                        dest=found.dest,
                        gateway=found.gateway,
                        device=names.get(found.index, ""),
                        source=found.source,
                        scope=found.scope,
                        family=_KATA_FAMILY[family],
                        mtu=found.mtu,
                    )
                )
        return routes

    async def list_routes(self) -> list[Route]:
        with self.netlink() as nl:
            try:
                return self._routes(nl, self._indexes(nl))
            except OSError as err:
                raise _failure("list routes", err) from err

    async def update_routes(self, routes: Sequence[Route]) -> list[Route]:
        """Replace the routing table with routes: link routes first, then gateway routes."""
        with self.netlink() as nl:
            indexes = self._indexes(nl)  # routes change no link: one dump serves the RPC
            try:
                for route in self._routes(nl, indexes):
                    if route.device and route.device != "lo":
                        try:
                            nl.delete_route(
                                _FAMILIES[route.family], route.dest, index=indexes[route.device]
                            )
                        except OSError as err:
                            if err.errno != errno.ESRCH:  # gone with an earlier deletion
                                raise
                for route in sorted(routes, key=lambda r: bool(r.gateway)):
                    if route.device and route.device not in indexes:
                        raise NotFound(
                            f"route {route.dest or 'default'}: no guest interface "
                            f"named {route.device!r}"
                        )
                    nl.replace_route(
                        _FAMILIES.get(route.family, socket.AF_INET),
                        route.dest,
                        index=indexes.get(route.device, 0),
                        gateway=route.gateway,
                        source=route.source,
                        scope=route.scope or None,
                        mtu=route.mtu,
                    )
                return self._routes(nl, indexes)
            except OSError as err:
                raise _failure("update routes", err) from err
            except ValueError as err:
                raise InvalidArgument(f"update routes: {err}") from err

    async def add_neighbors(self, neighbors: Sequence[Neighbor]) -> None:
        with self.netlink() as nl:
            indexes = self._indexes(nl)
            for neighbor in neighbors:
                if not neighbor.address or not neighbor.device or not neighbor.lladdr:
                    raise InvalidArgument(f"incomplete ARP neighbor {neighbor}")
                if neighbor.device not in indexes:
                    raise NotFound(f"no guest interface named {neighbor.device!r}")
                what = f"ARP neighbor {neighbor.address} on {neighbor.device}"
                try:
                    nl.replace_neighbor(indexes[neighbor.device], neighbor.address, neighbor.lladdr)
                except OSError as err:
                    raise _failure(what, err) from err
                except ValueError as err:
                    raise InvalidArgument(f"{what}: {err}") from err
