"""The agent's command line: init's words are read without argparse (its import costs a TCG
boot ≈ 0.27 s) and exactly as argparse reads them; anything unusual goes to argparse."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from guest.agent.__main__ import _parse_fast, parse_args, parser

INIT = ["--vsock", "--wait-for", "/run/coco-modules-loaded", "--runtime", "crun",
        "--ready-vsock-port", "1029"]


@pytest.mark.parametrize("argv", [
    INIT,
    [*INIT, "--debug", "--vsock-port=2048"],
    ["--unix", "/tmp/a.sock", "--runc", "runc", "--no-manage-system", "--policy", "/p.json"],
    ["--unix=/tmp/a.sock", "--manage-system", "--state-dir", "/s", "--shared-root", "/r",
     "--resolv-conf", "/etc/r", "--cgroup-parent", "/x"],
    ["--vsock", "--confidential", "--initdata=none", "--refuse-for", "1.5", "--initdata-dir",
     "/x"],
    [],
])
def test_fast_path_reads_what_argparse_reads(argv: list[str]) -> None:
    fast = _parse_fast(argv)
    assert fast is not None
    assert fast == SimpleNamespace(**vars(parser().parse_args(argv)))


@pytest.mark.parametrize("argv", [
    ["--help"], ["--vsock-port", "not-a-port"], ["--unix"], ["--unknown"], ["-v"],
    ["--vsock=yes"], ["--unix", "--vsock"], ["--no-vsock"],
])
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert _parse_fast(argv) is None
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_init_command_line_does_not_import_argparse() -> None:
    code = ("import sys; from guest.agent.__main__ import parse_args; "
            f"a = parse_args({INIT!r}); print(a.runtime, 'argparse' in sys.modules)")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.split() == ["crun", "False"]
