#!/usr/bin/env python3
"""`make bench-stdout`: where a container's stdout throughput goes, stage by stage, side by side.

One run on the development profile under TCG (containerd 2.1.9, the reference guest image, the
same profile file for every stage), N interleaved rounds of:

(a) the whole path: ``ctr run --rm … sh -c 'head -c 64M /dev/zero'`` through containerd, the
    shim's relay and containerd's FIFO reader, ``ctr``'s stdout read here (bench/run.py's
    row (d)); timed from the first byte to end of file, and as the whole run minus a ``true``
    run of the same round;
(b) the guest alone, in one VM booted directly from the profile (the shim's launch code, its
    9p share, its agent client), in a container that sees the guest's own Python: ``head`` into
    /dev/null (the writer's floor), ``head | cat`` (a pipe read by C), ``head`` read by the
    agent's own OutputBuffer (guest/agent/stdio.py, 1 MiB reads, data dropped), and the same
    plus what the agent does per chunk before the socket (ReadStreamResponse, ttrpc Response,
    frame);
(c) the vsock path, same VM: the guest's Python writing 64 MiB to a host vsock port (hybrid
    vsock through vhost-device-vsock, the host reading and dropping: no agent protocol), and the
    agent's ReadStdout of a ``head -c 64M /dev/zero`` container read by the shim's AgentClient
    and dropped, one read ahead as the relay reads (no relay, no FIFO, no containerd);
(d) the shim's share: (a) against (c)'s ReadStdout.

Every stream is counted to the byte; the agent's path is also checked for order with random
bytes (a file on the share, SHA-256 compared) once per round. Raw samples go to
bench/stdout-path-results.json. Run under ``heavy`` (it boots VMs and runs containerd).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypervisor.config import load_profile
from hypervisor.vm import LaunchOptions, QemuVm, launch_vm
from protocols.api.kata import oci_pb2
from shim.pod.agent import READ_CHUNK, AgentClient
from shim.pod.rootfs import GUEST_SHARED, HostShare
from tests import envinfo
from tests.e2e.conftest import shim_env
from tests.integration.guest.support import make_busybox_rootfs, spec
from tests.support.containerd import Containerd, coco_processes, private_containerd
from tests.support.guest import dev_profile_text, guest_image
from tests.support.images import BUSYBOX_REF, busybox_oci_archive

RUNTIME = "io.containerd.coco.v2"
RAW_PORT = 5001  # the host vsock port the guest writes raw bytes to
CHECK_MIB = 16  # the random file whose SHA-256 proves the agent's path keeps order
GUEST_DIRS = ("usr", "lib", "lib64", "opt/coco-guest")  # the guest's Python, bound read-only
GUEST_PYTHON = ("PYTHONPATH=/opt/coco-guest:/usr/lib/python3/dist-packages "
                "exec /usr/bin/python3.11 -S /probe.py")

# Runs in the guest (its own Python, its agent's modules); one JSON line per figure.
PROBE = r'''
import asyncio, json, os, socket, subprocess, sys, time
size, port = int(sys.argv[1]), int(sys.argv[2])
head = f"head -c {size} /dev/zero"

def report(name, seconds, count, reads=0):
    if count != size:
        raise SystemExit(f"{name}: {count} bytes, not {size}")
    print(json.dumps({"stage": name, "s": seconds, "reads": reads}), flush=True)

def shell(name, command):
    started = time.perf_counter()
    subprocess.run(["sh", "-c", command], check=True)
    report(name, time.perf_counter() - started, size)

async def agent_reader(encode):
    """The agent's read side as this image's agent does it (its pipe grown if it grows
    them); with encode, also what it does per reply before the socket."""
    from guest.agent import stdio
    from protocols.api.kata import agent_pb2
    from protocols.api.google.rpc.status_pb2 import Status
    from protocols.api.ttrpc.ttrpc_pb2 import Response
    from protocols.ttrpc.frame import FrameType, encode_frame
    started = time.perf_counter()
    read, write = os.pipe()
    if hasattr(stdio, "grow_pipe"):
        stdio.grow_pipe(read)
    child = subprocess.Popen(head.split(), stdout=write)
    os.close(write)
    buffer = stdio.OutputBuffer(read)
    count = reads = 0
    while data := await buffer.read(stdio.DEFAULT_LIMIT):
        count += len(data)
        reads += 1
        if encode:
            reply = agent_pb2.ReadStreamResponse(data=data).SerializeToString()
            body = Response(status=Status(code=0), payload=reply).SerializeToString()
            encode_frame(1, FrameType.RESPONSE, 0, body)
    child.wait()
    return time.perf_counter() - started, count, reads

def vsock_raw():
    piece = bytes(1 << 20)
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    sock.connect((socket.VMADDR_CID_HOST, port))
    started = time.perf_counter()
    for _ in range(size >> 20):
        sock.sendall(piece)
    sock.recv(1)  # the host answers once it has read everything (no half-close here)
    report("vsock raw (guest clock)", time.perf_counter() - started, size)

shell("head > /dev/null", f"{head} > /dev/null")
shell("head | cat > /dev/null", f"{head} | cat > /dev/null")
report("head | agent OutputBuffer", *asyncio.run(agent_reader(False)))
report("head | agent OutputBuffer + encoding", *asyncio.run(agent_reader(True)))
vsock_raw()
'''


def median(values: list[float]) -> float:
    return statistics.median(values)


def settle(cd: Containerd, base: Path, timeout: float = 60) -> None:
    """Until the previous sample's pod is gone (a QEMU still stopping slows the next one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not [pid for pid in coco_processes(base) if pid != cd.process.pid]:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the previous sample's pod did not go away in {timeout:g} s")


