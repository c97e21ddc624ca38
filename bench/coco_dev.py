#!/usr/bin/env python3
"""`make bench-coco`: the confidential path on coco-dev (no TEE hardware; it protects nothing).

1. **Guest pull vs plain download.** In a fresh coco-dev pod (containerd 2.1.9 CRI, podsandbox,
   QEMU TCG), three containers are started and waited for, each timed from StartContainer
   to its exit as seen through CRI:
   - ``base``: busybox (already in the guest's layer cache) running ``true``;
   - ``pull``: the ≥ 64 MiB image (busybox layer cached + one 64 MiB gzip layer) running
     ``true``: the guest fetches its manifest, config and big layer, verifies and unpacks it;
   - ``wget``: busybox running ``wget -O /dev/null`` of that image's manifest, config and big
     layer from the same registry (plain HTTP, in its netns), from the same guest.
   Two ratios, what the puller costs beyond the network (target ≤ 1.3):
   - on the guest's clock (the headline): the whole pull's duration from the puller's own log
     line (``image pull: …, N layers (M fetched) in X s``, its monotonic clock around the
     pull) against the sum of the three wget fetches timed in the same shell by reading
     /proc/uptime (a builtin ``read``: nothing but the wget forks in between) just before
     and after each ``wget``;
   - start→exit: (pull - base) / (wget - base), each term a difference of two container runs
     seen through CRI (noisy: a ~0.4 s difference of ~1.4 s runs), printed beside.
   Each run is a new pod (an empty layer cache).
2. **Pod start**: RunPodSandbox + CreateContainer + StartContainer (busybox sleeper), coco-dev
   (the guest pulls busybox from the registry) against the development profile (handler
   ``coco-none`` in the same containerd: the host's snapshot over 9p), interleaved.

Medians of ``--runs``; raw samples as JSON on the last line. Leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocols.api.cri import api_pb2 as cri
from tests import envinfo
from tests.e2e.coco_dev import CocoDevCri, coco_dev_cri
from tests.support import oci
from tests.support.cri import container_config, pod_config
from tests.support.guest import dev_profile_text, guest_image

SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]
DEV_HANDLER = "coco-none"


def timed_run(env: CocoDevCri, pod: str, name: str, image: str, command: list[str]) -> float:
    container = env.create(pod, name, image, command)
    started = time.monotonic()
    env.client.start_container(container)
    status = env.wait_exit(container, wait=600)
    took = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"{name} exited {status}: {env.logs(pod, name, wait=1)}")
    return took


PHASES = re.compile(r"image pull: .*: layer (?P<digest>sha256:[0-9a-f]{64}): .* in "
                    r"(?P<total>[0-9.]+) s \((?P<phases>[^)]*)\)")


def layer_phases(log: str, digest: str) -> dict[str, float] | None:
    """The puller's breakdown of layer ``digest`` from its log line in ``log``: ``total`` and
    seconds per phase of each side (``fetch: network 0.1, …; unpack: inflate 0.2, …`` →
    ``fetch_network``, ``unpack_inflate``, …); None without such a line."""
    for match in PHASES.finditer(log):
        if match["digest"] == digest:
            phases = {"total": float(match["total"])}
            for side_text in match["phases"].split("; "):
                side, _, parts = side_text.partition(": ")
                for part in parts.split(", "):
                    name, _, seconds = part.partition(" ")
                    phases[f"{side}_{name}"] = float(seconds)
            return phases
    return None


PULLED = re.compile(r"image pull: .*: (?P<digest>sha256:[0-9a-f]{64}), \d+ layers "
                    r"\(\d+ fetched\) in (?P<seconds>[0-9.]+) s")


def pull_seconds(log: str, manifest_digest: str) -> float | None:
    """The whole pull's duration of the image ``manifest_digest`` on the puller's own clock
    (manifest, config, every layer fetched, verified and unpacked) from its closing log line
    in ``log``; None without such a line."""
    for match in PULLED.finditer(log):
        if match["digest"] == manifest_digest:
            return float(match["seconds"])
    return None


def guest_pull_timing(env: CocoDevCri, pod: str, manifest_digest: str,
                      digest: str) -> tuple[float, dict[str, float]]:
    """The puller's own timing (its log lines on the pod VM's serial console, which coco-dev
    keeps in the pod's run directory): the whole pull's seconds, and the breakdown of layer
    ``digest``'s time."""
    consoles = sorted(env.pod_dir(pod).rglob("console.log"))
    for console in consoles:
        text = console.read_text(errors="replace")
        phases = layer_phases(text, digest)
        seconds = pull_seconds(text, manifest_digest)
        if phases is not None and seconds is not None:
            return seconds, phases
    seen = {str(c): c.read_text(errors="replace")[-3000:] for c in consoles}
    files = sorted(str(p) for p in env.run_dir.rglob("*"))
    raise SystemExit(f"no timing lines for image {manifest_digest} (layer {digest}) in the "
                     f"console of pod {pod}: {seen or files}")


