"""The real console entry in subprocesses: start, the daemon it spawns, delete, import cost."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import any_pb2, empty_pb2

from protocols.api.containerd.task.v2 import shim_pb2 as task_v2
from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from protocols.api.runtimeoptions.v1 import api_pb2
from protocols.ttrpc import Client
from shim.binary.template_client import TEMPLATE_DIR_ENV
from shim.core import paths
from shim.core.bundle import SANDBOX_ID_ANNOTATION
from tests.support.templates import stop_templates

REPO = Path(__file__).resolve().parents[3]
SHIM = Path(sys.executable).with_name("containerd-shim-coco-v2")
ADDRESS = "/run/containerd-test/containerd.sock"
TTRPC_PROFILE = b'[shim]\nprotocol = "ttrpc"\nbootstrap_version = 2\n'
GRPC_PROFILE = b'[shim]\nprotocol = "grpc"\n'


@dataclass
class Env:
    root: Path
    sockets: Path
    state: Path
    env: dict[str, str]
    events: FakeContainerdEvents

    def bundle(self, cid: str, sandbox_id: str = "") -> Path:
        bundle = self.root / "bundles" / cid
        bundle.mkdir(parents=True)
        annotations = {SANDBOX_ID_ANNOTATION: sandbox_id} if sandbox_id else {}
        (bundle / "config.json").write_text(json.dumps({"annotations": annotations}))
        return bundle

    def run(self, *args: str, cwd: Path, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([str(SHIM), *args], cwd=cwd, env=self.env, input=stdin,
                              capture_output=True, timeout=30, check=False)

    def start(self, cid: str, bundle: Path, stdin: bytes = b"",
              *extra: str) -> dict[str, Any]:
        done = self.run("-namespace", "default", "-address", ADDRESS, "-id", cid, *extra,
                        "start", cwd=bundle, stdin=stdin)
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr == b""  # containerd reads stdout and stderr combined
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def socket(self, group: str) -> Path:
        """containerd's convention, under the test's socket dir."""
        return self.sockets / hashlib.sha256(f"{ADDRESS}/default/{group}".encode()).hexdigest()

    def daemon_pid(self, cid: str) -> int:
        record = json.loads((self.state / "default" / cid / "shim.json").read_text())
        pid: int = record["pid"]
        return pid


def _alive(pid: int) -> bool:
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"daemon {pid} still running"
        time.sleep(0.02)


class FakeContainerdEvents:
    """containerd's ttrpc Events/Forward at TTRPC_ADDRESS, on a thread with its own loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.topics: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                        args=(self._serve(),), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _serve(self) -> None:
        from google.protobuf import empty_pb2

        from protocols.api.containerd.services.events.ttrpc.v1 import events_pb2
        from protocols.ttrpc import Server

        topics = self.topics

        class Events:
            async def Forward(self, request: Any, context: Any) -> empty_pb2.Empty:
                topics.append(request.envelope.topic)
                return empty_pb2.Empty()

        self._stop = asyncio.Event()
        server = Server()
        server.register_service(events_pb2.DESCRIPTOR.services_by_name["Events"], Events())
        await server.serve_unix(self.path)
        self._ready.set()
        await self._stop.wait()
        await server.close()

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    sockets = Path(tempfile.mkdtemp(prefix="cs", dir="/tmp"))
    state = tmp_path / "state"
    variables = dict(os.environ)
    variables.update({
        paths.SOCKET_DIR_ENV: str(sockets),
        paths.STATE_DIR_ENV: str(state),
        "PYTHONPATH": str(REPO),
        "COCO_SHIM_BOOTER": "tests.unit.shim.fakes:FakeBooter",
        "TTRPC_ADDRESS": str(sockets / "containerd.sock.ttrpc"),
        TEMPLATE_DIR_ENV: str(sockets / "templates"),
    })
    events = FakeContainerdEvents(sockets / "containerd.sock.ttrpc")
    result = Env(tmp_path, sockets, state, variables, events)
    yield result
    events.close()
    stop_templates(sockets / "templates")  # (its "containerd" is this test process)
    # No stray daemon, no stray socket.
    for record in state.glob("*/*/shim.json"):
        pid = json.loads(record.read_text())["pid"]
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
    for leftover in (sockets / "templates").glob("*"):
        leftover.unlink()
    with contextlib.suppress(FileNotFoundError):
        (sockets / "templates").rmdir()
    for leftover in sockets.iterdir():
        leftover.unlink()
    sockets.rmdir()