def whole_path(cd: Containerd, name: str, size: int) -> dict[str, float]:
    """(a): ``ctr run`` of the 64 MiB writer, its stdout read here; seconds for the run and
    from the first byte to end of file."""
    argv = [str(cd.bin_dir / "ctr"), "--address", str(cd.address), "--namespace", "default",
            "run", "--rm", "--runtime", RUNTIME, BUSYBOX_REF, name,
            "sh", "-c", f"head -c {size} /dev/zero"]
    started = time.monotonic()
    first = 0.0
    count = 0
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=cd.env()) as ctr:
        assert ctr.stdout is not None
        while chunk := os.read(ctr.stdout.fileno(), 1 << 20):
            if not count:
                first = time.monotonic()
            if chunk.count(0) != len(chunk):
                raise RuntimeError("(a): stdout is not the zeros written")
            count += len(chunk)
        ended = time.monotonic()
        _, err = ctr.communicate(timeout=300)
    if ctr.returncode != 0 or count != size:
        raise RuntimeError(f"(a): ctr run gave {count} bytes, exit {ctr.returncode}: "
                           f"{err.decode(errors='replace')[-500:]}")
    return {"run_s": time.monotonic() - started, "stream_s": ended - first}


def ctr_true(cd: Containerd, name: str) -> float:
    started = time.monotonic()
    cd.ctr("run", "--rm", "--runtime", RUNTIME, BUSYBOX_REF, name, "true", timeout=300)
    return time.monotonic() - started


def probe_rootfs(share: Path, check: bytes) -> Path:
    """The probe containers' rootfs on the 9p share: static busybox, the probe script, mount
    points for the guest's Python, the random file for the order check."""
    root = make_busybox_rootfs(share / "probe" / "rootfs")
    for applet in ("dd", "wc"):
        (root / "bin" / applet).symlink_to("busybox")
    for sub in GUEST_DIRS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "probe.py").write_text(PROBE)
    (root / "check.bin").write_bytes(check)
    return root


def probe_spec(args: list[str]) -> oci_pb2.Spec:
    message = spec(f"{GUEST_SHARED}/probe/rootfs", args)
    for sub in GUEST_DIRS:
        message.Mounts.append(oci_pb2.Mount(destination=f"/{sub}", type="bind",
                                            source=f"/{sub}", options=["rbind", "ro"]))
    return message


@dataclass
class Output:
    """A probe container's stdout as the host client read it."""

    head: bytes  # its first MiB (the guest probe's report is a few lines)
    count: int
    replies: int  # ReadStdout replies that carried data
    sha256: str
    from_start_s: float  # StartContainer to end of file
    stream_s: float  # first byte to end of file
    status: int


async def run_container(agent: AgentClient, cid: str, args: list[str], *,
                        ahead: bool = True) -> Output:
    """Create and start a container and read its stdout with the shim's AgentClient, data
    dropped: with ``ahead``, the next read is in flight while the last chunk is handled (as
    the relay reads); without, one read at a time."""
    await agent.create_container(cid, probe_spec(args), [])
    head = bytearray()
    count = replies = 0
    digest = hashlib.sha256()
    try:
        started = time.monotonic()
        await agent.start_container(cid)
        first = 0.0
        pending = asyncio.ensure_future(agent.read_stdout(cid, "", READ_CHUNK))
        while data := await pending:
            if ahead:
                pending = asyncio.ensure_future(agent.read_stdout(cid, "", READ_CHUNK))
            if not count:
                first = time.monotonic()
            count += len(data)
            replies += 1
            digest.update(data)
            if len(head) < 1 << 20:
                head += data
            if not ahead:
                pending = asyncio.ensure_future(agent.read_stdout(cid, "", READ_CHUNK))
        ended = time.monotonic()
        status = await agent.wait_process(cid, "")
    finally:
        await agent.remove_container(cid)
    return Output(bytes(head[:1 << 20]), count, replies, digest.hexdigest(), ended - started,
                  ended - first, status)


