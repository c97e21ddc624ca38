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
