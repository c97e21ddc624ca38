"""How the shim's own Python processes start: an isolated, site-less interpreter (``-I -S``) on
an explicit module path.

``site`` costs every start ≈ 15 ms here with the editable install (``python -c pass``: 22.3
against 7.7 ms with ``-IS``, min of 25), most of it the editable finder's imports; ``-m`` adds
``runpy``. containerd runs ``start`` once per container and waits
for the new daemon's first answer, so both skip them: the installed ``containerd-shim-coco-v2``
(:func:`render_launcher`, written by ``coco-shim install``) and the daemon ``start`` spawns
(:func:`daemon_argv`) run ``python -I -S`` with the module path the installing (or starting)
interpreter resolved, written out. ``-I`` also keeps the working directory (the bundle) and
``PYTHON*`` variables out of the daemon's imports; ``PYTHONPATH`` still counts, through the
starting interpreter's path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Final

# One shebang argument: the kernel passes everything after the interpreter as one word.
FLAGS: Final = ("-IS",)
# The package root: the directory holding ``shim`` (site-packages, or the source tree of an
# editable install, which only its finder in ``site`` would otherwise find).
ROOT: Final = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def module_path() -> list[str]:
    """This interpreter's module path as a site-less child needs it: its entries that exist
    (not the script's directory nor the working directory, not path hooks), in order, then
    the package root if none of them holds it."""
    entries = sys.path if sys.flags.safe_path else sys.path[1:]
    path: list[str] = []
    for entry in (*entries, ROOT):
        if entry and entry not in path and os.path.exists(entry):
            path.append(entry)
    return path


# ``start`` asks the node's template first (shim.binary.template_client: built-in modules
# only); everything else, and a ``start`` no template served, runs shim.__main__.main.
ENTRY_MAIN: Final = (
    "args = sys.argv[1:]\n"
    "served = None\n"
    "if args[-1:] == ['start']:\n"
    "    from shim.binary.template_client import via_template\n"
    "    served = via_template(args)\n"
    "    if isinstance(served, int):\n"
    "        sys.exit(served)\n"
    "from shim.__main__ import main\n"
    "sys.exit(main(args, stdin=served))\n")


def entry_code(path: Sequence[str]) -> str:
    """Python that sets the module path and runs ``containerd-shim-coco-v2``'s main (through
    ``start``'s template fast path, :mod:`shim.binary.template_client`), with the
    cyclic garbage collector off: start-up (≈ 280 modules for the daemon) makes no cyclic
    garbage, and collecting while importing costs ≈ 7 % of it. ``start`` and ``delete`` exit
    within milliseconds; the daemon turns it back on once it serves (:func:`collect_again`)."""
    return f"import gc, sys\ngc.disable()\nsys.path[:] = {list(path)!r}\n" + ENTRY_MAIN


def collect_again() -> None:
    """The daemon serves: what start-up made stays (``gc.freeze``: later collections skip it)
    and the collector runs again. Nothing to do where the entry code did not turn it off."""
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def daemon_argv(args: Sequence[str]) -> list[str]:
    """The daemon's command line: this interpreter, ``-I -S``, this process's module path."""
    return [sys.executable, *FLAGS, "-c", entry_code(module_path()), *args]


def render_launcher(python: str, path: Sequence[str]) -> str:
    """The installed ``containerd-shim-coco-v2``: ``python -I -S`` on ``path``."""
    return (f"#!{python} {' '.join(FLAGS)}\n"
            "# Written by `coco-shim install`; rerun it after moving or upgrading the shim.\n"
            + entry_code(path))
