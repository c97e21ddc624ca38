"""The netlink work of pod networking, in a short-lived helper process.

``python -m shim.network.helper setup <netns> <fd>`` enters the pod's network namespace, wires
it (:func:`shim.network.wire` over pyroute2) and sends, on the SOCK_SEQPACKET socket it
inherits as ``<fd>``, one message: a JSON answer plus the tap fds as SCM_RIGHTS.
``teardown <netns> <fd>`` reads the JSON of a :class:`~shim.network.PodNetwork` on stdin
and unwires it (a netns that is gone already is fine). Errors travel as
``{"error": {"kind": ..., "message": ...}}`` and become the shim's typed errors again.

Why a process: pyroute2 would add about 10 MiB to the shim daemon's resident memory (measured:
30.6 → 41.2 MiB for the daemon's imports) for two calls per pod, and entering a netns (setns)
is per-thread state better kept out of an asyncio daemon. The daemon side
(:class:`HelperNetworking`) never imports pyroute2; one helper run costs about 160 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shim.core.errors import FailedPrecondition, InvalidArgument, RpcError, Unavailable
from shim.core.timeouts import TIMEOUTS
from shim.network.tcfilter import (
    FAMILY_V4,
    FAMILY_V6,
    IpAddress,
    Link,
    Neighbor,
    PodNetwork,
    Route,
    WiredNetwork,
    unwire,
    wire,
)

MAX_MESSAGE = 1 << 20
MAX_FDS = 64
CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
ETH_P_ALL = 0x0003
INGRESS = 0xFFFF0000  # ffff:
FILTER_PRIO = 49152
FILTER_FLOWID = 0x10001  # 1:1 (unused on ingress; u32 wants one)
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
ERROR_KINDS: dict[str, type[RpcError]] = {
    "InvalidArgument": InvalidArgument, "FailedPrecondition": FailedPrecondition}


# --- pyroute2 behind the Netlink seam (helper process only) ------------------------------------


class PyrouteNetlink:
    """:class:`shim.network.Netlink` over pyroute2's IPRoute, in the current netns."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute

        self._ip: Any = _OsErrors(IPRoute())

    def close(self) -> None:
        self._ip.close()

    def _index(self, name: str) -> int | None:
        found = self._ip.link_lookup(ifname=name)
        return int(found[0]) if found else None

    def links(self) -> list[Link]:
        result = []
        for msg in self._ip.get_links():
            info = msg.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            name = str(msg.get_attr("IFLA_IFNAME"))
            if kind is None and msg["flags"] & 0x8:  # IFF_LOOPBACK
                kind = "loopback"
            mac = str(msg.get_attr("IFLA_ADDRESS") or "")
            result.append(Link(index=int(msg["index"]), name=name, kind=str(kind or ""),
                               mac="" if mac == "00:00:00:00:00:00" else mac,
                               mtu=int(msg.get_attr("IFLA_MTU") or 0)))
        return result

    def addresses(self, link: Link) -> list[IpAddress]:
        return [IpAddress(family=FAMILY_V6 if msg["family"] == socket.AF_INET6 else FAMILY_V4,
                          address=str(msg.get_attr("IFA_ADDRESS")), prefix=int(msg["prefixlen"]))
                for msg in self._ip.get_addr(index=link.index)]

    def routes(self, links: Mapping[int, str]) -> list[Route]:
        found = []
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in self._ip.get_routes(family=family, table=RT_TABLE_MAIN):
                device = links.get(int(msg.get_attr("RTA_OIF") or 0))
                if device is None or msg["type"] != RTN_UNICAST:
                    continue
                dst = msg.get_attr("RTA_DST")
                found.append(Route(
                    dest=f"{dst}/{msg['dst_len']}" if dst else "",
                    gateway=str(msg.get_attr("RTA_GATEWAY") or ""), device=device,
                    source=str(msg.get_attr("RTA_PREFSRC") or ""), scope=int(msg["scope"]),
                    family=FAMILY_V6 if family == socket.AF_INET6 else FAMILY_V4))
        return found

    def neighbors(self, links: Mapping[int, str]) -> list[Neighbor]:
        found = []
        for msg in self._ip.get_neighbours():
            device = links.get(int(msg["ifindex"]))
            if device is None or msg.get_attr("NDA_DST") is None:
                continue
            found.append(Neighbor(address=str(msg.get_attr("NDA_DST")),
                                  mac=str(msg.get_attr("NDA_LLADDR") or ""), device=device,
                                  state=int(msg["state"]), flags=int(msg["flags"])))
        return found

    def create_tap(self, name: str, mac: str, mtu: int) -> int:
        # Not persistent: the tap lives as long as an fd to it is open (ours, then QEMU's), so
        # a crashed shim or QEMU cannot leave it behind.
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                                   IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            index = self._index(name)
            if index is None:
                raise OSError(errno.ENODEV, f"tap {name} vanished")
            self._ip.link("set", index=index, address=mac, mtu=mtu, state="up")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def add_ingress(self, device: str) -> None:
        self._ip.tc("add", "ingress", self._require(device), "ffff:")

    def add_redirect(self, device: str, to_device: str) -> None:
        self._ip.tc("add-filter", "u32", self._require(device), parent=INGRESS,
                    prio=FILTER_PRIO, protocol=ETH_P_ALL, target=FILTER_FLOWID,
                    keys=["0x0/0x0+0"],
                    action={"kind": "mirred", "direction": "egress", "action": "redirect",
                            "ifindex": self._require(to_device)})

    def delete_ingress(self, device: str) -> None:
        index = self._index(device)
        if index is None:
            return
        try:
            self._ip.tc("del", "ingress", index, "ffff:")
        except OSError as err:
            if err.errno not in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
                raise

    def delete_link(self, name: str) -> None:
        index = self._index(name)
        if index is None:
            return
        try:
            self._ip.link("del", index=index)
        except OSError as err:
            if err.errno != errno.ENODEV:
                raise

    def _require(self, name: str) -> int:
        index = self._index(name)
        if index is None:
            raise OSError(errno.ENODEV, f"no link {name}")
        return index


