"""A private containerd for tests: own root, state and sockets under a temp dir.

Never touches a system containerd. Works for 2.x (config version 3) and 1.7 (version 2).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from shim.binary.template_client import TEMPLATE_ENTRY
from shim.core import interpreter
from tests import envinfo

START_TIMEOUT = 20.0
CRI_STATE = "io.containerd.grpc.v1.cri"  # the CRI plugin's state dir (1.7 and 2.x alike)


@dataclass
class Containerd:
    version: str  # "2.1.9" or "1.7.24"
    bin_dir: Path
    base: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    extra_path: list[Path] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    command_env: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> Path:
        return self.base / "c.sock"

    @property
    def ttrpc_address(self) -> Path:
        return Path(str(self.address) + ".ttrpc")

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    def env(self) -> dict[str, str]:
        path = os.pathsep.join([*(str(p) for p in self.extra_path), str(self.bin_dir),
                                os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        return {**os.environ, "PATH": path}

    def ctr(self, *args: str, namespace: str = "default", timeout: float = 120,
            check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run this containerd's own `ctr` against it."""
        cmd = [str(self.bin_dir / "ctr"), "--address", str(self.address), "--namespace", namespace,
               *args]
        result = subprocess.run(cmd, env=self.env(), capture_output=True, timeout=timeout,
                                input=input, check=False)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {result.returncode}\nstdout: {result.stdout.decode()}\n"
                f"stderr: {result.stderr.decode()}\ncontainerd log tail:\n{self.log_tail()}")
        return result

    def restart(self) -> None:
        """SIGTERM containerd, then start it again on the same root, state and sockets (its
        shims keep running and are reconnected from the state it kept)."""
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=30)
        self.address.unlink(missing_ok=True)
        self.ttrpc_address.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.command_env, start_new_session=True)
        self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not (self.address.exists() and self.ttrpc_address.exists()):
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd {self.version} exited "
                                   f"{self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd {self.version} not ready in {START_TIMEOUT}s:"
                                   f"\n{self.log_tail()}")
            time.sleep(0.02)

    def cni_netns(self) -> list[Path]:
        """The pod network namespaces CRI pinned under this containerd's state dir
        (tests/support/cri.py sets ``netns_mounts_under_state_dir``): after the last
        RemovePodSandbox there must be none."""
        return sorted((self.base / "state" / CRI_STATE / "netns").glob("*"))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _config(version: str, base: Path, extra: str) -> str:
    root, state = base / "root", base / "state"
    if version.startswith("1."):
        return (f'version = 2\nroot = "{root}"\nstate = "{state}"\n'
                f'[grpc]\n  address = "{base / "c.sock"}"\n{extra}')
    return (f"version = 3\nroot = '{root}'\nstate = '{state}'\n"
            f"[grpc]\n  address = '{base / 'c.sock'}'\n{extra}")


def bin_dir_for(version: str) -> Path:
    env = envinfo.load()
    return env.containerd17_bin if version.startswith("1.") else env.containerd2_bin


@contextmanager
def private_containerd(version: str, *, extra_config: str = "",
                       extra_path: list[Path] | None = None,
                       env: Mapping[str, str] | None = None,
                       log_level: str = "debug") -> Iterator[Containerd]:
    """Start containerd `version` on private sockets; stop it and remove everything after.

    Tests keep containerd's (and so the shim's, which follows it) debug log; benchmarks run at
    ``info``, as a node does."""
    bin_dir = bin_dir_for(version)
    binary = bin_dir / "containerd"
    if not binary.exists():
        raise RuntimeError(f"{binary} missing: run `make env` (scripts/setup-env.sh)")
    # Short path: unix socket paths must stay under 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="ctd-", dir="/tmp"))
    cfg = base / "config.toml"
    cfg.write_text(_config(version, base, extra_config))
    log_path = base / "containerd.log"
    log = log_path.open("wb")
    cd_env = {**os.environ, **(env or {})}
    cd_env["PATH"] = os.pathsep.join([*(str(p) for p in extra_path or []), str(bin_dir),
                                      cd_env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
    command = [str(binary), "--config", str(cfg), "--log-level", log_level]
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=cd_env,
                            start_new_session=True)
    cd = Containerd(version, bin_dir, base, proc, log_path, list(extra_path or []),
                    command, cd_env)
    leaked: list[Path] = []
    try:
        cd.wait_ready()
        yield cd
        # The after-each-module leak check every private containerd gets: a pod network
        # namespace CRI still holds once the module removed its pods (the test or containerd's
        # failed-sandbox cleanup left it) would outlive the test.
        leaked = cd.cni_netns()
        said = [line for line in cd.log_path.read_text(errors="replace").splitlines()
                if "level=error" in line and ("sandbox" in line or "netns" in line
                                              or "network namespace" in line)][-10:]
    finally:
        proc = cd.process  # a restart replaced it
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        subprocess.run(["umount", "-R", "-l", str(base / "root")], capture_output=True,
                       check=False)
        subprocess.run(["umount", "-R", "-l", str(base / "state")], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)
    if leaked:
        raise AssertionError(f"containerd {version} left pod network namespaces behind: "
                             f"{[p.name for p in leaked]}; it said:\n" + "\n".join(said))


def is_shim_daemon(cmdline: Sequence[str]) -> bool:
    """A shim daemon's command line: `<python> -IS -c <entry> … serve`
    (shim.core.interpreter.daemon_argv). A daemon the template forked shows the same (the
    template rewrites /proc/<pid>/cmdline and environ to a spawned daemon's)."""
    return list(cmdline[1:3]) == [*interpreter.FLAGS, "-c"] and "serve" in cmdline


def is_shim_template(cmdline: Sequence[str]) -> bool:
    """The node's template process (shim.binary.template_client.template_argv). Its
    environment is its containerd's (the first ``start``'s), so :func:`coco_processes` of a
    test base finds it too: it must be gone once its containerd is."""
    return list(cmdline[1:3]) == [*interpreter.FLAGS, "-c"] and len(cmdline) > 3 and \
        f"from {TEMPLATE_ENTRY} import" in cmdline[3]


def shim_daemons(run_dir_marker: Path) -> list[psutil.Process]:
    """Our shim daemons (:func:`is_shim_daemon`) whose COCO_SHIM_RUN_DIR lies under
    ``run_dir_marker``: the processes to measure for one private containerd."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        cmd = proc.info["cmdline"] or []
        environ = proc.info["environ"] or {}
        if is_shim_daemon(cmd) and \
                str(run_dir_marker) in environ.get("COCO_SHIM_RUN_DIR", ""):
            found.append(proc)
    return found


def coco_processes(base: Path) -> list[int]:
    """Processes started for this test base: shim daemons, QEMUs and vhost-device-vsock helpers
    (base in their command line or environment), and containerd itself while it runs."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(base).encode() in cmdline or str(base).encode() in environ:
            found.append(int(entry.name))
    return found
