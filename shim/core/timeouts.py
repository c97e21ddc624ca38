"""Every bounded wait of the shim, in one table (callers own timeouts, STYLE habit 5).

``AGENT_RPC`` bounds each Kata agent RPC the way kata's runtime-rs does, per method; ``None``
marks the long polls (WaitProcess, ReadStdout/ReadStderr, GetOOMEvent, and WriteStdin, which
blocks for back-pressure): they wait as long as the process lives. The hypervisor's own table
travels in ``vm`` and is handed to every VM launch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from hypervisor.timeouts import Timeouts as VmTimeouts

AGENT_RPC: Final[Mapping[str, float | None]] = MappingProxyType({
    "Check": 30.0,  # kata: Check 30 s, per dial attempt
    "CreateSandbox": 60.0,
    "DestroySandbox": 10.0,
    "SetPolicy": 30.0,
    "UpdateInterface": 30.0,
    "UpdateRoutes": 30.0,
    "AddARPNeighbors": 30.0,
    "CreateContainer": 60.0,  # kata: 60 s (a guest image pull happens here)
    "StartContainer": 30.0,
    "ExecProcess": 30.0,
    "SignalProcess": 10.0,
    "WaitProcess": None,
    "ReadStdout": None,
    "ReadStderr": None,
    "WriteStdin": None,
    "CloseStdin": 10.0,
    "TtyWinResize": 5.0,
    "PauseContainer": 10.0,
    "ResumeContainer": 10.0,
    "StatsContainer": 10.0,
    "UpdateContainer": 10.0,
    "RemoveContainer": 30.0,
    "GetOOMEvent": None,
    "GetGuestDetails": 10.0,  # the dial asks a guest that answered NOT_SERVING why
})


@dataclass(frozen=True)
class Timeouts:
    agent: Mapping[str, float | None] = field(default_factory=lambda: AGENT_RPC)
    agent_dial_retry_pause: float = 0.1  # between two dial attempts while the guest boots
    agent_dial_attempt: float = 5.0  # one dial attempt: connect (+ the hybrid CONNECT reply)
    boot: float = 180.0  # boot the pod VM up to CreateSandbox (TCG boots are slow)
    # Waiting for a node-wide boot slot (shim/pod/admission.py) while other pods boot; the boot
    # clock above (and the dial timeout) stop meanwhile. A burst of 16 pods on 2 CPUs waits
    # ≈ 7 boots for the last slot.
    boot_slot_wait: float = 300.0
    # How long a pod keeps its boot slot after its agent first answered, waiting for its
    # sandbox to be usable (its first container started; a lone TCG pod needs ≈ 3 s): past it
    # the slot goes back to the node whatever the pod does.
    boot_slot_hold: float = 30.0
    vm_stop: float = 30.0  # DestroySandbox, VM stop and host cleanup of a pod
    # The VM died: how long its processes get to report their exits before the teardown.
    vm_exit_reports: float = 10.0
    network_helper: float = 30.0  # one run of the netns helper (wire or unwire a pod netns)
    # After the init process exits the agent kills the container's other processes; how long
    # their exits get before init's own exit is reported anyway.
    execs_after_init: float = 10.0
    # After WaitProcess answered: how long the output may still drain (a guest that streams
    # forever cannot hold the exit back), then the relay is cancelled and the exit reported.
    output_drain: float = 5.0
    # CloseIO: how long what containerd already wrote may take to reach the guest before the
    # stdin relay (a WriteStdin stuck on a guest that never reads) is cancelled.
    stdin_flush: float = 5.0
    # A guest reports OOM as often as it likes: one /tasks/oom per container per interval.
    oom_event_interval: float = 1.0
    # Events: one Forward/Publish attempt, the number of attempts, the pause between them
    # (the Go shim: 5 s, 5 tries).
    event_attempt: float = 5.0
    event_attempts: int = 5
    event_retry_pause: float = 0.5
    # On shutdown: how long queued events get to reach containerd.
    event_drain: float = 5.0
    # gRPC/ttrpc server: the pause that lets the Shutdown reply leave, then the grace for
    # in-flight calls when the shim stops.
    shutdown_reply: float = 0.05
    server_grace: float = 1.0
    # start and delete (the binary): `containerd --version`, and how long SIGKILLed processes
    # get to disappear.
    version_probe: float = 5.0
    kill_wait: float = 5.0
    kill_poll: float = 0.01
    # The pod's host cgroup: how long its last processes get to leave before rmdir gives up.
    cgroup_empty: float = 5.0
    vm: VmTimeouts = field(default_factory=VmTimeouts)  # hypervisor/: passed to every launch


TIMEOUTS = Timeouts()
