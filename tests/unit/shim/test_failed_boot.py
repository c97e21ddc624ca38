"""The logs of a failed boot: kept (tails, bounded count and age) and named in the error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shim.core import failed_boot, paths
from shim.core.errors import Unavailable


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(paths.STATE_DIR_ENV, str(tmp_path / "state"))
    return tmp_path / "state"


def make_logs(folder: Path, size: int = 100) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "console.log").write_bytes(b"c" * (size - 4) + b"END\n")
    (folder / "qemu.stderr.log").write_text("qemu: warning\n")
    (folder / "unrelated.txt").write_text("not a log\n")
    return folder


def test_keep_copies_the_tails_and_the_error(state: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failed_boot, "LOG_TAIL", 16)
    logs = make_logs(tmp_path / "logs", size=1000)
    kept = failed_boot.keep("default", "pod1", logs, Unavailable("agent did not answer"))
    assert kept == state / ".failed-boots/default/pod1"
    assert sorted(p.name for p in kept.iterdir()) == ["console.log", "error.txt",
                                                      "qemu.stderr.log"]
    assert (kept / "console.log").read_bytes() == b"c" * 12 + b"END\n"  # the end, 16 bytes
    assert (kept / "error.txt").read_text() == "Unavailable: agent did not answer\n"
    assert failed_boot.keep("default", "pod2", tmp_path / "absent", Unavailable("x")) is None


def test_prune_bounds_count_and_age(state: Path, tmp_path: Path) -> None:
    base = failed_boot.root()
    for index in range(5):
        pod = base / "ns" / f"pod{index}"
        pod.mkdir(parents=True)
        os.utime(pod, (1000.0 + index, 1000.0 + index))
    failed_boot.prune(base, keep_pods=3, retention=100, now=1004.0)
    assert sorted(p.name for p in (base / "ns").iterdir()) == ["pod2", "pod3", "pod4"]
    failed_boot.prune(base, keep_pods=3, retention=1.5, now=1004.0)
    assert sorted(p.name for p in (base / "ns").iterdir()) == ["pod3", "pod4"]
    failed_boot.prune(base, keep_pods=3, retention=0.5, now=1010.0)
    assert not (base / "ns").exists()  # empty namespace folders go too


def test_kept_on_failure_names_the_folder(state: Path, tmp_path: Path) -> None:
    logs = make_logs(tmp_path / "logs")
    with pytest.raises(Unavailable) as info, failed_boot.kept_on_failure("ns", "p", logs):
        raise Unavailable("agent at hvsock:x:1024 did not answer within 30 s")
    assert str(info.value) == ("agent at hvsock:x:1024 did not answer within 30 s (console and "
                               f"QEMU logs kept in {state / '.failed-boots/ns/p'})")
    assert isinstance(info.value.__cause__, Unavailable)
    with pytest.raises(KeyError), failed_boot.kept_on_failure("ns", "q", logs):
        raise KeyError("a bug stays what it is")
    assert (state / ".failed-boots/ns/q/console.log").exists()
    with pytest.raises(Unavailable, match=r"^no logs$"), failed_boot.kept_on_failure(
            "ns", "r", tmp_path / "none"):
        raise Unavailable("no logs")
    with failed_boot.kept_on_failure("ns", "s", logs):
        pass
    assert not (state / ".failed-boots/ns/s").exists()
