"""The seam between the task service and the pod VM.

``PodSandbox`` is one running pod VM reached through its guest agent; each method maps 1:1 onto
a Kata agent RPC (``grpc.AgentService``, see shared/reference/kata-agent-protocol.md), so the real
implementation is a thin adapter over a ttrpc ``AgentClient`` plus the hypervisor, and the unit
tests use fakes. ``SandboxFactory`` boots the VM for the first task of a pod (prepare → launch
QEMU → connect agent → network → CreateSandbox, each step undone on failure).

Conventions the adapter implements: ``exec_id == ""`` means the container's init process;
``read_stdout``/``read_stderr`` return ``b""`` once the stream has ended (the agent reports EOF
as an error); agent errors surface as ``shim.core.errors`` types (``Unavailable`` when the VM or the
vsock connection is gone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from shim.binary.contract import RuntimeOptions
from shim.core.errors import Unavailable


@dataclass(frozen=True)
class Mount:
    """containerd.types.Mount: a rootfs mount containerd prepared on the host."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContainerConfig:
    """What CreateContainer needs: the OCI spec (config.json), rootfs, which stdio is wired."""

    container_id: str
    bundle: Path
    spec: Mapping[str, object]
    rootfs: Sequence[Mount] = ()
    terminal: bool = False
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False


@dataclass(frozen=True)
class ExecConfig:
    """What ExecProcess needs: the OCI runtime-spec Process (JSON from ExecProcessRequest.spec)."""

    container_id: str
    exec_id: str
    process: Mapping[str, object]
    terminal: bool = False
    stdin: bool = False


@dataclass(frozen=True)
class ContainerStats:
    """StatsContainer's answer, already encoded as the Any containerd expects in Stats."""

    type_url: str = ""
    value: bytes = b""


@dataclass(frozen=True)
class SandboxConfig:
    """Everything known about the pod when its first task is created."""

    sandbox_id: str
    namespace: str
    bundle: Path
    spec: Mapping[str, object]
    options: RuntimeOptions = field(default_factory=RuntimeOptions)


class PodSandbox(Protocol):
    """One pod VM and its agent. Method ↔ Kata agent RPC (grpc.AgentService/...)."""

    @property
    def pid(self) -> int:
        """Host pid that stands for the pod's processes (the hypervisor), as Kata reports it."""
        ...

    async def create_container(self, config: ContainerConfig) -> None:  # CreateContainer
        ...

    async def start_container(self, container_id: str) -> None:  # StartContainer
        ...

    async def exec_process(self, config: ExecConfig) -> None:  # ExecProcess
        ...

    async def signal_process(self, container_id: str, exec_id: str, signal: int) -> None:
        """SignalProcess."""
        ...

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        """WaitProcess: blocks until the process exits; returns its exit status."""
        ...

    async def read_stdout(self, container_id: str, exec_id: str, size: int) -> bytes:
        """ReadStdout: up to ``size`` bytes, blocking until some arrive; b"" at end of stream."""
        ...

    async def read_stderr(self, container_id: str, exec_id: str, size: int) -> bytes:
        """ReadStderr (as read_stdout)."""
        ...

    async def write_stdin(self, container_id: str, exec_id: str, data: bytes) -> int:
        """WriteStdin: returns how many bytes the agent took (may be fewer than given)."""
        ...

    async def close_stdin(self, container_id: str, exec_id: str) -> None:  # CloseStdin
        ...

    async def tty_win_resize(self, container_id: str, exec_id: str, rows: int,
                             columns: int) -> None:  # TtyWinResize
        ...

    async def pause_container(self, container_id: str) -> None:  # PauseContainer
        ...

    async def resume_container(self, container_id: str) -> None:  # ResumeContainer
        ...

    async def stats_container(self, container_id: str) -> ContainerStats:  # StatsContainer
        ...

    async def update_container(self, container_id: str,
                               resources: Mapping[str, object]) -> None:  # UpdateContainer
        ...

    async def remove_container(self, container_id: str) -> None:  # RemoveContainer
        ...

    async def release_container(self, container_id: str) -> None:
        """The host side of RemoveContainer only (the rootfs share): for the pod's last
        container when the pod ends with it, which DestroySandbox takes down in the guest."""
        ...

    async def get_oom_event(self) -> str:
        """GetOOMEvent: blocks until a container of the pod hits its memory limit; its id."""
        ...

    async def shutdown(self) -> None:
        """DestroySandbox, then stop the VM (graceful, then forceful). Idempotent."""
        ...


class SandboxFactory(Protocol):
    async def create_sandbox(self, config: SandboxConfig) -> PodSandbox:
        """Boot the pod VM and bring its agent to CreateSandbox; roll back on failure."""
        ...


class UnwiredSandboxFactory:
    """The default until the VM wiring (hypervisor/ + agent client) lands: refuses politely."""

    async def create_sandbox(self, config: SandboxConfig) -> PodSandbox:
        raise Unavailable(f"pod {config.sandbox_id}: no VM backend is wired into this shim yet")