# The registry serves an OCI manifest only to a client that accepts its type.
ACCEPT = f"--header 'Accept: {oci.OCI_MANIFEST}'"


def wget_line(url: str, output: str) -> str:
    """busybox wget of ``url`` to ``output``, a manifest with its ACCEPT header."""
    header = f" {ACCEPT}" if "/manifests/" in url else ""
    return f"wget -q{header} -O {output} {url}"


# Bytes received on the pod's interfaces (lo excluded), from /proc/net/dev, in shell builtins
# only: nothing forks or copies on the fetch's path.
RX_FUNCTION = """rx() {
  total=0
  while IFS= read -r line; do
    case "$line" in *:*)
      name="${line%%:*}"; name="${name##* }"
      [ "$name" = lo ] && continue
      set -- ${line#*:}; total=$((total + $1));;
    esac
  done < /proc/net/dev
  echo "$total"
}"""


def wget_script(urls: dict[str, str], sink: str) -> str:
    """busybox sh: fetch every URL with busybox wget into ``sink`` (a command reading stdin),
    print ``<name> <sink's output>`` per URL; any wget failure fails the script (pipefail).
    Not for timing: a pipe under TCG costs more than the download (busybox wget writes 4 KiB
    at a time; measured: 6.5 s instead of 0.4 s for the 65 MiB)."""
    lines = ["set -eo pipefail"]
    for name, url in urls.items():
        lines.append(f'out=$({wget_line(url, "-")} | {sink}); echo "{name} $out"')
    return "\n".join(lines)


# /proc/uptime ("12345.67 …") in hundredths of a second, shell builtins only: ``cs 12345.67``
# sets $cs. "1${frac}" - 100 keeps a fraction such as "08" from reading as octal.
CENTISECONDS_FUNCTION = """cs() { cs=$(( ${1%.*} * 100 + 1${1#*.} - 100 )); }"""


def rx_wget_script(urls: dict[str, str]) -> str:
    """The timed baseline: plain ``wget -O /dev/null`` of every URL (a failure fails the
    script), printing ``<name> <bytes the interface received meanwhile> <hundredths of a
    second the wget took on the guest's clock>`` per URL. The clock is a builtin ``read`` of
    /proc/uptime just before and after each wget (no fork, no command substitution inside
    the window); counting the bytes is outside it."""
    lines = ["set -e", RX_FUNCTION, CENTISECONDS_FUNCTION, "before=$(rx)"]
    for name, url in urls.items():
        lines += ["read -r up0 _ < /proc/uptime", wget_line(url, "/dev/null"),
                  "read -r up1 _ < /proc/uptime",
                  'cs "$up0"; t0=$cs; cs "$up1"; t1=$cs',
                  f'after=$(rx); echo "{name} $((after - before)) $((t1 - t0))"; '
                  "before=$after"]
    return "\n".join(lines)


def wget_seconds(output: str, names: Iterable[str]) -> float:
    """The wget fetches' summed duration on the guest's clock from ``rx_wget_script``'s
    output (its third field per name)."""
    got = dict(line.split(" ", 1) for line in output.splitlines() if " " in line)
    total = 0
    for name in names:
        fields = got.get(name, "").split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise SystemExit(f"wget baseline: no guest timing for {name} ({output!r})")
        total += int(fields[1])
    return total / 100


# What a download of N body bytes may add on the wire: Ethernet/IP/TCP headers (< 5 % at
# a 1500 MTU) and the HTTP response head.
WIRE_OVERHEAD = 1.08
WIRE_SLACK = 64 << 10


