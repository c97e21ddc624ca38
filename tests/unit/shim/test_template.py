"""The template's pure parts: request encoding, identity, staleness, replies and fallback."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.binary import template_client
from shim.binary.template_client import (
    BadRequest,
    TemplatePaths,
    decode_request,
    encode_request,
    parse_reply,
)
from shim.core.config import ConfigSource, ShimConfig, shim_config
from shim.core.errors import InvalidArgument
from shim.template import codewatch


def _request(**changes: object) -> bytes:
    fields: dict[str, object] = {"argv": [b"shim", b"-id", b"c1", b"start"],
                                 "environ": [b"A=1", b"B=x=y", b"EMPTY="],
                                 "cgroup": b"0::/a/b\n", "umask": 0o022, "stdin": b"\0opts\n"}
    fields.update(changes)
    return encode_request(**fields)  # type: ignore[arg-type]


def test_a_request_round_trips_byte_for_byte() -> None:
    request = decode_request(_request())
    assert request.argv == ["shim", "-id", "c1", "start"]
    assert request.environ == {"A": "1", "B": "x=y", "EMPTY": ""}
    assert (request.cgroup, request.umask, request.stdin) == ("0::/a/b\n", 0o022, b"\0opts\n")


def test_undecodable_bytes_survive_as_surrogates() -> None:
    request = decode_request(_request(argv=[b"shim", b"\xff"], environ=[b"K=\xfe"]))
    assert os.fsencode(request.argv[1]) == b"\xff"
    assert os.fsencode(request.environ["K"]) == b"\xfe"


@pytest.mark.parametrize(("data", "why"), [
    (b"HELLO", "not a template request"),
    (_request()[:-1], "truncated"),
    (_request() + b"x", "overlong"),
    (template_client.MAGIC + (template_client.MAX_REQUEST + 1).to_bytes(8, "big"), "more than"),
    (template_client.MAGIC + (8).to_bytes(8, "big") + (0).to_bytes(8, "big"), "1 fields"),
    (_request(environ=[b"=no-name"]), "without a name"),
    (_request(environ=[b"NOEQUALS"]), "without a name"),
    (_request(umask=0o7777), "bad umask"),
    (_request(argv=[]), "empty argv"),
])
def test_bad_requests_are_refused_with_the_cause(data: bytes, why: str) -> None:
    with pytest.raises(BadRequest, match=why):
        decode_request(data)


def test_a_field_that_runs_past_the_request_is_refused() -> None:
    body = (100).to_bytes(8, "big") + b"short"
    data = template_client.MAGIC + len(body).to_bytes(8, "big") + body
    with pytest.raises(BadRequest, match="runs past"):
        decode_request(data)


@pytest.mark.parametrize(("args", "address"), [
    (["-namespace", "k8s.io", "-address", "/run/c.sock", "-id", "x", "start"], "/run/c.sock"),
    (["--address=/run/d.sock", "start"], "/run/d.sock"),
    (["-address"], ""),
    (["-id", "x", "start"], ""),
])
def test_the_containerd_address_is_read_from_go_style_flags(args: list[str],
                                                            address: str) -> None:
    assert template_client.containerd_address(args) == address


def test_one_template_per_containerd_and_code_identity() -> None:
    env = {template_client.TEMPLATE_DIR_ENV: "/run/t"}
    one = template_client.template_paths("/run/a.sock", "code-1", env)
    assert one.socket == f"/run/t/{one.digest}.sock" and len(one.digest) == 24
    assert one.lock.endswith(".lock") and one.log.endswith(".log")
    assert template_client.template_paths("/run/a.sock", "code-1", env).socket == one.socket
    others = {template_client.template_paths("/run/b.sock", "code-1", env).digest,
              template_client.template_paths("/run/a.sock", "code-2", env).digest}
    assert one.digest not in others and len(others) == 2
    default = template_client.template_paths("/run/a.sock", "code-1", {})
    assert default.socket.startswith(template_client.DEFAULT_TEMPLATE_DIR + "/")


def test_the_code_identity_covers_interpreter_module_path_and_import_time_env(
        monkeypatch: pytest.MonkeyPatch) -> None:
    before = template_client.code_identity()
    monkeypatch.setenv("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    assert template_client.code_identity() != before
    monkeypatch.delenv("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION")
    monkeypatch.setattr("sys.path", ["/elsewhere"])
    assert template_client.code_identity() != before


def test_a_changed_or_removed_module_file_makes_the_template_stale(tmp_path: Path) -> None:
    first, second = tmp_path / "a.py", tmp_path / "b.py"
    first.write_text("x = 1\n")
    second.write_text("y = 1\n")
    stamp = codewatch.code_stamp([Module(first), Module(second), object()])
    assert str(first) in stamp and codewatch.changed(stamp) is None
    second.write_text("y = 22\n")  # same second or not: the size differs
    assert codewatch.changed(stamp) == str(second)
    stamp = codewatch.code_stamp([Module(first), Module(second)])
    os.utime(first, ns=(1, 1))
    assert codewatch.changed(stamp) == str(first)
    stamp = codewatch.code_stamp([Module(first)])
    first.unlink()
    assert codewatch.changed(stamp) == str(first)


class Module:
    def __init__(self, path: Path) -> None:
        self.__file__ = str(path)


@pytest.mark.parametrize("change", ["write", "touch", "replace", "remove"])
def test_the_code_watch_checks_every_file_only_after_inotify_saw_a_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """No event queued: no stat of every file (the full check is not run). An edit in place,
    a touch, a replacement by rename or a removal queues one: the full check then names the
    file, and keeps naming it on every later request."""
    lib = tmp_path / "lib"
    lib.mkdir()
    module, other = lib / "m.py", lib / "other.txt"
    module.write_text("x = 1\n")
    calls: list[int] = []
    full = codewatch.changed

    def counted(stamp: codewatch.Stamp) -> str | None:
        calls.append(1)
        return full(stamp)

    monkeypatch.setattr(codewatch, "changed", counted)
    watch = codewatch.CodeWatch(codewatch.code_stamp([Module(module)]))
    try:
        assert watch.watching
        assert [watch.changed() for _ in range(3)] == [None, None, None] and calls == []
        other.write_text("a neighbour\n")  # an event, but the code is unchanged
        assert watch.changed() is None and len(calls) == 1
        assert watch.changed() is None and len(calls) == 1  # drained: cheap again
        if change == "write":
            module.write_text("x = 22\n")
        elif change == "touch":
            os.utime(module, ns=(1, 1))
        elif change == "replace":
            (lib / "m.new").write_text("x = 3\n")
            os.rename(lib / "m.new", module)
        else:
            module.unlink()
        assert watch.changed() == str(module) and watch.changed() == str(module)
    finally:
        watch.close()


def test_without_inotify_every_request_runs_the_full_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = tmp_path / "m.py"
    module.write_text("x = 1\n")
    monkeypatch.setattr(codewatch, "_inotify", lambda paths: -1)
    watch = codewatch.CodeWatch(codewatch.code_stamp([Module(module)]))
    assert not watch.watching and watch.changed() is None
    module.write_text("x = 22\n")
    assert watch.changed() == str(module)


def test_a_watch_refused_means_no_inotify(tmp_path: Path) -> None:
    """A directory gone before it is watched: no inotify at all (the full check decides)."""
    assert codewatch._inotify([str(tmp_path), str(tmp_path / "gone")]) == -1
    fd = codewatch._inotify([str(tmp_path)])
    assert fd >= 0
    os.close(fd)


@pytest.mark.parametrize(("reply", "status", "pid", "reason"), [
    (b"ok 0 4242\n", 0, 4242, ""),
    (b"ok 1 0\n", 1, 0, ""),
    (b"fallback [shim] template = false\n", None, 0, "[shim] template = false"),
    (b"", None, 0, "without an answer"),
    (b"ok zero\n", None, 0, "without an answer"),
])
def test_replies(reply: bytes, status: int | None, pid: int, reason: str) -> None:
    parsed = parse_reply(reply)
    assert (parsed.status, parsed.pid) == (status, pid) and reason in parsed.reason


class FakeTemplate:
    """A socket that takes one request (with its three descriptors) and answers ``reply``."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.reply = reply
        self.got: bytes = b""
        self.fds = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 8)
            self.fds = len(fds)
            for fd in fds:
                os.close(fd)
            total = template_client.request_length(data)
            while len(data) < total:
                data += conn.recv(total - len(data))
            self.got = data
            conn.sendall(self.reply)

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()