class _OsErrors:
    """IPRoute with its NetlinkError (not an OSError) turned into OSError with the errno."""

    def __init__(self, ipr: Any) -> None:
        self._ipr = ipr

    def __getattr__(self, name: str) -> Any:
        from pyroute2.netlink.exceptions import NetlinkError

        method = getattr(self._ipr, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except NetlinkError as err:
                raise OSError(err.code, f"{name}: {os.strerror(err.code)}") from err

        return call


def enter_netns(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise FailedPrecondition(f"network namespace {path}: {err.strerror}") from err
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise FailedPrecondition(f"network namespace {path}: cannot enter it: "
                                     f"{os.strerror(code)}")
    finally:
        os.close(fd)


def _run(command: str, netns: str, stdin_text: str) -> tuple[dict[str, Any], list[int]]:
    if command == "teardown" and not os.path.exists(netns):
        return {}, []  # CNI removed the namespace: everything in it went with it
    enter_netns(netns)
    netlink = PyrouteNetlink()
    try:
        if command == "setup":
            network, fds = wire(netlink, netns)
            return {"network": json.loads(network.to_json())}, fds
        if command == "teardown":
            unwire(netlink, PodNetwork.from_json(stdin_text))
            return {}, []
        raise InvalidArgument(f"unknown command {command!r}")
    finally:
        netlink.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or not args[2].isdigit():
        print("usage: python -m shim.network.helper setup|teardown <netns> <reply-fd>",
              file=sys.stderr)
        return 2
    reply = socket.socket(fileno=int(args[2]))
    fds: list[int] = []
    try:
        stdin_text = sys.stdin.read() if args[0] == "teardown" else ""
        answer, fds = _run(args[0], args[1], stdin_text)
    except RpcError as err:
        answer = {"error": {"kind": type(err).__name__, "message": str(err)}}
    except Exception as err:
        answer = {"error": {"kind": "OSError", "message": f"{type(err).__name__}: {err}"}}
    socket.send_fds(reply, [json.dumps(answer).encode()], fds)
    return 0


# --- the daemon side ----------------------------------------------------------------------------


class HelperNetworking:
    """``PodNetworking`` through the helper process (the shim daemon's default)."""

    def __init__(self, python: str = sys.executable,
                 timeout: float = TIMEOUTS.network_helper) -> None:
        self.python = python
        self.timeout = timeout

    async def setup(self, netns: Path) -> WiredNetwork:
        answer, fds = await self._call("setup", netns, b"")
        try:
            network = PodNetwork.from_json(json.dumps(answer["network"]))
            if len(fds) != len(network.endpoints):
                raise Unavailable(f"network helper sent {len(fds)} fds for "
                                  f"{len(network.endpoints)} interfaces")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return WiredNetwork(network, fds)

    async def teardown(self, wired: WiredNetwork) -> None:
        wired.close_fds()
        if not wired.network.endpoints:
            return
        await self._call("teardown", Path(wired.network.netns),
                         wired.network.to_json().encode())

    async def _call(self, command: str, netns: Path,
                    stdin: bytes) -> tuple[dict[str, Any], list[int]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with ours:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *helper_argv(self.python, command, netns, theirs.fileno()),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE, pass_fds=(theirs.fileno(),),
                    env=_helper_env())
            finally:
                theirs.close()
            try:
                async with asyncio.timeout(self.timeout):
                    _, err = await proc.communicate(stdin)
            except BaseException as exc:  # timeout or cancellation: the helper goes too
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                if isinstance(exc, TimeoutError):
                    raise Unavailable(f"network helper ({command} {netns}) did not finish "
                                      f"in {self.timeout:g} s") from exc
                raise
            return _answer(ours, command, netns, proc.returncode, err)


def helper_argv(python: str, command: str, netns: Path, fd: int) -> list[str]:
    return [python, "-P", "-m", "shim.network.helper", command, str(netns), str(fd)]


def _answer(ours: socket.socket, command: str, netns: Path, returncode: int | None,
            err: bytes) -> tuple[dict[str, Any], list[int]]:
    """The helper's one message (it has exited: the message, if any, is queued)."""
    ours.setblocking(False)
    try:
        data, fds, _, _ = socket.recv_fds(ours, MAX_MESSAGE, MAX_FDS)
    except BlockingIOError:
        data, fds = b"", []
    if not data:
        raise Unavailable(f"network helper ({command} {netns}) exited with status "
                          f"{returncode} without answering: "
                          f"{err.decode(errors='replace').strip()[-500:]}")
    answer: dict[str, Any] = json.loads(data)
    error = answer.get("error")
    if error is not None:
        for fd in fds:
            os.close(fd)
        kind = ERROR_KINDS.get(str(error.get("kind")), Unavailable)
        raise kind(f"pod network ({netns}): {error.get('message')}")
    return answer, list(fds)


def teardown_recorded(record: str, python: str = sys.executable,
                      timeout: float = TIMEOUTS.network_helper) -> None:
    """Synchronous teardown from a recorded :class:`PodNetwork` JSON, for ``delete`` after a
    shim daemon died (its QEMU is killed first, so the taps are gone; the veths' ingress
    qdiscs and redirect filters are what remains)."""
    network = PodNetwork.from_json(record)
    if not network.endpoints:
        return
    netns = Path(network.netns)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours:
        try:
            done = subprocess.run(helper_argv(python, "teardown", netns, theirs.fileno()),
                                  input=record.encode(), capture_output=True, timeout=timeout,
                                  pass_fds=(theirs.fileno(),), env=_helper_env(), check=False)
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"network helper (teardown {netns}) did not finish in "
                              f"{timeout:g} s") from exc
        finally:
            theirs.close()
        _answer(ours, "teardown", netns, done.returncode, done.stderr)


def _helper_env() -> dict[str, str]:
    """The helper runs the same code as this process (``-P``: never whatever the working
    directory holds)."""
    ours = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ours, env.get("PYTHONPATH")) if p)
    return env


if __name__ == "__main__":
    raise SystemExit(main())
