"""The shim's interpreter command lines: -I -S on an explicit module path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shim.core import interpreter

REPO = Path(__file__).resolve().parents[3]


def test_module_path_keeps_order_drops_missing_hooks_and_the_script_dir(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    monkeypatch.setattr(sys, "path", ["/script/dir", str(second), "", str(tmp_path / "gone"),
                                      "__editable__.finder.__path_hook__", str(first),
                                      str(second)])
    assert interpreter.module_path() == [str(second), str(first), str(REPO)]


def test_daemon_argv_runs_main_isolated_without_site() -> None:
    argv = interpreter.daemon_argv(["-v"])
    assert argv[:3] == [sys.executable, "-IS", "-c"] and argv[4:] == ["-v"]
    done = subprocess.run([*argv[:4], "-h"], cwd="/", env={}, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: containerd-shim-coco-v2")


def test_launcher_is_python_isolated_without_site_on_the_path() -> None:
    text = interpreter.render_launcher("/opt/py/bin/python3", ["/x", "/y"])
    assert text.splitlines()[0] == "#!/opt/py/bin/python3 -IS"
    assert "sys.path[:] = ['/x', '/y']\n" in text
    compile(text, "launcher", "exec")


def test_the_daemon_turns_the_collector_back_on_once_it_serves(tmp_path: Path) -> None:
    """The entry code turns the cyclic collector off for start-up; collect_again (called by
    the daemon once it serves) freezes what start-up made and turns it on; where the collector
    was never off (tests, coco-shim), it changes nothing."""
    code = interpreter.entry_code(interpreter.module_path()).replace(
        interpreter.ENTRY_MAIN,
        "off = not gc.isenabled()\n"
        "from shim.core.interpreter import collect_again\n"
        "collect_again()\n"
        "print(off, gc.isenabled(), gc.get_freeze_count() > 0)\n")
    done = subprocess.run([sys.executable, "-IS", "-c", code], capture_output=True, text=True,
                          timeout=30, check=True)
    assert done.stdout.split() == ["True", "True", "True"]
    import gc

    frozen = gc.get_freeze_count()
    interpreter.collect_again()
    assert gc.isenabled() and gc.get_freeze_count() == frozen