@contextlib.asynccontextmanager
async def raw_listener(vm: QemuVm, size: int) -> AsyncIterator[dict[str, float]]:
    """The host end of (c)'s raw stream: vhost-device-vsock hands a guest connection to host
    port RAW_PORT to ``<uds>_<port>``; read and dropped, timed from accept to the last byte,
    then answered with one byte (vhost-device-vsock does not pass a half-close on)."""
    assert vm.channel is not None and vm.channel.hybrid_socket is not None
    path = Path(f"{vm.channel.hybrid_socket}_{RAW_PORT}")
    result: dict[str, float] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        started = time.monotonic()
        count = 0
        while count < size and (data := await reader.read(1 << 20)):
            count += len(data)
        result["s"] = time.monotonic() - started
        result["bytes"] = count
        writer.write(b"k")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, str(path), limit=1 << 20)
    try:
        yield result
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.to_thread(path.unlink, missing_ok=True)


async def direct_vm(profile_path: Path, work: Path, vhost: Path, size: int,
                    check: bytes) -> dict[str, float]:
    """(b) and (c) in one VM booted from the profile as the shim boots a pod's."""
    share = work / "shared"
    host_share = HostShare(share)
    await host_share.open()
    probe_rootfs(share, check)
    vm = await launch_vm(load_profile(profile_path), LaunchOptions(
        run_root=work / "run", name="stdout-probe", accel="tcg", vhost_device_vsock=vhost,
        log_dir=work / "logs", shares=host_share.vm_shares()))
    figures: dict[str, float] = {}
    try:
        assert vm.channel is not None
        agent = await AgentClient.dial(vm.channel, dial_timeout=120)
        try:
            await agent.create_sandbox("stdout-probe", "stdout-probe", [],
                                       host_share.sandbox_storages())
            # (c) the agent's ReadStdout, no relay: the same writer as (a)
            zeros = hashlib.sha256(bytes(size)).hexdigest()
            flood = ["sh", "-c", f"head -c {size} /dev/zero"]
            for label, ahead in (("one ahead", True), ("one at a time", False)):
                out = await run_container(agent, f"readstdout-{ahead}", flood, ahead=ahead)
                if out.count != size or out.sha256 != zeros or out.status != 0:
                    raise RuntimeError(f"(c) ReadStdout {label}: {out.count} bytes (zeros: "
                                       f"{out.sha256 == zeros}), exit {out.status}")
                figures[f"ReadStdout, {label}"] = out.stream_s
                figures[f"ReadStdout, {label}, from StartContainer"] = out.from_start_s
                figures[f"ReadStdout, {label}: replies"] = out.replies
            # order: random bytes through the same path, SHA-256 compared
            out = await run_container(agent, "order", ["cat", "/check.bin"])
            if out.status != 0 or out.sha256 != hashlib.sha256(check).hexdigest():
                raise RuntimeError("(c) ReadStdout lost or reordered bytes of the random file")
            # (b) and (c) raw, measured by the guest's Python
            async with raw_listener(vm, size) as raw:
                out = await run_container(
                    agent, "guest", ["sh", "-c", f"{GUEST_PYTHON} {size} {RAW_PORT}"])
            if out.status != 0:
                raise RuntimeError(f"guest probe failed (exit {out.status}): {out.head!r}")
            for line in out.head.decode().splitlines():
                row = json.loads(line)
                figures[row["stage"]] = row["s"]
                if row["reads"]:
                    figures[f"{row['stage']}: reads"] = row["reads"]
            if raw.get("bytes") != size:
                raise RuntimeError(f"(c) raw vsock: the host read {raw} bytes, not {size}")
            figures["vsock raw (host clock)"] = raw["s"]
        finally:
            await agent.close()
    finally:
        await vm.aclose()
        shutil.rmtree(share, ignore_errors=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--containerd", default="2.1.9")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).with_name("stdout-path-results.json"))
    parser.add_argument("--baseline-initrd", type=Path,
                        help="another guest image (e.g. main's) whose (b) and (c) run in each "
                             "round too, for a before/after side by side")
    args = parser.parse_args()
    size = args.mib << 20
    env = envinfo.load()
    base = Path(tempfile.mkdtemp(prefix=f"coco-bench-stdout-{os.getpid()}-", dir="/tmp"))
    samples: dict[str, list[float]] = {}
    try:
        image = guest_image()
        profile = base / "profile.toml"
        profile.write_text(dev_profile_text(env.kernel, image.image))
        before = base / "profile-baseline.toml"
        if args.baseline_initrd:
            before.write_text(dev_profile_text(env.kernel, args.baseline_initrd.resolve()))
        shim_vars = shim_env(base, profile)
        with private_containerd(args.containerd, env=shim_vars, log_level="info",
                                extra_path=[Path(sys.executable).parent,
                                            env.vhost_device_vsock.parent]) as cd:
            cd.ctr("images", "import", "--platform", "linux/amd64",
                   str(busybox_oci_archive(base / "busybox.tar")))
            for i in range(args.runs):
                settle(cd, base)
                true_s = ctr_true(cd, f"true-{i}")
                settle(cd, base)
                whole = whole_path(cd, f"flood-{i}", size)
                settle(cd, base)
                work = base / f"direct-{i}"
                work.mkdir()
                figures = asyncio.run(direct_vm(profile, work, env.vhost_device_vsock, size,
                                                os.urandom(CHECK_MIB << 20)))
                if args.baseline_initrd:
                    work = base / f"baseline-{i}"
                    work.mkdir()
                    old = asyncio.run(direct_vm(before, work, env.vhost_device_vsock, size,
                                                os.urandom(CHECK_MIB << 20)))
                    figures.update({f"before: {name}": value for name, value in old.items()})
                figures["ctr run, first byte to EOF"] = whole["stream_s"]
                figures["ctr run minus a true run"] = whole["run_s"] - true_s
                for name, value in figures.items():
                    samples.setdefault(name, []).append(value)
                print(f"round {i + 1}/{args.runs}: " + ", ".join(
                    f"{name} {value:.0f}" if name.endswith(("replies", "reads"))
                    else f"{name} {value:.2f} s" for name, value in figures.items()), flush=True)
    finally:
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)

    results: dict[str, Any] = {"mib": args.mib, "runs": args.runs, "samples": samples,
                               "command": " ".join([sys.executable, *sys.argv])}
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    rows = [
        ("(a) whole path: ctr run, first byte to EOF", "ctr run, first byte to EOF"),
        ("(a) whole path: ctr run minus a true run", "ctr run minus a true run"),
        ("(b) guest: head > /dev/null (writer floor)", "head > /dev/null"),
        ("(b) guest: head | cat > /dev/null", "head | cat > /dev/null"),
        ("(b) guest: head | agent's OutputBuffer", "head | agent OutputBuffer"),
        ("(b) guest: ... + ReadStdout reply encoding", "head | agent OutputBuffer + encoding"),
        ("(c) vsock raw, guest Python → host (host clock)", "vsock raw (host clock)"),
        ("(c) vsock raw (guest clock)", "vsock raw (guest clock)"),
        ("(c) agent ReadStdout → host client, one ahead", "ReadStdout, one ahead"),
        ("(c) agent ReadStdout → host client, one at a time", "ReadStdout, one at a time"),
    ]
    print(f"\n{args.mib} MiB of stdout, medians of {args.runs} interleaved rounds, development "
          "profile (QEMU TCG, 1 vCPU), hybrid vsock")
    if args.baseline_initrd:
        print(f"  {'':<52} {'this tree':>21}   before ({args.baseline_initrd.name}, same rounds)")
    for label, key in rows:
        seconds = median(samples[key])
        line = f"  {label:<52} {seconds:6.2f} s  {args.mib / seconds:7.1f} MiB/s"
        if f"before: {key}" in samples:
            was = median(samples[f"before: {key}"])
            line += f"   {was:6.2f} s  {args.mib / was:7.1f} MiB/s"
        print(line)
    for key in ("ReadStdout, one ahead: replies", "head | agent OutputBuffer + encoding: reads"):
        line = f"  {key:<52} {median(samples[key]):6.0f}"
        if f"before: {key}" in samples:
            line += f"   before {median(samples[f'before: {key}']):6.0f}"
        print(line)
    through = median(samples["ctr run, first byte to EOF"])
    agent = median(samples["ReadStdout, one ahead"])
    print(f"  (d) the shim's share: (a) first byte to EOF ÷ (c) ReadStdout one ahead = "
          f"{through / agent:.2f} ({through - agent:+.2f} s)")
    print(f"raw samples: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
