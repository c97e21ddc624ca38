"""Task events: what the domain reports, in the order things happened.

The task manager publishes these small dataclasses through a :class:`Publisher`; the daemon's
:class:`~shim.daemon.events.EventForwarder` turns them into containerd's protobuf events and
delivers them in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol


@dataclass(frozen=True)
class Stdio:
    """A process's stdio as containerd names it: FIFO paths (empty: none) and whether it is a
    terminal; /tasks/create carries it as TaskIO."""

    stdin: str = ""
    stdout: str = ""
    stderr: str = ""
    terminal: bool = False


@dataclass(frozen=True)
class TaskCreate:
    topic: ClassVar[str] = "/tasks/create"
    container_id: str
    bundle: str
    pid: int
    io: Stdio = field(default_factory=Stdio)


@dataclass(frozen=True)
class TaskStart:
    topic: ClassVar[str] = "/tasks/start"
    container_id: str
    pid: int


@dataclass(frozen=True)
class TaskExit:
    topic: ClassVar[str] = "/tasks/exit"
    container_id: str
    id: str  # the container id for init, the exec id otherwise (CRI matches on it)
    pid: int
    exit_status: int
    exited_at: int  # ns since the epoch


@dataclass(frozen=True)
class TaskDelete:
    topic: ClassVar[str] = "/tasks/delete"
    container_id: str
    pid: int
    exit_status: int
    exited_at: int
    id: str = ""


@dataclass(frozen=True)
class TaskExecAdded:
    topic: ClassVar[str] = "/tasks/exec-added"
    container_id: str
    exec_id: str


@dataclass(frozen=True)
class TaskExecStarted:
    topic: ClassVar[str] = "/tasks/exec-started"
    container_id: str
    exec_id: str
    pid: int


@dataclass(frozen=True)
class TaskPaused:
    topic: ClassVar[str] = "/tasks/paused"
    container_id: str


@dataclass(frozen=True)
class TaskResumed:
    topic: ClassVar[str] = "/tasks/resumed"
    container_id: str


@dataclass(frozen=True)
class TaskOOM:
    topic: ClassVar[str] = "/tasks/oom"
    container_id: str


Event = (TaskCreate | TaskStart | TaskExit | TaskDelete | TaskExecAdded | TaskExecStarted
         | TaskPaused | TaskResumed | TaskOOM)


class Publisher(Protocol):
    """Where the domain sends its events (in order)."""

    async def publish(self, event: Event) -> None: ...
