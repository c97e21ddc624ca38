"""The boot script (shim/pod/boot.py) with fakes for the networking, QEMU launch and agent:
its steps in order, the crash record written as each thing comes to exist, taps before QEMU
(their fds on its command line, closed by us after), interfaces/routes/neighbours after the
agent answers and before CreateSandbox, and rollback of every earlier step on any failure."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hypervisor.errors import QemuError
from hypervisor.profile import RuntimeProfile, TeeKind
from hypervisor.vm import AgentChannel, LaunchOptions, VirtualMachine
from shim.core import paths
from shim.core.crash_record import ShimState
from shim.core.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    RpcError,
    Unavailable,
)
from shim.core.timeouts import Timeouts
from shim.network.tcfilter import (
    FAMILY_V4,
    Endpoint,
    IpAddress,
    Neighbor,
    PodNetwork,
    Route,
    WiredNetwork,
)
from shim.pod.admission import BootSlots, HeldSlot, Priority
from shim.pod.agent import Agent
from shim.pod.boot import BootEnv, VmBooter
from shim.pod.sizing import HostSize
from shim.pod.vm import BootClock, PodConfig, PodVm
from tests.unit.shim.fakes import FakeAgent, FakeVm
from tests.unit.shim.helpers import FAST

POD_NETWORK = PodNetwork(
    netns="",  # set per test
    endpoints=(Endpoint("eth0", "02:42:c6:12:00:02", 1450, "tap0_eth0",
                        (IpAddress(FAMILY_V4, "198.18.0.2", 24),)),),
    routes=(Route("", "198.18.0.1", "eth0", "", 0, FAMILY_V4),),
    neighbors=(Neighbor("198.18.0.9", "02:00:00:00:00:09", "eth0", 0x80),))
POLICY_ANNOTATION = "io.katacontainers.config.agent.policy"


@dataclass
class FakeNetworking:
    log: list[str]
    setups: list[Path] = field(default_factory=list)
    teardowns: int = 0
    fds: list[int] = field(default_factory=list)

    async def setup(self, netns: Path) -> WiredNetwork:
        self.log.append("network setup")
        self.setups.append(netns)
        fd = os.open(os.devnull, os.O_RDONLY)
        self.fds.append(fd)
        return WiredNetwork(PodNetwork(str(netns), POD_NETWORK.endpoints, POD_NETWORK.routes,
                                       POD_NETWORK.neighbors), [fd])

    async def teardown(self, wired: WiredNetwork) -> None:
        wired.close_fds()
        self.log.append("network teardown")
        self.teardowns += 1


class LoggingVm(FakeVm):
    def __init__(self, log: list[str], pid: int) -> None:
        super().__init__(pid)
        self.log = log

    async def aclose(self) -> None:
        self.log.append("vm close")
        await super().aclose()


class LoggingAgent(FakeAgent):
    def __init__(self, log: list[str], fail: str = "") -> None:
        super().__init__()
        self.log = log
        self.fail = fail
        self.probe: Callable[[str], object] | None = None  # called at each step, before it runs

    def _step(self, method: str) -> None:
        self.log.append(method)
        if self.probe is not None:
            self.probe(method)
        if method == self.fail:
            raise RpcError(f"agent {method}: refused")

    async def set_policy(self, policy: str) -> None:
        self._step("SetPolicy")
        await super().set_policy(policy)

    async def update_interface(self, interface: Any) -> None:
        self._step("UpdateInterface")
        await super().update_interface(interface)

    async def update_routes(self, routes: Any) -> None:
        self._step("UpdateRoutes")
        await super().update_routes(routes)

    async def add_arp_neighbors(self, neighbors: Any) -> None:
        self._step("AddARPNeighbors")
        await super().add_arp_neighbors(neighbors)

    async def create_sandbox(self, sandbox_id: str, hostname: str, dns: Any,
                             storages: Any) -> None:
        self._step("CreateSandbox")
        await super().create_sandbox(sandbox_id, hostname, dns, storages)

    async def close(self) -> None:
        self.log.append("agent close")
        await super().close()


@dataclass
class Harness:
    log: list[str]
    networking: FakeNetworking
    launches: list[LaunchOptions]
    agent: LoggingAgent
    tmp: Path
    annotations: tuple[str, ...] = ()
    launch_fails: bool = False
    console: str = ""  # written to the VM's console log at launch
    helper: int = 0  # a process standing for vhost-device-vsock (a real pid, for the record)
    vm: LoggingVm | None = None
    coco_dev: bool = False  # the confidential path without a TEE (guest pull, initdata)
    profiles: list[RuntimeProfile] = field(default_factory=list)
    cgroup_root: Path | None = None
    boot_slots: int | None = None  # the profile's [runtime] boot_slots (None: host CPUs)
    slot_wait: float = 5.0  # Timeouts.boot_slot_wait
    slot_hold: float = 5.0  # Timeouts.boot_slot_hold
    # The daemon's priority: "low" / "back" each with the log's length at the time.
    nice: list[tuple[str, int]] = field(default_factory=list)

    def config(self, netns: str | None, sandbox_id: str = "pod1",
               annotations: dict[str, str] | None = None) -> PodConfig:
        namespaces: list[dict[str, str]] = [{"type": "pid"}]
        if netns is not None:
            namespaces.append({"type": "network", "path": netns})
        return PodConfig(sandbox_id=sandbox_id, namespace="default",
                         bundle=self.tmp / "bundle",
                         spec={"hostname": "pod1", "linux": {"namespaces": namespaces},
                               "annotations": annotations or {}})

    def booter(self) -> VmBooter:
        profile = RuntimeProfile(
            name="fake", tee=TeeKind.NONE, qemu=Path("/usr/bin/qemu-system-x86_64"),
            kernel=None, vcpus=1, memory_mib=512, enable_annotations=self.annotations,
            source="fake.toml", dial_timeout=1.0, confidential_without_tee=self.coco_dev,
            kernel_params="coco.agent.confidential=1" if self.coco_dev else "",
            boot_slots=self.boot_slots)

        async def accelerator(profile: object, cache: Path) -> str:
            return "tcg"

        async def launch(profile: RuntimeProfile, options: LaunchOptions) -> VirtualMachine:
            self.profiles.append(profile)
            # QEMU needs the tap fds open while it starts.
            for nic in options.nics:
                os.fstat(nic.tap_fd)
            assert options.on_spawn is not None and options.timeouts == FAST.vm
            options.on_spawn(self.helper)  # the vsock backend, then QEMU, as they spawn
            self.log.append("launch")
            self.launches.append(options)
            if self.console and options.log_dir is not None:
                options.log_dir.mkdir(parents=True, exist_ok=True)
                (options.log_dir / "console.log").write_text(self.console)
            if self.launch_fails:
                raise QemuError("no QEMU today")
            self.vm = LoggingVm(self.log, os.getpid())
            options.on_spawn(os.getpid())
            return self.vm

        async def dial(channel: AgentChannel, dial_timeout: float,
                       exited: asyncio.Future[object], timeouts: Timeouts) -> Agent:
            self.log.append("agent connect")
            return self.agent

        return VmBooter(BootEnv(
            networking=self.networking,
            profile=lambda options: profile,
            accelerator=accelerator, vhost_device_vsock=lambda: None, launch=launch,
            dial=dial, timeouts=dataclasses.replace(
                FAST, boot_slot_wait=self.slot_wait, boot_slot_hold=self.slot_hold),
            host_size=lambda: HostSize(cpus=4, memory_mib=8192),
            cgroup_root=lambda: self.cgroup_root, priority=lambda: FakePriority(self)))


class FakePriority(Priority):
    """Records instead of renicing the test process."""

    def __init__(self, harness: Harness) -> None:
        super().__init__()
        self.harness = harness
        self.low = False

    def lower(self) -> None:
        self.low = True
        self.harness.nice.append(("low", len(self.harness.log)))

    def restore(self) -> None:
        if self.low:
            self.low = False
            self.harness.nice.append(("back", len(self.harness.log)))


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    log: list[str] = []
    monkeypatch.setenv(paths.RUN_ROOT_ENV, str(tmp_path / "run"))
    monkeypatch.setenv(paths.STATE_DIR_ENV, str(tmp_path / "state"))
    monkeypatch.setenv(paths.BOOT_SLOTS_ENV, str(tmp_path / "boot-slots"))
    return Harness(log, FakeNetworking(log), [], LoggingAgent(log), tmp_path,
                   helper=os.getppid())


def netns_file(h: Harness) -> Path:
    path = h.tmp / "podns"
    path.touch()
    return path


def pod_dir(h: Harness) -> Path:
    return paths.pod_run_dir("default", "pod1")


async def test_steps_are_in_order_and_recorded(harness: Harness) -> None:
    netns = netns_file(harness)
    vm = await harness.booter().boot(harness.config(str(netns)))
    assert harness.log == ["network setup", "launch", "agent connect", "UpdateInterface",
                           "UpdateRoutes", "AddARPNeighbors", "CreateSandbox"]
    (nic,) = harness.launches[0].nics
    assert nic.mac == "02:42:c6:12:00:02" and nic.tap_fd == harness.networking.fds[0]
    with pytest.raises(OSError):  # our copy is closed once QEMU has its own
        os.fstat(nic.tap_fd)
    (iface, routes, neighbors) = harness.agent.network
    assert (iface.name, iface.hwAddr, iface.mtu) == ("eth0", "02:42:c6:12:00:02", 1450)
    assert [r.gateway for r in routes] == ["198.18.0.1"]
    assert [n.lladdr for n in neighbors] == ["02:00:00:00:00:09"]
    assert harness.agent.sandbox is not None
    assert harness.agent.sandbox[:2] == ("pod1", "pod1")  # sandbox id, hostname
    # The crash record, for delete should this daemon die: every pid, the run dir, the netns.
    state = ShimState.of("default", "pod1")
    assert [pid for pid, _ in state.pids()] == [harness.helper, os.getpid()]
    assert state.dirs() == [pod_dir(harness)] and pod_dir(harness).is_dir()
    assert state.network() is not None

    await vm.destroy(vm_gone=False)
    assert harness.log[-3:] == ["agent close", "vm close", "network teardown"]
    assert state.network() is None
    assert not pod_dir(harness).exists()


@pytest.mark.parametrize("failing", ["UpdateInterface", "UpdateRoutes", "AddARPNeighbors",
                                     "CreateSandbox"])
async def test_a_failure_after_wiring_unwires(harness: Harness, failing: str) -> None:
    harness.agent.fail = failing
    with pytest.raises(RpcError, match=failing):
        await harness.booter().boot(harness.config(str(netns_file(harness))))
    assert harness.networking.teardowns == 1
    assert harness.log[-3:] == ["agent close", "vm close", "network teardown"]
    assert not pod_dir(harness).exists()
    assert ShimState.of("default", "pod1").network() is None


async def test_a_failed_boot_keeps_its_logs_and_names_them(harness: Harness) -> None:
    harness.agent.fail = "CreateSandbox"
    harness.console = "coco-init: stage 2\n"
    with pytest.raises(RpcError) as info:
        await harness.booter().boot(harness.config(None))
    kept = harness.tmp / "state/.failed-boots/default/pod1"
    assert str(info.value) == f"agent CreateSandbox: refused (console and QEMU logs kept in {kept})"
    assert (kept / "console.log").read_text() == "coco-init: stage 2\n"
    assert "agent CreateSandbox: refused" in (kept / "error.txt").read_text()
    assert not pod_dir(harness).exists()  # rolled back all the same


async def test_a_failed_launch_unwires(harness: Harness) -> None:
    harness.launch_fails = True
    with pytest.raises(Unavailable, match="no QEMU today"):
        await harness.booter().boot(harness.config(str(netns_file(harness))))
    assert harness.log == ["network setup", "launch", "network teardown"]
    with pytest.raises(OSError):
        os.fstat(harness.networking.fds[0])
    assert not pod_dir(harness).exists()
    # What spawned before the failure is on the record (delete finds it dead: harmless).
    assert [pid for pid, _ in ShimState.of("default", "pod1").pids()] == [harness.helper]


async def test_a_cancelled_boot_undoes_itself(harness: Harness) -> None:
    """Cancelled while the agent is dialled (an early boot that CreateSandbox discards)."""
    dialling, hang = asyncio.Event(), asyncio.Event()
    booter = harness.booter()

    async def dial(*args: object) -> Agent:
        harness.log.append("agent connect")
        dialling.set()
        await hang.wait()
        raise AssertionError("not reached")

    booter.env.dial = dial
    boot = asyncio.ensure_future(booter.boot(harness.config(None)))
    async with asyncio.timeout(2):
        await dialling.wait()
    boot.cancel()
    with pytest.raises(asyncio.CancelledError):
        await boot
    assert harness.log == ["launch", "agent connect", "vm close"]
    assert harness.vm is not None and harness.vm.stopped
    assert not pod_dir(harness).exists()


async def test_no_netns_means_no_nic(harness: Harness) -> None:
    await harness.booter().boot(harness.config(None))
    assert harness.networking.setups == [] and harness.launches[0].nics == ()
    assert "UpdateInterface" not in harness.log


async def test_missing_netns_is_refused_before_anything(harness: Harness) -> None:
    gone = harness.tmp / "gone"
    with pytest.raises(FailedPrecondition, match=f"network namespace {gone} does not exist"):
        await harness.booter().boot(harness.config(str(gone)))
    assert harness.log == []
    assert not pod_dir(harness).exists()
    assert not ShimState.of("default", "pod1").path.exists()


async def test_an_existing_run_dir_is_refused(harness: Harness) -> None:
    pod_dir(harness).mkdir(parents=True)
    with pytest.raises(FailedPrecondition, match="exists"):
        await harness.booter().boot(harness.config(None))
    assert harness.log == []


async def test_the_policy_annotation_is_set_before_the_sandbox(harness: Harness) -> None:
    harness.annotations = (POLICY_ANNOTATION,)
    policy = 'package agent_policy\ndefault CreateContainerRequest := true\n'
    await harness.booter().boot(harness.config(None, annotations={
        POLICY_ANNOTATION: base64.b64encode(policy.encode()).decode()}))
    assert harness.log[-2:] == ["SetPolicy", "CreateSandbox"]
    assert harness.agent.policy == policy


@pytest.mark.parametrize(("value", "why"), [("%%% not base64", "not base64"),
                                            (base64.b64encode(b"\xff\xfe").decode(),
                                             "not UTF-8")])
async def test_a_malformed_policy_annotation_is_invalid_argument(
        harness: Harness, value: str, why: str) -> None:
    harness.annotations = (POLICY_ANNOTATION,)
    with pytest.raises(InvalidArgument, match=f"{POLICY_ANNOTATION}: .*{why}"):
        await harness.booter().boot(harness.config(None, annotations={POLICY_ANNOTATION: value}))
    assert harness.log == []  # refused before anything was made


async def test_annotations_off_the_allow_list_are_refused(harness: Harness) -> None:
    with pytest.raises(InvalidArgument, match=r"not allowed by runtime profile fake\.toml"):
        await harness.booter().boot(harness.config(None, annotations={
            "io.katacontainers.config.hypervisor.kernel_params": "quiet"}))


def test_the_real_boot_env_wires_through_the_helper_process() -> None:
    env = BootEnv()
    assert type(env.networking).__name__ == "HelperNetworking"  # pyroute2 stays out
    assert env.dial.__name__ == "dial_agent"


# --- the confidential path (coco-dev): initdata before anything boots, guest pull ---------

INITDATA_ANNOTATION = "io.katacontainers.config.hypervisor.cc_init_data"
INITDATA_TOML = b'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"policy.rego" = "x"\n'


def initdata_value(doc: bytes = INITDATA_TOML) -> str:
    import gzip

    return base64.b64encode(gzip.compress(doc)).decode()


async def test_coco_dev_launches_with_its_initdata_and_no_share(harness: Harness) -> None:
    harness.coco_dev = True
    harness.annotations = (INITDATA_ANNOTATION,)
    vm = await harness.booter().boot(harness.config(None, annotations={
        INITDATA_ANNOTATION: initdata_value()}))
    (launched,) = harness.launches
    assert launched.initdata is not None and launched.initdata.toml == INITDATA_TOML
    assert launched.shares == ()
    assert harness.agent.sandbox is not None and harness.agent.sandbox[3] == []
    assert type(vm.rootfs).__name__ == "GuestPull"
    assert not (pod_dir(harness) / "shared").exists()
    await vm.destroy(vm_gone=False)


@pytest.mark.parametrize(("value", "why"), [
    ("%%%", "base64"),
    (base64.b64encode(b"not gzip").decode(), "gzip"),
    (initdata_value(b'version = "9"\nalgorithm = "sha384"\n[data]\n'), "version"),
    (initdata_value(b"x = '" + b"a" * (2 << 20) + b"'\n"), "exceeds 1048576 bytes"),
])
async def test_bad_initdata_is_refused_before_anything_boots(harness: Harness, value: str,
                                                             why: str) -> None:
    harness.coco_dev = True
    harness.annotations = (INITDATA_ANNOTATION,)
    with pytest.raises(InvalidArgument) as info:
        await harness.booter().boot(harness.config(None, annotations={
            INITDATA_ANNOTATION: value}))
    assert why in str(info.value).lower() and INITDATA_ANNOTATION in str(info.value)
    assert harness.log == [] and harness.launches == []
    assert not pod_dir(harness).exists()


async def test_initdata_off_the_allow_list_is_refused(harness: Harness) -> None:
    harness.coco_dev = True
    with pytest.raises(InvalidArgument, match="not allowed"):
        await harness.booter().boot(harness.config(None, annotations={
            INITDATA_ANNOTATION: initdata_value()}))
    assert harness.launches == []


async def test_a_refused_set_policy_is_permission_denied_and_undone(harness: Harness) -> None:
    from shim.core.errors import PermissionDenied

    harness.coco_dev = True
    harness.annotations = (POLICY_ANNOTATION,)

    async def deny(policy: str) -> None:
        harness.log.append("SetPolicy")
        raise PermissionDenied("agent SetPolicy: policy denied SetPolicyRequest (rule "
                               "SetPolicyRequest)")

    harness.agent.set_policy = deny  # type: ignore[method-assign]
    with pytest.raises(PermissionDenied, match="SetPolicyRequest"):
        await harness.booter().boot(harness.config(None, annotations={
            POLICY_ANNOTATION: base64.b64encode(b"package agent_policy\n").decode()}))
    assert "CreateSandbox" not in harness.log
    assert harness.log[-2:] == ["agent close", "vm close"]
    assert not pod_dir(harness).exists()


async def test_every_container_is_checked_against_the_allow_list(harness: Harness) -> None:
    harness.coco_dev = True
    vm = await harness.booter().boot(harness.config(None))
    with pytest.raises(InvalidArgument, match=r"container c2: annotation .*kernel_params"):
        await vm.create_container("c2", harness.tmp, {
            "annotations": {"io.kubernetes.cri.image-name": "r/x:1",
                            "io.katacontainers.config.hypervisor.kernel_params": "x=1"},
            "process": {"args": ["sh"], "cwd": "/"}}, [])
    await vm.create_container("c3", harness.tmp, {
        "annotations": {"io.kubernetes.cri.image-name": "r/x:1"},
        "process": {"args": ["sh"], "cwd": "/"}}, [])


def hold_every_slot(count: int) -> list[HeldSlot]:
    """Every node-wide boot slot, taken as other daemons' boots would."""
    node = BootSlots.for_node(count)
    assert node is not None
    held = [taken for _ in range(count) if (taken := node.try_take("pod other")) is not None]
    assert len(held) == count
    return held


