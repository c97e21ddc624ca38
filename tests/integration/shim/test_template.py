"""The template process for real: it forks a daemon that serves ttrpc on the passed socket in
the right cgroup, environment, working directory and session; it exits with its containerd;
it refuses stale code, other users and other parents; concurrent launches leave one.

This test process plays containerd: ``start`` requests come from its children (a small client
script doing exactly what ``start``'s fast path does), so their parent is the template's
"containerd". No VM: the daemon boots nothing (a ttrpc profile without early boot).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from protocols.ttrpc import Client
from shim.binary.template_client import TemplatePaths, template_argv
from shim.core.crash_record import process_start_time
from shim.core.interpreter import module_path

REPO = Path(__file__).resolve().parents[3]
ADDRESS = "/run/containerd-template-test.sock"
PROFILE = '[shim]\nprotocol = "ttrpc"\nbootstrap_version = 3\nearly_boot = false\n'
CLIENT = """
import json, os, sys
sys.path[:0] = [{repo!r}]
from shim.binary import template_client as t
paths = t.TemplatePaths({directory!r}, {digest!r})
if len(sys.argv) > 1 and sys.argv[1] == "--nofile":
    import resource
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    del sys.argv[1:3]
if len(sys.argv) > 1 and sys.argv[1] == "--cgroup":
    with open(sys.argv[2], "w") as f:
        f.write("0")
    del sys.argv[1:3]
