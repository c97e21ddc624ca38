#!/usr/bin/env python3
"""The agent's start-up in instructions: a figure this shared, noisy machine cannot blur.

    python bench/guest_instructions.py IMAGE [NAME=IMAGE ...]

Under TCG a guest's time goes mostly to the instructions it executes, and the boot timeline's
"interpreter + imports" moves by ±30 % between rounds when other work shares the cores. This
counts them instead: each image (an initramfs of the reference guest) is unpacked, and its own
interpreter runs, in a chroot of it under valgrind's cachegrind (``I refs``: instructions
executed), what init's entry runs up to the agent's "imports done" (``to Check``), then also
the container machinery's imports (``to AgentService``), and ``python -S -c pass`` alone (the
interpreter's own start). The entry's start-up helpers are called if the image has them (older
images lack some), so the figures compare what each image's init really does; nothing is
written to the kernel log. Needs root (chroot, a bind mount of /proc) and valgrind.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest.image.cpio import read_initramfs

PYTHONPATH = "/opt/coco-guest:/usr/lib/python3/dist-packages"
# init's entry (guest/agent/entry.py main) without its kernel-log mark and the agent's main
ENTRY = (
    "import sys\n"
    "from guest.agent import entry\n"
    "for step in ('pause_gc', 'import_asyncio_without_ssl', 'defer_pure_python_protobuf'):\n"
    "    getattr(entry, step, lambda: None)()\n"
    "import guest.agent.__main__ as agent\n"
    "if sys.argv[1:] == ['machinery']:\n"
    "    agent.import_machinery()\n"
)
RUNS = {"interpreter alone": ["-c", "pass"], "to Check (imports done)": ["-c", ENTRY],
        "to AgentService (machinery imported)": ["-c", ENTRY, "machinery"]}
IREFS = re.compile(r"I\s+refs:\s+([\d,]+)")


@contextlib.contextmanager
def unpacked(image: Path) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="coco-bench-ir-"))
    proc = root / "proc"
    mounted = False
    try:
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"],
                       input=read_initramfs(image.read_bytes()), cwd=root, check=True)
        for rel in ("usr/libexec/valgrind", "usr/bin/valgrind.bin"):
            source = Path("/") / rel
            if source.is_dir():
                shutil.copytree(source, root / rel, symlinks=True)
            else:
                shutil.copy2(source, root / rel)
        proc.mkdir(exist_ok=True)
        subprocess.run(["mount", "--bind", "/proc", str(proc)], check=True)
        mounted = True
        yield root
    finally:
        if mounted:
            subprocess.run(["umount", str(proc)], check=True)
        shutil.rmtree(root)


def instructions(root: Path, args: list[str]) -> int:
    out = subprocess.run(
        [shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/usr/bin/valgrind.bin",
         "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
         "/usr/bin/python3.11", "-S", *args],
        env={"PYTHONPATH": PYTHONPATH, "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True, timeout=600,
    )
    found = IREFS.search(out.stderr)
    if found is None:
        raise RuntimeError(f"no I refs in valgrind's output:\n{out.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("image", type=Path)
    p.add_argument("others", nargs="*", metavar="NAME=IMAGE")
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install valgrind")
    images = {"image": args.image}
    for spec in args.others:
        name, _, path = spec.partition("=")
        images[name] = Path(path)
    counts: dict[str, dict[str, int]] = {}
    for name, image in images.items():
        with unpacked(image) as root:
            counts[name] = {label: instructions(root, run) for label, run in RUNS.items()}
    width = max(len(label) for label in RUNS)
    print(f"{'instructions (millions)':<{width}}  " + "  ".join(f"{n:>10}" for n in counts))
    for label in RUNS:
        cells = []
        for name in counts:
            value = counts[name][label] / 1e6
            ratio = counts[name][label] / counts["image"][label]
            cells.append(f"{value:7.1f}" + (f" {ratio:.2f}x" if name != "image" else "      "))
        print(f"{label:<{width}}  " + "  ".join(f"{c:>10}" for c in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
