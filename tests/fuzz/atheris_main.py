"""One coverage-guided fuzz process (atheris/libFuzzer) for one target of ``targets.py``.

    python -m tests.fuzz.atheris_main TARGET STATUS_FILE CRASH_DIR [libFuzzer flags] CORPUS

Our packages are instrumented for coverage; protobuf, asyncio and the rest are not. A crash (an
exception out of the target, or a :class:`~tests.fuzz.targets.Violation`) is recorded and the
run goes on: STATUS_FILE gets one JSON line per distinct crash (signature, exception, input
file), and the input is written to CRASH_DIR. libFuzzer itself prints ``Done N runs``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["protocols", "shim", "hypervisor", "tests.fuzz"]):
    from tests.fuzz import targets


def signature(err: BaseException) -> str:
    """Where the exception came from: its type and the innermost frame of our code (for an
    invariant violation caused by an exception, the cause's)."""
    if isinstance(err, targets.Violation) and err.__cause__ is not None:
        return f"Violation from {signature(err.__cause__)}"
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/site-packages/" not in f.filename and "/lib/python3" not in f.filename]
    where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
    return f"{type(err).__name__} at {where}"


def main() -> None:
    name, status_path, crash_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    target = targets.TARGETS[name]
    seen: set[str] = set()

    def one_input(data: bytes) -> None:
        try:
            target(data)
        except Exception as err:
            key = signature(err)
            if key in seen:
                return
            seen.add(key)
            digest = hashlib.sha256(data).hexdigest()[:16]
            crash_dir.mkdir(parents=True, exist_ok=True)
            path = crash_dir / f"{name}-{digest}"
            path.write_bytes(data)
            record = {"target": name, "signature": key, "input": str(path),
                      "error": "".join(traceback.format_exception_only(err)).strip()[:500]}
            with status_path.open("a") as status:
                status.write(json.dumps(record) + "\n")
            print(f"fuzz: CRASH {name}: {key}: {record['error']}", file=sys.stderr, flush=True)

    libfuzzer_argv = [sys.argv[0], *sys.argv[4:]]
    atheris.Setup(libfuzzer_argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
