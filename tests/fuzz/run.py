"""``make fuzz``: coverage-guided fuzzing of every decoder that reads bytes the shim does not
control, at least 10⁶ inputs in all, bounded in time and memory.

    python -m tests.fuzz.run [--inputs 1000000] [--max-time 1200] [--rss-limit-mb 512]
                             [--target NAME ...]

Each target of ``tests/fuzz/targets.py`` runs in its own atheris (libFuzzer) process with an
equal share of the inputs and of the time, starting from well-formed seeds. libFuzzer stops a
process at ``--rss-limit-mb`` (an out-of-memory finding); its peak RSS (from ``wait4``) is
reported per target and asserted below the bound. The last line is
``fuzz: <N> inputs, <C> crashes``; each crash is printed with the file holding its input
(replay: ``python -m tests.fuzz.replay FILE``). Exit status 1 when anything crashed, ran out of
memory, or fewer inputs than asked ran within the time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.fuzz.targets import TARGETS, seeds

REPO = Path(__file__).resolve().parents[2]
DONE = re.compile(rb"Done (\d+) runs in (\d+) second")
MAX_LEN = 8192  # longest generated input (bytes); a 4 GiB frame header needs only 10


@dataclass
class Outcome:
    target: str
    inputs: int = 0
    seconds: float = 0.0
    peak_rss_mib: float = 0.0
    crashes: list[dict[str, str]] = field(default_factory=list)
    problem: str = ""  # the process itself failed (OOM, libFuzzer error)


def fuzz_one(target: str, runs: int, max_time: int, rss_limit_mb: int, work: Path,
             crash_dir: Path) -> Outcome:
    corpus = work / f"corpus-{target}"
    corpus.mkdir()
    for index, seed in enumerate(seeds(target)):
        (corpus / f"seed-{index}").write_bytes(seed)
    status = work / f"status-{target}.jsonl"
    status.touch()
    log = work / f"libfuzzer-{target}.log"
    argv = [sys.executable, "-m", "tests.fuzz.atheris_main", target, str(status), str(crash_dir),
            f"-runs={runs}", f"-max_total_time={max_time}", f"-max_len={MAX_LEN}",
            f"-rss_limit_mb={rss_limit_mb}", "-print_final_stats=1", "-seed=1",
            str(corpus)]
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONPATH": str(REPO)})
        _, wait_status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(wait_status)
    outcome = Outcome(target, seconds=time.monotonic() - started,
                      peak_rss_mib=usage.ru_maxrss / 1024)
    text = log.read_bytes()
    done = DONE.findall(text)
    if done:
        outcome.inputs = int(done[-1][0])
    outcome.crashes = [json.loads(line) for line in status.read_text().splitlines() if line]
    if process.returncode != 0:
        tail = text.decode(errors="replace").strip().splitlines()[-15:]
        outcome.problem = (f"libFuzzer process exited {process.returncode} (log {log}):\n  "
                           + "\n  ".join(tail))
    return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="in all, shared equally")
    parser.add_argument("--max-time", type=int, default=1200, help="seconds in all")
    parser.add_argument("--rss-limit-mb", type=int, default=512)
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    parser.add_argument("--work", type=Path,
                        help="keep corpora and logs here (default: a temp dir, removed after "
                             "a clean run)")
    args = parser.parse_args(argv)

    names = args.target or list(TARGETS)
    runs = -(-args.inputs // len(names))
    max_time = max(1, args.max_time // len(names))
    work = args.work or Path(tempfile.mkdtemp(prefix="coco-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    crash_dir = work / "crashes"
    print(f"fuzz: {len(names)} targets, {runs} inputs and at most {max_time}s each, "
          f"RSS limit {args.rss_limit_mb} MiB, work dir {work}", flush=True)

    outcomes = []
    for name in names:
        outcome = fuzz_one(name, runs, max_time, args.rss_limit_mb, work, crash_dir)
        outcomes.append(outcome)
        print(f"fuzz: {name}: {outcome.inputs} inputs in {outcome.seconds:.0f}s "
              f"({outcome.inputs / max(outcome.seconds, 1e-9):.0f}/s), "
              f"peak RSS {outcome.peak_rss_mib:.0f} MiB, {len(outcome.crashes)} crashes",
              flush=True)
        for crash in outcome.crashes:
            print(f"fuzz:   CRASH {crash['signature']}\n    {crash['error']}\n"
                  f"    input: {crash['input']}", flush=True)
        if outcome.problem:
            print(f"fuzz:   {outcome.problem}", flush=True)

    total = sum(o.inputs for o in outcomes)
    crashes = sum(len(o.crashes) for o in outcomes) + sum(bool(o.problem) for o in outcomes)
    peak = max(o.peak_rss_mib for o in outcomes)
    failed = crashes > 0
    if peak > args.rss_limit_mb:
        print(f"fuzz: peak RSS {peak:.0f} MiB above the bound of {args.rss_limit_mb} MiB")
        failed = True
    if total < args.inputs:
        print(f"fuzz: only {total} of {args.inputs} inputs ran within {args.max_time}s")
        failed = True
    print(f"fuzz: peak RSS {peak:.0f} MiB (bound {args.rss_limit_mb} MiB), "
          f"{sum(o.seconds for o in outcomes):.0f}s")
    if args.work is None and not failed:
        shutil.rmtree(work)  # nothing to replay; a failed run keeps its inputs and logs
    print(f"fuzz: {total} inputs, {crashes} crashes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
