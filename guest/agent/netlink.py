"""rtnetlink, only what the agent's network RPCs need: links, addresses, routes, neighbours.

One NETLINK_ROUTE socket, one request at a time, answered before the next (the kernel answers
at once: no await needed). Under TCG every `ip` process costs the guest ≈ 50 ms; a netlink
request costs well under one. Message layouts are those of <linux/rtnetlink.h>,
<linux/if_link.h>, <linux/if_addr.h> and <linux/neighbour.h>.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH = 28
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU = 1, 3, 4
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PREFSRC, RTA_METRICS, RTA_TABLE = 1, 4, 5, 7, 8, 15
RTAX_MTU = 2
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
IFF_UP = 0x1
RT_TABLE_MAIN = 254
RTPROT_BOOT = 3
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255

_HEADER = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBi")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, protocol,
#                                       scope, type, flags
_NDMSG = struct.Struct("=BxxxiHBB")  # ndmsg: family, ifindex, state, flags, type
_ATTR = struct.Struct("=HH")  # rtattr: len, type


class NetlinkError(OSError):
    """The kernel refused a request; ``errno`` is its error."""


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    mtu: int
    hw_addr: str
    flags: int


@dataclass(frozen=True)
class AddressInfo:
    index: int
    family: int  # socket.AF_INET / AF_INET6
    address: str
    prefix_length: int


@dataclass(frozen=True)
class RouteInfo:
    family: int
    dest: str  # "" for the default route; "a.b.c.d/n", or a bare host address
    gateway: str
    index: int  # output interface, 0 if none
    source: str
    scope: int
    mtu: int


def _align(length: int) -> int:
    return (length + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def attrs(data: bytes) -> dict[int, bytes]:
    """rtattrs → {type: payload} (the first of each type; nested flag bits dropped)."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size or offset + length > len(data):
            break
        found.setdefault(kind & 0x3FFF, data[offset + _ATTR.size : offset + length])
        offset += _align(length)
    return found


def messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """A datagram → (type, flags, seq, payload) per netlink message."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, flags, seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise NetlinkError(0, f"truncated netlink message at {offset}")
        yield kind, flags, seq, data[offset + _HEADER.size : offset + length]
        offset += _align(length)


def _text(payload: bytes) -> str:
    return payload.split(b"\0", 1)[0].decode(errors="replace")


def _ip(family: int, payload: bytes) -> str:
    return socket.inet_ntop(family, payload)


def _packed(address: str) -> tuple[int, bytes]:
    parsed = ipaddress.ip_address(address)
    family = socket.AF_INET if parsed.version == 4 else socket.AF_INET6
    return family, parsed.packed


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


class Netlink:
    """A NETLINK_ROUTE socket in the calling process's network namespace."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        if sock is None:
            sock = socket.socket(
                socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
            )
            sock.bind((0, 0))
        self._sock = sock
        self._seq = 0

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def request(self, kind: int, flags: int, body: bytes) -> list[tuple[int, bytes]]:
        """Send one request; return the answers (a dump's messages; [] for an ack)."""
        self._seq += 1
        seq = self._seq
        flags |= NLM_F_REQUEST
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        if not dump:
            flags |= NLM_F_ACK
        self._sock.send(_HEADER.pack(_HEADER.size + len(body), kind, flags, seq, 0) + body)
        answers: list[tuple[int, bytes]] = []
        while True:
            for answer, answer_flags, answer_seq, payload in messages(self._sock.recv(1 << 16)):
                if answer_seq != seq:
                    continue  # an answer to an abandoned earlier request
                if answer == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", payload)
                    if code:
                        raise NetlinkError(-code, os.strerror(-code))
                    return answers  # the ack
                if answer == NLMSG_DONE:
                    return answers
                answers.append((answer, payload))
                if not answer_flags & NLM_F_MULTI:
                    return answers

    # -- links --

    def links(self) -> list[LinkInfo]:
        found = []
        for _, payload in self.request(RTM_GETLINK, NLM_F_DUMP, _IFINFO.pack(0, 0, 0, 0, 0)):
            _family, _type, index, flags, _change = _IFINFO.unpack_from(payload)
            found_attrs = attrs(payload[_IFINFO.size :])
            hw = found_attrs.get(IFLA_ADDRESS, b"")
            mtu = found_attrs.get(IFLA_MTU, b"")
            found.append(
                LinkInfo(
                    index=index,
                    name=_text(found_attrs.get(IFLA_IFNAME, b"")),
                    mtu=struct.unpack("=I", mtu)[0] if len(mtu) == 4 else 0,
                    hw_addr=":".join(f"{b:02x}" for b in hw) if len(hw) == 6 else "",
                    flags=flags,
                )
            )
        return found

    def set_link(self, index: int, *, up: bool | None = None, mtu: int = 0, name: str = "") -> None:
        """One RTM_NEWLINK: state, MTU and name of link ``index`` (what is given)."""
        flags = IFF_UP if up else 0
        change = IFF_UP if up is not None else 0
        body = _IFINFO.pack(0, 0, index, flags, change)
        if mtu:
            body += attr(IFLA_MTU, _u32(mtu))
        if name:
            body += attr(IFLA_IFNAME, name.encode() + b"\0")
        self.request(RTM_NEWLINK, 0, body)

    # -- addresses --

    def addresses(self) -> list[AddressInfo]:
        found = []
        for _, payload in self.request(RTM_GETADDR, NLM_F_DUMP, _IFADDR.pack(0, 0, 0, 0, 0)):
            family, prefix, _flags, _scope, index = _IFADDR.unpack_from(payload)
            found_attrs = attrs(payload[_IFADDR.size :])
            raw = found_attrs.get(IFA_LOCAL) or found_attrs.get(IFA_ADDRESS)
            if raw is None or family not in (socket.AF_INET, socket.AF_INET6):
                continue
            found.append(AddressInfo(index, family, _ip(family, raw), prefix))
        return found

    def _address(self, kind: int, flags: int, index: int, address: str, prefix: int) -> None:
        family, packed = _packed(address)
        body = _IFADDR.pack(family, prefix, 0, 0, index)
        body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
        self.request(kind, flags, body)

    def add_address(self, index: int, address: str, prefix: int) -> None:
        self._address(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, index, address, prefix)

    def delete_address(self, index: int, address: str, prefix: int) -> None:
        self._address(RTM_DELADDR, 0, index, address, prefix)

    # -- routes --

    def routes(self, family: int) -> list[RouteInfo]:
        """The main table's unicast routes of ``family``."""
        found = []
        for _, payload in self.request(
            RTM_GETROUTE, NLM_F_DUMP, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        ):
            fam, dst_len, _src, _tos, table, _proto, scope, kind, _flags = _RTMSG.unpack_from(
                payload
            )
            found_attrs = attrs(payload[_RTMSG.size :])
            if RTA_TABLE in found_attrs:
                (table,) = struct.unpack("=I", found_attrs[RTA_TABLE])
            if table != RT_TABLE_MAIN or kind != RTN_UNICAST:
                continue
            dest = ""
            if RTA_DST in found_attrs:
                dest = _ip(fam, found_attrs[RTA_DST])
                if dst_len != len(found_attrs[RTA_DST]) * 8:
                    dest = f"{dest}/{dst_len}"
            metrics = attrs(found_attrs.get(RTA_METRICS, b""))
            oif = found_attrs.get(RTA_OIF, b"")
            found.append(
                RouteInfo(
                    family=fam,
                    dest=dest,
                    gateway=_ip(fam, found_attrs[RTA_GATEWAY])
                    if RTA_GATEWAY in found_attrs
                    else "",
                    index=struct.unpack("=i", oif)[0] if len(oif) == 4 else 0,
                    source=_ip(fam, found_attrs[RTA_PREFSRC]) if RTA_PREFSRC in found_attrs else "",
                    scope=scope,
                    mtu=struct.unpack("=I", metrics[RTAX_MTU])[0] if RTAX_MTU in metrics else 0,
                )
            )
        return found

    def _route_body(
        self, family: int, dest: str, *, scope: int, index: int, gateway: str = "",
        source: str = "", mtu: int = 0,
    ) -> bytes:  # fmt: skip
        network = ipaddress.ip_network(dest, strict=False) if dest else None
        dst_len = network.prefixlen if network is not None else 0
        body = _RTMSG.pack(family, dst_len, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, scope, RTN_UNICAST, 0)
        if network is not None:
            body += attr(RTA_DST, network.network_address.packed)
        if gateway:
            body += attr(RTA_GATEWAY, _packed(gateway)[1])
        if index:
            body += attr(RTA_OIF, struct.pack("=i", index))
        if source:
            body += attr(RTA_PREFSRC, _packed(source)[1])
        if mtu:
            body += attr(RTA_METRICS, attr(RTAX_MTU, _u32(mtu)))
        return body

    def replace_route(
        self, family: int, dest: str, *, index: int, gateway: str = "", source: str = "",
        scope: int | None = None, mtu: int = 0,
    ) -> None:  # fmt: skip
        """`ip route replace`: a route without a gateway is link-scoped unless told."""
        if scope is None:
            scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
        body = self._route_body(
            family, dest, scope=scope, index=index, gateway=gateway, source=source, mtu=mtu
        )
        self.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, body)

    def delete_route(self, family: int, dest: str, *, index: int) -> None:
        self.request(
            RTM_DELROUTE, 0, self._route_body(family, dest, scope=RT_SCOPE_NOWHERE, index=index)
        )

    # -- neighbours --

    def replace_neighbor(self, index: int, address: str, lladdr: str) -> None:
        """A permanent neighbour entry (`ip neigh replace … nud permanent`)."""
        family, packed = _packed(address)
        mac = bytes(int(part, 16) for part in lladdr.split(":"))
        body = _NDMSG.pack(family, index, NUD_PERMANENT, 0, 0)
        body += attr(NDA_DST, packed) + attr(NDA_LLADDR, mac)
        self.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body)
