"""rtnetlink messages, encoded and decoded against hand-built kernel answers, and netmasks.
(The real kernel is driven by tests/integration/guest/test_agent_host.py, in a namespace.)"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest

from guest.agent import netlink as nl
from guest.agent.errors import InvalidArgument, NotFound
from guest.agent.network import FAMILY_V4, Interface, Network, Route, prefix_length


def message(kind: int, body: bytes, *, seq: int = 1, flags: int = nl.NLM_F_MULTI) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, kind, flags, seq, 0) + body + b"\0" * (-length % 4)


def done(seq: int = 1) -> bytes:
    return message(nl.NLMSG_DONE, struct.pack("=i", 0), seq=seq)


def ack(seq: int, error: int = 0) -> bytes:
    return message(nl.NLMSG_ERROR, struct.pack("=i", -error) + b"\0" * 16, seq=seq, flags=0)


def link(index: int, name: str, mac: bytes, mtu: int, flags: int) -> bytes:
    body = struct.pack("=BxHiII", 0, 1, index, flags, 0)
    body += nl.attr(nl.IFLA_IFNAME, name.encode() + b"\0") + nl.attr(nl.IFLA_MTU, struct.pack(
        "=I", mtu)) + nl.attr(nl.IFLA_ADDRESS, mac)
    return message(nl.RTM_NEWLINK, body)


def address(index: int, family: int, text: str, prefix: int) -> bytes:
    body = struct.pack("=BBBBi", family, prefix, 0, 0, index)
    return message(nl.RTM_NEWADDR, body + nl.attr(nl.IFA_LOCAL, socket.inet_pton(family, text)))


def route(dest: str, dst_len: int, gateway: str, oif: int, *, scope: int = 0,
          kind: int = nl.RTN_UNICAST, table: int = nl.RT_TABLE_MAIN, mtu: int = 0) -> bytes:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, dst_len, 0, 0, table, 2, scope, kind, 0)
    if dest:
        body += nl.attr(nl.RTA_DST, socket.inet_aton(dest))
    if gateway:
        body += nl.attr(nl.RTA_GATEWAY, socket.inet_aton(gateway))
    body += nl.attr(nl.RTA_OIF, struct.pack("=i", oif))
    if mtu:
        body += nl.attr(nl.RTA_METRICS, nl.attr(nl.RTAX_MTU, struct.pack("=I", mtu)))
    return message(nl.RTM_NEWROUTE, body)


class FakeKernel:
    """A NETLINK_ROUTE socket double: records requests, answers from a script per type."""

    def __init__(self, dumps: dict[int, list[bytes]], errors: dict[int, int] | None = None):
        self.dumps = dumps
        self.errors = errors or {}
        self.sent: list[tuple[int, int, bytes]] = []
        self._pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        [(kind, flags, seq, body)] = list(nl.messages(data))
        self.sent.append((kind, flags, body))
        if kind in self.dumps:
            answers = [m[:8] + struct.pack("=I", seq) + m[12:] for m in self.dumps[kind]
                       if kind != nl.RTM_GETROUTE or m[16] == body[0]]  # routes: by family
            self._pending.append(b"".join(answers) + done(seq))
        else:
            self._pending.append(ack(seq, self.errors.get(kind, 0)))
        return len(data)

    def recv(self, _size: int) -> bytes:
        return self._pending.pop(0)

    def close(self) -> None:
        pass


LINKS = [link(1, "lo", b"\0" * 6, 65536, 0x49), link(2, "eth0", bytes.fromhex("020000000007"),
                                                     1500, 0x1003)]
ADDRESSES = [address(1, socket.AF_INET, "127.0.0.1", 8),
             address(2, socket.AF_INET, "198.18.0.2", 24),
             address(2, socket.AF_INET6, "fe80::1", 64)]
ROUTES = [route("", 0, "198.18.0.1", 2),
          route("198.18.0.0", 24, "", 2, scope=nl.RT_SCOPE_LINK),
          route("198.19.0.0", 16, "198.18.0.1", 2, mtu=1300),
          route("198.18.0.2", 32, "", 2, kind=2, table=255)]  # local table: not listed


def network(kernel: FakeKernel) -> Network:
    return Network(netlink=lambda: nl.Netlink(kernel))  # type: ignore[arg-type]


def kernel() -> FakeKernel:
    return FakeKernel({nl.RTM_GETLINK: LINKS, nl.RTM_GETADDR: ADDRESSES,
                       nl.RTM_GETROUTE: ROUTES})


async def test_interfaces_decoded() -> None:
    lo, eth0 = await network(kernel()).list_interfaces()
    assert (lo.name, lo.mtu, lo.raw_flags) == ("lo", 65536, 0x49)
    assert (eth0.name, eth0.mtu, eth0.hw_addr) == ("eth0", 1500, "02:00:00:00:00:07")
    assert [(a.address, a.mask, a.family) for a in eth0.addresses] == [
        ("198.18.0.2", "24", 0), ("fe80::1", "64", 1)]


async def test_routes_decoded_main_table_unicast_only() -> None:
    fake = FakeKernel({nl.RTM_GETLINK: LINKS, nl.RTM_GETROUTE: ROUTES})
    routes = await network(fake).list_routes()
    v4 = [r for r in routes if r.family == FAMILY_V4]
    assert [(r.dest, r.gateway, r.device, r.scope, r.mtu) for r in v4] == [
        ("", "198.18.0.1", "eth0", 0, 0),
        ("198.18.0.0/24", "", "eth0", 253, 0),
        ("198.19.0.0/16", "198.18.0.1", "eth0", 0, 1300),
    ]


async def test_update_interface_requests() -> None:
    fake = kernel()
    updated = await network(fake).update_interface(Interface(
        device="", name="eth0", hw_addr="02:00:00:00:00:07", mtu=1400,
        addresses=(), raw_flags=0))
    assert updated.name == "eth0"
    kinds = [kind for kind, _, _ in fake.sent]
    # find by MAC, down, MTU, old addresses deleted, up, listing
    assert kinds[:5] == [nl.RTM_GETLINK, nl.RTM_NEWLINK, nl.RTM_NEWLINK, nl.RTM_GETADDR,
                         nl.RTM_DELADDR]
    down = fake.sent[1][2]
    assert struct.unpack_from("=BxHiII", down)[2:] == (2, 0, nl.IFF_UP)
    mtu = nl.attrs(fake.sent[2][2][16:])
    assert struct.unpack("=I", mtu[nl.IFLA_MTU]) == (1400,) and nl.IFLA_IFNAME not in mtu
    deleted = [nl.attrs(body[8:])[nl.IFA_LOCAL] for kind, _, body in fake.sent
               if kind == nl.RTM_DELADDR]
    assert deleted == [socket.inet_aton("198.18.0.2"), socket.inet_pton(socket.AF_INET6,
                                                                        "fe80::1")]
    up = [body for kind, _, body in fake.sent if kind == nl.RTM_NEWLINK][-1]
    assert struct.unpack_from("=BxHiII", up)[2:] == (2, nl.IFF_UP, nl.IFF_UP)
    assert all(flags & nl.NLM_F_ACK for kind, flags, _ in fake.sent
               if kind in (nl.RTM_NEWLINK, nl.RTM_DELADDR))


def test_rename_request() -> None:
    fake = kernel()
    nl.Netlink(fake).set_link(2, name="net0", mtu=1400)  # type: ignore[arg-type]
    [(kind, flags, body)] = fake.sent
    assert kind == nl.RTM_NEWLINK and flags & nl.NLM_F_ACK
    assert struct.unpack_from("=BxHiII", body)[2:] == (2, 0, 0)  # state left alone
    assert nl.attrs(body[16:])[nl.IFLA_IFNAME] == b"net0\0"


async def test_update_routes_requests() -> None:
    fake = kernel()
    await network(fake).update_routes([
        Route(dest="198.19.0.0/16", gateway="198.18.0.1", device="eth0", mtu=1300),
        Route(dest="198.18.0.0/24", device="eth0", scope=253),
    ])
    new = [body for kind, _, body in fake.sent if kind == nl.RTM_NEWROUTE]
    first, second = (struct.unpack_from("=BBBBBBBBI", body) for body in new)
    assert (first[1], first[6]) == (24, nl.RT_SCOPE_LINK)  # the link route first
    assert (second[1], second[6]) == (16, nl.RT_SCOPE_UNIVERSE)
    extras = nl.attrs(new[1][12:])
    assert extras[nl.RTA_GATEWAY] == socket.inet_aton("198.18.0.1")
    assert nl.attrs(extras[nl.RTA_METRICS])[nl.RTAX_MTU] == struct.pack("=I", 1300)
    deleted = [kind for kind, _, _ in fake.sent if kind == nl.RTM_DELROUTE]
    assert len(deleted) == 3  # every listed route on a device other than lo


async def test_errors_are_typed() -> None:
    with pytest.raises(NotFound, match="no guest interface"):
        await network(kernel()).update_interface(Interface(device="", name="nope",
                                                           hw_addr="02:00:00:00:00:99"))
    with pytest.raises(NotFound, match="no guest interface named 'eth9'"):
        await network(kernel()).update_routes([Route(dest="198.19.0.0/16", device="eth9")])
    refusing = FakeKernel({nl.RTM_GETLINK: LINKS}, errors={nl.RTM_NEWNEIGH: 19})  # ENODEV
    with pytest.raises(NotFound, match="No such device"):
        await network(refusing).add_neighbors([_neighbor()])
    with pytest.raises(InvalidArgument, match="incomplete"):
        await network(kernel()).add_neighbors([_neighbor(lladdr="")])


def _neighbor(**changes: Any) -> Any:
    from guest.agent.network import Neighbor

    fields = {"address": "198.18.0.1", "device": "eth0", "lladdr": "02:00:00:00:00:01"}
    return Neighbor(**{**fields, **changes})


def test_attrs_round_trip_and_truncation() -> None:
    data = nl.attr(3, b"eth0\0") + nl.attr(4, struct.pack("=I", 1500))
    assert nl.attrs(data) == {3: b"eth0\0", 4: struct.pack("=I", 1500)}
    assert nl.attrs(data[:-2]) == {3: b"eth0\0"}  # a cut attribute is not read
    with pytest.raises(nl.NetlinkError):
        list(nl.messages(message(nl.RTM_NEWLINK, b"x" * 20)[:-8]))


@pytest.mark.parametrize(
    ("mask", "family", "length"), [("24", 0, 24), ("255.255.0.0", 0, 16), ("", 0, 32), ("", 1, 128)]
)
def test_prefix_length(mask: str, family: int, length: int) -> None:
    assert prefix_length(mask, family) == length


def test_bad_mask() -> None:
    with pytest.raises(InvalidArgument):
        prefix_length("255.0.255.0", 0)