def check_received(output: str, blobs: dict[str, tuple[str, int]]) -> None:
    """Fail the bench unless the interface received each blob's size (and not much more)."""
    got = dict(line.split(" ", 1) for line in output.splitlines() if " " in line)
    for name, (_, size) in blobs.items():
        seen = int(got.get(name, "0").split()[0] or 0)
        if not size <= seen <= size * WIRE_OVERHEAD + WIRE_SLACK:
            raise SystemExit(f"wget baseline: {name}: the pod received {seen} bytes while "
                             f"fetching a {size}-byte blob ({output!r})")


CPU_PERIOD = 100_000


def pod_resources(vcpus: int) -> cri.LinuxContainerResources | None:
    """Limits that make static sizing give the pod VM ``vcpus`` (the coco-dev profile's base
    is 1 vCPU; a CPU quota of n whole CPUs adds n, shim/pod/sizing.py)."""
    if vcpus <= 1:
        return None
    return cri.LinuxContainerResources(cpu_period=CPU_PERIOD, cpu_quota=(vcpus - 1) * CPU_PERIOD)


def check_vcpus(env: CocoDevCri, pod: str, vcpus: int) -> int:
    """Fail unless the pod's QEMU has ``vcpus`` (its -smp); return its thread count (TCG
    runs each vCPU in a thread of its own when it is multi-threaded, QEMU's default for an
    x86 guest on an x86 host: a 2-vCPU VM shows one thread more than a 1-vCPU one)."""
    argv = env.qemu_argv(pod)
    smp = argv[argv.index("-smp") + 1].split(",")[0]
    if smp != str(vcpus):
        raise SystemExit(f"pod {pod}: wanted {vcpus} vCPUs, its QEMU has -smp {smp}")
    needle = str(env.pod_dir(pod)).encode()
    for pid in env.qemus():
        if needle in Path(f"/proc/{pid}/cmdline").read_bytes():
            return len(list(Path(f"/proc/{pid}/task").iterdir()))
    raise SystemExit(f"pod {pod}: no QEMU found")


def pull_vs_wget(env: CocoDevCri, run: int, large_ref: str, large: oci.Image,
                 vcpus: int) -> dict[str, float]:
    pod = env.run_pod(f"pull-{run}-{vcpus}cpu", initdata=env.initdata(),
                      resources=pod_resources(vcpus))
    try:
        threads = check_vcpus(env, pod, vcpus)
        env.start(pod, "warm", env.refs["busybox"], ["true"])  # busybox into the layer cache
        urls, blobs = blob_urls(env, large_ref, large)
        layer = large.layers[-1]
        base = timed_run(env, pod, "base", env.refs["busybox"], ["true"])
        pull = timed_run(env, pod, "pull", large_ref, ["true"])
        guest_pull, phases = guest_pull_timing(env, pod, large.manifest_digest, layer.digest)
        # The baseline: the same three fetches to /dev/null, the bytes the pod received for
        # each checked below, each timed on the guest's clock.
        wget = timed_run(env, pod, "wget", env.refs["busybox"],
                         ["sh", "-c", rx_wget_script(urls)])
        output = env.logs(pod, "wget", until="layer ")
        check_received(output, blobs)
        guest_wget = wget_seconds(output, blobs)
        if run == 0 and vcpus == 1:  # once: what these URLs serve is the blobs (untimed)
            env.start(pod, "wget-sha", env.refs["busybox"],
                      ["sh", "-c", wget_script(urls, "sha256sum")])
            check_wget(env.logs(pod, "wget-sha", until="layer "), blobs, "sha256")
    finally:
        env.remove_pod(pod)
    return {"vcpus": vcpus, "qemu_threads": threads, "base": base, "pull": pull, "wget": wget,
            "ratio": (pull - base) / (wget - base),
            "guest_pull": guest_pull, "guest_wget": guest_wget,
            "guest_ratio": guest_pull / guest_wget,
            **{f"layer_{name}": seconds for name, seconds in phases.items()}}


def blob_urls(env: CocoDevCri, large_ref: str, large: oci.Image,
              ) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    """The big image's manifest, config and big layer: URLs on the plain registry, and
    (digest, size) of each."""
    host = env.registries.plain.host
    repository = large_ref.split("/", 1)[1].rsplit(":", 1)[0]
    config = large.config_bytes()
    layer = large.layers[-1]
    blobs = {"manifest": (large.manifest_digest, len(large.manifest_bytes())),
             "config": (oci.sha256(config), len(config)),
             "layer": (layer.digest, len(layer.blob))}
    urls = {"manifest": f"http://{host}/v2/{repository}/manifests/{large.manifest_digest}",
            "config": f"http://{host}/v2/{repository}/blobs/{blobs['config'][0]}",
            "layer": f"http://{host}/v2/{repository}/blobs/{layer.digest}"}
    return urls, blobs