async def test_launch_waits_for_a_node_boot_slot(harness: Harness) -> None:
    """With every node-wide boot slot held (by other daemons), the boot wires its network and
    waits before QEMU; once a slot frees it launches and dials (the dial's clock starts
    then: waiting is not charged to it)."""
    harness.boot_slots = 2
    held = hold_every_slot(2)
    boot = asyncio.create_task(harness.booter().boot(harness.config(str(netns_file(harness)))))
    await asyncio.sleep(0.2)
    assert harness.log == ["network setup"] and not boot.done()
    held.pop().release()  # one daemon's boot is over
    vm = await asyncio.wait_for(boot, 5)
    assert harness.log[:3] == ["network setup", "launch", "agent connect"]
    slots = BootSlots(paths.boot_slots_dir(), 2)
    assert slots.try_take() is None  # the pod holds its slot until its first container starts
    vm.started()
    back = slots.try_take()
    assert back is not None
    for slot in [*held, back]:
        slot.release()
    await vm.destroy(vm_gone=False)


async def test_a_waiting_boot_works_at_low_priority_until_it_holds_a_slot(
        harness: Harness) -> None:
    """All slots held: the boot lowers its daemon's priority at once and wires its network
    meanwhile (the netns helper inherits that); it is back at its own priority as soon as it
    holds a slot, before QEMU's launch. A boot that finds a slot free never lowers it."""
    harness.boot_slots = 1
    held = hold_every_slot(1)
    boot = asyncio.create_task(harness.booter().boot(harness.config(str(netns_file(harness)))))
    await asyncio.sleep(0.2)
    assert harness.log == ["network setup"] and harness.nice == [("low", 0)]
    held[0].release()
    vm = await asyncio.wait_for(boot, 5)
    assert harness.nice == [("low", 0), ("back", 1)]  # after the wiring, before the launch
    assert harness.log[1:3] == ["launch", "agent connect"]
    await vm.destroy(vm_gone=False)
    harness.nice.clear()
    vm = await asyncio.wait_for(harness.booter().boot(harness.config(None, "pod2")), 5)
    assert harness.nice == []
    await vm.destroy(vm_gone=False)


