#!/usr/bin/env python3
"""`make bench-guest`: the reference guest's boot next to the bare kernel boot, where the time
goes (on the guest's own clock), and what the pod VM costs the host in memory.

    heavy $COCO_CACHE/venv/bin/python bench/guest.py [--runs 5] [--initrd NAME=PATH ...]
        [--importtime] [--no-memory] [--balloon-ab] [--params NAME=KERNEL_PARAMS ...] [--device]
        [--guest-cmd NAME=SHELL ...] [--qemu-env NAME=VAR=V[,...] ...]
        [--variants-on-device] [--memory-all] [--only NAME,...]

Every sample boots the development profile's exact QEMU argv (hypervisor.launch_vm: 1 vCPU,
512 MiB, TCG, hybrid vsock, the pod's 9p rootfs share), and the series are interleaved, in an
order rotated every round, so that each sees the same (shared, noisy) machine; every figure is
a ratio within one run:

  bare    the same argv with a trivial initramfs whose /init powers off: launch → QEMU gone;
  agent   the reference image: launch → the shim's dial (the guest's ready announcement, then
          Health.Check OK);
  NAME    each --initrd variant, the same way (before/after of a change);
  device  with ``--device``: the reference image's device form (the tiny initramfs and the
          read-only EROFS root on virtio-blk, ``coco.root=blk``), the same way; its memory is
          measured like agent's, and the root image's pages in the host's page cache (shared
          by every pod of the node, in no QEMU's RSS) are reported with fincore.

The timeline comes from the guest's kernel log (init and the agent mark their steps in it;
`dmesg` runs in a container with CAP_SYSLOG after the boot): kernel clock 0, initramfs unpacked,
/init, modules loaded, agent imports done, listening, first Check; and what continues after
the first Check (the other devices' drivers, the AgentService built). The host's time of that
first Check puts the guest's clock 0 on the host's clock. ``--importtime`` boots once more with
``python -X importtime`` and lists the agent's costliest imports.

Memory (the first agent boot): once an idle busybox pod runs (CreateSandbox, a `sleep`
container) and the guest had time to return free pages, QEMU's /proc/<pid>/smaps is split into
guest RAM (the memfd backend), the TCG translation cache (anonymous executable mappings), QEMU's
heap and other anonymous memory, its binary and shared libraries, and other mapped files (RSS;
PSS beside it). "On a KVM host" is everything but the TCG cache. The guest says whether its
balloon driver is bound and negotiated free page reporting (virtio feature bit 5).
``--balloon-ab`` adds the series "no-balloon" (the same image and argv with
``free_page_reporting = false``: no virtio-balloon) and measures the memory of both in every
round, side by side; each ``--params NAME=...`` adds a series booting the reference image with
those kernel parameters too (e.g. ``page_reporting.page_reporting_order=N``), measured the same,
and a series "bare-NAME", the bare boot with them: a parameter a profile ships reaches the
bare boot too, so "NAME ÷ bare-NAME" is the ratio it would give.
``--guest-cmd NAME=SHELL`` adds a series that runs SHELL in the guest (a container that sees the
guest's PIDs and may write /proc/sys) once the idle pod runs, before memory settles (e.g.
``echo 1 > /proc/sys/vm/compact_memory``); ``--qemu-env NAME=VAR=V,...`` one whose QEMU starts
with that environment (e.g. ``MALLOC_ARENA_MAX=1``); ``--variants-on-device`` boots those
series (and ``--params``') in the device form. ``--only`` keeps only the named series.

Where the guest RAM goes: once memory settled, which guest-physical pages QEMU holds
(``/proc/<qemu>/pagemap`` over its memfd guest RAM: by range, by 2 MiB block, a map) and what
the guest's kernel says each of them is (``/proc/kpageflags`` read in the guest: reserved,
page cache, free, slab, anonymous, unflagged kernel allocations), with the guest's buddyinfo,
iomem and boot-time ``Memory:`` line. QEMU's heap is split into glibc's main arena, its
per-thread arenas (64 MiB-aligned) and other anonymous mappings (the largest listed); the
binary and libraries show RSS, PSS and private (the per-pod floor with N pods).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypervisor.config import load_profile
from hypervisor.vm import LaunchOptions, QemuVm, launch_vm
from protocols.api.kata import agent_pb2, oci_pb2
from protocols.errors import PermissionDenied
from shim.pod.agent import AgentClient
from shim.pod.rootfs import GUEST_SHARED, HostShare
from tests import envinfo
from tests.integration.guest.support import make_busybox_rootfs, spec
from tests.support import targets
from tests.support.guest import build_bare_initrd, dev_profile_text, guest_image
from tests.support.targets import FIGURES

MEMORY_MIB = 512  # firmware-configs/qemu-none.toml's guest
DIAL_TIMEOUT = 180.0
SETTLE_MAX_S = 90.0  # idle pod: free page reporting works in 2 s passes until nothing is left
SETTLE_STEP_S = 3.0  # settled: guest RAM changed by less than 1 MiB over one step
MIB = 2**20
# (kernel log text, timeline label); the agent's and init's marks come from bootlog.py / init.
MARKS = (
    ("Trying to unpack rootfs image as initramfs", "unpack"),
    ("Freeing initrd memory", "unpacked"),
    ("Run /init as init process", "init"),
    ("coco-init: root mounted", "rootmounted"),
    ("coco-init: stage 2", "stage2"),
    ("coco-init: modules loaded", "modules"),
    ("coco-init: starting agent", "agent-exec"),
    ("coco-agent: interpreter up", "interp"),
    ("coco-agent: imports done", "imports"),
    ("coco-agent: listening on vsock port", "listening"),
    ("coco-agent: first Check answered", "check"),
    ("coco-agent: machinery imported", "imported"),
    ("coco-init: device drivers loaded", "drivers"),
    ("coco-agent: agent service ready", "service"),
)
STEPS = (  # (row, from, to): the timeline's rows, on the guest's clock
    ("kernel: clock 0 → initramfs unpack starts", "0", "unpack"),
    ("kernel: initramfs unpack (decompress + cpio)", "unpack", "unpacked"),
    ("kernel: rest of init → /init", "unpacked", "init"),
    ("init: stage 1 + 2 → agent started (python exec)", "init", "agent-exec"),
    ("  of which device form's stage 1 → root mounted", "init", "rootmounted"),
    ("agent: interpreter + imports", "agent-exec", "imports"),
    ("  of which the interpreter's start (exec → entry)", "agent-exec", "interp"),
    ("  of which the agent's imports (entry → main)", "interp", "imports"),
    ("agent: → listening (modules, initdata, policy)", "imports", "listening"),
    ("agent: listening → first Check answered", "listening", "check"),
    ("beside: init → boot modules loaded (agent waits)", "init", "modules"),
    ("after Check: listening → machinery imported", "listening", "imported"),
    ("after Check: listening → device drivers loaded", "listening", "drivers"),
    ("after Check: listening → AgentService ready", "listening", "service"),
)
MEMINFO = (  # the guest's memory, the agent's RSS as one more "key: value kB" line, modules
    "cat /proc/meminfo; for p in /proc/[0-9]*; do "
    "grep -q guest.agent $p/cmdline 2>/dev/null && "
    "sed -n 's/^VmRSS:/AgentRSS:/p' $p/status; done; "
    "echo Modules= $(sed 's/ .*//' /proc/modules); "
    # the balloon driver bound to a device, with the features it negotiated (a string of 0/1,
    # index = bit): bit 5 is VIRTIO_BALLOON_F_REPORTING, free page reporting
    "for d in /sys/bus/virtio/drivers/virtio_balloon/virtio*; do "
    "[ -e $d/features ] && echo Balloon= ${d##*/} $(cat $d/features); done; "
    # free blocks per order and zone: what free page reporting (order >= 9 here) can return
    "sed 's/^/Buddy= /' /proc/buddyinfo")
REPORTING_BIT = 5
DMESG = re.compile(r"^\[\s*(\d+\.\d+)\]\s(.*)$")


@dataclass
class Boot:
    seconds: float  # launch → Check OK (agent) or → QEMU gone (bare)
    marks: dict[str, float] = field(default_factory=dict)  # guest clock, seconds
    launched: float = 0.0  # launch → QEMU running (cont)
    memory: dict[str, Any] | None = None
    importtime: list[tuple[int, str]] | None = None
    importtime_raw: list[str] | None = None  # in import order, for the nesting


def profile_for(folder: Path, name: str, initrd: Path, *,
                free_page_reporting: bool = True, image: Path | None = None) -> Path:
    env = envinfo.load()
    path = folder / f"profile-{name}.toml"
    path.write_text(dev_profile_text(env.kernel, initrd, memory_mib=MEMORY_MIB,
                                     free_page_reporting=free_page_reporting, image=image))
    return path


def page_cache_mib(path: Path) -> float:
    """How much of a file the host's page cache holds (util-linux fincore), MiB: the root
    image's pages, shared by every pod of the node, outside any QEMU's RSS."""
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / MIB


async def launch(profile: Path, run_root: Path, extra: str = "",
                 qemu_env: tuple[str, ...] = ()) -> tuple[QemuVm, float, float]:
    env = envinfo.load()
    share = run_root / "shared"
    share.mkdir(parents=True, exist_ok=True)
    rootfs = share / "bench-rootfs"
    if not rootfs.exists():
        make_busybox_rootfs(rootfs)
        for applet in ("dmesg", "sed"):
            (rootfs / "bin" / applet).symlink_to("busybox")
    started = time.monotonic()
    vm = await launch_vm(load_profile(profile), LaunchOptions(
        run_root=run_root, name="bench", accel="tcg", vhost_device_vsock=env.vhost_device_vsock,
        log_dir=run_root / "logs", shares=HostShare(share).vm_shares(),
        extra_kernel_params=extra, argv_prefix=("/usr/bin/env", *qemu_env) if qemu_env else ()))
    return vm, started, time.monotonic() - started


async def bare_boot(profile: Path, run_root: Path, extra: str = "") -> Boot:
    vm, started, launched = await launch(profile, run_root, extra)
    try:
        async with asyncio.timeout(DIAL_TIMEOUT):
            reason = await vm.wait()
        seconds = time.monotonic() - started
        if not reason.clean:
            raise RuntimeError(f"the bare VM did not power off cleanly: {reason}")
        return Boot(seconds, launched=launched)
    finally:
        await vm.aclose()


def _storage() -> agent_pb2.Storage:
    return agent_pb2.Storage(driver="9p", source="kataShared", fstype="9p",
                             options=["trans=virtio", "version=9p2000.L"],
                             mount_point=str(GUEST_SHARED))


async def run_container(agent: AgentClient, cid: str, args: list[str], *,
                        capabilities: Iterable[str] = (), wait: bool = True,
                        guest_pids: bool = False, writable_sysctl: bool = False) -> bytes:
    oci = spec(f"{GUEST_SHARED}/bench-rootfs", args)
    if guest_pids:  # no PID namespace: see the guest's processes (the agent)
        del oci.Linux.Namespaces[0]
    if writable_sysctl:  # the guest's /proc/sys/vm knobs (with CAP_SYS_ADMIN)
        del oci.Linux.ReadonlyPaths[:]
    caps = list(capabilities)
    if caps:
        oci.Process.Capabilities.CopyFrom(oci_pb2.LinuxCapabilities(
            Bounding=caps, Effective=caps, Permitted=caps))
    await agent.create_container(cid, oci, [_storage()])
    await agent.start_container(cid)
    if not wait:
        return b""
    out = b""
    while chunk := await agent.read_stdout(cid, "", 65536):
        out += chunk
    await agent.wait_process(cid, "")
    await agent.remove_container(cid)
    return out


def parse_marks(dmesg: str) -> dict[str, float]:
    marks: dict[str, float] = {}
    for line in dmesg.splitlines():
        found = DMESG.match(line)
        if not found:
            continue
        stamp, text = float(found.group(1)), found.group(2)
        for needle, label in MARKS:
            if needle in text and label not in marks:
                marks[label] = stamp
    return marks


def smaps_breakdown(pid: int) -> dict[str, Any]:
    """RSS and PSS of QEMU's mappings, by kind (MiB)."""
    kinds: dict[str, dict[str, float]] = {}
    anon: list[list[Any]] = []  # QEMU's anonymous mappings: [start, size MiB, perms, RSS MiB]
    current = "other"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            perms = head[1]
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            entry = [hex(lo), (hi - lo) / MIB, perms, 0.0]
            path = " ".join(head[5:]) if len(head) > 5 else ""
            if path.startswith("/memfd:"):
                current = "guest RAM (memfd backend)"
            elif not path and "x" in perms:
                current = "TCG translation cache"
            elif path == "[heap]":
                current = "QEMU heap: [heap] (glibc main arena)"
            elif not path and int(head[0].split("-")[0], 16) % (64 * MIB) == 0:
                # glibc's per-thread arenas: 64 MiB-aligned reservations, touched in part
                current = "QEMU heap: thread arenas (64 MiB-aligned)"
            elif not path or path == "[stack]" or path.startswith("[anon"):
                current = "QEMU other anonymous (stacks, large mmap'd blocks)"
            elif ".so" in path or path.endswith("qemu-system-x86_64"):
                current = "QEMU binary and shared libraries"
            else:
                current = "other mappings"
            kinds.setdefault(current, {"rss": 0.0, "pss": 0.0, "private": 0.0, "dirty": 0.0})
            if current.startswith("QEMU heap") or current.startswith("QEMU other"):
                anon.append(entry)
        elif head[0] in ("Private_Clean:", "Private_Dirty:"):
            # pages no other process maps now; the dirty ones (a library's relocated data,
            # written) stay private however many QEMUs map the same file
            kinds[current]["private"] += int(head[1]) / 1024
            if head[0] == "Private_Dirty:":
                kinds[current]["dirty"] += int(head[1]) / 1024
        elif head[0] in ("Rss:", "Pss:"):
            kinds[current][head[0][:-1].lower()] += int(head[1]) / 1024
            if head[0] == "Rss:" and anon and anon[-1] is entry:
                entry[3] = int(head[1]) / 1024
    total = {k: sum(v[k] for v in kinds.values()) for k in ("rss", "pss")}
    kvm = sum(v["rss"] for k, v in kinds.items() if k != "TCG translation cache")
    largest = sorted((a for a in anon if a[3] >= 0.5), key=lambda a: -a[3])[:12]
    return {"kinds": kinds, "total": total, "kvm_host_rss": kvm, "largest_anon": largest}


