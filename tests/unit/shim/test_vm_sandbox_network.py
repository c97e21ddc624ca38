"""The network steps of the ordered pod start (shim/vm_sandbox.py), with fakes for the
networking, QEMU launch and agent: taps before QEMU (their fds on its command line, closed by
us after), interfaces/routes/neighbours after the agent answers and before CreateSandbox, and
rollback that unwires on any later failure."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf.message import Message

from hypervisor.errors import QemuError
from hypervisor.vm import LaunchOptions
from shim.binary import contract
from shim.binary.manager import ShimState
from shim.core.errors import FailedPrecondition, ShimError, Unavailable
from shim.network.tcfilter import (
    FAMILY_V4,
    Endpoint,
    IpAddress,
    Neighbor,
    PodNetwork,
    Route,
    WiredNetwork,
)
from shim.pod import vm_sandbox
from shim.pod.sandbox import SandboxConfig
from shim.pod.vm_sandbox import VmSandbox, VmSandboxFactory

POD_NETWORK = PodNetwork(
    netns="",  # set per test
    endpoints=(Endpoint("eth0", "02:42:c6:12:00:02", 1450, "tap0_eth0",
                        (IpAddress(FAMILY_V4, "198.18.0.2", 24),)),),
    routes=(Route("", "198.18.0.1", "eth0", "", 0, FAMILY_V4),),
    neighbors=(Neighbor("198.18.0.9", "02:00:00:00:00:09", "eth0", 0x80),))


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


class FakeVm:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.pid = 0
        self.helper_pids: list[int] = []
        self.channel = None

    async def aclose(self) -> None:
        self.log.append("vm close")

    async def stop(self) -> None:
        self.log.append("vm stop")

    async def wait(self) -> Any:
        return SimpleNamespace(kind="shutdown")


class FakeAgent:
    def __init__(self, log: list[str], fail: str = "") -> None:
        self.log = log
        self.fail = fail
        self.requests: dict[str, Message] = {}

    async def call(self, method: str, request: Message, response: Any = None,
                   limit: float | None = None) -> Any:
        self.log.append(method)
        self.requests[method] = request
        if method == self.fail:
            raise ShimError(f"agent {method}: refused")
        return None

    async def close(self) -> None:
        self.log.append("agent close")


@dataclass
class Harness:
    log: list[str]
    networking: FakeNetworking
    launches: list[LaunchOptions]
    agent: FakeAgent
    tmp: Path
    launch_fails: bool = False

    def config(self, netns: str | None, sandbox_id: str = "pod1") -> SandboxConfig:
        namespaces: list[dict[str, str]] = [{"type": "pid"}]
        if netns is not None:
            namespaces.append({"type": "network", "path": netns})
        return SandboxConfig(sandbox_id=sandbox_id, namespace="default",
                             bundle=self.tmp / "bundle",
                             spec={"hostname": "pod1", "linux": {"namespaces": namespaces}})


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    log: list[str] = []
    h = Harness(log, FakeNetworking(log), [], FakeAgent(log), tmp_path)
    monkeypatch.setenv(vm_sandbox.RUN_ROOT_ENV, str(tmp_path / "run"))
    monkeypatch.setenv(contract.STATE_DIR_ENV, str(tmp_path / "state"))
    profile = SimpleNamespace(tee=SimpleNamespace(confidential=False), enable_annotations=(),
                              source="fake.toml", dial_timeout=1.0)
    monkeypatch.setattr(vm_sandbox, "load_pod_profile", lambda options: profile)

    async def accel(profile: object) -> str:
        return "tcg"

    monkeypatch.setattr(vm_sandbox, "decide_accelerator", accel)
    monkeypatch.setattr(vm_sandbox, "which_vhost_device_vsock", lambda: None)

    async def launch(profile: object, options: LaunchOptions) -> FakeVm:
        # QEMU needs the tap fds open while it starts.
        for nic in options.nics:
            os.fstat(nic.tap_fd)
        log.append("launch")
        h.launches.append(options)
        if h.launch_fails:
            raise QemuError("no QEMU today")
        return FakeVm(log)

    monkeypatch.setattr(vm_sandbox, "launch_vm", launch)

    async def connect(self: VmSandbox, dial_timeout: float) -> None:
        log.append("agent connect")
        self._agent = h.agent  # type: ignore[assignment]

    monkeypatch.setattr(VmSandbox, "connect", connect)
    monkeypatch.setattr(VmSandbox, "adopt", lambda self, stack: setattr(self, "_cleanup", stack))
    return h


def netns_file(h: Harness) -> Path:
    path = h.tmp / "podns"
    path.touch()
    return path


async def test_network_steps_are_in_order(harness: Harness) -> None:
    netns = netns_file(harness)
    factory = VmSandboxFactory(networking=harness.networking)
    sandbox = await factory.create_sandbox(harness.config(str(netns)))
    assert harness.log == ["network setup", "launch", "agent connect", "UpdateInterface",
                           "UpdateRoutes", "AddARPNeighbors", "CreateSandbox"]
    (nic,) = harness.launches[0].nics
    assert nic.mac == "02:42:c6:12:00:02" and nic.tap_fd == harness.networking.fds[0]
    with pytest.raises(OSError):  # our copy is closed once QEMU has its own
        os.fstat(nic.tap_fd)
    iface = harness.agent.requests["UpdateInterface"].interface  # type: ignore[attr-defined]
    assert (iface.name, iface.hwAddr, iface.mtu) == ("eth0", "02:42:c6:12:00:02", 1450)
    state = ShimState.of("default", "pod1")
    assert state.network() is not None  # for delete, should this daemon die

    await sandbox.shutdown()
    assert harness.log[-3:] == ["agent close", "vm close", "network teardown"]
    assert state.network() is None


@pytest.mark.parametrize("failing", ["UpdateInterface", "UpdateRoutes", "AddARPNeighbors",
                                     "CreateSandbox"])
async def test_a_failure_after_wiring_unwires(harness: Harness, failing: str) -> None:
    harness.agent.fail = failing
    factory = VmSandboxFactory(networking=harness.networking)
    with pytest.raises(ShimError, match=failing):
        await factory.create_sandbox(harness.config(str(netns_file(harness))))
    assert harness.networking.teardowns == 1
    assert harness.log[-3:] == ["agent close", "vm close", "network teardown"]
    assert not (harness.tmp / "run" / "default" / "pod1").exists()
    assert ShimState.of("default", "pod1").network() is None


async def test_a_failed_launch_unwires(harness: Harness) -> None:
    harness.launch_fails = True
    factory = VmSandboxFactory(networking=harness.networking)
    with pytest.raises(Unavailable, match="no QEMU today"):
        await factory.create_sandbox(harness.config(str(netns_file(harness))))
    assert harness.log == ["network setup", "launch", "network teardown"]
    with pytest.raises(OSError):
        os.fstat(harness.networking.fds[0])


async def test_no_netns_means_no_nic(harness: Harness) -> None:
    factory = VmSandboxFactory(networking=harness.networking)
    await factory.create_sandbox(harness.config(None))
    assert harness.networking.setups == [] and harness.launches[0].nics == ()
    assert "UpdateInterface" not in harness.log


async def test_missing_netns_is_refused_before_anything(harness: Harness) -> None:
    factory = VmSandboxFactory(networking=harness.networking)
    gone = harness.tmp / "gone"
    with pytest.raises(FailedPrecondition, match=f"network namespace {gone} does not exist"):
        await factory.create_sandbox(harness.config(str(gone)))
    assert harness.log == []
    assert not (harness.tmp / "run" / "default" / "pod1").exists()
