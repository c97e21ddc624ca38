#!/usr/bin/env python3
"""`make bench-overhead`: the host-side footprint of a pod VM beyond its guest RAM.

Boots CRI pods of a few sizes (podsandbox mode, containerd 2.1.9 unless --containerd, the
development profile: QEMU TCG with a memfd guest RAM shared with vhost-device-vsock), with
limits that size the VM (shim/pod/sizing.py), runs a container that touches memory in each, and
reports per pod:

- guest RAM: what -m gave the VM;
- guest pages resident: the PSS of the guest-RAM mapping (``/memfd:mem``) in QEMU and
  vhost-device-vsock together;
- VMM footprint: each process's PSS minus its share of the guest-RAM mapping, for QEMU,
  vhost-device-vsock and the shim daemon (all three live in the pod's cgroup);
- the total beyond guest RAM = the sum of the footprints.

The RuntimeClass overhead must cover the VM's base memory (guest RAM the pod's limits do not
account for) plus the largest footprint: ``shim/cli/install.py`` takes its figure from here.
Prints a Markdown table and writes ``bench/overhead.json``. Leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cri import cri_node

from protocols.api.cri import api_pb2 as cri
from tests.support.containerd import coco_processes, shim_daemons
from tests.support.cri import container_config, pod_config
from tests.support.images import BUSYBOX_REF

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
GUEST_RAM_MAPPING = "/memfd:mem"  # hypervisor/cmdline.py MemfdBackend("mem", …)
# (pod memory limit MiB, memory the container touches MiB): the guest RAM is base + limit.
SIZES = ((0, 64), (256, 128), (1024, 512))
SETTLE = 5.0  # seconds after the container has touched its memory, before sampling


def smaps_pss(pid: int) -> tuple[int, int]:
    """(total PSS, PSS of the guest-RAM mapping) of ``pid`` in bytes."""
    total = guest = 0
    in_guest = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":") or "-" in fields[0]:  # a mapping's header line
            in_guest = GUEST_RAM_MAPPING in line
            continue
        if fields[0] == "Pss:":
            kib = int(fields[1]) * 1024
            total += kib
            if in_guest:
                guest += kib
    return total, guest


def pod_processes(base: Path, run_dir: Path) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {"qemu": [], "vhost-device-vsock": [],
                                   "shim": [p.pid for p in shim_daemons(run_dir)]}
    for pid in coco_processes(base):
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except (OSError, UnicodeDecodeError):
            continue
        if "qemu-system" in name:
            found["qemu"].append(pid)
        elif "vhost-device-vsock" in name:
            found["vhost-device-vsock"].append(pid)
    return found


def measure(base: Path, run_dir: Path) -> dict[str, float]:
    procs = pod_processes(base, run_dir)
    out: dict[str, float] = {"guest_resident_mib": 0.0}
    total = 0.0
    for role, pids in procs.items():
        footprint = 0.0
        for pid in pids:
            pss, guest = smaps_pss(pid)
            footprint += (pss - guest) / MIB
            out["guest_resident_mib"] += guest / MIB
        out[f"{role}_mib"] = round(footprint, 1)
        total += footprint
    out["beyond_guest_mib"] = round(total, 1)
    out["guest_resident_mib"] = round(out["guest_resident_mib"], 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--containerd", default="2.1.9")
    parser.add_argument("--base-memory", type=int, default=512,
                        help="the profile's memory_mib (the VM's base), MiB")
    parser.add_argument("--samples", type=int, default=3)
    args = parser.parse_args()
    rows: list[dict[str, float]] = []
    with cri_node(args.containerd, subnet="198.18.202.0/24", prefix="coco-bovh-") as node:
        # The node's pods boot from its profile: the base memory is set before the first.
        node.profile.write_text(node.profile.read_text().replace(
            "memory_mib = 1024", f"memory_mib = {args.base_memory}"))
        client, base = node.client, node.base
        run_dir = base / "run"
        for limit, touch in SIZES:
            resources = cri.LinuxContainerResources(
                cpu_period=100000, cpu_quota=100000,
                memory_limit_in_bytes=limit * MIB) if limit else None
            pod = pod_config(f"ovh-{limit}", uuid.uuid4().hex, base,
                             resources=resources)
            pod_id = client.run_pod(pod)
            # Touch guest memory (a shell variable of `touch` MiB, anonymous memory
            # of the container's shell), then idle holding it.
            toucher = ["/bin/sh", "-c",
                       f"x=$(head -c {touch * MIB} /dev/zero | tr '\\0' a); "
                       "echo filled ${#x}; trap 'exit 0' TERM; "
                       "while :; do sleep 1; done"]
            cid = client.create_container(pod_id, container_config(
                "toucher", BUSYBOX_REF, toucher), pod)
            client.start_container(cid)
            log = base / "toucher.log"
            deadline = time.monotonic() + 120
            while "filled" not in (log.read_text() if log.exists() else ""):
                if time.monotonic() > deadline:
                    raise RuntimeError("the container never filled its memory")
                time.sleep(0.5)
            time.sleep(SETTLE)
            samples = []
            for _ in range(args.samples):
                samples.append(measure(base, run_dir))
                time.sleep(1)
            row = {key: round(statistics.median(s[key] for s in samples), 1)
                   for key in samples[0]}
            row["guest_ram_mib"] = args.base_memory + limit
            row["pod_limit_mib"] = limit
            rows.append(row)
            client.stop_container(cid, timeout=5)
            client.remove_container(cid)
            client.stop_pod(pod_id)
            client.remove_pod(pod_id)
            log.unlink(missing_ok=True)
    print("| pod limit | guest RAM | guest pages resident | QEMU beyond guest | "
          "vhost-device-vsock | shim daemon | total beyond guest RAM |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['pod_limit_mib']:.0f} MiB | {row['guest_ram_mib']:.0f} MiB | "
              f"{row['guest_resident_mib']} MiB | {row['qemu_mib']} MiB | "
              f"{row['vhost-device-vsock_mib']} MiB | {row['shim_mib']} MiB | "
              f"**{row['beyond_guest_mib']} MiB** |")
    (REPO / "bench" / "overhead.json").write_text(json.dumps(
        {"containerd": args.containerd, "base_memory_mib": args.base_memory, "pods": rows},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
