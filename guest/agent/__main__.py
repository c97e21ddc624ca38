"""``python -m guest.agent``: run the reference guest agent.

In the guest (started by the image's init): ``--vsock`` serves ttrpc on vsock port 1024.
Outside a VM, for tests: ``--unix PATH`` (optionally together with --vsock). The process exits
after DestroySandbox has been answered, or on SIGTERM/SIGINT; init then powers the VM off.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from guest.agent.network import Network
from guest.agent.policy import RegoPolicy
from guest.agent.reaper import Reaper
from guest.agent.sandbox import AgentPaths, Sandbox
from guest.agent.service import AgentService, HealthService
from protocols.api.kata import agent_pb2, health_pb2
from protocols.ttrpc import Server

log = logging.getLogger("guest.agent")

AGENT_PORT = 1024
WAIT_FOR_TIMEOUT = 120.0  # module loading under TCG takes seconds, never minutes


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m guest.agent", description=__doc__)
    p.add_argument("--vsock", action="store_true", help="serve on vsock (inside the guest)")
    p.add_argument("--vsock-port", type=int, default=AGENT_PORT)
    p.add_argument("--unix", type=Path, default=None, help="also/instead serve on this socket")
    p.add_argument("--state-dir", type=Path, default=Path("/run/coco-agent"))
    p.add_argument("--shared-root", type=Path, default=Path("/run/kata-containers"))
    p.add_argument("--resolv-conf", type=Path, default=Path("/etc/resolv.conf"))
    p.add_argument("--cgroup-parent", default="/coco", help="cgroup of the containers' cgroups")
    p.add_argument(
        "--runtime",
        "--runc",
        dest="runtime",
        default="runc",
        help="the OCI runtime CLI containers run with: runc or crun",
    )
    p.add_argument("--policy", type=Path, default=None, help="initial policy document")
    p.add_argument(
        "--manage-system",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="set hostname/DNS on CreateSandbox (default: only with --vsock)",
    )
    p.add_argument(
        "--wait-for",
        type=Path,
        default=None,
        help="listen only once this file exists (init creates it when modules are loaded)",
    )
    p.add_argument("--debug", action="store_true")
    return p


async def serve(args: argparse.Namespace) -> int:
    reaper = Reaper()
    reaper.install()
    paths = AgentPaths(
        state_dir=args.state_dir,
        shared_root=args.shared_root,
        resolv_conf=args.resolv_conf,
        cgroup_parent=args.cgroup_parent,
    )
    manage_system = args.vsock if args.manage_system is None else args.manage_system
    sandbox = Sandbox(reaper, paths, runc_binary=args.runtime, manage_system=manage_system)
    policy = RegoPolicy(args.policy.read_text(), str(args.policy)) if args.policy else None
    agent = AgentService(sandbox, Network(), policy)

    server = Server()
    server.register_service(health_pb2.DESCRIPTOR.services_by_name["Health"], HealthService())
    server.register_service(agent_pb2.DESCRIPTOR.services_by_name["AgentService"], agent)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if args.wait_for is not None:
            await _wait_for_file(args.wait_for, WAIT_FOR_TIMEOUT)
        if args.vsock:
            await server.serve_vsock(args.vsock_port)
            log.info("serving on vsock port %d", args.vsock_port)
        if args.unix is not None:
            await server.serve_unix(args.unix)
            log.info("serving on %s", args.unix)
        print(f"coco-agent: ready (uptime {_uptime()})", file=sys.stderr, flush=True)
        waiters = [
            asyncio.ensure_future(stop.wait()),
            asyncio.ensure_future(sandbox.shutdown.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        log.info("shutting down (%s)", "signal" if stop.is_set() else "sandbox destroyed")
    finally:
        await server.close()
        await sandbox.destroy_sandbox()
        reaper.close()
    return 0


async def _wait_for_file(path: Path, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240 - another process's file
            await asyncio.sleep(0.02)


def _uptime() -> str:
    try:
        with open("/proc/uptime") as f:
            return f.read().split()[0] + " s"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if not args.vsock and args.unix is None:
        parser().error("give --vsock and/or --unix PATH")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="coco-agent %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