async def test_a_boot_that_fails_or_is_cancelled_while_waiting_gets_its_priority_back(
        harness: Harness) -> None:
    harness.boot_slots = 1
    held = hold_every_slot(1)
    try:
        boot = asyncio.create_task(harness.booter().boot(harness.config(None)))
        await asyncio.sleep(0.1)
        boot.cancel()
        with pytest.raises(asyncio.CancelledError):
            await boot
        assert [what for what, _ in harness.nice] == ["low", "back"]
        harness.nice.clear()
        harness.slot_wait = 0.1
        with pytest.raises(DeadlineExceeded):
            await harness.booter().boot(harness.config(None))
        assert [what for what, _ in harness.nice] == ["low", "back"]
    finally:
        held[0].release()


async def test_boot_slots_come_from_the_profile(harness: Harness) -> None:
    """[runtime] boot_slots = 3: with two slots held a boot goes ahead, with three it waits;
    boot_slots = 0: no admission at all."""
    harness.boot_slots = 3
    held = hold_every_slot(2)
    try:
        vm = await asyncio.wait_for(harness.booter().boot(harness.config(None)), 5)
        await vm.destroy(vm_gone=False)
        third = BootSlots(paths.boot_slots_dir(), 3).try_take("pod other")
        assert third is not None
        held.append(third)  # now all three are held
        waiting = asyncio.create_task(harness.booter().boot(harness.config(None)))
        await asyncio.sleep(0.1)
        assert not waiting.done() and harness.log.count("launch") == 1
        waiting.cancel()
        await asyncio.wait({waiting})
        harness.boot_slots = 0
        vm = await asyncio.wait_for(harness.booter().boot(harness.config(None)), 5)
        assert harness.log.count("launch") == 2
        await vm.destroy(vm_gone=False)
    finally:
        for slot in held:
            slot.release()