async def settled_memory(pid: int) -> dict[str, Any]:
    """QEMU's breakdown once the guest RAM it holds stops shrinking (free page reporting
    returns the guest's free pages in passes), at most SETTLE_MAX_S after the pod started."""
    started = time.monotonic()
    previous = smaps_breakdown(pid)
    history = [_guest_ram(previous)]
    while time.monotonic() - started < SETTLE_MAX_S:
        await asyncio.sleep(SETTLE_STEP_S)
        current = smaps_breakdown(pid)
        history.append(_guest_ram(current))
        if abs(history[-1] - history[-2]) < 1.0:
            current["settle_s"] = time.monotonic() - started
            current["guest_ram_history_mib"] = history
            return current
        previous = current
    previous["settle_s"] = time.monotonic() - started
    previous["guest_ram_history_mib"] = history
    return previous


def resident_pages(pid: int) -> list[bool]:
    """Per 4 KiB of guest-physical RAM: does QEMU hold it (its memfd guest RAM through
    /proc/PID/pagemap, bit 63)? On q35 with <= 2 GiB the RAM region's offset is the
    guest-physical address."""
    start = end = 0
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        head = line.split()
        if len(head) > 5 and head[5].startswith("/memfd:"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            if hi - lo > end - start:
                start, end = lo, hi
    if not end:
        return []
    page = 4096
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        pagemap.seek(start // page * 8)
        raw = pagemap.read((end - start) // page * 8)
    return [bool(int.from_bytes(raw[i:i + 8], "little") >> 63) for i in range(0, len(raw), 8)]


# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h), most telling first
KPF = (("reserved (kernel image, memmap, firmware, early allocations)", 32), ("slab", 7),
       ("page tables", 26), ("anonymous (processes)", 12), ("page cache (file, on LRU)", 5),
       ("free (buddy head)", 10), ("no struct page", 20))
KPF_COMPOUND_TAIL = 16


def classify_resident(present: list[bool], kpageflags: bytes) -> dict[str, float]:
    """MiB of the guest-physical pages QEMU holds, by what the guest's kernel says each page
    is (/proc/kpageflags, read in the guest). A free block's head page alone is marked
    buddy: the unflagged pages after it up to the next flagged one are counted as free too;
    other unflagged pages are kernel allocations without a flag (vmalloc, stacks, ...)."""
    flags = [int.from_bytes(kpageflags[i:i + 8], "little")
             for i in range(0, len(kpageflags) - 7, 8)]
    kinds: dict[str, float] = {}
    in_free = False
    last = 0
    for pfn, here in enumerate(present):
        value = flags[pfn] if pfn < len(flags) else -1
        if value == -1:
            kind = "beyond kpageflags"
        elif value & (1 << 10):
            kind, in_free = "free (buddy head)", True
        elif value == 0 and in_free:
            kind = "free (inside a free block)"
        else:
            in_free = False
            if value & (1 << KPF_COMPOUND_TAIL) and pfn:
                value = last  # a compound page's tail: what its head is
            kind = next((name for name, bit in KPF if value & (1 << bit)),
                        "unflagged kernel allocations" if value == 0 else "other flags")
            last = value
        if here:
            kinds[kind] = kinds.get(kind, 0.0) + 1 / 256
    return dict(sorted(kinds.items(), key=lambda kv: -kv[1]))


def guest_residency(present: list[bool]) -> dict[str, Any]:
    """Which guest-physical pages QEMU holds (its memfd guest RAM through /proc/PID/pagemap):
    resident MiB per guest-physical range and how the resident pages fill 2 MiB blocks (the
    unit free page reporting returns at its default order 9). On q35 with <= 2 GiB the RAM
    region's offset is the guest-physical address."""
    if not present:
        return {}
    per_block = 512  # 2 MiB of 4 KiB pages
    blocks = [sum(present[i:i + per_block]) for i in range(0, len(present), per_block)]
    ranges = ((0, 16), (16, 64), (64, 128), (128, 256), (256, 512))
    by_range = {f"{lo}-{hi} MiB": sum(present[lo * 256:hi * 256]) / 256 for lo, hi in ranges}
    return {"resident_mib": sum(present) / 256, "by_range_mib": by_range,
            "blocks_2m": {"full": sum(b == per_block for b in blocks),
                          "partial": sum(0 < b < per_block for b in blocks),
                          "empty": sum(b == 0 for b in blocks),
                          "partial_resident_mib": sum(b for b in blocks
                                                      if 0 < b < per_block) / 256},
            "map_2m": "".join(" .:-=+*#%@"[min(9, (b * 9 + per_block - 1) // per_block)]
                              for b in blocks)}


def _guest_ram(breakdown: dict[str, Any]) -> float:
    return float(breakdown["kinds"].get("guest RAM (memfd backend)", {}).get("rss", 0.0))


async def agent_boot(profile: Path, run_root: Path, *, gate: bool = True,
                     memory: bool = False, importtime: bool = False, append: str = "",
                     guest_cmd: str = "", qemu_env: tuple[str, ...] = ()) -> Boot:
    extra = " ".join(p for p in (append, "coco.agent.importtime=1" if importtime else "") if p)
    vm, started, launched = await launch(profile, run_root, extra, qemu_env)
    try:
        assert vm.channel is not None
        exited: asyncio.Future[object] = asyncio.ensure_future(vm.wait())
        try:
            channel = vm.channel if gate else dataclasses.replace(vm.channel,
                                                                  wait_guest_ready=None)
            agent = await AgentClient.dial(channel, DIAL_TIMEOUT, exited=exited)
        finally:
            exited.cancel()
        boot = Boot(time.monotonic() - started, launched=launched)
        try:
            if memory:
                await agent.create_sandbox("bench", "bench", (), [_storage()])
                await run_container(agent, "idle", ["sleep", "3600"], wait=False)
                assert vm.pid is not None
                if guest_cmd:  # a candidate fix, run once the idle pod is up
                    out = await run_container(agent, "guest-cmd", ["sh", "-c", guest_cmd],
                                              capabilities=["CAP_SYS_ADMIN"], guest_pids=True,
                                              writable_sysctl=True)
                    print(f"  guest-cmd said: {out.decode(errors='replace').strip()[:200]}")
                boot.memory = await settled_memory(vm.pid)
                present = resident_pages(vm.pid)
                boot.memory["residency"] = guest_residency(present)
                flags = await run_container(agent, "kpageflags", ["cat", "/proc/kpageflags"],
                                            capabilities=["CAP_SYS_ADMIN"])
                boot.memory["resident_by_guest_kind"] = classify_resident(present, flags)
                iomem = await run_container(agent, "iomem", ["cat", "/proc/iomem"],
                                            capabilities=["CAP_SYS_ADMIN"])
                boot.memory["guest_iomem"] = [
                    line.strip() for line in iomem.decode(errors="replace").splitlines()
                    if "RAM" in line or "Kernel" in line]
                meminfo = await run_container(agent, "meminfo", ["sh", "-c", MEMINFO],
                                              guest_pids=True)
                boot.memory["guest_meminfo_kib"] = {
                    k: int(v.split()[0]) for k, v in (
                        line.split(":", 1) for line in meminfo.decode().splitlines()
                        if ":" in line)
                    if k in ("MemTotal", "MemFree", "Buffers", "Cached", "Shmem", "Slab",
                             "AnonPages", "KernelStack", "PageTables", "AgentRSS")}
                boot.memory["guest_modules"] = next(
                    (line.split("=", 1)[1].split() for line in meminfo.decode().splitlines()
                     if line.startswith("Modules=")), [])
                boot.memory["guest_buddyinfo"] = [
                    line.split(None, 1)[1] for line in meminfo.decode().splitlines()
                    if line.startswith("Buddy=")]
                balloon = [line.split()[1:] for line in meminfo.decode().splitlines()
                           if line.startswith("Balloon=")]
                boot.memory["guest_balloon"] = {
                    "bound": [b[0] for b in balloon],
                    "reporting": any(len(b) > 1 and len(b[1]) > REPORTING_BIT
                                     and b[1][REPORTING_BIT] == "1" for b in balloon)}
            try:
                out = await run_container(agent, "dmesg", ["dmesg"],
                                          capabilities=["CAP_SYSLOG"])
                boot.marks = parse_marks(out.decode(errors="replace"))
                if boot.memory is not None:
                    boot.memory["guest_memory_line"] = next(
                        (line for line in out.decode(errors="replace").splitlines()
                         if "Memory: " in line and "available" in line), "")
            except PermissionDenied as err:  # a confidential guest's policy forbids it
                print(f"  (no timeline: the guest's policy refused the dmesg container: "
                      f"{str(err)[:80]}...)", flush=True)
            with contextlib.suppress(Exception):
                await agent.destroy_sandbox()
        finally:
            await agent.close()
        if importtime:
            console = (run_root / "logs/console.log").read_text(errors="replace")
            boot.importtime = parse_importtime(console)
            boot.importtime_raw = [line for line in console.splitlines()
                                   if line.startswith("import time:")]
        return boot
    finally:
        await vm.aclose()


def parse_importtime(console: str) -> list[tuple[int, str]]:
    """(cumulative µs, module indented by its import depth), costliest first."""
    rows: list[tuple[int, str]] = []
    for line in console.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) != 3:
            continue
        name = parts[2][1:]  # one space after the bar; then two per level of nesting
        rows.append((int(parts[1]), name.rstrip()))
    return sorted(rows, reverse=True)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timeline(boots: list[Boot]) -> list[tuple[str, float]]:
    """Median seconds of each step; the host part first."""
    rows: list[tuple[str, float]] = [
        ("host: vhost-device-vsock, QEMU, QMP → running", med([b.launched for b in boots])),
        ("firmware + kernel load + decompression → clock 0",
         med([b.seconds - b.marks["check"] - b.launched for b in boots if "check" in b.marks])),
    ]
    for label, start, end in STEPS:
        spans = [b.marks[end] - (0.0 if start == "0" else b.marks[start])
                 for b in boots if end in b.marks and (start == "0" or start in b.marks)]
        rows.append((label, med(spans)))
    return rows


def image_facts(path: Path) -> str:
    size = path.stat().st_size
    return f"{path} ({size / MIB:.1f} MiB)"


def wants_memory(name: str, run: int, args: argparse.Namespace) -> bool:
    if args.no_memory:
        return False
    if args.balloon_ab or args.memory_all:
        return name not in ("bare", *(i.partition("=")[0] for i in args.initrd))
    candidates = (i.partition("=")[0] for i in (*args.params, *args.guest_cmd, *args.qemu_env))
    return name in ("agent", "device", *candidates) and run == 0


def print_memory_ab(series: dict[str, list[Boot]]) -> None:
    """QEMU's memory with and without the balloon, medians over the rounds, side by side."""
    measured = {n: [b.memory for b in boots if b.memory] for n, boots in series.items()}
    measured = {n: ms for n, ms in measured.items() if ms}
    if "agent" not in measured or "no-balloon" not in measured:
        return
    names = list(measured)
    kinds = sorted({k for ms in measured.values() for m in ms for k in m["kinds"]})

    def rss(name: str, kind: str) -> float:
        return med([m["kinds"].get(kind, {}).get("rss", 0.0) for m in measured[name]])

    print("\nQEMU memory, idle busybox pod, 512 MiB guest: free page reporting on (agent) vs "
          "off (no-balloon), RSS MiB, medians of "
          + " / ".join(f"{len(v)}" for v in measured.values()) + " rounds")
    print(f"  {'kind':<40} " + " ".join(f"{n:>12}" for n in names))
    for kind in kinds:
        print(f"  {kind:<40} " + " ".join(f"{rss(n, kind):>12.1f}" for n in names))
    for label, key in (("total", "total"), ("on a KVM host", "kvm_host_rss")):
        values = [med([m[key]["rss"] if key == "total" else m[key] for m in measured[n]])
                  for n in names]
        off = values[names.index("no-balloon")]
        print(f"  {label:<40} " + " ".join(f"{v:>12.1f}" for v in values)
              + "   ÷ no-balloon " + " ".join(f"{v / off:.2f}" for v in values))
    for name, ms in measured.items():
        print(f"  {name}: on a KVM host per round "
              + " ".join(f"{m['kvm_host_rss']:.0f}" for m in ms)
              + f"; guest balloon {ms[0].get('guest_balloon')}"
              + "; settled after " + " ".join(f"{m['settle_s']:.0f}" for m in ms) + " s")


def print_memory_medians(series: dict[str, list[Boot]]) -> None:
    """On a KVM host and guest RAM per series, medians over the rounds that measured memory."""
    rows = {n: [b.memory for b in boots if b.memory] for n, boots in series.items()}
    rows = {n: ms for n, ms in rows.items() if ms}
    if not rows:
        return
    print("\nQEMU memory per series (MiB, medians; rounds): on a KVM host / guest RAM / "
          "guest MemTotal-MemFree")
    for name, ms in rows.items():
        used = [(m["guest_meminfo_kib"].get("MemTotal", 0)
                 - m["guest_meminfo_kib"].get("MemFree", 0)) / 1024 for m in ms
                if m.get("guest_meminfo_kib")]
        print(f"  {name:<28} {med([m['kvm_host_rss'] for m in ms]):>7.1f} / "
              f"{med([_guest_ram(m) for m in ms]):>6.1f} / {med(used):>6.1f}   ({len(ms)}: "
              + " ".join(f"{m['kvm_host_rss']:.0f}" for m in ms) + ")")


def is_bare(name: str) -> bool:
    """The bare boots: "bare", and "bare-NAME", the bare boot with ``--params NAME``'s."""
    return name == "bare" or name.startswith("bare-")


def bare_of(series: dict[str, list[Boot]], name: str) -> list[float]:
    """The bare boot's samples a series is measured against: a series with kernel parameters of
    its own against the bare boot with them (they reach the bare boot too), others "bare"."""
    return [b.seconds for b in series.get(f"bare-{name}") or series.get("bare", [])]


def print_figures(series: dict[str, list[Boot]]) -> None:
    """Issue 18's figures this bench measures, beside the issue's baseline and target: the bare
    boot, each image's boot ÷ bare (medians of the rounds; a series with kernel parameters of its
    own ÷ the bare boot with them), each image's QEMU on a KVM host."""
    print(f"\n{targets.HEADER}")
    bare = [b.seconds for b in series.get("bare", [])]
    if bare:
        print(targets.line("bare_boot", med(bare), f"{med(bare):.2f} s"))
    for name, boots in series.items():
        if is_bare(name) or not boots:
            continue
        own_bare = bare_of(series, name)
        if own_bare:
            ratio = med([b.seconds for b in boots]) / med(own_bare)
            print(targets.line("boot_ratio", ratio, f"{ratio:.2f}x", of=name))
        memory = [b.memory["kvm_host_rss"] for b in boots if b.memory]
        if memory:
            print(targets.line("qemu_idle_kvm_host_mib", med(memory), f"{med(memory):.1f} MiB",
                               of=name))


def print_memory(name: str, memory: dict[str, Any] | None) -> None:
    if not memory:
        return
    print(f"\nQEMU memory of '{name}', idle busybox pod, 512 MiB guest (MiB, RSS / PSS / "
          "private)")
    for kind, v in sorted(memory["kinds"].items(), key=lambda kv: -kv[1]["rss"]):
        print(f"  {kind:<40} {v['rss']:>7.1f} / {v['pss']:>7.1f} / {v.get('private', 0):>7.1f}")
    libs = memory["kinds"].get("QEMU binary and shared libraries")
    if libs:
        dirty = libs.get("dirty", 0.0)
        print(f"  binary + libraries: private dirty {dirty:.1f}; per pod with N pods on the node"
              " (private dirty + the rest / N): "
              + ", ".join(f"N={n}: {dirty + (libs['rss'] - dirty) / n:.1f}" for n in (1, 2, 10)))
    print(f"  {'total':<40} {memory['total']['rss']:>7.1f} / {memory['total']['pss']:>7.1f}")
    print(f"  {'on a KVM host (all but the TCG cache)':<40} {memory['kvm_host_rss']:>7.1f}"
          f"   target {FIGURES['qemu_idle_kvm_host_mib'].target}")
    print(f"  guest /proc/meminfo (KiB): {memory['guest_meminfo_kib']}")
    print(f"  guest modules loaded: {' '.join(memory['guest_modules'])}")
    print(f"  guest balloon: {memory['guest_balloon']}")
    if memory.get("guest_memory_line"):
        print(f"  guest kernel: {memory['guest_memory_line']}")
    for line in memory.get("guest_buddyinfo", []):
        print(f"  guest buddyinfo (free blocks, order 0..10): {line}")
    residency = memory.get("residency")
    if residency:
        print(f"  guest-physical pages QEMU holds: {residency['resident_mib']:.1f} MiB; by range"
              f" {residency['by_range_mib']}; 2 MiB blocks {residency['blocks_2m']}")
        print(f"  map, one char per 2 MiB of guest-physical RAM (' ' none .. '@' all): "
              f"|{residency['map_2m']}|")
    if memory.get("largest_anon"):
        print("  QEMU's largest anonymous mappings (start, size MiB, perms, RSS MiB): "
              + "; ".join(f"{a[0]} {a[1]:.1f} {a[2]} {a[3]:.1f}" for a in memory["largest_anon"]))
    if memory.get("resident_by_guest_kind"):
        print("  guest RAM QEMU holds, by what the guest's kernel says each page is "
              "(/proc/kpageflags), MiB:")
        for kind, mib in memory["resident_by_guest_kind"].items():
            print(f"    {kind:<60} {mib:>7.1f}")
    for line in memory.get("guest_iomem", []):
        print(f"  guest iomem: {line}")
    print(f"  guest RAM held by QEMU every {SETTLE_STEP_S:g} s after the pod started "
          f"(MiB): {' '.join(f'{v:.0f}' for v in memory['guest_ram_history_mib'])}")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--initrd", action="append", default=[], metavar="NAME=PATH[:nogate]",
                        help="also boot this image in every round (':nogate': an image from "
                        "before the ready announcement, dialed without waiting for it)")
    parser.add_argument("--image", type=Path, default=None,
                        help="the 'agent' image (default: build the reference image)")
    parser.add_argument("--importtime", action="store_true")
    parser.add_argument("--append", default="", help="extra kernel parameters for every agent "
                        "boot (e.g. coco.agent.confidential=1)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--balloon-ab", action="store_true",
                        help="add the series no-balloon (free_page_reporting = false) and "
                        "measure the memory of it and of agent in every round")
    parser.add_argument("--params", action="append", default=[], metavar="NAME=KERNEL_PARAMS",
                        help="one more series: the reference image with these kernel "
                        "parameters added")
    parser.add_argument("--device", action="store_true",
                        help="add the series device (and device-no-balloon with --balloon-ab):"
                        " the reference image's device form (tiny initramfs + read-only EROFS "
                        "root on virtio-blk), beside 'agent', the initramfs form")
    parser.add_argument("--guest-cmd", action="append", default=[], metavar="NAME=SHELL",
                        help="one more series: the reference image, and once the idle pod runs"
                        " this shell command in a guest container that sees the guest's PIDs "
                        "and may write /proc/sys (CAP_SYS_ADMIN), before memory settles")
    parser.add_argument("--qemu-env", action="append", default=[], metavar="NAME=VAR=V[,...]",
                        help="one more series: the reference image, QEMU started with these "
                        "environment variables (e.g. MALLOC_ARENA_MAX=1)")
    parser.add_argument("--variants-on-device", action="store_true",
                        help="the --params and --guest-cmd series boot the device form")
    parser.add_argument("--memory-all", action="store_true",
                        help="measure memory in every round of every agent series")
    parser.add_argument("--only", default="", metavar="NAME,...",
                        help="boot only these series (e.g. bare,device,NAME)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("guest-results.json"))
    args = parser.parse_args()
    built = guest_image()
    image = args.image or built.image
    base = Path(tempfile.mkdtemp(prefix="coco-bench-guest-", dir="/tmp"))
    series: dict[str, list[Boot]] = {"bare": [], "agent": []}
    if args.balloon_ab:
        series["no-balloon"] = []
    if args.device:
        series["device"] = []
        if args.balloon_ab:
            series["device-no-balloon"] = []
    variants: dict[str, tuple[Path, bool]] = {}
    extra_params: dict[str, str] = {}
    for item in args.params:
        name, _, params = item.partition("=")
        extra_params[name] = params
        series[name] = []
        series[f"bare-{name}"] = []
    guest_cmds: dict[str, str] = {}
    for item in args.guest_cmd:
        name, _, command = item.partition("=")
        guest_cmds[name] = command
        series[name] = []
    qemu_envs: dict[str, tuple[str, ...]] = {}
    for item in args.qemu_env:
        name, _, assignments = item.partition("=")
        qemu_envs[name] = tuple(assignments.split(","))
        series[name] = []
    for item in args.initrd:
        name, _, rest = item.partition("=")
        path, _, flag = rest.partition(":")
        variants[name] = (Path(path), flag != "nogate")
        series[name] = []
    imports: list[tuple[int, str]] = []
    imports_raw: list[str] = []
    failures: list[str] = []
    try:
        bare_initrd = build_bare_initrd(base)
        profiles = {"bare": profile_for(base, "bare", bare_initrd),
                    **{f"bare-{n}": profile_for(base, f"bare-{n}", bare_initrd)
                       for n in extra_params},
                    "agent": profile_for(base, "agent", image),
                    **({"no-balloon": profile_for(base, "no-balloon", image,
                                                  free_page_reporting=False)}
                       if args.balloon_ab else {}),
                    **{n: (profile_for(base, n, built.boot_initrd, image=built.rootfs)
                           if args.variants_on_device else profile_for(base, n, image))
                       for n in (*extra_params, *guest_cmds, *qemu_envs)},
                    **({"device": profile_for(base, "device", built.boot_initrd,
                                              image=built.rootfs)} if args.device else {}),
                    **({"device-no-balloon": profile_for(
                        base, "device-no-balloon", built.boot_initrd, image=built.rootfs,
                        free_page_reporting=False)} if args.device and args.balloon_ab else {}),
                    **{n: profile_for(base, n, p) for n, (p, _) in variants.items()}}
        if args.only:
            keep = args.only.split(",")
            profiles = {n: p for n, p in profiles.items() if n in keep}
            series = {n: b for n, b in series.items() if n in keep}
        names = list(profiles)
        for run in range(args.runs):
            # rotated every round: in a fixed order, two series that always followed an agent
            # boot ran slower in every phase, the host-only firmware one included, so no series
            # keeps the same place in every round
            shift = run % len(names)
            for name in names[shift:] + names[:shift]:
                profile = profiles[name]
                root = base / f"{name}-{run}"
                try:
                    if is_bare(name):
                        boot = await bare_boot(profile, root,
                                               extra_params.get(name.removeprefix("bare-"), ""))
                    else:
                        gate = variants[name][1] if name in variants else True
                        boot = await agent_boot(profile, root, gate=gate,
                                                memory=wants_memory(name, run, args),
                                                append=" ".join(p for p in (
                                                    args.append, extra_params.get(name, ""))
                                                    if p),
                                                guest_cmd=guest_cmds.get(name, ""),
                                                qemu_env=qemu_envs.get(name, ()))
                except Exception as err:  # one broken variant must not hide the others
                    failures.append(f"run {run + 1} {name}: {err}")
                    print(f"run {run + 1} {name}: FAILED: {err}", flush=True)
                    continue
                finally:
                    shutil.rmtree(root, ignore_errors=True)
                series[name].append(boot)
                print(f"run {run + 1} {name}: {boot.seconds:.2f} s", flush=True)
        if args.importtime:
            boot = await agent_boot(profiles["agent"], base / "importtime", importtime=True,
                                    append=args.append)
            imports = boot.importtime or []
            imports_raw = boot.importtime_raw or []
    finally:
        shutil.rmtree(base, ignore_errors=True)

    for failure in failures:
        print(f"FAILED {failure}")
    bare = med([b.seconds for b in series.get("bare", [])])
    print(f"\nreference guest: {image_facts(image)}")
    print(f"{args.runs} rounds, QEMU TCG, 1 vCPU, {MEMORY_MIB} MiB, interleaved, "
          "the order rotated every round\n")
    print(f"  {'series':<28} {'median':>8} {'÷ bare':>8}   samples")
    for name, boots in series.items():
        values = [b.seconds for b in boots]
        print(f"  {name:<28} {med(values):>7.2f}s {med(values) / bare:>7.2f}x   "
              + " ".join(f"{v:.2f}" for v in values))
    for name in extra_params:
        if not series.get(name) or not series.get(f"bare-{name}"):
            continue
        own = med([b.seconds for b in series[name]])
        own_bare = med(bare_of(series, name))
        print(f"  {name + ' ÷ bare-' + name:<28} {own / own_bare:>17.2f}x   "
              f"(bare-{name} ÷ bare {own_bare / bare:.2f}x)")
    for name, boots in series.items():
        if is_bare(name) or not boots:
            continue
        if not any(b.marks for b in boots):
            print(f"\nno timeline of '{name}': its guest's policy refused the dmesg container")
            continue
        print(f"\ntimeline of '{name}' (medians; guest steps on the guest's kernel clock)")
        for label, seconds in timeline(boots):
            print(f"  {label:<52} {seconds:>6.2f} s")
    if args.balloon_ab:
        print_memory_ab(series)
    for name, boots in series.items():
        if boots and boots[0].memory:
            print_memory(name, boots[0].memory)
    print_memory_medians(series)
    print_figures(series)
    if args.device:
        print(f"\ndevice form: root image {image_facts(built.rootfs)}, tiny initramfs "
              f"{image_facts(built.boot_initrd)}; the image's pages in the host's page cache "
              f"now (shared by every pod of the node, in no QEMU's RSS): "
              f"{page_cache_mib(built.rootfs):.1f} MiB")
    if imports:

        print("\nagent imports, costliest (cumulative, python -X importtime, one boot)")
        for micros, name in imports[:25]:
            print(f"  {micros / 1000:>8.1f} ms  {name}")
    args.out.write_text(json.dumps({
        "command": " ".join([sys.executable, *sys.argv]),
        "image": str(image), "image_bytes": image.stat().st_size,
        "series": {n: [vars(b) for b in boots] for n, boots in series.items()},
        "importtime": imports, "importtime_raw": imports_raw,
        "failures": failures}, indent=1, default=str))
    print(f"\nraw samples: {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