def _options(body: bytes) -> bytes:
    options = api_pb2.Options(config_body=body)
    return any_pb2.Any(type_url="runtimeoptions.v1.Options",
                       value=options.SerializeToString()).SerializeToString()


def _socket_inodes(pid: int) -> set[int]:
    """The inodes of the unix sockets bound at a path that ``pid`` holds (/proc/net/unix)."""
    held = {int(link[len("socket:["):-1]) for fd in Path(f"/proc/{pid}/fd").iterdir()
            if (link := os.readlink(fd)).startswith("socket:[")}
    bound: set[int] = set()
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and int(fields[6]) in held:
            bound.add(os.stat(fields[7]).st_ino)
    return bound


def _listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def test_default_is_ttrpc_v3_for_containerd_2(env: Env) -> None:
    boot = env.start("c1", env.bundle("c1"))
    assert boot == {"version": 3, "address": f"unix://{env.socket('c1')}", "protocol": "ttrpc"}
    assert _listening(str(env.socket("c1")))


def test_daemon_runs_isolated_without_site_on_starts_module_path(env: Env) -> None:
    """-I -S (no site, no working directory on the path, no PYTHON* variables), its module path
    written out: start's own, PYTHONPATH included (the fake booter lives under tests/)."""
    env.start("c1", env.bundle("c1"))
    argv = Path(f"/proc/{env.daemon_pid('c1')}/cmdline").read_bytes().split(b"\0")
    assert argv[1:3] == [b"-IS", b"-c"]
    path = re.search(rb"sys\.path\[:\] = (\[.*?\])\n", argv[3])
    assert path is not None
    assert str(REPO) in json.loads(path.group(1).replace(b"'", b'"'))


def test_start_grpc_and_shutdown(env: Env) -> None:
    bundle = env.bundle("c1")
    os.mkfifo(bundle / "log")
    log_fd = os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK)  # containerd's reader
    boot = env.start("c1", bundle, _options(b'[shim]\nprotocol = "grpc"\n'))
    expected = env.socket("c1")
    assert boot == {"version": 3, "address": str(expected), "protocol": "grpc"}
    assert _listening(boot["address"])
    assert stat.S_IMODE(os.stat(boot["address"]).st_mode) == 0o600
    pid = env.daemon_pid("c1")
    assert os.getsid(pid) == pid  # its own session: containerd's signals do not reach it
    # It serves the very socket start bound (inherited): no sibling was bound and renamed.
    assert not list(env.sockets.glob(f".{expected.name}*"))
    assert os.stat(boot["address"]).st_ino in _socket_inodes(pid)

    import grpc

    from protocols.api.containerd.task.v3 import shim_pb2_grpc

    async def talk() -> None:
        async with grpc.aio.insecure_channel(f"unix:{boot['address']}") as channel:
            stub = shim_pb2_grpc.TaskStub(channel)
            connected = await stub.Connect(task_v3.ConnectRequest(id="c1"))
            assert connected.shim_pid == pid
            await stub.Shutdown(task_v3.ShutdownRequest(id="c1"))

    asyncio.run(talk())
    _wait_gone(pid)
    assert not Path(boot["address"]).exists()
    assert not (env.state / "default" / "c1").exists()  # a clean exit leaves nothing behind
    log = os.read(log_fd, 1 << 16).decode()
    os.close(log_fd)
    assert re.search(r'^time="\d{4}-\d\d-\d\dT[\d:.]+Z" level=info msg="serving containerd'
                     r'\.task on \S+ \(grpc, pid \d+\)" runtime="io\.containerd\.coco\.v2"',
                     log, re.MULTILINE), log


