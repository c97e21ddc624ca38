#!/usr/bin/env python3
"""`make bench-daemon`: the shim's own start-up and weight, side by side with containerd's runc
shim (containerd-shim-runc-v2 of the same containerd release), in one run, rounds interleaved.

The shim is measured as a node operator installs it: `coco-shim install` into a private prefix
(its `usr/local/bin/containerd-shim-coco-v2`, the launcher containerd finds on its PATH);
each round also times `start` through pip's console script in the venv (same code: what the
launcher saves); `--pip-script` measures only that instead (what the README's "before" figures
ran).

(1) `start`: the same argv and environment for both binaries (a bundle whose daemon is not
    running yet: both spawn one), wall time of the `start` process. Our shim twice per round,
    interleaved: through the node's template (`[shim] template = true`, the default: the
    template forks the daemon) and spawning it directly (`template = false`). The very first
    template start of the run is the cold one (no template yet: `start` spawns the daemon
    itself and launches the template) and is reported apart; the bench then waits for the
    template to serve before the rounds;
(2) the new daemon answers its first RPC: from `start`'s exit to a ttrpc Task.Connect answered
    (the socket is dialled at once and retried every millisecond while it is not there);
(3) daemon memory: RSS, PSS and USS (smaps_rollup) of N daemons serving at the same time
    (each idle: no container, no VM — what the daemon itself costs; a pod's VM is QEMU's, and
    `make bench` measures one daemon with a running pod), so PSS shares the interpreter and
    libraries between them as it does on a node with N pods. Template daemons share the
    template's pages: their per-daemon figure is (the sum of the N daemons' PSS + the
    template's PSS) / N, i.e. the template counted in full and divided among its daemons (PSS
    already splits each shared page among the processes mapping it, so the sum is what the
    N daemons and their template cost together);
(4) gRPC daemons (what containerd 1.7 talks to with `protocol = "auto"`), template off:
    `start`, the first gRPC call (Connect, grpclib's client) after it, and RSS/PSS/USS of
    --grpc-rounds of them serving at once; with --before, the other checkout's gRPC daemons
    interleaved in the same run.

No VM, no containerd: it runs in seconds (run it under `heavy` all the same: figures need a
quiet machine). The bench process plays containerd: the template watches it and exits with it.
Results are printed next to issue 18's baseline and target and written to
bench/daemon-results.json (or --out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from google.protobuf import empty_pb2

from protocols.api.containerd.task.v3 import shim_pb2 as task_v3
from protocols.ttrpc.client import Client
from shim.cli.install import LAUNCHER
from tests import envinfo
from tests.support import targets

TASK: str = "containerd.task.v3.Task"
PIP_SCRIPT = Path(sys.executable).parent / "containerd-shim-coco-v2"


def installed_shim(prefix: Path) -> Path:
    """``coco-shim install --prefix <prefix>`` (the real installer, every file it writes);
    the binary containerd would run."""
    done = subprocess.run([str(Path(sys.executable).parent / "coco-shim"), "install",
                           "--prefix", str(prefix)], capture_output=True, text=True,
                          timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"coco-shim install failed: {done.stdout} {done.stderr}")
    return prefix / LAUNCHER


def memory(pid: int) -> dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) of ``pid`` in MiB, from smaps_rollup."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    return {"rss_mib": fields["Rss"] / 1024, "pss_mib": fields["Pss"] / 1024,
            "uss_mib": (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024}


def settle(pid: int, timeout: float = 10) -> None:
    """Wait until the daemon has finished its start-up work (no CPU used for 100 ms), so that
    it does not compete with the next sample on this 2-core machine."""
    process = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    used = sum(process.cpu_times()[:2])
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = sum(process.cpu_times()[:2])
        if now == used:
            return
        used = now


class Bench:
    def __init__(self, base: Path, containerd_bin: Path, coco: Path) -> None:
        self.base = base
        self.coco = coco
        self.runc = containerd_bin / "containerd-shim-runc-v2"
        self.containerd = containerd_bin / "containerd"
        self.config = base / "config.toml"
        self.env = {**os.environ,
                    "TTRPC_ADDRESS": str(base / "containerd.sock.ttrpc"),
                    "COCO_SHIM_CONFIG": str(self.config),
                    "COCO_SHIM_SOCKET_DIR": str(base / "s"),
                    "COCO_SHIM_STATE_DIR": str(base / "state"),
                    "COCO_SHIM_RUN_DIR": str(base / "run"),
                    "COCO_SHIM_TEMPLATE_DIR": str(base / "templates")}
        self.serial = 0
        self.daemons: list[int] = []
        self.fifos: list[int] = []

    def start(self, binary: Path, protocol: str = "ttrpc", env: dict[str, str] | None = None,
              template: bool | None = False) -> tuple[float, str, Path]:
        """``template`` None: the profile does not name the key (a --before checkout may not
        know it)."""
        """Run ``<binary> … start`` for a new id; (seconds, the address it printed, bundle)."""
        self.serial += 1
        task_id = f"bench{os.getpid()}-{self.serial}"
        bundle = self.base / "bundles" / task_id
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps(
            {"ociVersion": "1.2.0", "process": {"args": ["true"], "cwd": "/"},
             "root": {"path": "rootfs"}, "annotations": {}}))
        # containerd makes the bundle's log FIFO and holds its read end (runc's daemon exits
        # without one); the logs stay in the pipe, a few lines each.
        os.mkfifo(bundle / "log")
        self.fifos.append(os.open(bundle / "log", os.O_RDONLY | os.O_NONBLOCK))
        key = "" if template is None else f'template = {"true" if template else "false"}\n'
        self.config.write_text(f'[shim]\nprotocol = "{protocol}"\nearly_boot = false\n{key}')
        argv = [str(binary), "-namespace", "bench", "-address", str(self.base / "containerd.sock"),
                "-publish-binary", str(self.containerd), "-id", task_id, "start"]
        t0 = time.perf_counter()
        done = subprocess.run(argv, cwd=bundle, env={**self.env, **(env or {})},
                              capture_output=True, text=True,
                              input="", timeout=30, check=False)
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{binary.name} start failed: {done.stdout} {done.stderr}")
        address = json.loads(done.stdout)["address"]
        return elapsed, address.removeprefix("unix://"), bundle

    async def first_rpc(self, path: str, task_id: str) -> tuple[float, int]:
        """Dial until the socket takes the connection, then Connect; (seconds, shim pid)."""
        t0 = time.perf_counter()
        deadline = t0 + 20
        while True:
            try:
                client = await Client.connect_unix(path, timeout=5)
                break
            except OSError:
                if time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(0.001)
        async with client:
            reply = await client.call(TASK, "Connect", task_v3.ConnectRequest(id=task_id),
                                      task_v3.ConnectResponse, timeout=20)
        return time.perf_counter() - t0, reply.shim_pid

    def shutdown(self, path: str, task_id: str, pid: int) -> None:
        async def ask() -> None:
            with contextlib.suppress(Exception):
                async with await Client.connect_unix(path, timeout=2) as client:
                    await client.call(TASK, "Shutdown", task_v3.ShutdownRequest(id=task_id),
                                      empty_pb2.Empty, timeout=5)

        asyncio.run(ask())
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def round(self, binary: Path, env: dict[str, str] | None = None,
              template: bool | None = False, protocol: str = "ttrpc") -> dict[str, Any]:
        """One start, its first RPC, and the daemon left serving (pid recorded). ``protocol``
        "grpc": containerd 1.7's transport (before grpclib, `start` waited for a gRPC daemon's
        readiness line)."""
        elapsed, path, bundle = self.start(binary, protocol=protocol, env=env,
                                           template=template)
        first = self.first_grpc_rpc if protocol == "grpc" else self.first_rpc
        rpc, pid = asyncio.run(first(path, bundle.name))
        self.daemons.append(pid)
        settle(pid)
        return {"start_s": elapsed, "first_rpc_s": rpc, "pid": pid, "path": path,
                "id": bundle.name}

    async def first_grpc_rpc(self, path: str, task_id: str) -> tuple[float, int]:
        """The same over gRPC (grpclib's client, h2 prior knowledge like containerd's)."""
        from grpclib.client import Channel, UnaryUnaryMethod

        t0 = time.perf_counter()
        deadline = t0 + 20
        while True:
            channel = Channel(path=path)
            try:
                connect = UnaryUnaryMethod(channel, f"/{TASK}/Connect", task_v3.ConnectRequest,
                                           task_v3.ConnectResponse)
                reply = await connect(task_v3.ConnectRequest(id=task_id), timeout=20)
                return time.perf_counter() - t0, reply.shim_pid
            except OSError:
                if time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(0.001)
            finally:
                channel.close()

    def stop(self, pid: int, path: str) -> None:
        """SIGTERM (the daemon's clean shutdown), SIGKILL if it lingers."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def template_pid(self, timeout: float = 30) -> int:
        """The template this bench process launched, once it serves."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for lock in (self.base / "templates").glob("*.lock"):
                text = lock.read_text().strip()
                if text.isdigit() and lock.with_suffix(".sock").exists():
                    return int(text)
            time.sleep(0.01)
        raise RuntimeError("no template serves: see " + " ".join(
            str(p) for p in (self.base / "templates").glob("*.log")))

    def close(self) -> None:
        for pid in self.daemons:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for fd in self.fifos:
            os.close(fd)


def row(name: str, ours: float, baseline: float | None, unit: str, target: str,
        was: str) -> str:
    ratio = f"{ours / baseline:5.2f}x" if baseline else "      "
    base = f"{baseline:8.1f} {unit}" if baseline is not None else " " * (9 + len(unit))
    return f"{name:<44} {ours:8.1f} {unit}  {base}  {ratio}  {target:<14} {was}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--daemons", type=int, default=10,
                        help="daemons serving at once for the memory figures")
    parser.add_argument("--grpc-rounds", type=int, default=5,
                        help="gRPC daemons started (and left serving at once) per column")
    parser.add_argument("--pip-script", action="store_true",
                        help=f"measure {PIP_SCRIPT} instead of the installed launcher")
    parser.add_argument("--before", type=Path, default=None, metavar="TREE",
                        help="also measure another checkout of the shim (pip's console "
                        "script with PYTHONPATH=TREE), interleaved: before/after in one run")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).with_name("daemon-results.json"))
    args = parser.parse_args()
    env = envinfo.load()
    base = Path(tempfile.mkdtemp(prefix="coco-bench-daemon-", dir="/tmp"))
    coco = PIP_SCRIPT if args.pip_script else installed_shim(base / "root")
    bench = Bench(base, env.containerd2_bin, coco)
    runc_base = base / "runc-root"
    try:
        samples: dict[str, list[dict[str, Any]]] = {"template": [], "coco": [], "runc": []}
        # Template off as on a node whose profile turns it off: no template runs for it (its
        # own, empty template directory), so `start` finds none and spawns the daemon.
        off = {"COCO_SHIM_TEMPLATE_DIR": str(base / "no-templates")}
        pairs: list[tuple[str, Path, dict[str, str]]] = [("template", coco, {}),
                                                         ("coco", coco, off),
                                                         ("runc", bench.runc, {})]
        # A warm-up (containerd's version and the profile's [shim] table cached, files in the
        # page cache), then the cold start: no template yet (this start spawns the daemon
        # itself and launches the template).
        warm = bench.round(coco, off, template=False)
        bench.shutdown(warm["path"], warm["id"], warm["pid"])
        cold = bench.round(coco, template=True)
        template_pid = bench.template_pid()
        bench.shutdown(cold["path"], cold["id"], cold["pid"])
        if not args.pip_script:  # start through pip's console script too, same code
            samples["pip"] = []
            pairs.append(("pip", PIP_SCRIPT, off))
        if args.before:
            samples["before"] = []
            pairs.append(("before", PIP_SCRIPT, {"PYTHONPATH": str(args.before.resolve())}))
        kept = [name for name in samples if name != "pip"]  # memory: daemons left serving
        for i in range(args.rounds):  # interleaved; the order rotates every round
            for name, binary, extra in pairs[i % len(pairs):] + pairs[:i % len(pairs)]:
                sample = bench.round(binary, extra, template=True if name == "template"
                                     else None if name == "before" else False)
                samples[name].append(sample)
                if i >= args.daemons or name not in kept:
                    bench.shutdown(sample["path"], sample["id"], sample["pid"])
        # The first --daemons of each are still serving: their memory, side by side.
        time.sleep(1)  # let the last daemons finish their start-up allocations
        mem = {name: [memory(s["pid"]) for s in samples[name][:args.daemons]]
               for name in kept}
        # The template and its spare intermediate (forked in advance, idle): both count.
        family = [memory(pid) for pid in (template_pid, *(
            child.pid for child in psutil.Process(template_pid).children()))]
        template_mem = {key: sum(part[key] for part in family) for key in family[0]}
        if not all(psutil.Process(s["pid"]).ppid() != template_pid
                   for s in samples["template"]):
            raise RuntimeError("a template daemon is still the template's child")
        for name in kept:
            for sample in samples[name][:args.daemons]:
                bench.shutdown(sample["path"], sample["id"], sample["pid"])
        # gRPC (containerd 1.7): start, first call and memory, interleaved with --before.
        grpc_pairs: list[tuple[str, Path, dict[str, str]]] = [("coco", coco, off),
                                                              ("template", coco, {})]
        if args.before:
            grpc_pairs.append(("before", PIP_SCRIPT,
                               {"PYTHONPATH": str(args.before.resolve())}))
        grpc: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in grpc_pairs}
        for i in range(args.grpc_rounds):
            for name, binary, extra in grpc_pairs[i % len(grpc_pairs):] + grpc_pairs[
                    :i % len(grpc_pairs)]:
                grpc[name].append(bench.round(
                    binary, extra, template=None if name == "before" else name == "template",
                    protocol="grpc"))
        time.sleep(1)
        grpc_mems = {name: [memory(s["pid"]) for s in grpc[name]] for name in grpc}
        for name in grpc:
            for sample in grpc[name]:
                bench.stop(sample["pid"], sample["path"])
    finally:
        bench.close()
        # runc's shim keeps its sockets under /run/containerd/s: ours were named from our ids.
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(runc_base, ignore_errors=True)

    def med(name: str, key: str) -> float:
        return float(statistics.median(s[key] for s in samples[name])) * 1000

    def mmed(name: str, key: str) -> float:
        return statistics.median(m[key] for m in mem[name])

    n_template = len(mem["template"])
    template_share = (sum(m["pss_mib"] for m in mem["template"]) + template_mem["pss_mib"]) \
        / n_template

    def gmed(name: str, key: str) -> float:
        return float(statistics.median(s[key] for s in grpc[name])) * 1000

    def gmem(name: str, key: str) -> float:
        return statistics.median(m[key] for m in grpc_mems[name])

    results = {
        "command": " ".join([sys.executable, *sys.argv]), "rounds": args.rounds,
        "daemons": args.daemons, "runc": str(bench.runc), "coco": str(coco),
        "start_ms": {n: [s["start_s"] * 1000 for s in samples[n]] for n in samples},
        "first_rpc_ms": {n: [s["first_rpc_s"] * 1000 for s in samples[n]] for n in samples},
        "memory_mib": mem,
        "template_memory_mib": template_mem, "template_pss_per_daemon_mib": template_share,
        "cold_template_start_ms": cold["start_s"] * 1000,
        "cold_template_first_rpc_ms": cold["first_rpc_s"] * 1000,
        "before": str(args.before) if args.before else None,
        "grpc": {name: {"start_ms": [s["start_s"] * 1000 for s in grpc[name]],
                        "first_rpc_ms": [s["first_rpc_s"] * 1000 for s in grpc[name]],
                        "memory_mib": grpc_mems[name]} for name in grpc},
    }
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'figure (medians, ' + str(args.rounds) + ' interleaved rounds)':<44} "
          f"{'coco':>11}  {'runc shim':>11}  ratio  {'target':<14} issue 18 baseline")
    print(row("`start`, template forks the daemon", med("template", "start_s"),
              med("runc", "start_s"), "ms", "≤ 2.5x", "76 vs 11.8 ms: 6.7x"))
    print(row("`start`, cold: launches the template", cold["start_s"] * 1000,
              med("runc", "start_s"), "ms", "(once)", "(first start of the run)"))
    print(row("`start`, spawns the daemon (template off)", med("coco", "start_s"),
              med("runc", "start_s"), "ms", "≤ 2.5x", ""))
    if "pip" in samples:
        print(row("`start` through pip's console script", med("pip", "start_s"),
                  med("runc", "start_s"), "ms", "", "(the venv's, editable)"))
    print(row("first RPC after `start` exits, template", med("template", "first_rpc_s"),
              med("runc", "first_rpc_s"), "ms", "≤ 100 ms", "303 ms (runc 19)"))
    print(row("first RPC after `start` exits, template off", med("coco", "first_rpc_s"),
              med("runc", "first_rpc_s"), "ms", "≤ 100 ms", ""))
    print(row(f"daemon PSS, {n_template} template daemons + template / {n_template}",
              template_share, mmed("runc", "pss_mib"), "MiB", "≤ 12 MiB/pod",
              "20.0 MiB (runc 5.6)"))
    print(row("  (median daemon PSS alone; template + spare PSS)", mmed("template", "pss_mib"),
              template_mem["pss_mib"], "MiB", "", ""))
    print(row(f"daemon PSS, {args.daemons} serving at once, template off",
              mmed("coco", "pss_mib"), mmed("runc", "pss_mib"), "MiB", "≤ 12 MiB/pod", ""))
    print(row(f"daemon USS, {args.daemons} serving, template", mmed("template", "uss_mib"),
              mmed("runc", "uss_mib"), "MiB", "", "19.2 MiB"))
    print(row(f"daemon USS, {args.daemons} serving, template off", mmed("coco", "uss_mib"),
              mmed("runc", "uss_mib"), "MiB", "", ""))
    print(row(f"daemon RSS, {args.daemons} serving, template off", mmed("coco", "rss_mib"),
              mmed("runc", "rss_mib"), "MiB", "", ""))
    print(f"gRPC daemons (containerd 1.7's transport), {args.grpc_rounds} serving at once:")
    print(row("  gRPC `start`", gmed("coco", "start_s"), med("runc", "start_s"), "ms", "",
              ""))
    print(row("  gRPC first call (Connect) after `start`", gmed("coco", "first_rpc_s"), None,
              "ms", "", ""))
    print(row("  gRPC daemon RSS", gmem("coco", "rss_mib"), None, "MiB", "≤ 30 MiB",
              "44.2 MiB (with a pod)"))
    print(row("  gRPC daemon PSS", gmem("coco", "pss_mib"), None, "MiB", "", ""))
    print(row("  gRPC daemon USS", gmem("coco", "uss_mib"), None, "MiB", "", ""))
    print(row("  gRPC `start`, template forks the daemon", gmed("template", "start_s"),
              med("runc", "start_s"), "ms", "", ""))
    print(row("  gRPC first call after `start`, template", gmed("template", "first_rpc_s"),
              None, "ms", "", ""))
    print(row("  gRPC daemon RSS, template", gmem("template", "rss_mib"), None, "MiB",
              "≤ 30 MiB", "(shared pages count whole)"))
    print(row("  gRPC daemon PSS alone, template", gmem("template", "pss_mib"), None, "MiB",
              "", ""))
    print(row("  gRPC daemon USS, template", gmem("template", "uss_mib"), None, "MiB", "", ""))
    if args.before:
        print(f"--before {args.before} (pip's console script), same run, same runc column:")
        print(row("  `start`", med("before", "start_s"), med("runc", "start_s"), "ms", "", ""))
        print(row("  first RPC", med("before", "first_rpc_s"), med("runc", "first_rpc_s"),
                  "ms", "", ""))
        print(row("  daemon PSS", mmed("before", "pss_mib"), mmed("runc", "pss_mib"), "MiB",
                  "", ""))
        print(row("  daemon USS", mmed("before", "uss_mib"), mmed("runc", "uss_mib"), "MiB",
                  "", ""))
        for label, key, unit, value in (
                ("gRPC `start`", "start_s", "ms", gmed),
                ("gRPC first call after `start`", "first_rpc_s", "ms", gmed),
                ("gRPC daemon RSS", "rss_mib", "MiB", gmem),
                ("gRPC daemon PSS", "pss_mib", "MiB", gmem),
                ("gRPC daemon USS", "uss_mib", "MiB", gmem)):
            now, was = value("coco", key), value("before", key)
            print(f"  {label:<42} {was:8.1f} {unit} before → {now:8.1f} {unit} now "
                  f"({now / was:.2f}x)")
    start_ratio = med("template", "start_s") / med("runc", "start_s")
    first_rpc, grpc_rss = med("template", "first_rpc_s"), gmem("template", "rss_mib")
    print(f"\n{targets.HEADER} (the defaults: the template forks the daemon)")
    print(targets.line("start_ratio", start_ratio, f"{start_ratio:.2f}x"))
    print(targets.line("first_rpc_ms", first_rpc, f"{first_rpc:.1f} ms"))
    print(targets.line("daemon_pss_per_pod_mib", template_share, f"{template_share:.1f} MiB",
                       of=f"{n_template} daemons + the template's share"))
    print(targets.line("grpc_daemon_rss_mib", grpc_rss, f"{grpc_rss:.1f} MiB", of="idle"))
    print(f"raw samples: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
