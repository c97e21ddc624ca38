"""Every bounded wait in the hypervisor package, in one table (callers own timeouts)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    qmp_socket_appear: float = 10.0  # QEMU creates the QMP socket before it listens
    qmp_connect: float = 5.0
    qmp_command: float = 10.0  # default per-call bound for QMP commands
    graceful_stop: float = 5.0  # system_powerdown: how long the guest gets to power off
    quit: float = 3.0  # after `quit`, how long QEMU gets to exit
    stop_grace: float = 1.0  # after an unrequested STOP, how long to wait for SHUTDOWN/exit
    kill: float = 3.0  # after SIGKILL, how long until the process is reaped
    vhost_user_socket: float = 5.0  # vhost-device-vsock creating its socket
    probe: float = 10.0  # one capability-probe QEMU run
    kvm_probe_boot: float = 2.0  # bounded KVM boot attempt
    hybrid_connect: float = 5.0  # CONNECT <port> handshake on a hybrid vsock socket
    guest_ready_line: float = 2.0  # reading the guest's "READY <port>" once it connected


TIMEOUTS = Timeouts()