def test_early_boot_false_in_the_default_config_is_honoured(env: Env, tmp_path: Path) -> None:
    """`ctr run` sends no runtime options: start must read the same file the daemon will
    ($COCO_SHIM_CONFIG here), and [shim] early_boot = false there means no early boot."""
    profile = tmp_path / "configuration.toml"
    profile.write_text('[shim]\nprotocol = "ttrpc"\nearly_boot = false\n')
    env.env["COCO_SHIM_CONFIG"] = str(profile)
    boot = env.start("c1", env.bundle("c1"))
    assert boot["protocol"] == "ttrpc"
    argv = Path(f"/proc/{env.daemon_pid('c1')}/cmdline").read_bytes().split(b"\0")
    assert b"serve" in argv and b"-early-boot" not in argv


def test_bad_runtime_options_are_a_clear_start_error(env: Env) -> None:
    bundle = env.bundle("c1")
    done = env.run("-namespace", "default", "-address", ADDRESS, "-id", "c1", "start",
                   cwd=bundle, stdin=b"\x0a\xff")
    assert done.returncode == 1
    assert b"runtime options: not a runtimeoptions.v1.Options" in done.stderr
    assert b"Traceback" not in done.stderr
    assert not (env.state / "default" / "c1").exists() and not env.socket("c1").exists()


def test_large_runtime_options_reach_the_daemon_off_its_argv(env: Env) -> None:
    """200 KiB of runtime options: on the daemon's argv that was E2BIG (one argument may not
    exceed 128 KiB) and readable by anyone in /proc/<pid>/cmdline."""
    body = TTRPC_PROFILE + b"# " + b"x" * (200 << 10) + b"\n"
    boot = env.start("c1", env.bundle("c1"), _options(body))
    assert boot["protocol"] == "ttrpc"
    pid = env.daemon_pid("c1")
    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
    assert b"-early-boot" in argv and b"xxxx" not in argv and len(argv) < 4096


@pytest.mark.parametrize("flag,value", [("-id", "../.."), ("-id", "a/b"), ("-id", "x" * 77),
                                        ("-id", ".hidden"), ("-namespace", "..")])
def test_start_and_delete_refuse_ids_outside_containerds_rules(
        env: Env, flag: str, value: str) -> None:
    """An id becomes a host path (state record, run dir): ``../..`` must never get there."""
    bundle = env.bundle("c1")
    args = {"-namespace": "default", "-id": "c1", flag: value}
    argv = [arg for pair in args.items() for arg in pair]
    victim = env.state / "victim"
    victim.mkdir(parents=True)
    for action in ("start", "delete"):
        done = env.run("-address", ADDRESS, *argv, action, cwd=bundle,
                       stdin=_options(TTRPC_PROFILE))
        assert done.returncode == 1, done
        assert b"containerd's identifier rules" in done.stderr or b"longer than 76" in done.stderr
        assert b"Traceback" not in done.stderr
    assert victim.is_dir()
    assert sorted(p.name for p in env.state.iterdir()) == ["victim"]
    assert list(env.sockets.iterdir()) == [env.sockets / "containerd.sock.ttrpc"]


def test_start_refuses_a_sandbox_id_annotation_outside_the_rules(env: Env) -> None:
    done = env.run("-namespace", "default", "-address", ADDRESS, "-id", "c1", "start",
                   cwd=env.bundle("c1", sandbox_id="../../etc"), stdin=_options(TTRPC_PROFILE))
    assert done.returncode == 1
    assert b"io.kubernetes.cri.sandbox-id '../../etc' must match" in done.stderr
    assert not env.state.exists() or not any(env.state.iterdir())


