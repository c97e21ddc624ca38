"""The agent as a real subprocess on a unix socket, in its own UTS/network/mount namespaces.

Namespaces keep the host untouched: hostname, links and routes, and mounts the agent makes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


@dataclass
class AgentProcess:
    workdir: Path
    runtime: str = "/usr/sbin/runc"
    proc: subprocess.Popen[bytes] | None = None
    netns: str | None = None  # run in this named netns (else a fresh, empty one)

    @property
    def cgroup_parent(self) -> str:
        """Unique per agent, so test sessions running side by side never share a cgroup."""
        return f"/coco-test-{os.getpid()}-{id(self)}"

    @property
    def socket(self) -> Path:
        return self.workdir / "agent.sock"

    @property
    def log(self) -> Path:
        return self.workdir / "agent.log"

    def start(self, *extra: str, ready: str = "coco-agent: ready") -> None:
        if self.netns is None:
            prefix = ["unshare", "--uts", "--net"]
        else:
            # nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup mounts
            prefix = ["nsenter", f"--net=/var/run/netns/{self.netns}", "unshare", "--uts"]
        argv = [
            *prefix, "--mount", "--propagation", "private",
            sys.executable, "-m", "guest.agent",
            "--unix", str(self.socket),
            "--state-dir", str(self.workdir / "state"),
            "--shared-root", str(self.workdir / "shared"),
            "--resolv-conf", str(self.workdir / "resolv.conf"),
            "--initdata-dir", str(self.workdir / "initdata"),
            "--manage-system",
            "--cgroup-parent", self.cgroup_parent,
            "--runtime", self.runtime,
            "--debug",
            *extra,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        # The socket file appears at bind(), before listen(): wait for the agent's own word.
        while ready not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not start:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
