#!/usr/bin/env python3
"""`make bench-cri`: pods through containerd's CRI plugin with networking on.

Reports the median of N runs of RunPodSandbox + CreateContainer + StartContainer (what the
kubelet waits for before a pod is running; handler `coco`, CNI bridge + host-local in
198.18.201.0/24, podsandbox mode) and the shim daemon's RSS/PSS for a running pod with its
network wired, then issue 18's figure it measures through `tests/support/targets.py`: the gRPC
daemon's RSS when the node runs containerd 1.x (`--containerd 1.7.24`; 2.x's shims speak
ttrpc), the other figures referred to the benches that print them. Needs `make env`; leaves
nothing running.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from tests import envinfo
from tests.support import targets
from tests.support.containerd import Containerd, private_containerd, shim_daemons
from tests.support.cri import (
    CRI_NAMESPACE,
    PAUSE_ENTRYPOINT,
    PAUSE_REF,
    CniNetwork,
    CriClient,
    container_config,
    cri_config,
    pod_config,
)
from tests.support.guest import dev_profile_text, guest_image
from tests.support.images import BUSYBOX_REF, busybox_oci_archive

REPO = Path(__file__).resolve().parent.parent
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; while :; do sleep 1; done"]


class CriNode(NamedTuple):
    """A private containerd with the CRI plugin, the `coco` handler on ``profile`` (rewrite it
    between runs: every pod's daemon reads it when the pod boots), a CNI bridge network and the
    busybox and pause images imported."""

    containerd: Containerd
    client: CriClient
    base: Path
    profile: Path


@contextlib.contextmanager
def cri_node(version: str, *, subnet: str = "198.18.201.0/24",
             prefix: str = "coco-bcri-",
             enable_annotations: tuple[str, ...] = (),
             tree: Path | None = None) -> Iterator[CriNode]:
    """Bring a CRI node up (the development profile on the reference guest image, TCG); leave
    nothing running after. ``enable_annotations``: pod annotations the profile allows and CRI
    passes on (e.g. kata's kernel_params). ``tree``: another checkout whose shim the node's
    daemons run (a before/after in one run; default: this one)."""
    env = envinfo.load()
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    tag = uuid.uuid4().hex[:6]
    network = CniNetwork(name=f"coco-bench-{tag}", bridge=f"cocobch{tag}",
                         subnet=subnet, data_dir=base / "cni-ipam")
    try:
        image = guest_image()
        profile = base / "profile.toml"
        profile.write_text(dev_profile_text(env.kernel, image.image,
                                            enable_annotations=enable_annotations))
        network.write(base / "cni")
        shim_env = {"COCO_SHIM_RUN_DIR": str(base / "run"), "COCO_SHIM_SOCKET_DIR": str(base / "s"),
                    "COCO_SHIM_STATE_DIR": str(base / "state"),
                    "PYTHONPATH": str((tree or REPO).resolve())}
        config = cri_config(version, profile=profile, cni_conf_dir=base / "cni",
                            pod_annotations=enable_annotations)
        with private_containerd(version, extra_config=config, env=shim_env,
                                log_level="info", extra_path=[Path(sys.executable).parent,
                                            env.vhost_device_vsock.parent]) as cd:
            for ref, archive, entrypoint in ((BUSYBOX_REF, base / "busybox.tar", None),
                                             (PAUSE_REF, base / "pause.tar", PAUSE_ENTRYPOINT)):
                busybox_oci_archive(archive, ref, entrypoint=entrypoint)
                cd.ctr("images", "import", "--platform", "linux/amd64", str(archive),
                       namespace=CRI_NAMESPACE)
            with CriClient(cd.address) as client:
                yield CriNode(cd, client, base, profile)
    finally:
        network.remove_bridge()
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)


def start_pod(node: CriNode, name: str) -> tuple[str, str]:
    """RunPodSandbox + CreateContainer + StartContainer of a busybox sleeper, as the kubelet
    does before a pod is running: (pod id, container id)."""
    pod = pod_config(name, uuid.uuid4().hex, node.base)
    pod_id = node.client.run_pod(pod)
    cid = node.client.create_container(pod_id, container_config("c", BUSYBOX_REF, SLEEPER), pod)
    node.client.start_container(cid)
    return pod_id, cid


def remove_pod(node: CriNode, pod_id: str, cid: str) -> None:
    node.client.stop_container(cid, timeout=5)
    node.client.remove_container(cid)
    node.client.stop_pod(pod_id)
    node.client.remove_pod(pod_id)


def issue18(containerd: str, rss_mib: float) -> list[str]:
    """Issue 18's figures after the CRI figures: the running pod's daemon RSS is the gRPC figure
    only on containerd 1.x (its shims speak gRPC; 2.x's speak ttrpc); the others are referred
    to the benches that print them."""
    lines = [targets.HEADER]
    printed: list[str] = []
    if containerd.split(".")[0] == "1":
        lines.append(targets.line("grpc_daemon_rss_mib", rss_mib, f"{rss_mib:.1f} MiB",
                                  of=f"a running CRI pod, containerd {containerd}"))
        printed.append("grpc_daemon_rss_mib")
    else:
        lines.append("  (the gRPC daemon's RSS: this bench with --containerd 1.7.24)")
    lines += targets.elsewhere(printed)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--containerd", default="2.1.9")
    args = parser.parse_args()
    samples: list[float] = []
    rss = pss = 0.0
    with cri_node(args.containerd) as node:
        for i in range(args.runs):
            t0 = time.monotonic()
            pod_id, cid = start_pod(node, f"bench-{i}")
            samples.append(time.monotonic() - t0)
            if i == 0:
                time.sleep(2)
                [daemon] = shim_daemons(node.base)
                info = daemon.memory_full_info()
                rss, pss = info.rss / 2**20, info.pss / 2**20
            remove_pod(node, pod_id, cid)
    print(f"\nCRI pods, containerd {args.containerd}, podsandbox mode, networking on, "
          f"QEMU TCG, {args.runs} runs")
    print(f"  RunPodSandbox+CreateContainer+StartContainer (median)  "
          f"{statistics.median(samples):.2f} s   samples {[round(s, 2) for s in samples]}")
    print(f"  shim daemon of a running pod, RSS / PSS               {rss:.1f} / {pss:.1f} MiB")
    print("", *issue18(args.containerd, rss), sep="\n")
    print(json.dumps({"cri_start_s": samples, "rss_mib": rss, "pss_mib": pss}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
