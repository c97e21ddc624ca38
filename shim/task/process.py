"""Containers and processes of the task domain, and the process state machine.

A container's init process is the task (exec_id ""); its execs are processes too. Misuse of a
transition raises ``FailedPrecondition("cannot <verb> in state <state>")``.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shim.core.config import RuntimeOptions
from shim.core.state_machine import Transition, check
from shim.pod.mounts import Mount
from shim.task.events import Stdio
from shim.task.stdio import ProcessIO


class ProcessState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


P = ProcessState


class ProcessTransition(Transition):
    target: ProcessState

    START = ("start", {P.CREATED}, P.RUNNING)
    PAUSE = ("pause", {P.RUNNING}, P.PAUSED)
    RESUME = ("resume", {P.PAUSED}, P.RUNNING)
    EXIT = ("exit", {P.CREATED, P.RUNNING, P.PAUSED}, P.STOPPED)
    DELETE = ("delete", {P.CREATED, P.STOPPED}, P.DELETED)


LIVE = (ProcessState.RUNNING, ProcessState.PAUSED)
FINISHED = (ProcessState.STOPPED, ProcessState.DELETED)


@dataclass(frozen=True)
class ProcessStatus:
    """What State reports."""

    id: str
    exec_id: str
    bundle: str
    pid: int
    state: ProcessState
    stdio: Stdio
    exit_status: int
    exited_at: int  # ns since the epoch, 0 while running


@dataclass(frozen=True)
class Exit:
    pid: int
    exit_status: int
    exited_at: int  # ns since the epoch, 0 if the process never ran


class Process:
    """One process in the guest: a container's init (exec_id "") or an exec."""

    def __init__(self, container_id: str, exec_id: str, stdio: Stdio, io: ProcessIO,
                 exec_spec: Mapping[str, object] | None = None) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.io = io
        self.exec_spec = exec_spec
        self.state = ProcessState.CREATED
        self.pid = 0
        self.exit_status = 0
        self.exited_at = 0
        self.exited = asyncio.Event()  # Wait
        self.exit_published = asyncio.Event()  # the container's own exit waits for its execs'

    @property
    def name(self) -> str:
        return f"{self.container_id}/{self.exec_id}" if self.exec_id else self.container_id

    @property
    def live(self) -> bool:
        return self.state in LIVE

    def apply(self, transition: ProcessTransition) -> None:
        check(transition, self.state)
        self.state = transition.target


@dataclass
class Container:
    id: str
    bundle: Path
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]


@dataclass(frozen=True)
class CreateTask:
    id: str
    bundle: str
    rootfs: Sequence[Mount] = ()
    stdio: Stdio = field(default_factory=Stdio)
    checkpoint: str = ""
    options: RuntimeOptions = field(default_factory=RuntimeOptions)


@dataclass(frozen=True)
class ExecTask:
    container_id: str
    exec_id: str
    spec: Mapping[str, object]
    stdio: Stdio = field(default_factory=Stdio)