reply = t.ask(paths, t.build_request(sys.argv[1:], b""))
print(json.dumps({{"status": reply.status, "pid": reply.pid, "reason": reply.reason}}))
"""


def _wait(predicate: Any, timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    return process_start_time(pid) is not None


class Node:
    """A template for this test process (its "containerd") and the starts it serves."""

    def __init__(self, base: Path, digest: str = "tmpl") -> None:
        self.base = base
        self.paths = TemplatePaths(str(base / "t"), digest)
        (base / "t").mkdir(mode=0o711, exist_ok=True)
        (base / "profile.toml").write_text(PROFILE)
        self.env = {**os.environ,
                    "COCO_SHIM_SOCKET_DIR": str(base / "s"),
                    "COCO_SHIM_STATE_DIR": str(base / "state"),
                    "COCO_SHIM_RUN_DIR": str(base / "run"),
                    "COCO_SHIM_CONFIG": str(base / "profile.toml"),
                    "COCO_SHIM_BOOTER": "tests.unit.shim.fakes:FakeBooter",
                    "TEMPLATE_TEST_MARKER": f"marker-{os.getpid()}"}
        self.process: subprocess.Popen[bytes] | None = None
        self.daemons: list[int] = []
        self.fifos: list[int] = []

    def launch(self, containerd_pid: int | None = None,
               code: str | None = None) -> subprocess.Popen[bytes]:
        argv = template_argv(self.paths, module_path(), containerd_pid or os.getpid())
        if code is not None:
            argv[3] = code
        process = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        self.process = process
        return process

    def serving(self) -> None:
        """The socket exists (it is bound and listened on in one step; no probe connection:
        the template would fork for it)."""
        _wait(lambda: Path(self.paths.socket).exists(), what="the template's socket")

    def bundle(self, cid: str) -> Path:
        bundle = self.base / "bundles" / cid
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps({"annotations": {}}))
        os.mkfifo(bundle / "log")  # containerd holds the log FIFO's read end
        self.fifos.append(os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK))
        return bundle

    def start(self, cid: str, *, cgroup: str = "", via_shell: bool = False,
              env: dict[str, str] | None = None,
              nofile: int = 0) -> tuple[dict[str, Any], str]:
        """``start`` for ``cid`` through the template: (its reply, start's stdout)."""
        bundle = self.bundle(cid)
        code = CLIENT.format(repo=str(REPO), directory=self.paths.socket.rsplit("/", 1)[0],
                             digest=self.paths.digest)
        argv = [sys.executable, "-c", code]
        if nofile:
            argv += ["--nofile", str(nofile)]
        if cgroup:
            argv += ["--cgroup", cgroup]
        argv += ["-namespace", "default", "-address", ADDRESS, "-id", cid, "start"]
        if via_shell:  # start's parent is then a shell, not this "containerd"
            argv = ["sh", "-c", '"$@"; exit $?', "sh", *argv]
        done = subprocess.run(argv, cwd=bundle, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.strip().splitlines()
        reply: dict[str, Any] = json.loads(lines[-1])
        if reply["pid"]:
            self.daemons.append(reply["pid"])
        return reply, "\n".join(lines[:-1])

    def close(self) -> None:
        daemons, self.daemons = self.daemons, []
        fifos, self.fifos = self.fifos, []
        for pid in daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in daemons:
            _wait(lambda pid=pid: not _alive(pid), what=f"daemon {pid} to exit")
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(10)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None
        for fd in fifos:
            os.close(fd)


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    # Under /tmp, traversable (0711): another user must reach the socket to be refused.
    base = Path(tempfile.mkdtemp(prefix=f"coco-tmpl-{os.getpid()}-", dir="/tmp"))
    base.chmod(0o711)
    served = Node(base)
    try:
        served.launch()
        served.serving()
        yield served
        served.close()
        assert not Path(served.paths.socket).exists()
    finally:
        served.close()
        shutil.rmtree(base, ignore_errors=True)


def _removed(cgroup: Path) -> bool:
    """rmdir ``cgroup`` once no process (a zombie not yet reaped counts) is left in it."""
    try:
        cgroup.rmdir()
    except OSError as err:
        if err.errno != errno.EBUSY:
            raise
        return False
    return True


def _proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_a_forked_daemon_serves_ttrpc_in_starts_session_cwd_env_and_cgroup(node: Node) -> None:
    cgroup_dir = Path(f"/sys/fs/cgroup/unified/coco-template-test-{os.getpid()}")
    if not Path("/sys/fs/cgroup/unified").is_dir():
        cgroup_dir = Path(f"/sys/fs/cgroup/coco-template-test-{os.getpid()}")
    cgroup_dir.mkdir()
    try:
        reply, out = node.start("c1", cgroup=str(cgroup_dir / "cgroup.procs"))
        assert reply["status"] == 0, reply
        pid = reply["pid"]
        boot = json.loads(out)
        record = json.loads((node.base / "state/default/c1/shim.json").read_text())
        assert record["pid"] == pid and boot["protocol"] == "ttrpc"
        path = boot["address"].removeprefix("unix://")

        async def connect() -> int:
            async with await Client.connect_unix(path, timeout=10) as client:
                answer = await client.call("containerd.task.v3.Task", "Connect",
                                           task_v3.ConnectRequest(id="c1"),
                                           task_v3.ConnectResponse, timeout=10)
            return int(answer.shim_pid)

        assert asyncio.run(connect()) == pid
        # Its own session, the bundle as working directory, stdio on /dev/null.
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid
        assert os.readlink(f"/proc/{pid}/cwd") == str(node.base / "bundles/c1")
        assert {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)} == {os.devnull}
        # start's environment and a spawned daemon's command line, as /proc shows them.
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"TEMPLATE_TEST_MARKER=marker-{os.getpid()}".encode() in environ
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:3] == [b"-IS", b"-c"] and b"serve" in cmdline and b"c1" in cmdline
        # start's cgroup (the client joined a new one; the template was not in it).
        relative = "/" + cgroup_dir.name
        assert f"0::{relative}" in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        assert f"0::{relative}" not in Path(
            f"/proc/{node.process.pid if node.process else 0}/cgroup").read_text()
        # Nothing of the template's survives: no thread but the daemon's, no signal blocked,
        # no descriptor of the template (its socket, lock, log, pidfds).
        assert _proc_status(pid)["SigBlk"].strip("0") == ""
        targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        template_fds = f"/proc/{node.process.pid if node.process else 0}/fd"
        template_pipes = {target for fd in os.listdir(template_fds)  # the wakeup pipe, …
                          if (target := os.readlink(f"{template_fds}/{fd}")).startswith("pipe:")}
        template_files = {node.paths.lock, node.paths.log, "anon_inode:[pidfd]", *template_pipes}
        assert not targets & template_files, targets
    finally:
        for pid in node.daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait(lambda: _removed(cgroup_dir), what=f"{cgroup_dir} removed (its killed daemon "
              "and the intermediate reaped)")


def test_a_grpc_daemon_is_forked_and_ready_before_start_answers(node: Node) -> None:
    """containerd 1.7's transport: the forked daemon serves gRPC (grpclib) on the socket
    ``start`` bound, like ttrpc; nobody waits for it."""
    profile = node.base / "grpc.toml"
    profile.write_text('[shim]\nprotocol = "grpc"\nbootstrap_version = 2\nearly_boot = false\n')
    reply, out = node.start("g1", env={"COCO_SHIM_CONFIG": str(profile)})
    assert reply["status"] == 0 and reply["pid"], reply
    boot = json.loads(out)
    assert boot["protocol"] == "grpc" and boot["version"] == 2
    assert b"serve" in Path(f"/proc/{reply['pid']}/cmdline").read_bytes()

    async def connect() -> int:
        from grpclib.client import Channel, UnaryUnaryMethod

        from protocols.api.containerd.task.v3 import shim_pb2 as task_v3

        channel = Channel(path=boot["address"])  # the socket start bound: served, no retry
        try:
            call = UnaryUnaryMethod(channel, "/containerd.task.v3.Task/Connect",
                                    task_v3.ConnectRequest, task_v3.ConnectResponse)
            reply = await call(task_v3.ConnectRequest(id="g1"), timeout=30)
            return int(reply.shim_pid)
        finally:
            channel.close()

    assert asyncio.run(connect()) == reply["pid"]


