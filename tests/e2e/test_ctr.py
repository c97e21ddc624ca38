"""`ctr` against real containerd 2.1.9 and 1.7.24 with our shim: every container runs in a VM."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest

from tests.e2e.conftest import RUNTIME, CocoContainerd, pod_boots
from tests.support.images import BUSYBOX_REF

pytestmark = pytest.mark.e2e
GUEST_KERNEL_PREFIX = "6.1."  # the Debian bookworm guest kernel; the host runs another one


def name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def test_run_output_stderr_stdin_and_exit_code_from_the_guest(coco: CocoContainerd) -> None:
    """One `ctr run --rm` (one pod VM) proves what a plain run carries: stdout from the guest
    kernel, stderr, every byte of stdin (2000 lines) and the container's exit code; the VM
    booted once, early (from start's bundle), and Create adopted it. (Three runs proved these
    one each, a VM boot apiece.)"""
    cid = name("hello")
    payload = b"".join(b"line %d\n" % i for i in range(2000))
    out = coco.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX_REF, cid, "sh", "-c",
                   "echo hello; uname -r; wc -c; md5sum </dev/null >/dev/null; "
                   "echo bye >&2; exit 3", input=payload, check=False)
    assert out.returncode == 3, out
    assert b"bye" in out.stderr, out.stderr
    lines = out.stdout.decode().split()
    assert lines[0] == "hello", lines
    assert lines[1].startswith(GUEST_KERNEL_PREFIX), lines
    assert lines[1] != subprocess.run(["uname", "-r"], capture_output=True,
                                      text=True).stdout.strip()
    assert lines[2] == str(len(payload)), lines
    assert pod_boots(coco.cd, cid) == 1, coco.cd.log_tail()
    assert "does not match Create" not in coco.cd.log_path.read_text(errors="replace")


def test_run_with_tty(coco: CocoContainerd) -> None:
    """`ctr run -t` needs a terminal: give it one with script(1)."""
    cid = name("tty")
    ctr = " ".join([str(coco.cd.bin_dir / "ctr"), "--address", str(coco.cd.address),
                    "run", "--rm", "-t", "--runtime", RUNTIME, BUSYBOX_REF, cid,
                    "sh", "-c", "'tty; stty size; exit 4'"])
    out = subprocess.run(["script", "-qefc", ctr, "/dev/null"], capture_output=True,
                         timeout=240, env=coco.cd.env(), stdin=subprocess.DEVNULL)
    text = out.stdout.decode(errors="replace")
    assert "/dev/pts/" in text, text
    assert out.returncode == 4, text


class TestRunningTask:
    """One detached container; exec, ps, pause/resume, kill against it."""

    def test_exec_kill_ps_pause_resume(self, coco: CocoContainerd) -> None:
        cid = name("long")
        coco.run(cid, "sh", "-c", "trap 'exit 7' TERM; while true; do sleep 0.2; done",
                 flags=("-d",))
        try:
            tasks = coco.ctr("task", "ls").stdout.decode()
            assert cid in tasks and "RUNNING" in tasks

            out = coco.ctr("task", "exec", "--exec-id", "e1", cid, "sh", "-c",
                           "echo exec-out; exit 5", check=False)
            assert out.returncode == 5 and b"exec-out" in out.stdout, out

            out = coco.ctr("task", "exec", "--exec-id", "e2", cid, "sh", "-c",
                           "read x; echo got:$x", input=b"abc\n")
            assert b"got:abc" in out.stdout

            ps = coco.ctr("task", "ps", cid).stdout.decode()
            assert "PID" in ps and len(ps.splitlines()) >= 2, ps

            metrics = coco.ctr("task", "metrics", cid).stdout.decode()
            assert "memory.usage" in metrics and "pids.current" in metrics, metrics
            usage = next(line.split()[-1] for line in metrics.splitlines()
                         if line.startswith("memory.usage "))
            assert int(usage) > 0, metrics

            coco.ctr("task", "pause", cid)
            assert "PAUSED" in coco.ctr("task", "ls").stdout.decode()
            coco.ctr("task", "resume", cid)
            assert "RUNNING" in coco.ctr("task", "ls").stdout.decode()

            coco.ctr("task", "kill", "--signal", "SIGTERM", cid)
            wait_stopped(coco, cid)
            listing = coco.ctr("task", "ls").stdout.decode()
            assert "STOPPED" in listing
        finally:
            coco.ctr("task", "rm", "-f", cid, check=False)
            coco.ctr("container", "rm", cid, check=False)

    def test_sigkill(self, coco: CocoContainerd) -> None:
        cid = name("kill")
        coco.run(cid, "sleep", "600", flags=("-d",))
        try:
            coco.ctr("task", "kill", "--signal", "SIGKILL", cid)
            wait_stopped(coco, cid)
            out = coco.ctr("task", "rm", cid).stdout.decode()
            assert "137" in out or out == "", out
        finally:
            coco.ctr("task", "rm", "-f", cid, check=False)
            coco.ctr("container", "rm", cid, check=False)


def wait_stopped(coco: CocoContainerd, cid: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in coco.ctr("task", "ls").stdout.decode().splitlines():
            if line.startswith(cid) and "STOPPED" in line:
                return
        time.sleep(0.2)
    raise AssertionError(f"{cid} did not stop: {coco.ctr('task', 'ls').stdout.decode()}")


def test_disallowed_annotation_is_refused(coco: CocoContainerd) -> None:
    out = coco.run(name("annot"), "true", check=False, flags=(
        "--rm", "--annotation", "io.katacontainers.config.hypervisor.default_memory=4096"))
    assert out.returncode != 0
    assert b"io.katacontainers.config.hypervisor.default_memory" in out.stderr, out.stderr
    assert b"not allowed" in out.stderr