def test_start_ttrpc_groups_a_pod_and_runs_a_task(env: Env) -> None:
    sandbox = env.bundle("pod")
    boot = env.start("pod", sandbox, _options(TTRPC_PROFILE))
    path = str(env.socket("pod"))
    assert boot == {"version": 2, "address": f"unix://{path}", "protocol": "ttrpc"}
    assert _listening(path)
    pid = env.daemon_pid("pod")
    # The pod's first container: the daemon boots the VM at once, from start's options.
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-early-boot" in argv
    # start's runtime options reach it through an inherited memfd, never on its argv.
    assert b"-runtime-options-fd" in argv
    assert not any(_options(TTRPC_PROFILE).hex().encode() in arg for arg in argv)
    # A container of the same pod: start prints the running shim's address, spawns nothing.
    app = env.bundle("app", sandbox_id="pod")
    assert env.start("app", app, _options(TTRPC_PROFILE)) == boot
    assert not (env.state / "default" / "app" / "shim.json").exists()

    async def talk() -> None:
        client = await Client.connect_unix(path)
        service = "containerd.task.v2.Task"
        created = await client.call(service, "Create", task_v2.CreateTaskRequest(
            id="pod", bundle=str(sandbox)), task_v2.CreateTaskResponse)
        assert created.pid == pid  # the fake VM's "hypervisor" is the daemon itself
        await client.call(service, "Start", task_v2.StartRequest(id="pod"),
                          task_v2.StartResponse)
        await client.call(service, "Kill", task_v2.KillRequest(id="pod", signal=9),
                          empty_pb2.Empty)
        exited = await client.call(service, "Wait", task_v2.WaitRequest(id="pod"),
                                   task_v2.WaitResponse)
        assert exited.exit_status == 137
        await client.call(service, "Delete", task_v2.DeleteRequest(id="pod"),
                          task_v2.DeleteResponse)
        await client.call(service, "Shutdown", task_v2.ShutdownRequest(id="pod"),
                          empty_pb2.Empty)
        await client.close()

    asyncio.run(talk())
    _wait_gone(pid)
    assert not (env.state / "default" / "pod").exists()
    assert env.events.topics == ["/tasks/create", "/tasks/start", "/tasks/exit",
                                 "/tasks/delete"]


def test_delete_cleans_up_after_a_dead_shim(env: Env) -> None:
    bundle = env.bundle("c1")
    boot = env.start("c1", bundle, _options(TTRPC_PROFILE))
    pid = env.daemon_pid("c1")
    state = env.state / "default" / "c1"
    (state / "init.pid").write_text("4242")
    helper = subprocess.Popen(["sleep", "60"])  # stands for a QEMU the dead shim left behind
    run_dir = env.root / "run" / "pod"
    (run_dir / "vm-1").mkdir(parents=True)
    # A vhost-device-vsock the daemon spawned but died before recording: it names the run dir.
    unrecorded = subprocess.Popen(["sh", "-c", "sleep 60", f"{run_dir}/vm-1/vhu.sock"])
    try:
        from shim.core.crash_record import ShimState

        ShimState(state).add_pid(helper.pid)
        ShimState(state).add_dir(run_dir)
        # A daemon that still serves is left alone (containerd 2.1.9 calls delete spuriously).
        done = env.run("-namespace", "default", "-address", ADDRESS, "-id", "c1",
                       "-bundle", str(bundle), "delete", cwd=bundle)
        assert done.returncode == 0, done.stderr.decode()
        assert task_v3.DeleteResponse.FromString(done.stdout).pid == 4242
        assert _alive(pid) and helper.poll() is None and unrecorded.poll() is None
        assert state.exists() and run_dir.exists()
        # Its socket gone (a failed reload): now it is dead to containerd and is reaped.
        Path(boot["address"].removeprefix("unix://")).unlink()
        before = time.time_ns()
        done = env.run("-namespace", "default", "-address", ADDRESS, "-id", "c1",
                       "-bundle", str(bundle), "delete", cwd=bundle)
        assert done.returncode == 0, done.stderr.decode()
        response = task_v3.DeleteResponse.FromString(done.stdout)
        assert (response.pid, response.exit_status) == (4242, 137)
        assert response.exited_at.ToNanoseconds() >= before
        assert helper.wait(timeout=10) == -signal.SIGKILL
        assert unrecorded.wait(timeout=10) == -signal.SIGKILL
        _wait_gone(pid)
        assert not state.exists() and not run_dir.exists()
        assert not Path(boot["address"].removeprefix("unix://")).exists()
    finally:
        for process in (helper, unrecorded):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait()