async def test_the_slot_wait_is_bounded_names_the_holders_and_rolls_back(
        harness: Harness) -> None:
    harness.boot_slots = 1
    harness.slot_wait = 0.2
    held = hold_every_slot(1)
    try:
        with pytest.raises(DeadlineExceeded) as info:
            await harness.booter().boot(harness.config(str(netns_file(harness))))
    finally:
        held[0].release()
    assert str(info.value) == (f"pod pod1: no boot slot free in 0.2 s (all 1 held by other "
                               f"boots: {os.getpid()} pod other)")
    assert harness.log == ["network setup", "network teardown"]  # QEMU never started
    assert not pod_dir(harness).exists()


async def test_a_boot_cancelled_while_waiting_holds_nothing_and_rolls_back(
        harness: Harness) -> None:
    """The pod deleted mid-wait (its boot cancelled): no slot taken, nothing left."""
    harness.boot_slots = 1
    held = hold_every_slot(1)
    boot = asyncio.create_task(harness.booter().boot(harness.config(str(netns_file(harness)))))
    await asyncio.sleep(0.1)
    boot.cancel()
    with pytest.raises(asyncio.CancelledError):
        await boot
    held[0].release()
    assert harness.log == ["network setup", "network teardown"]
    assert not pod_dir(harness).exists()
    again = BootSlots(paths.boot_slots_dir(), 1).try_take()
    assert again is not None  # the cancelled waiter holds nothing
    again.release()


