"""Replay a crash input ``make fuzz`` saved: ``python -m tests.fuzz.replay FILE...``.

The file name starts with the target (``<target>-<digest>``); the exception is raised as is.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.fuzz.targets import TARGETS


def main(paths: list[str]) -> int:
    for name in paths:
        path = Path(name)
        target = path.name.rsplit("-", 1)[0]
        TARGETS[target](path.read_bytes())
        print(f"{path}: {target}: no crash")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
