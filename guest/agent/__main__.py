"""``python -m guest.agent``: run the reference guest agent.

In the guest (started by the image's init): ``--vsock`` serves ttrpc on vsock port 1024.
Outside a VM, for tests: ``--unix PATH`` (optionally together with --vsock). The process exits
after DestroySandbox has been answered, or on SIGTERM/SIGINT; init then powers the VM off.

Before serving, in this order: the kernel modules are in (``--wait-for``), initdata is found,
checked against the TEE's evidence and written out (:mod:`guest.agent.initdata`), the guest's
kind is settled and the policy installed: initdata's ``policy.rego`` if it has one, else
``--policy``, else the built-in default (the confidential one on a confidential guest).

Then it listens, with Health answering at once and the AgentService pending
(:class:`guest.agent.pending.PendingService`): the container machinery (sandbox, networking,
image pull) is imported in a worker thread meanwhile, and once it is in and the device drivers
are loaded (``--serve-after``) the AgentService is built with the policy settled above; RPCs
that arrive earlier wait for it. The host's first Check so waits for neither.
Started by init (through :mod:`guest.agent.entry`), the interpreter collects no cyclic garbage
until the AgentService is built, or the start-up has settled on failing or refusing
(:func:`guest.agent.entry.end_startup`).

A confidential guest is one that runs on a TEE (the host cannot hide the TEE from it), or was
given initdata, or was started with ``--confidential`` (init passes it for the kernel command
line's ``coco.agent.confidential=1``: coco-dev's way, where there is no TEE to detect and so
nothing the host could not change anyway; on a TEE that line is measured).

If one of init's background boot steps fails (``--boot-failed``: a driver does not load, a
mount fails, the steps die), or the container machinery cannot be built, the agent stops
waiting at once: Health answers NOT_SERVING and every AgentService call, waiting or later,
fails naming the cause (FAILED_PRECONDITION ``guest failed to start: init's boot step failed:
<step, exit status, stderr tail>`` for a step), for ``--refuse-for`` seconds; then it exits
with status 3 and init powers the VM off. A step that never ends is named after
:data:`WAIT_FOR_TIMEOUT`.

If initdata must be refused (or its policy does not compile), the agent does not serve the
agent API: it answers every Health call with FAILED_PRECONDITION ``guest refused to start: <why>``
for ``--refuse-for`` seconds, so the host's dial loop learns the reason over the same channel
(the same line goes to the console), then exits with status 2; init powers the VM off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, NamedTuple

from guest.agent import initdata, timeline
from guest.agent.bootlog import KMSG, BootLog
from guest.agent.bootsteps import BootStepFailed, wait_for_step
from guest.agent.entry import end_startup
from guest.agent.errors import InvalidArgument
from guest.agent.health import HealthService
from guest.agent.pending import AGENT_SERVICE, PendingService, failure_status
from guest.agent.policy import (
    AllowAll,
    DeferredPolicy,
    Policy,
    RegoPolicy,
    deferred_confidential_default,
)
from guest.image_pull.config import DEFAULT_CONFIG_PATH, PullConfig, guest_pull_config
from protocols.api.kata import health_pb2
from protocols.ttrpc import Code, RequestContext, Server, TtrpcError

if TYPE_CHECKING:
    import argparse

    from guest.agent.reaper import Reaper
    from guest.agent.sandbox import Sandbox
    from guest.agent.service import AgentService
    from guest.agent.storage import GuestPull
    from guest.attestation.components import GuestComponents
    from guest.image_pull.puller import GuestRootfs

log = logging.getLogger("guest.agent")

AGENT_PORT = 1024
WAIT_FOR_TIMEOUT = 120.0  # module loading under TCG takes seconds, never minutes
REFUSE_FOR = 60.0  # seconds the refusal is served: longer than a shim's dial timeout
REFUSED_EXIT = 2
FAILED_EXIT = 3  # the guest could not start (a boot step, the machinery): served, then exit
VMADDR_CID_HOST = 2
READY_ANNOUNCE_TIMEOUT = 10.0  # the host listens from before the VM starts: one try will do


class Option(NamedTuple):
    """One command-line option: argparse is built from these, and so is the fast path."""

    flags: tuple[str, ...]
    dest: str
    kind: str  # "flag" (store_true), "bool" (--x / --no-x), "int", "float", "path", "str"
    default: object = None
    help: str = ""


OPTIONS = (
    Option(("--vsock",), "vsock", "flag", False, "serve on vsock (inside the guest)"),
    Option(("--vsock-port",), "vsock_port", "int", AGENT_PORT),
    Option(("--unix",), "unix", "path", None, "also/instead serve on this socket"),
    Option(("--state-dir",), "state_dir", "path", Path("/run/coco-agent")),
    Option(("--shared-root",), "shared_root", "path", Path("/run/kata-containers")),
    Option(("--resolv-conf",), "resolv_conf", "path", Path("/etc/resolv.conf")),
    Option(("--cgroup-parent",), "cgroup_parent", "str", "/coco",
           "cgroup of the containers' cgroups"),
    Option(("--runtime", "--runc"), "runtime", "str", "runc",
           "the OCI runtime CLI containers run with: runc or crun"),
    Option(("--policy",), "policy", "path", None,
           "Rego policy replacing the built-in default (initdata's policy.rego replaces it)"),
    Option(("--confidential",), "confidential", "flag", False,
           "a confidential guest even without TEE or initdata (coco-dev)"),
    Option(("--initdata",), "initdata", "str", None,
           '"scan" /dev/vd* and /dev/sd* (default with --vsock), "none" (default otherwise), '
           "or the path of an initdata disk image"),
    Option(("--initdata-dir",), "initdata_dir", "path", initdata.OUTPUT_DIR),
    Option(("--refuse-for",), "refuse_for", "float", REFUSE_FOR,
           "seconds the refusal is served (SECONDS)"),
    Option(("--image-pull-config",), "image_pull_config", "path", DEFAULT_CONFIG_PATH,
           "guest pull settings (TOML, cdh.toml's [image] shape); defaults when missing"),
    Option(("--pause-bundle",), "pause_bundle", "path", None,
           "bundle (config.json + rootfs/) of the pod's sandbox container "
           "(default: guest.image_pull.pause.PAUSE_BUNDLE, /pause_bundle)"),
    Option(("--manage-system",), "manage_system", "bool", None,
           "set hostname/DNS on CreateSandbox (default: only with --vsock)"),
    Option(("--wait-for",), "wait_for", "path", None,
           "listen only once this file exists (init creates it when modules are loaded)"),
    Option(("--serve-after",), "serve_after", "path", None,
           "answer Health at once but serve the AgentService only once this file exists "
           "(init creates it when the device drivers are loaded)"),
    Option(("--boot-failed",), "boot_failed", "path", None,
           "init writes this file if a boot step fails (the step, its exit status, its stderr "
           "tail): the agent then stops waiting and answers every call with it"),
    Option(("--finish-boot",), "finish_boot", "flag", False,
           "mount the containers' filesystems under /dev and bring lo up before serving the "
           "AgentService (guest.agent.devices; init passes it)"),
    Option(("--boot-step",), "boot_step", "path", None,
           "init writes the name of its running boot step here (named if a wait times out)"),
    Option(("--ready-vsock-port",), "ready_vsock_port", "int", None,
           "once listening, connect to the host (CID 2) on this port and say READY (the host "
           "dials hybrid vsock only after it: see hypervisor/vsock.py)"),
    Option(("--dev-evidence-field",), "dev_evidence_field", "evidence", None,
           "without a TEE only (coco-dev tests): the evidence field initdata must match (HEX)"),
    Option(("--debug",), "debug", "flag", False),
    Option(("--trace",), "trace", "flag", False,
           "print the agent's timeline on stderr (guest/agent/timeline.py; benchmarks)"),
)


def parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(prog="python -m guest.agent", description=__doc__)
    for option in OPTIONS:
        if option.kind == "flag":
            p.add_argument(*option.flags, dest=option.dest, action="store_true",
                           help=option.help or None)
        elif option.kind == "bool":
            p.add_argument(*option.flags, dest=option.dest,
                           action=argparse.BooleanOptionalAction, default=option.default,
                           help=option.help or None)
        else:
            p.add_argument(*option.flags, dest=option.dest, type=_CONVERT[option.kind],
                           default=option.default, help=option.help or None)
    return p


def parse_args(argv: list[str]) -> SimpleNamespace:
    """The command line. When every word is a known ``--option [value]`` (init's command line)
    it is read without argparse, whose import costs ≈ 0.27 s of a TCG boot; anything else
    (--help, an unknown or malformed option) goes to argparse, which says what is wrong."""
    fast = _parse_fast(argv)
    return fast if fast is not None else SimpleNamespace(**vars(parser().parse_args(argv)))


def _parse_fast(argv: list[str]) -> SimpleNamespace | None:
    by_flag = {flag: option for option in OPTIONS for flag in option.flags}
    values = {option.dest: option.default for option in OPTIONS}
    words = iter(argv)
    for word in words:
        flag, has_value, value = word.partition("=")
        option = by_flag.get(flag)
        if option is None and flag.startswith("--no-"):
            negated = by_flag.get("--" + flag[len("--no-"):])
            if negated is not None and negated.kind == "bool" and not has_value:
                values[negated.dest] = False
                continue
        if option is None:
            return None
        if option.kind in ("flag", "bool"):
            if has_value:
                return None
            values[option.dest] = True
            continue
        if not has_value:
            value = next(words, "")
            if not value or value.startswith("--"):
                return None
        try:
            values[option.dest] = _CONVERT[option.kind](value)
        except ValueError:
            return None
    return SimpleNamespace(**values)


class Startup(NamedTuple):
    """What the agent settled before serving."""

    confidential: bool
    policy: Policy
    initdata: initdata.Initdata | None


class TeeEvidence:
    """:class:`guest.agent.initdata.EvidenceSource` over :mod:`guest.tee` (configfs-tsm).

    ``dev_field`` (``--dev-evidence-field HEX``, from coco-dev's kernel command line
    ``coco.agent.dev_evidence_field=HEX``) stands in for the evidence field only when no TEE
    is detected, so tests can boot a coco-dev guest whose "evidence" does not match its
    initdata and see it refuse. It cannot weaken anything: on a TEE it is ignored (the field
    comes from the hardware report), and it only ever adds a check that can fail, never
    removes one; on coco-dev the host controls the guest anyway (coco-dev protects nothing).
    """

    def __init__(self, dev_field: bytes | None = None) -> None:
        from guest.tee import Tee, TeeError, detect

        try:
            self.tee = detect()
        except TeeError as err:
            raise initdata.InitdataError(f"the TEE cannot be used: {err}") from err
        self._none = Tee.SAMPLE
        self.dev_field = dev_field if self.tee is Tee.SAMPLE else None
        if dev_field is not None and self.dev_field is None:
            log.warning("--dev-evidence-field ignored: a %s TEE reports the evidence",
                        self.tee.value)

    @property
    def platform(self) -> str | None:
        return None if self.tee is self._none else str(self.tee.value)

    def init_data_field(self) -> bytes | None:
        from guest.tee import TeeError, bound_field

        if self.dev_field is not None:
            return self.dev_field
        try:
            return bound_field(self.tee)
        except TeeError as err:
            raise initdata.InitdataError(f"reading the TEE's evidence failed: {err}") from err


def evidence_source(dev_field: bytes | None = None) -> TeeEvidence:
    return TeeEvidence(dev_field)


def dev_evidence_field(text: str) -> bytes:
    """``--dev-evidence-field``: hex, 32 or 48 bytes (an SNP or TDX field's size); ValueError
    otherwise (argparse then names the option)."""
    field = bytes.fromhex(text)
    if len(field) not in (32, 48):
        raise ValueError(f"{len(field)} bytes, expected 32 or 48")
    return field


_CONVERT: dict[str, Callable[[str], object]] = {
    "int": int, "float": float, "path": Path, "str": str, "evidence": dev_evidence_field}


def initdata_device(args: SimpleNamespace) -> Path | None:
    choice = args.initdata or ("scan" if args.vsock else "none")
    if choice == "none":
        return None
    if choice == "scan":
        return initdata.find_disk()
    return Path(choice)


def prepare(args: SimpleNamespace, evidence: initdata.EvidenceSource) -> Startup:
    """Initdata, the guest's kind and its policy. Raises InitdataError or InvalidArgument when
    the guest must refuse to start."""
    found = initdata.load(initdata_device(args), evidence)
    confidential = bool(args.confidential or found is not None or evidence.platform)
    policy: Policy
    if found is not None and found.policy is not None:
        policy = RegoPolicy(found.policy, "initdata policy.rego")
    elif args.policy is not None:
        policy = RegoPolicy(args.policy.read_text(), str(args.policy))
    elif confidential:
        policy = deferred_confidential_default()  # compiled once listening: build_machinery
    else:
        policy = AllowAll()
    if found is not None:
        initdata.write_out(found, args.initdata_dir)
    log.info(
        "%s guest (TEE: %s), policy: %s",
        "confidential" if confidential else "development",
        evidence.platform or "none",
        policy.origin,
    )
    return Startup(confidential, policy, found)


class GuestComponentsError(Exception):
    """The guest components (guest.attestation) could not start from the initdata."""


def start_components(
    startup: Startup, evidence: TeeEvidence, initdata_dir: Path
) -> GuestComponents | None:
    """With initdata: the attestation agent, data hub and resource endpoint it configures
    (imported only then: they need cryptography)."""
    if startup.initdata is None:
        return None
    from guest.attestation.components import GuestComponents

    try:
        return GuestComponents.start(initdata_dir, tee=evidence.tee)
    except Exception as err:
        raise GuestComponentsError(f"guest components from initdata: {err}") from err


class RefusingHealth:
    """grpc.Health while the guest refuses to start: every call answers the reason."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.answered = asyncio.Event()

    def _refuse(self) -> TtrpcError:
        self.answered.set()
        return TtrpcError(Code.FAILED_PRECONDITION, self.message)

    async def Check(
        self, request: health_pb2.CheckRequest, ctx: RequestContext
    ) -> health_pb2.HealthCheckResponse:
        raise self._refuse()

    async def Version(
        self, request: health_pb2.CheckRequest, ctx: RequestContext
    ) -> health_pb2.VersionCheckResponse:
        raise self._refuse()


async def _listen(server: Server, args: SimpleNamespace, boot: BootLog) -> None:
    if args.vsock:
        await server.serve_vsock(args.vsock_port)
        boot.mark(f"listening on vsock port {args.vsock_port}")
        log.info("serving on vsock port %d", args.vsock_port)
    if args.unix is not None:
        await server.serve_unix(args.unix)
        log.info("serving on %s", args.unix)
    if args.vsock and args.ready_vsock_port is not None:
        await announce_ready(args.ready_vsock_port, args.vsock_port)
        boot.mark("ready announced")


async def announce_ready(
    port: int, agent_port: int, bound: float = READY_ANNOUNCE_TIMEOUT
) -> None:
    """Tell the host the agent listens: connect to CID 2 ``port``, send ``READY <agent port>``.

    A failure is logged, not fatal: the host then reports that the guest never announced.
    """
    loop = asyncio.get_running_loop()
    last: OSError | None = None
    try:
        async with asyncio.timeout(bound):
            while True:
                with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as sock:
                    sock.setblocking(False)
                    try:
                        await loop.sock_connect(sock, (VMADDR_CID_HOST, port))
                        await loop.sock_sendall(sock, f"READY {agent_port}\n".encode())
                        return
                    except OSError as err:  # the host is not listening (yet): reset
                        last = err
                await asyncio.sleep(0.1)
    except TimeoutError:
        log.warning("could not announce readiness on host vsock port %d: %s", port, last)


async def refuse(
    args: SimpleNamespace, reason: str, stop: asyncio.Event, boot: BootLog
) -> int:
    message = f"guest refused to start: {reason}"
    print(f"coco-agent: {message}", file=sys.stderr, flush=True)
    health = RefusingHealth(message)
    server = Server()
    server.register_service(health_pb2.DESCRIPTOR.services_by_name["Health"], health)
    try:
        await _listen(server, args, boot)
        end_startup()
        print(f"coco-agent: refusing for {args.refuse_for:g} s", file=sys.stderr, flush=True)
        await _linger(args.refuse_for, stop)
    finally:
        await server.close()
    return REFUSED_EXIT


class Machinery(NamedTuple):
    """What serves the agent API beyond Health: built after the agent listens."""

    reaper: Reaper
    sandbox: Sandbox
    agent: AgentService


def import_machinery(policy: Policy | None = None, *, guest_pull: bool = True) -> None:
    """The container machinery's modules (≈ 0.5 s of a TCG boot) and a deferred policy's
    engine: imported in a worker thread while the event loop already answers Health (see
    :class:`guest.agent.pending.PendingService`). The guest puller (≈ a quarter of it) only
    with ``guest_pull`` (a confidential guest: every container is pulled in the guest); a
    development guest imports it at its first ``image_guest_pull`` storage, if ever
    (:class:`LazyGuestPull`)."""
    if isinstance(policy, DeferredPolicy):
        policy.prepare_engine()
    import guest.agent.network
    import guest.agent.reaper
    import guest.agent.sandbox
    import guest.agent.service

    if guest_pull:
        import guest.image_pull.pause
        import guest.image_pull.puller  # noqa: F401


class LazyGuestPull:
    """:class:`guest.agent.storage.GuestPull` that builds the real handler
    (:class:`guest.image_pull.puller.GuestPullStorage`, importing the puller) on first use."""

    def __init__(self, make: Callable[[], GuestPull]) -> None:
        self._make = make
        self._real: GuestPull | None = None

    def _handler(self) -> GuestPull:
        if self._real is None:
            self._real = self._make()
        return self._real

    async def mount(self, container_id: str, source: str, driver_options: tuple[str, ...],
                    mount_point: str, target: str | None = None) -> GuestRootfs:
        return await self._handler().mount(container_id, source, driver_options,
                                           mount_point, target)

    def release(self, mount_point: str) -> None:
        if self._real is not None:  # nothing was mounted through a handler never made
            self._real.release(mount_point)


def build_machinery(
    args: SimpleNamespace,
    startup: Startup,
    components: GuestComponents | None,
    pull_config: PullConfig,
) -> Machinery:
    """The reaper (installed: the loop's SIGCHLD), the sandbox and the AgentService over them,
    with the policy settled before listening."""
    from guest.agent.network import Network
    from guest.agent.reaper import Reaper
    from guest.agent.runc import pin_read_only
    from guest.agent.sandbox import AgentPaths, Sandbox
    from guest.agent.service import AgentService
    from guest.image_pull.pause import PAUSE_BUNDLE, pause_argv

    if isinstance(startup.policy, DeferredPolicy):
        startup.policy.load()  # here, in the loop's thread, which will use the engine
    if args.vsock:  # in the VM (never on a test host): the runtime's binary, read-only
        pinned = pin_read_only(args.runtime)
        timeline.mark(f"runtime read-only: {pinned}")
    reaper = Reaper()
    reaper.install()
    paths = AgentPaths(
        state_dir=args.state_dir,
        shared_root=args.shared_root,
        resolv_conf=args.resolv_conf,
        cgroup_parent=args.cgroup_parent,
    )
    manage_system = args.vsock if args.manage_system is None else args.manage_system

    def guest_pull_storage() -> GuestPull:
        from guest.image_pull.puller import GuestPullStorage, ImagePuller

        return GuestPullStorage(lambda: ImagePuller(pull_config), args.shared_root,
                                args.pause_bundle or PAUSE_BUNDLE)

    guest_pull = (guest_pull_storage() if startup.confidential
                  else LazyGuestPull(guest_pull_storage))
    sandbox = Sandbox(
        reaper,
        paths,
        runc_binary=args.runtime,
        manage_system=manage_system,
        secrets=components.hub if components is not None else None,
        guest_pull=guest_pull,
        pid_namespace_init=lambda: pause_argv(args.pause_bundle or PAUSE_BUNDLE),
    )
    return Machinery(reaper, sandbox, AgentService(sandbox, Network(), startup.policy))


def register_agent_service(server: Server, service: AgentService) -> None:
    """The AgentService's RPCs on ``server`` (its descriptors came with the machinery)."""
    from protocols.api.kata import agent_pb2

    server.register_service(agent_pb2.DESCRIPTOR.services_by_name["AgentService"], service)


def in_thread(fn: Callable[[], None], name: str) -> asyncio.Future[None]:
    """Run ``fn`` in a thread of its own; the future (of the running loop) says when it ended.

    A plain thread, not the loop's executor: concurrent.futures.thread and queue cost ≈ 0.1 s
    of a TCG boot. The caller owns the future and awaits it; ``fn`` is short and cannot be
    cancelled (an import), so the owner waits for it rather than abandoning it.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            fn()
        except BaseException as err:
            error = err
        with contextlib.suppress(RuntimeError):  # the loop is gone: its owner is too
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return done


async def serve(args: SimpleNamespace, boot: BootLog | None = None) -> int:
    """Settle the start-up (initdata, policy, guest components, pull settings; a refusal is
    served instead), listen with Health answering and the AgentService pending, then build
    the container machinery and hand the AgentService its implementation."""
    boot = boot or BootLog(None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if args.wait_for is not None:
        try:
            await wait_for_step(args.wait_for, WAIT_FOR_TIMEOUT, failed=args.boot_failed,
                                step=args.boot_step)
        except BootStepFailed as err:
            return await serve_failed(args, err, stop, boot)
    try:
        evidence = evidence_source(args.dev_evidence_field)
        startup = prepare(args, evidence)
        components = start_components(startup, evidence, args.initdata_dir)
        pull_config = guest_pull_config(
            startup.initdata.data.get("cdh.toml") if startup.initdata is not None else None,
            args.image_pull_config,
            components.hub.resource if components is not None else None,
        )
        if pull_config.work_dir.resolve().is_relative_to(args.shared_root.resolve()):
            raise InvalidArgument(
                f"image pull work_dir {pull_config.work_dir} must not lie beneath the shared "
                f"root {args.shared_root}: the host may write there (CopyFile, storages)"
            )
    except (initdata.InitdataError, InvalidArgument, GuestComponentsError) as err:
        return await refuse(args, str(err), stop, boot)

    server = Server()
    agent = PendingService()
    def on_check() -> None:
        boot.mark_once("first Check answered")
        timeline.mark("Check answered")

    health = HealthService(on_check=on_check,
                           failed=lambda: agent.failed)
    server.register_service(health_pb2.DESCRIPTOR.services_by_name["Health"], health)
    server.register_pending(AGENT_SERVICE, agent.wait)
    imported: asyncio.Future[None] | None = None
    machinery: Machinery | None = None

    async def start_machinery() -> Machinery:
        assert imported is not None
        await asyncio.shield(imported)
        boot.mark("machinery imported")
        timeline.mark("machinery imported")
        if args.finish_boot:
            # A few system calls while init's drivers step still runs: after the machinery's
            # imports (which bring ctypes and guest.agent.mounts), not before the host's first
            # Check, which they would delay on the loop (measured: 0.25 s under TCG).
            from guest.agent.devices import finish_boot
            finish_boot()
            timeline.mark("containers' filesystems mounted, lo up")
        if args.serve_after is not None:
            await wait_for_step(args.serve_after, WAIT_FOR_TIMEOUT, failed=args.boot_failed,
                                step=args.boot_step)
            timeline.mark("init's boot steps done")
        built = build_machinery(args, startup, components, pull_config)
        timeline.mark("machinery built")
        return built

    stopped = asyncio.ensure_future(stop.wait())
    status = 0
    try:
        await _listen(server, args, boot)
        print(f"coco-agent: ready (uptime {_uptime()})", file=sys.stderr, flush=True)
        timeline.mark("machinery import begins")
        imported = in_thread(
            lambda: import_machinery(startup.policy, guest_pull=startup.confidential),
            "agent-imports")
        starting = asyncio.ensure_future(start_machinery())
        failure: Exception | None = None
        try:
            try:
                await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting  # raises what the start-up raised
        except Exception as err:  # a boot step or the machinery: served below, then exit
            failure = err
        if failure is not None:
            agent.fail(failure)
            end_startup()
            _say_failed(failure, boot)
            await _linger(args.refuse_for, stop)
            status = FAILED_EXIT
        elif not starting.cancelled():
            machinery = starting.result()
        if machinery is not None and not stop.is_set():
            register_agent_service(server, machinery.agent)
            agent.resolve()
            boot.mark("agent service ready")
            end_startup()
            shutdown = asyncio.ensure_future(machinery.sandbox.shutdown.wait())
            try:
                await asyncio.wait([stopped, shutdown], return_when=asyncio.FIRST_COMPLETED)
            finally:
                shutdown.cancel()
        if failure is None:
            log.info("shutting down (%s)", "signal" if stop.is_set() else "sandbox destroyed")
    except Exception as err:
        agent.fail(err)
        raise
    finally:
        stopped.cancel()
        agent.fail(ConnectionAbortedError("the agent is shutting down"))
        await server.close()
        if imported is not None and not imported.done():
            with contextlib.suppress(Exception):
                await imported  # an import cannot be interrupted: its owner waits for it
        if machinery is not None:
            await machinery.sandbox.destroy_sandbox()
            machinery.reaper.close()
        if components is not None:
            components.close()
    return status


async def serve_failed(
    args: SimpleNamespace, error: Exception, stop: asyncio.Event, boot: BootLog
) -> int:
    """The guest cannot start (a boot step failed before the agent listens): listen anyway, if
    the channel's modules are in, with Health answering NOT_SERVING and every AgentService
    call the cause, for ``--refuse-for`` seconds; FAILED_EXIT. If it cannot listen, the error
    ends the agent (init powers off; the console has the cause)."""
    _say_failed(error, boot)
    agent = PendingService()
    agent.fail(error)
    server = Server()
    server.register_service(health_pb2.DESCRIPTOR.services_by_name["Health"],
                            HealthService(failed=lambda: True))
    server.register_pending(AGENT_SERVICE, agent.wait)
    try:
        await _listen(server, args, boot)
        end_startup()
        await _linger(args.refuse_for, stop)
    finally:
        await server.close()
    return FAILED_EXIT


def _say_failed(error: Exception, boot: BootLog) -> None:
    """The cause on the console (kept by the host after a failed boot) and in the boot log."""
    message = failure_status(error).message
    print(f"coco-agent: {message}; serving that for a while, then exiting",
          file=sys.stderr, flush=True)
    boot.mark("agent service failed")


async def _linger(seconds: float, stop: asyncio.Event) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


def _uptime() -> str:
    try:
        with open("/proc/uptime") as f:
            return f.read().split()[0] + " s"
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    boot = BootLog(KMSG if args.vsock else None)  # in the VM
    boot.mark("imports done")
    timeline.enable(args.trace)
    if not args.vsock and args.unix is None:
        parser().error("give --vsock and/or --unix PATH")
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="coco-agent %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(serve(args, boot))


if __name__ == "__main__":
    sys.exit(main())