def test_the_second_container_of_a_pod_shares_its_shim(node: Node) -> None:
    first, out = node.start("p1")
    assert first["status"] == 0 and first["pid"]
    bundle = node.bundle("p1-c2")
    spec = {"annotations": {"io.kubernetes.cri.sandbox-id": "p1"}}
    (bundle / "config.json").write_text(json.dumps(spec))
    code = CLIENT.format(repo=str(REPO), directory=str(node.base / "t"),
                         digest=node.paths.digest)
    done = subprocess.run([sys.executable, "-c", code, "-namespace", "default", "-address",
                           ADDRESS, "-id", "p1-c2", "start"], cwd=bundle, env=node.env,
                          capture_output=True, text=True, timeout=60, check=True)
    lines = done.stdout.strip().splitlines()
    assert json.loads(lines[-1]) == {"status": 0, "pid": 0, "reason": ""}  # nothing forked
    assert json.loads(lines[0]) == json.loads(out)


def test_bad_input_is_starts_own_error_through_the_template(node: Node) -> None:
    code = CLIENT.format(repo=str(REPO), directory=str(node.base / "t"),
                         digest=node.paths.digest)
    done = subprocess.run([sys.executable, "-c", code, "-namespace", "default", "-address",
                           ADDRESS, "-id", "../bad", "start"], cwd=node.base, env=node.env,
                          capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1])["status"] == 1
    assert "start:" in done.stderr and "id" in done.stderr


def test_a_start_whose_parent_is_not_its_containerd_is_declined(node: Node) -> None:
    reply, out = node.start("c-shell", via_shell=True)
    assert reply["status"] is None and "is not this template's containerd" in reply["reason"]
    assert out == "" and not (node.base / "state/default/c-shell").exists()


def test_a_start_with_other_limits_is_declined(node: Node) -> None:
    """The daemon would inherit the template's limits, not start's: start runs itself."""
    reply, out = node.start("c-limits", nofile=100)
    assert reply["status"] is None and reply["reason"] == "start has other resource limits"
    assert out == ""


def test_a_profile_without_the_template_is_declined(node: Node) -> None:
    profile = node.base / "off.toml"
    profile.write_text(PROFILE + "template = false\n")
    reply, _ = node.start("c-off", env={"COCO_SHIM_CONFIG": str(profile)})
    assert reply == {"status": None, "pid": 0, "reason": "[shim] template = false"}
    # Declined before start's work: no address file, no state (start then runs itself).
    assert not (node.base / "bundles/c-off/address").exists()
    assert not (node.base / "state/default/c-off").exists()


def test_another_user_is_refused(node: Node) -> None:
    os.chmod(node.paths.socket, 0o666)  # past the file mode: SO_PEERCRED must still refuse
    try:
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.settimeout(10)
                    sock.connect(node.paths.socket)
                    code = 0 if sock.recv(100) == b"" else 3
            except OSError as err:
                code = 10 + (err.errno or 0)
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.chmod(node.paths.socket, 0o600)
    assert "refused pid" in Path(node.paths.log).read_text()


def test_the_template_exits_when_its_containerd_exits(tmp_path: Path) -> None:
    fake = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    node = Node(tmp_path)
    try:
        template = node.launch(containerd_pid=fake.pid)
        node.serving()
        fake.kill()
        fake.wait()
        assert template.wait(5) == 0
        assert not Path(node.paths.socket).exists()
        assert f"containerd (pid {fake.pid}) exited" in Path(node.paths.log).read_text()
    finally:
        fake.kill()
        fake.wait()
        node.close()


def test_stale_code_is_refused_and_the_template_exits(tmp_path: Path) -> None:
    module = tmp_path / "lib" / "zygote_probe_module.py"
    module.parent.mkdir()
    module.write_text("VALUE = 1\n")
    node = Node(tmp_path)
    path = [str(module.parent), *module_path()]
    code = (f"import gc, sys\ngc.disable()\nsys.path[:] = {path!r}\n"
            "from shim.template.server import main\n"
            "sys.exit(main(sys.argv[1:], modules=('zygote_probe_module', 'shim.__main__')))\n")
    try:
        template = node.launch(code=code)
        node.serving()
        module.write_text("VALUE = 22\n")  # an upgrade in place
        reply, out = node.start("c-stale")
        assert reply["status"] is None and "code changed" in reply["reason"], reply
        assert str(module) in reply["reason"] and out == ""
        assert template.wait(5) == 0
        assert not Path(node.paths.socket).exists()
    finally:
        node.close()


