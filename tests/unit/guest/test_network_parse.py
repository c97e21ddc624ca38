"""Parsing `ip -o` output (iproute2 and busybox forms) and netmasks."""

from __future__ import annotations

import pytest

from guest.agent.errors import InvalidArgument
from guest.agent.network import (
    FAMILY_V4,
    FAMILY_V6,
    parse_addresses,
    parse_links,
    parse_routes,
    prefix_length,
)

LINKS = (
    "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN mode DEFAULT group "
    "default qlen 1000\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00\n"
    "2: eth0@if5: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1400 qdisc noqueue state UP\\    "
    "link/ether 02:00:00:00:00:07 brd ff:ff:ff:ff:ff:ff\n"
)
ADDRS = (
    "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
    "2: eth0    inet 198.18.0.2/24 brd 198.18.0.255 scope global eth0\\       valid_lft forever\n"
    "2: eth0    inet6 fe80::1/64 scope link \\       valid_lft forever preferred_lft forever\n"
)
ROUTES = (
    "default via 198.18.0.1 dev eth0\n"
    "198.18.0.0/24 dev eth0 proto kernel scope link src 198.18.0.2\n"
    "198.19.0.0/16 via 198.18.0.1 dev eth0 mtu 1300\n"
)


def test_links() -> None:
    lo, eth0 = parse_links(LINKS)
    assert (lo.name, lo.mtu, lo.flags) == ("lo", 65536, 0x8 | 0x1 | 0x10000)
    assert (eth0.name, eth0.mtu, eth0.hw_addr) == ("eth0", 1400, "02:00:00:00:00:07")


def test_addresses() -> None:
    found = parse_addresses(ADDRS)
    assert [(a.address, a.mask, a.family) for a in found["eth0"]] == [
        ("198.18.0.2", "24", FAMILY_V4),
        ("fe80::1", "64", FAMILY_V6),
    ]


def test_routes() -> None:
    default, link, via = parse_routes(ROUTES, FAMILY_V4)
    assert (default.dest, default.gateway, default.device) == ("", "198.18.0.1", "eth0")
    assert (link.dest, link.scope, link.source) == ("198.18.0.0/24", 253, "198.18.0.2")
    assert (via.gateway, via.mtu) == ("198.18.0.1", 1300)


@pytest.mark.parametrize(
    ("mask", "family", "length"), [("24", 0, 24), ("255.255.0.0", 0, 16), ("", 0, 32), ("", 1, 128)]
)
def test_prefix_length(mask: str, family: int, length: int) -> None:
    assert prefix_length(mask, family) == length


def test_bad_mask() -> None:
    with pytest.raises(InvalidArgument):
        prefix_length("255.0.255.0", 0)