async def test_the_boot_clock_stops_while_waiting_for_a_slot(harness: Harness) -> None:
    """The pod's boot deadline (here 0.3 s) does not run while the boot waits 0.5 s for a
    slot; it runs again, with what was left, once the slot is held."""
    harness.boot_slots = 1
    held = hold_every_slot(1)

    async def boot() -> PodVm:
        async with asyncio.timeout(0.3) as deadline:
            return await harness.booter().boot(harness.config(None), BootClock(deadline))

    booting = asyncio.create_task(boot())
    await asyncio.sleep(0.5)
    held[0].release()
    vm = await booting
    await vm.destroy(vm_gone=False)


async def test_the_vm_is_sized_from_the_pods_limits(harness: Harness) -> None:
    """2 CPUs / 768 MiB of limits on a 1 vCPU / 512 MiB base: QEMU gets 3 / 1280 MiB, and an
    update beyond that size is refused naming the limit."""
    vm = await harness.booter().boot(harness.config(None, annotations={
        "io.kubernetes.cri.sandbox-cpu-quota": "200000",
        "io.kubernetes.cri.sandbox-cpu-period": "100000",
        "io.kubernetes.cri.sandbox-cpu-shares": "2048",
        "io.kubernetes.cri.sandbox-memory": str(768 << 20)}))
    (profile,) = harness.profiles
    assert (profile.vcpus, profile.memory_mib) == (3, 1280)
    assert vm.size is not None and vm.size.workload_memory_mib == 768
    with pytest.raises(FailedPrecondition, match="memory limit 1024 MiB exceeds the 768 MiB"):
        vm.size.check_update("c1", 1, 1024)
    with pytest.raises(FailedPrecondition, match="CPU limit 4 vCPUs exceeds the pod VM's 3"):
        vm.size.check_update("c1", 4, 0)
    vm.size.check_update("c1", 3, 768)
    await vm.destroy(vm_gone=False)


