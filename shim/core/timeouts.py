"""Every bounded wait of the shim daemon, in one table (callers own timeouts, STYLE habit 5).

Long polls have no entry on purpose: Wait, WaitProcess, ReadStdout/ReadStderr and WriteStdin
(which blocks for back-pressure) wait as long as the process lives.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    create_sandbox: float = 180.0  # boot the pod VM and reach its agent (TCG boots are slow)
    create_container: float = 60.0  # kata: CreateContainer 60 s (guest pull happens here)
    start_container: float = 30.0
    exec_process: float = 30.0
    signal_process: float = 10.0
    remove_container: float = 30.0
    pause_resume: float = 10.0
    update_container: float = 10.0
    stats_container: float = 10.0
    tty_win_resize: float = 5.0
    close_stdin: float = 10.0
    shutdown_sandbox: float = 30.0
    network_helper: float = 30.0  # one run of the netns helper (wire or unwire a pod netns)
    # After the init process exits the agent kills the container's other processes; how long
    # their exits get before init's own exit is reported anyway.
    execs_after_init: float = 10.0
    # Events: one Forward/Publish attempt, the number of attempts, the pause between them
    # (the Go shim: 5 s, 5 tries).
    event_attempt: float = 5.0
    event_attempts: int = 5
    event_retry_pause: float = 0.5
    # On shutdown: how long queued events get to reach containerd.
    event_drain: float = 5.0
    # gRPC/ttrpc server: grace for in-flight calls when the shim stops.
    server_grace: float = 1.0


TIMEOUTS = Timeouts()