def host_pull_vs_wget(env: CocoDevCri, large_ref: str, large: oci.Image) -> dict[str, float]:
    """The same comparison at native speed, without a VM: the guest's puller code run on this
    host against the same registry (its layer cache on tmpfs, busybox cached first), and the
    host's busybox wget of the same URLs. Separates the puller's design from TCG's cost."""
    import asyncio
    import logging
    import tempfile

    from guest.image_pull.config import PullConfig, RegistryRule
    from guest.image_pull.puller import ImagePuller

    urls, blobs = blob_urls(env, large_ref, large)
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("guest.image_pull.puller")
    handler = Collect()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="coco-bench-pull-", dir="/dev/shm"))
    try:
        host = env.registries.plain.host
        config = PullConfig(work_dir=work / "images", ca_bundle=None,
                            registries=(RegistryRule(prefix=host, insecure=True),))
        puller = ImagePuller(config)
        asyncio.run(puller.pull(env.refs["busybox"]))
        started = time.monotonic()
        asyncio.run(puller.pull(large_ref))
        pull = time.monotonic() - started
        plain = "set -e\n" + "\n".join(wget_line(url, "/dev/null") for url in urls.values())
        started = time.monotonic()
        subprocess.run(["busybox", "sh", "-c", plain], check=True)
        wget = time.monotonic() - started
        counted = subprocess.run(["busybox", "sh", "-c", wget_script(urls, "wc -c")],
                                 capture_output=True, text=True, check=True).stdout
        check_wget(counted, blobs, "bytes")  # the same URLs, untimed: every byte there
    finally:
        logger.removeHandler(handler)
        shutil.rmtree(work, ignore_errors=True)
    phases = layer_phases("\n".join(lines), blobs["layer"][0])
    if phases is None:
        raise SystemExit(f"no timing line for the layer in the host puller's log: {lines}")
    del phases["total"]  # the host pull's time is measured around it
    return {"host_pull": pull, "host_wget": wget, "host_ratio": pull / wget,
            **{f"host_{name}": seconds for name, seconds in phases.items()}}


def check_wget(output: str, blobs: dict[str, tuple[str, int]], kind: str) -> None:
    """Fail the bench unless wget got each blob whole: its byte count, or its SHA-256."""
    got = dict(line.split(" ", 1) for line in output.splitlines() if " " in line)
    for name, (digest, size) in blobs.items():
        seen = got.get(name, "").split()
        want = str(size) if kind == "bytes" else digest.removeprefix("sha256:")
        if not seen or seen[0] != want:
            raise SystemExit(f"wget baseline is not the blobs: {name}: got {seen[:1]}, "
                             f"expected {kind} {want} ({output!r})")


def spread(samples: list[float], unit: str) -> str:
    """``median unit (min to max; each sample in run order)``."""
    ordered = sorted(samples)
    each = ", ".join(f"{x:.2f}" for x in samples)
    return (f"{statistics.median(samples):.2f} {unit} ({ordered[0]:.2f} to {ordered[-1]:.2f}; "
            f"{each})")