async def test_a_pod_without_limits_gets_the_profile_size(harness: Harness) -> None:
    vm = await harness.booter().boot(harness.config(None))
    assert (harness.profiles[0].vcpus, harness.profiles[0].memory_mib) == (1, 512)
    await vm.destroy(vm_gone=False)


async def test_the_daemon_joins_the_pods_cgroup_before_launching(harness: Harness) -> None:
    """The cgroup directories are recorded before they are made, the daemon moves in before
    any helper spawns, and leaves again on teardown (a tmp tree stands for cgroupfs)."""
    root = harness.tmp / "cgroupfs"
    (root / "kubepods").mkdir(parents=True)
    harness.cgroup_root = root
    config = harness.config(None)
    spec = {**config.spec, "linux": {"cgroupsPath": "/kubepods/pod42/pod1"}}
    vm = await harness.booter().boot(PodConfig(config.sandbox_id, config.namespace,
                                               config.bundle, spec))
    made = [root / "kubepods/pod42", root / "kubepods/pod42/pod1"]
    assert ShimState.of("default", "pod1").cgroups() == made
    assert (made[1] / "cgroup.procs").read_text() == f"{os.getpid()}\n"
    await vm.destroy(vm_gone=False)
    assert (root / "cgroup.procs").read_text() == f"{os.getpid()}\n"  # back home
    assert (root / "kubepods").is_dir()  # not ours: never removed