@pytest.fixture
def paths(tmp_path: Path) -> Iterator[TemplatePaths]:
    yield TemplatePaths(str(tmp_path), "t")


def test_ask_sends_the_request_with_cwd_stdout_stderr(paths: TemplatePaths) -> None:
    fake = FakeTemplate(Path(paths.socket), b"ok 0 77\n")
    request = template_client.build_request(["-address", "/a", "start"], b"options")
    reply = template_client.ask(paths, request)
    fake.close()
    assert (reply.status, reply.pid) == (0, 77)
    assert fake.got == request and fake.fds == 3
    decoded = decode_request(fake.got)
    assert decoded.argv[1:] == ["-address", "/a", "start"] and decoded.stdin == b"options"
    assert decoded.environ == dict(os.environ)
    assert decoded.cgroup == Path("/proc/self/cgroup").read_text()


def test_no_template_falls_back_quietly(paths: TemplatePaths,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template_client, "read_stdin", lambda: b"opts")
    monkeypatch.setattr(template_client, "template_paths", lambda *_: paths)
    assert template_client.via_template(["-address", "/a", "start"]) == b"opts"
    assert not Path(paths.log).exists()  # a node's first start is no news


def test_a_declining_template_falls_back_and_says_why(paths: TemplatePaths,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template_client, "read_stdin", lambda: b"opts")
    monkeypatch.setattr(template_client, "template_paths", lambda *_: paths)
    fake = FakeTemplate(Path(paths.socket), b"fallback the template's code changed (x.py)\n")
    assert template_client.via_template(["-address", "/a", "start"]) == b"opts"
    fake.close()
    assert "running start itself: the template's code changed (x.py)" in \
        Path(paths.log).read_text()