def pod_start(env: CocoDevCri, handler: str, run: int) -> float:
    name = f"start-{handler}-{run}"
    logs = env.base / "logs" / name
    logs.mkdir(parents=True, exist_ok=True)
    config = pod_config(name, uuid.uuid4().hex, logs)
    from tests.e2e.coco_dev import INITDATA_ANNOTATION, initdata_annotation

    if handler != DEV_HANDLER:
        config.annotations[INITDATA_ANNOTATION] = initdata_annotation(env.initdata())
    started = time.monotonic()
    pod = env.client.run_pod(config, handler)
    container = env.client.create_container(pod, container_config(
        "c", env.refs["busybox"], SLEEPER), config)
    env.client.start_container(container)
    took = time.monotonic() - started
    env.client.stop_container(container, timeout=5)
    env.client.remove_container(container)
    env.client.stop_pod(pod)
    env.client.remove_pod(pod)
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vcpus", type=int, nargs="+", default=[1, 2],
                        help="pod VM sizes for the pull/wget pair, interleaved within each run "
                             "(1: the profile's own; more through the pod's CPU limit)")
    parser.add_argument("--no-pod-start", action="store_true",
                        help="measure only the pull against wget (skip the pod start figures)")
    args = parser.parse_args()
    env_info = envinfo.load()
    image = guest_image()
    large = oci.large()
    pulls: list[dict[str, float]] = []
    hosts: list[dict[str, float]] = []
    starts: dict[str, list[float]] = {"coco": [], DEV_HANDLER: []}
    dev_profile = Path(f"/tmp/coco-bench-dev-{uuid.uuid4().hex[:6]}.toml")
    dev_profile.write_text(dev_profile_text(env_info.kernel, image.image))
    try:
        with coco_dev_cri("2.1.9", "podsandbox", image,
                          extra_handlers={DEV_HANDLER: dev_profile}) as env:
            large_ref = env.registries.push([large], env.registries.plain, "coco/large")
            env.client.pull_image(large_ref)
            for run in range(args.runs):
                for vcpus in args.vcpus:
                    pulls.append(pull_vs_wget(env, run, large_ref, large, vcpus))
                hosts.append(host_pull_vs_wget(env, large_ref, large))
                for handler in () if args.no_pod_start else ("coco", DEV_HANDLER):
                    starts[handler].append(pod_start(env, handler, run))
    finally:
        dev_profile.unlink(missing_ok=True)
    size = sum(len(b) for b in large.blobs().values()) / 2**20
    print(f"\ncoco-dev, containerd 2.1.9 CRI podsandbox, QEMU TCG, {args.runs} runs (medians)")
    for vcpus in args.vcpus:
        mine = [p for p in pulls if p["vcpus"] == vcpus]
        print(f"  pod VM with {vcpus} vCPU{'s' if vcpus > 1 else ''}:")
        print(f"    guest pull / wget of the {size:.0f} MiB image, target ≤ 1.3; "
              "median (min to max; per run)")
        print("      on the guest's clock (the puller's log line; wget between /proc/uptime "
              "reads):")
        print(f"        pull {spread([p['guest_pull'] for p in mine], 's')}")
        print(f"        wget {spread([p['guest_wget'] for p in mine], 's')}")
        print(f"        ratio {spread([p['guest_ratio'] for p in mine], 'x')}")
        print("      start→exit through CRI, minus a cached busybox `true` (base):")
        for key in ("base", "pull", "wget"):
            print(f"        {key} {spread([p[key] for p in mine], 's')}")
        print(f"        pull - base {spread([p['pull'] - p['base'] for p in mine], 's')}")
        print(f"        wget - base {spread([p['wget'] - p['base'] for p in mine], 's')}")
        print(f"        ratio {spread([p['ratio'] for p in mine], 'x')}")
        phases = [k for k in mine[0] if k.startswith("layer_")]
        print("    the big layer in the guest (the puller's own clock, exclusive time per phase "
              "of each thread):")
        print("      " + ", ".join(f"{k.removeprefix('layer_')} "
                                  f"{statistics.median(p[k] for p in mine):.2f}" for k in phases))
    print("  wget -O /dev/null: the bytes the pod received checked against each blob's size "
          "every run; what the URLs serve checked by SHA-256 in the first")
    host = {k: statistics.median(h[k] for h in hosts) for k in hosts[0]}
    print(f"  the same without a VM (this host's CPU, the puller's code, busybox wget): pull "
          f"{host['host_pull']:.2f} s, wget {host['host_wget']:.2f} s: "
          f"{host['host_ratio']:.2f}x")
    print("    " + ", ".join(f"{k.removeprefix('host_')} {v:.2f}" for k, v in host.items()
                            if k not in ("host_pull", "host_wget", "host_ratio")))
    if not args.no_pod_start:
        coco, dev = (statistics.median(starts[h]) for h in ("coco", DEV_HANDLER))
        print(f"  pod start (RunPodSandbox+CreateContainer+StartContainer): coco-dev "
              f"{coco:.2f} s, dev profile {dev:.2f} s ({coco / dev:.2f}x)")
    print(json.dumps({"pull": pulls, "host": hosts, "pod_start": starts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