async def test_a_bad_cgroups_path_is_refused_before_anything(harness: Harness) -> None:
    harness.cgroup_root = harness.tmp
    config = harness.config(None)
    spec = {**config.spec, "linux": {"cgroupsPath": "/kubepods/../etc"}}
    with pytest.raises(InvalidArgument, match=r"cgroupsPath.*'\.\.'"):
        await harness.booter().boot(PodConfig(config.sandbox_id, config.namespace,
                                              config.bundle, spec))
    assert harness.log == [] and not pod_dir(harness).exists()


def slot_free(count: int) -> bool:
    """Whether one of ``count`` node-wide boot slots is free now (taken and given back)."""
    taken = BootSlots(paths.boot_slots_dir(), count).try_take("probe")
    if taken is None:
        return False
    taken.release()
    return True


async def test_the_slot_is_held_across_create_sandbox_until_the_first_container_starts(
        harness: Harness) -> None:
    """One slot: held through the agent's Check, the guest's network and CreateSandbox; the
    booted pod still holds it; the pod's first container start gives it back, once."""
    harness.boot_slots = 1
    seen: dict[str, bool] = {}
    harness.agent.probe = lambda method: seen.setdefault(method, slot_free(1))
    vm = await harness.booter().boot(harness.config(str(netns_file(harness))))
    assert seen == {"UpdateInterface": False, "UpdateRoutes": False, "AddARPNeighbors": False,
                    "CreateSandbox": False}
    assert vm.boot_slot is not None and not slot_free(1)
    vm.started()
    assert vm.boot_slot is None and slot_free(1)
    vm.started()  # a second container's start: nothing more to give back
    await vm.destroy(vm_gone=False)


