"""The committed *_pb2 modules are what `make protos` would generate from the .proto files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_generated_modules_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen-protos.py"), "--check"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, (
        f"gen-protos.py --check exited {result.returncode}:\n{result.stdout}{result.stderr}")
