"""Guest networking (UpdateInterface, UpdateRoutes, ARP neighbours, listings) via `ip`.

Kept dependency-light on purpose: the guest's busybox `ip` (iproute2's on a host test) does the
work; links are found through /sys/class/net, addresses and routes are parsed from `ip -o`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, replace

from guest.agent.errors import InvalidArgument, NotFound, RuntimeFailure
from guest.agent.reaper import Reaper

SCOPES = {"global": 0, "universe": 0, "site": 200, "link": 253, "host": 254, "nowhere": 255}
FAMILY_V4, FAMILY_V6 = 0, 1  # types.IPFamily


@dataclass(frozen=True)
class Address:
    family: int
    address: str
    mask: str  # prefix length as text, as Kata sends it


@dataclass(frozen=True)
class Interface:
    device: str
    name: str
    addresses: tuple[Address, ...] = ()
    mtu: int = 0
    hw_addr: str = ""
    raw_flags: int = 0
    type: str = ""


@dataclass(frozen=True)
class Route:
    dest: str = ""  # "" is the default route
    gateway: str = ""
    device: str = ""
    source: str = ""
    scope: int = 0
    family: int = FAMILY_V4
    flags: int = 0
    mtu: int = 0


@dataclass(frozen=True)
class Neighbor:
    address: str
    device: str
    lladdr: str
    state: int = 0
    flags: int = 0


# net/if.h flag names as `ip link` prints them
IFF_FLAGS = {
    "UP": 0x1, "BROADCAST": 0x2, "DEBUG": 0x4, "LOOPBACK": 0x8, "POINTOPOINT": 0x10,
    "NOTRAILERS": 0x20, "RUNNING": 0x40, "NOARP": 0x80, "PROMISC": 0x100, "ALLMULTI": 0x200,
    "MASTER": 0x400, "SLAVE": 0x800, "MULTICAST": 0x1000, "PORTSEL": 0x2000,
    "AUTOMEDIA": 0x4000, "DYNAMIC": 0x8000, "LOWER_UP": 0x10000, "DORMANT": 0x20000,
    "ECHO": 0x40000,
}  # fmt: skip


@dataclass(frozen=True)
class Link:
    name: str
    mtu: int
    hw_addr: str
    flags: int


def parse_links(output: str) -> list[Link]:
    """`ip -o link show` lines -> links (name without the @peer suffix)."""
    links: list[Link] = []
    for line in output.splitlines():
        words = line.replace("\\", " ").split()
        if len(words) < 3 or not words[0].rstrip(":").isdigit():
            continue
        name = words[1].rstrip(":").split("@")[0]
        names = words[2].strip("<>").split(",") if words[2].startswith("<") else []
        pairs = {words[i]: words[i + 1] for i in range(3, len(words) - 1)}
        hw_addr = next((pairs[k] for k in pairs if k.startswith("link/") and k != "link/none"), "")
        mtu = pairs.get("mtu", "0")
        links.append(
            Link(
                name=name,
                mtu=int(mtu) if mtu.isdigit() else 0,
                hw_addr=hw_addr if hw_addr.count(":") == 5 else "",
                flags=sum(IFF_FLAGS.get(flag, 0) for flag in names),
            )
        )
    return links


def prefix_length(mask: str, family: int) -> int:
    if not mask:
        return 32 if family == FAMILY_V4 else 128
    if mask.isdigit():
        return int(mask)
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
    except ValueError as err:
        raise InvalidArgument(f"bad netmask {mask!r}") from err


def parse_addresses(output: str) -> dict[str, list[Address]]:
    """`ip -o addr show` lines -> addresses per device."""
    found: dict[str, list[Address]] = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) < 4 or words[2] not in ("inet", "inet6"):
            continue
        device = words[1].split("@")[0]
        address, _, mask = words[3].partition("/")
        family = FAMILY_V4 if words[2] == "inet" else FAMILY_V6
        found.setdefault(device, []).append(Address(family, address, mask))
    return found


def parse_routes(output: str, family: int) -> list[Route]:
    """`ip route show` lines -> routes."""
    routes: list[Route] = []
    for line in output.splitlines():
        words = line.split()
        if not words or words[0] in ("broadcast", "local", "unreachable", "multicast"):
            continue
        route = Route(dest="" if words[0] == "default" else words[0], family=family)
        # After the destination come key/value words: via X dev Y proto Z scope W src V ...
        pairs: dict[str, str] = {}
        for index in range(1, len(words) - 1):
            if words[index] in ("via", "dev", "src", "scope", "mtu") and words[index] not in pairs:
                pairs[words[index]] = words[index + 1]
        scope = pairs.get("scope", "global")
        route = replace(
            route,
            gateway=pairs.get("via", ""),
            device=pairs.get("dev", ""),
            source=pairs.get("src", ""),
            scope=int(scope) if scope.isdigit() else SCOPES.get(scope, 0),
            mtu=int(pairs.get("mtu", "0")) if pairs.get("mtu", "0").isdigit() else 0,
        )
        routes.append(route)
    return routes


@dataclass
class Network:
    reaper: Reaper
    ip: str = "ip"
    arp: str = "arp"

    async def _ip(self, *args: str) -> str:
        return await self._run(self.ip, *args)

    async def _run(self, tool: str, *args: str) -> str:
        done = await self.reaper.run([tool, *args])
        what = " ".join([tool.rsplit("/", 1)[-1], *args])
        if done.code != 0:
            message = done.stderr.decode(errors="replace").strip()
            if "cannot find device" in message.lower() or "no such device" in message.lower():
                raise NotFound(f"{what}: {message}")
            raise RuntimeFailure(f"{what}: {message or f'exit {done.code}'}")
        return done.stdout.decode(errors="replace")

    async def links(self) -> list[Link]:
        return parse_links(await self._ip("-o", "link", "show"))

    async def device_for(self, interface: Interface) -> str:
        """The guest link an Interface means: by MAC, else by name, else by device."""
        links = await self.links()
        if interface.hw_addr:
            for link in links:
                if link.hw_addr.lower() == interface.hw_addr.lower():
                    return link.name
        names = {link.name for link in links}
        for candidate in (interface.name, interface.device):
            if candidate and candidate in names:
                return candidate
        raise NotFound(f"no guest interface matches {interface.hw_addr or interface.name!r}")

    async def list_interfaces(self) -> list[Interface]:
        addresses = parse_addresses(await self._ip("-o", "addr", "show"))
        return [
            Interface(
                device=link.name,
                name=link.name,
                addresses=tuple(addresses.get(link.name, [])),
                mtu=link.mtu,
                hw_addr=link.hw_addr,
                raw_flags=link.flags,
            )
            for link in await self.links()
        ]

    async def update_interface(self, interface: Interface) -> Interface:
        device = await self.device_for(interface)
        await self._ip("link", "set", "dev", device, "down")
        if interface.name and interface.name != device:
            await self._ip("link", "set", "dev", device, "name", interface.name)
            device = interface.name
        if interface.mtu:
            await self._ip("link", "set", "dev", device, "mtu", str(interface.mtu))
        await self._ip("addr", "flush", "dev", device)
        for address in interface.addresses:
            prefix = prefix_length(address.mask, address.family)
            await self._ip("addr", "add", f"{address.address}/{prefix}", "dev", device)
        await self._ip("link", "set", "dev", device, "up")
        for current in await self.list_interfaces():
            if current.name == device:
                return current
        raise NotFound(f"interface {device} vanished")

    async def list_routes(self) -> list[Route]:
        v4 = parse_routes(await self._ip("-4", "route", "show"), FAMILY_V4)
        try:
            v6 = parse_routes(await self._ip("-6", "route", "show"), FAMILY_V6)
        except RuntimeFailure:  # no IPv6 in this kernel/namespace
            v6 = []
        return v4 + v6

    async def update_routes(self, routes: Sequence[Route]) -> list[Route]:
        """Replace the routing table with routes: link routes first, then gateway routes."""
        for route in await self.list_routes():
            if route.device and route.device != "lo":
                family = "-6" if route.family == FAMILY_V6 else "-4"
                await self._ip(family, "route", "del", route.dest or "default", "dev", route.device)
        for route in sorted(routes, key=lambda r: bool(r.gateway)):
            family = "-6" if route.family == FAMILY_V6 else "-4"
            args = [family, "route", "replace", route.dest or "default"]
            if route.gateway:
                args += ["via", route.gateway]
            if route.device:
                args += ["dev", route.device]
            if route.source:
                args += ["src", route.source]
            if route.scope:
                args += ["scope", str(route.scope)]
            if route.mtu:
                args += ["mtu", str(route.mtu)]
            await self._ip(*args)
        return await self.list_routes()

    async def add_neighbors(self, neighbors: Sequence[Neighbor]) -> None:
        for neighbor in neighbors:
            if not neighbor.address or not neighbor.device or not neighbor.lladdr:
                raise InvalidArgument(f"incomplete ARP neighbor {neighbor}")
            try:
                await self._ip(
                    "neigh", "replace", neighbor.address, "lladdr", neighbor.lladdr,
                    "dev", neighbor.device, "nud", "permanent",
                )  # fmt: skip
            except RuntimeFailure as err:
                if "invalid argument" not in str(err):
                    raise
                # busybox `ip neigh` can only show and flush; its `arp` sets a permanent entry.
                await self._run(
                    self.arp, "-i", neighbor.device, "-s", neighbor.address, neighbor.lladdr
                )