def test_a_stop_signal_during_a_fork_still_stops_the_template(tmp_path: Path) -> None:
    """SIGTERM that lands while the template forks its spare: Python runs the handler inside
    an at-fork callback, here at once (a callback that signals the template itself and calls a
    function), where a handler that raised had its exception printed and dropped, and the
    template served on (1 run in 5 of the concurrent-launch test below, SIGTERM sent just as
    the spare was forked). The signal reaches the loop through the wakeup pipe instead."""
    node = Node(tmp_path)
    code = (f"import gc, os, signal, sys\ngc.disable()\nsys.path[:] = {module_path()!r}\n"
            "def _call():\n    pass\n"
            "def _signal_once():\n"
            "    if not _signal_once.sent:\n"
            "        _signal_once.sent = True\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        _call()  # the handler runs here, in the callback\n"
            "_signal_once.sent = False\n"
            "os.register_at_fork(after_in_parent=_signal_once)\n"
            "from shim.template.server import main\nsys.exit(main(sys.argv[1:]))\n")
    try:
        template = node.launch(code=code)
        assert template.wait(20) == 0
        assert not Path(node.paths.socket).exists()
        assert "exits: signal SIGTERM" in Path(node.paths.log).read_text()
    finally:
        node.close()


def test_concurrent_launches_leave_one_template(tmp_path: Path) -> None:
    node = Node(tmp_path)
    launched = [node.launch() for _ in range(3)]
    try:
        node.serving()
        _wait(lambda: sum(p.poll() is None for p in launched) == 1, what="one template left")
        assert all(p.returncode == 0 for p in launched if p.poll() is not None)
        lock_pid = int(Path(node.paths.lock).read_text())
        assert [p.pid for p in launched if p.poll() is None] == [lock_pid]
    finally:
        for process in launched:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(10)
            if process.stderr is not None:
                process.stderr.close()
        node.process = None
        node.close()
    assert not Path(node.paths.socket).exists()


def _spare(template_pid: int, not_pid: int = 0) -> int:
    """The template's spare intermediate: its one live child (intermediates that served a
    start are gone or zombies), waited for if the template is forking it; not ``not_pid``."""
    found: list[int] = []

    def one() -> bool:
        children = [c for c in psutil.Process(template_pid).children()
                    if c.status() != psutil.STATUS_ZOMBIE and c.pid != not_pid]
        found[:] = [c.pid for c in children]
        return len(children) == 1

    _wait(one, what=f"template {template_pid}'s one spare intermediate")
    return found[0]


def test_a_spare_intermediate_serves_one_start_and_is_replaced(node: Node) -> None:
    """The template forks the intermediate before the request comes: it waits (holding
    nothing of the template's but its log), serves exactly one start, exits; a new one takes
    its place. A spare killed while it waits is replaced too, and starts keep being served."""
    assert node.process is not None
    template = node.process.pid
    first = _spare(template)
    targets = {os.readlink(f"/proc/{first}/fd/{fd}") for fd in os.listdir(f"/proc/{first}/fd")}
    assert not targets & {node.paths.lock, "anon_inode:[pidfd]"}, targets
    assert os.getsid(first) == os.getsid(template)  # start's session only once it serves
    reply, _ = node.start("c-spare1")
    assert reply["status"] == 0 and reply["pid"], reply
    _wait(lambda: not _alive(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE,
          what=f"the used spare {first} to exit")
    second = _spare(template, not_pid=first)
    os.kill(second, signal.SIGKILL)  # dies unused: the template reaps it and forks another
    third = _spare(template, not_pid=second)
    assert third not in (first, second)
    reply, _ = node.start("c-spare2")
    assert reply["status"] == 0 and reply["pid"], reply


def test_the_spare_does_not_outlive_its_template(tmp_path: Path) -> None:
    """Stopped (SIGTERM) or killed, the template leaves no spare behind: the spare reads EOF
    on its channel and exits."""
    for how in (signal.SIGTERM, signal.SIGKILL):
        (tmp_path / how.name).mkdir()
        node = Node(tmp_path / how.name)
        try:
            template = node.launch()
            node.serving()
            spare = _spare(template.pid)
            template.send_signal(how)
            template.wait(10)
            _wait(lambda spare=spare: not _alive(spare), what=f"spare {spare} to exit")
        finally:
            node.close()