@pytest.mark.parametrize("failing", ["UpdateInterface", "CreateSandbox"])
async def test_a_boot_failing_after_the_launch_gives_its_slot_back(harness: Harness,
                                                                   failing: str) -> None:
    harness.boot_slots = 1
    harness.agent.fail = failing
    with pytest.raises(RpcError, match=failing):
        await harness.booter().boot(harness.config(str(netns_file(harness))))
    assert slot_free(1)


async def test_a_cancelled_boot_after_the_launch_gives_its_slot_back(harness: Harness) -> None:
    harness.boot_slots = 1
    entered = asyncio.Event()
    release = asyncio.Event()

    async def stalled_create_sandbox(*_: object) -> None:
        entered.set()
        await release.wait()  # an agent that never answers CreateSandbox

    harness.agent.create_sandbox = stalled_create_sandbox  # type: ignore[method-assign,assignment]
    boot = asyncio.create_task(harness.booter().boot(harness.config(None)))
    await asyncio.wait_for(entered.wait(), 5)
    assert not slot_free(1)
    boot.cancel()
    with pytest.raises(asyncio.CancelledError):
        await boot
    assert slot_free(1) and not pod_dir(harness).exists()


async def test_the_hold_is_bounded_from_the_agents_first_answer(harness: Harness) -> None:
    """A pod that never starts a container (or whose agent stalls) gives its slot back
    ``boot_slot_hold`` after the agent first answered, and runs on."""
    harness.boot_slots = 1
    harness.slot_hold = 0.2
    vm = await harness.booter().boot(harness.config(None))
    assert not slot_free(1)
    await asyncio.sleep(0.4)
    assert slot_free(1) and vm.boot_slot is not None and not vm.boot_slot.held
    vm.started()  # late: nothing to give back
    await vm.destroy(vm_gone=False)


async def test_a_pod_torn_down_before_its_first_start_gives_its_slot_back(
        harness: Harness) -> None:
    harness.boot_slots = 1
    vm = await harness.booter().boot(harness.config(None))
    assert not slot_free(1)
    await vm.destroy(vm_gone=False)
    assert slot_free(1)
