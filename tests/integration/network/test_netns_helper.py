"""Pod networking against real network namespaces: the helper process wires a veth to a tap
with tc redirects (pyroute2), hands the tap fd back over SCM_RIGHTS, and unwires; failures
leave nothing behind. Traffic is checked without a VM: an ARP request written into the tap fd
reaches the peer namespace, and its answer comes back out of the same fd."""

from __future__ import annotations

import ipaddress
import os
import select
import time
from pathlib import Path

import pytest

from shim.core.crash_record import ShimState
from shim.core.errors import FailedPrecondition, InvalidArgument
from shim.network.helper import HelperNetworking, teardown_recorded
from shim.network.tcfilter import FAMILY_V4, IpAddress, WiredNetwork
from tests.support.netns import VethPair, sh, veth_pair

pytestmark = pytest.mark.integration
VNET_HDR = bytes(10)  # struct virtio_net_hdr: the tap is opened with IFF_VNET_HDR


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    mac = mac_bytes(src_mac)
    return (b"\xff" * 6 + mac + b"\x08\x06"  # ethernet: broadcast, ARP
            + b"\x00\x01\x08\x00\x06\x04\x00\x01"  # ethernet/IPv4, request
            + mac + ipaddress.IPv4Address(src_ip).packed
            + bytes(6) + ipaddress.IPv4Address(target_ip).packed)


def read_arp_reply(fd: int, from_ip: str, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    wanted = ipaddress.IPv4Address(from_ip).packed
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        frame = os.read(fd, 65536)[len(VNET_HDR):]
        if frame[12:14] == b"\x08\x06" and frame[20:22] == b"\x00\x02" and frame[28:32] == wanted:
            return frame
    raise AssertionError(f"no ARP reply from {from_ip} on the tap within {timeout} s")


def assert_clean(pair: VethPair) -> None:
    assert [n for n in pair.pod_links() if n.startswith("tap")] == []
    assert pair.ingress_qdiscs() == []
    assert "mirred" not in pair.filters("eth0")


async def test_wire_real_netns_traffic_flows_and_teardown_is_clean() -> None:
    helper = HelperNetworking()
    with veth_pair(subnet=10, mtu=1400) as pair:
        veth = pair.link("eth0")
        wired = await helper.setup(pair.pod_path)
        try:
            (endpoint,) = wired.network.endpoints
            assert (endpoint.name, endpoint.mac, endpoint.mtu, endpoint.tap) == (
                "eth0", veth["address"], 1400, "tap0_eth0")
            assert IpAddress(FAMILY_V4, pair.pod_ip, 24) in endpoint.addresses
            assert {(r.dest, r.gateway) for r in wired.network.routes} >= {
                ("", pair.peer_ip), ("198.18.10.0/24", "")}
            assert [(n.address, n.mac) for n in wired.network.neighbors] == [
                ("198.18.10.9", "02:00:00:00:00:09")]
            tap = pair.link("tap0_eth0")
            assert (tap["address"], tap["mtu"]) == (veth["address"], 1400)
            assert sorted(pair.ingress_qdiscs()) == ["eth0", "tap0_eth0"]
            assert "Egress Redirect to device tap0_eth0" in pair.filters("eth0")
            assert "Egress Redirect to device eth0" in pair.filters("tap0_eth0")

            (fd,) = wired.tap_fds
            os.set_blocking(fd, False)
            os.write(fd, VNET_HDR + arp_request(endpoint.mac, pair.pod_ip, pair.peer_ip))
            reply = read_arp_reply(fd, pair.peer_ip)
            assert reply[0:6] == mac_bytes(endpoint.mac)  # addressed to the pod's MAC
        finally:
            await helper.teardown(wired)
        assert_clean(pair)
        assert wired.tap_fds == []
        await helper.teardown(wired)  # idempotent
        assert_clean(pair)


async def test_unwirable_interface_is_refused_and_nothing_is_left() -> None:
    with veth_pair(subnet=11) as pair:
        # (this kernel has no dummy driver; a bridge that is not a veth is as unwirable)
        sh("ip", "-n", pair.pod, "link", "add", "br0", "type", "bridge")
        with pytest.raises(InvalidArgument, match="interface br0 is a bridge"):
            await HelperNetworking().setup(pair.pod_path)
        assert_clean(pair)


async def test_failure_on_second_interface_rolls_back_the_first() -> None:
    # eth1's MTU (65535) is more than a tap accepts: its tap fails after eth0 is fully wired.
    with veth_pair(subnet=12) as pair:
        sh("ip", "link", "add", "eth1", "netns", pair.pod, "mtu", "65535", "type", "veth",
           "peer", "name", "peer1", "netns", pair.peer)
        with pytest.raises(Exception, match=r"tap1_eth1|Invalid argument") as caught:
            await HelperNetworking().setup(pair.pod_path)
        assert not isinstance(caught.value, AssertionError)
        assert_clean(pair)
        assert "mirred" not in pair.filters("eth1")


async def test_missing_netns_is_named() -> None:
    gone = Path("/var/run/netns/coco-no-such-netns")
    with pytest.raises(FailedPrecondition, match=str(gone)):
        await HelperNetworking().setup(gone)


async def test_teardown_after_the_netns_is_gone_is_fine() -> None:
    with veth_pair(subnet=13) as pair:
        wired = await HelperNetworking().setup(pair.pod_path)
        path = pair.pod_path
    assert not path.exists()
    await HelperNetworking().teardown(wired)
    await HelperNetworking().teardown(WiredNetwork(wired.network, []))


async def test_delete_unwires_what_a_dead_daemon_recorded(tmp_path: Path) -> None:
    """The daemon records the wired network; after it died (and its QEMU with the tap fds),
    ``delete`` removes the redirect left on the veth from that record."""
    state = ShimState(tmp_path / "state")
    with veth_pair(subnet=14) as pair:
        wired = await HelperNetworking().setup(pair.pod_path)
        state.add_network(wired.network.to_json())
        wired.close_fds()  # the daemon and its QEMU are gone: so is the tap
        assert [n for n in pair.pod_links() if n.startswith("tap")] == []
        assert pair.ingress_qdiscs() == ["eth0"]  # ...but the veth still redirects
        record = state.network()
        assert record is not None
        teardown_recorded(record)
        assert_clean(pair)
        teardown_recorded(record)  # idempotent
        state.clear_network()
        assert state.network() is None