def test_a_template_that_hangs_up_is_a_fallback(paths: TemplatePaths,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template_client, "read_stdin", lambda: b"")
    monkeypatch.setattr(template_client, "template_paths", lambda *_: paths)
    fake = FakeTemplate(Path(paths.socket), b"")
    assert template_client.via_template(["start"]) == b""
    fake.close()
    assert "without an answer" in Path(paths.log).read_text()


def test_served_start_returns_the_templates_exit_status(paths: TemplatePaths,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template_client, "read_stdin", lambda: b"")
    monkeypatch.setattr(template_client, "template_paths", lambda *_: paths)
    fake = FakeTemplate(Path(paths.socket), b"ok 1 0\n")
    assert template_client.via_template(["start"]) == 1
    fake.close()


def test_a_held_lock_means_a_template_is_starting(paths: TemplatePaths) -> None:
    import fcntl

    assert not template_client.template_locked(paths)  # no lock file at all
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o600)
    assert not template_client.template_locked(paths)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert template_client.template_locked(paths)
    finally:
        os.close(fd)
    assert not template_client.template_locked(paths)


def test_the_shim_table_turns_the_template_off() -> None:
    assert ShimConfig().template is True
    off = shim_config(ConfigSource("[shim]\ntemplate = false\n", "t"))
    assert off.template is False
    with pytest.raises(InvalidArgument, match="template must be true or false"):
        shim_config(ConfigSource('[shim]\ntemplate = "no"\n', "t"))


def test_the_template_argv_is_the_daemons_interpreter_and_module_path() -> None:
    paths = TemplatePaths("/run/t", "abc")
    argv = template_client.template_argv(paths, ["/x"], 123)
    assert argv[1:3] == ["-IS", "-c"] and "sys.path[:] = ['/x']" in argv[3]
    assert template_client.TEMPLATE_ENTRY in argv[3]
    assert argv[4:] == ["/run/t/abc.sock", "/run/t/abc.lock", "/run/t/abc.log", "123"]


def test_the_fast_path_imports_only_built_in_modules() -> None:
    import subprocess
    import sys

    repo = str(Path(__file__).resolve().parents[3])
    probe = (f"import sys\nsys.path.insert(0, {repo!r})\nbefore = set(sys.modules)\n"
             "import shim.binary.template_client\n"
             "print(sorted(set(sys.modules) - before))\n")
    done = subprocess.run([sys.executable, "-IS", "-c", probe], capture_output=True, text=True,
                          timeout=30, check=True)
    added = eval(done.stdout)  # a printed list of names
    os_itself = {"os", "os.path", "posixpath", "genericpath", "stat", "_stat",
                 "_collections_abc"}  # what `os` is made of (`-S`: no site imported it)
    assert set(added) <= {"shim", "shim.binary", "shim.binary.template_client", "_socket",
                          "__future__", *os_itself}
