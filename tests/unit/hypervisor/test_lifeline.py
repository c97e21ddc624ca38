"""die_with_parent: a child started through it dies the moment its parent does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from hypervisor import lifeline
from hypervisor.errors import QemuError
from hypervisor.lifeline import die_with_parent

PARENT = r"""
import subprocess, sys
from hypervisor.lifeline import die_with_parent
from hypervisor.errors import VsockError
child = subprocess.Popen(die_with_parent(["sleep", "600"], VsockError), start_new_session=True)
print(child.pid, flush=True)
sys.stdin.read()  # until the test kills us
"""


def test_the_child_is_the_command_itself_behind_setpriv() -> None:
    argv = die_with_parent(["qemu-system-x86_64", "-S"], QemuError)
    assert argv[1:] == ["--pdeathsig", "KILL", "--", "/bin/sh", "-c", lifeline.GUARD,
                        str(os.getpid()), "qemu-system-x86_64", "-S"]
    assert argv[0].endswith("/setpriv")


def test_a_child_whose_owner_is_already_gone_does_not_start(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    argv = die_with_parent(["touch", str(marker)], QemuError)
    # Spawned by this process (the owner): it runs.
    assert subprocess.run(argv, check=False).returncode == 0 and marker.exists()
    marker.unlink()
    # Spawned by another process (as if reparented before its prctl): it does not.
    other = subprocess.run(["sh", "-c", '"$@"', "sh", *argv], check=False)
    assert other.returncode == 125 and not marker.exists()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_child_in_its_own_session_dies_with_its_parent(how: signal.Signals) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        deadline = time.monotonic() + 5
        while child.cmdline()[:1] != ["sleep"]:  # setpriv has exec'd: same pid
            assert time.monotonic() < deadline
            time.sleep(0.01)
        parent.send_signal(how)
        parent.wait(5)
        deadline = time.monotonic() + 5
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.01)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_without_setpriv_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lifeline, "_setpriv", lambda: None)
    with pytest.raises(QemuError, match=r"setpriv \(util-linux\) is not on PATH.*install "
                                        r"util-linux"):
        die_with_parent(["qemu-system-x86_64"], QemuError)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