def test_delete_without_state_still_answers(env: Env) -> None:
    bundle = env.bundle("ghost")
    done = env.run("-namespace", "default", "-address", ADDRESS, "-id", "ghost", "-bundle",
                   str(bundle), "delete", cwd=bundle)
    assert done.returncode == 0
    response = task_v3.DeleteResponse.FromString(done.stdout)
    assert (response.pid, response.exit_status) == (0, 137)


def test_containerd_1_7_gets_bootstrap_version_2(env: Env) -> None:
    fake = env.root / "containerd"
    fake.write_text("#!/bin/sh\necho 'containerd github.com/containerd/containerd 1.7.24 x'\n")
    fake.chmod(0o755)
    boot = env.start("c1", env.bundle("c1"), b"", "-publish-binary", str(fake))
    assert (boot["version"], boot["protocol"]) == (2, "grpc")
    cache = json.loads((env.state / "containerd-versions.json").read_text())
    assert list(cache.values()) == [1]


def test_start_records_the_address_in_every_bundle_for_containerd_1_7_reloads(
        env: Env) -> None:
    """containerd 1.7 reconnects after its restart only through ``<bundle>/address`` (parsed
    like start's output); 2.x migrates a 1.x bundle reading it as a plain ttrpc address."""
    fake = env.root / "containerd"
    fake.write_text("#!/bin/sh\necho 'containerd github.com/containerd/containerd 1.7.24 x'\n")
    fake.chmod(0o755)
    pod, app = env.bundle("pod"), env.bundle("app", sandbox_id="pod")
    boot = env.start("pod", pod, b"", "-publish-binary", str(fake))
    assert boot["protocol"] == "grpc"
    # gRPC: the bootstrap JSON exactly as printed (a plain address would mean ttrpc).
    assert json.loads((pod / "address").read_text()) == boot
    # A container of the pod's shim (no new daemon) gets the same record in its own bundle.
    assert env.start("app", app, b"", "-publish-binary", str(fake)) == boot
    assert json.loads((app / "address").read_text()) == boot
    assert stat.S_IMODE((app / "address").stat().st_mode) == 0o600
    assert sorted(p.name for p in app.iterdir()) == ["address", "config.json"]  # no staging

    ttrpc = env.bundle("t1")
    boot = env.start("t1", ttrpc, _options(TTRPC_PROFILE))
    assert (ttrpc / "address").read_text() == boot["address"] == f"unix://{env.socket('t1')}"


@pytest.mark.parametrize("profile", [TTRPC_PROFILE, GRPC_PROFILE], ids=["ttrpc", "grpc"])
def test_start_imports_nothing_heavy(env: Env, profile: bytes) -> None:
    env.start("c0", env.bundle("c0"), _options(profile))  # the profile's [shim] is cached
    bundle = env.bundle("c1")
    probe = (
        "import json, sys\n"
        "from shim.__main__ import main\n"
        "rc = main(['-namespace', 'default', '-address', '/a', '-id', 'c1', 'start'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in (\n"
        "                   'grpc', 'grpclib', 'h2', 'hpack', 'pyroute2')\n"
        "               or m.endswith('_pb2') or m.endswith('_pb2_grpc')\n"
        "               or m.startswith('google.protobuf') or m == 'shim.daemon.main'\n"
        "               or m in ('asyncio', 'dataclasses', 'inspect', 'hashlib', 'shutil',\n"
        "                        'subprocess', 'logging', 'tomllib'))\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=bundle, env=env.env,
                          input=_options(profile), capture_output=True, timeout=30,
                          check=False)
    report = json.loads(done.stderr.decode().strip().splitlines()[-1])
    assert report == {"rc": 0, "heavy": []}


def test_help_and_bad_flags(env: Env) -> None:
    for flag in ("-h", "--help"):
        done = env.run(flag, cwd=env.root)
        assert done.returncode == 0
        assert b"usage: containerd-shim-coco-v2" in done.stdout
    done = env.run("-bogus", "start", cwd=env.root)
    assert done.returncode == 2
    assert b"flag provided but not defined: -bogus" in done.stderr
