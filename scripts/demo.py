#!/usr/bin/env python3
"""`make demo`: a container inside a VM, through a real containerd and our shim; then the
confidential flow.

Phases (each timed): build the reference guest image (cached) → start a private containerd
2.1.9 with the runtime `io.containerd.coco.v2` on its PATH → import a locally built busybox
image → `ctr run --rm --runtime io.containerd.coco.v2 … uname -a` → show that the kernel that
answered is the guest's, not this host's → a **coco-dev** pod through CRI (the confidential
code path without TEE hardware: it protects nothing) whose image exists only in a registry in
its own network namespace: the guest pulls and verifies it, the host shares nothing (the
registry's access log shows the blobs fetched from the pod's IP; QEMU has no 9p/virtio-fs
device).

Then the confidential flow (tests/support/proof_env.py, the same pieces as the e2e proof): a
workload owner's KBS and registry in their own network namespace, a CRI pod on the coco-dev
profile whose initdata names that KBS, its image pulled inside the guest, the guest attesting,
the KBS releasing a fresh random secret to this pod's evidence, and the container printing the
secret's SHA-256; then every byte the host handled is scanned for the secret
(tests/support/secret_scan.py). Everything it started is stopped on the way out.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest.image.build import BuildResult
from tests import envinfo
from tests.support.containerd import private_containerd
from tests.support.guest import dev_profile_text, guest_image
from tests.support.images import BUSYBOX_REF, busybox_oci_archive

CONTAINERD = os.environ.get("COCO_DEMO_CONTAINERD", "2.1.9")
timings: list[tuple[str, float]] = []


@contextmanager
def phase(title: str) -> Iterator[None]:
    print(f"==> {title}", flush=True)
    start = time.monotonic()
    yield
    timings.append((title, time.monotonic() - start))


def main() -> int:
    env = envinfo.load()
    base = Path(tempfile.mkdtemp(prefix="coco-demo-", dir="/tmp"))
    try:
        with phase("guest image (reference agent, cached by its inputs)"):
            image = guest_image()
            print(f"    {image.image} ({image.size / 2**20:.1f} MiB, sha256 {image.sha256[:16]}…)")
        profile = base / "profile.toml"
        profile.write_text(dev_profile_text(env.kernel, image.image))
        shim_env = {"COCO_SHIM_CONFIG": str(profile), "COCO_SHIM_RUN_DIR": str(base / "run"),
                    "COCO_SHIM_SOCKET_DIR": str(base / "s"),
                    "COCO_SHIM_STATE_DIR": str(base / "state")}
        with phase(f"private containerd {CONTAINERD}"), \
                private_containerd(CONTAINERD, extra_path=[Path(sys.executable).parent,
                                                           env.vhost_device_vsock.parent],
                                   env=shim_env, log_level="info") as cd:
            print(f"    {cd.address}")
            with phase("import a locally built busybox image"):
                cd.ctr("images", "import", "--platform", "linux/amd64",
                       str(busybox_oci_archive(base / "busybox.tar")))
            command = ["run", "--rm", "--runtime", "io.containerd.coco.v2", BUSYBOX_REF,
                       "demo", "uname", "-a"]
            with phase("ctr " + " ".join(command)):
                out = cd.ctr(*command, timeout=300)
            guest = out.stdout.decode().strip()
            host = subprocess.run(["uname", "-a"], capture_output=True, text=True).stdout.strip()
            print(f"\n    container says: {guest}\n    this host is:   {host}\n")
            if guest.split()[2] == host.split()[2]:
                print("demo: the container reported the host kernel: it did not run in a VM",
                      file=sys.stderr)
                return 1
            print("    → the container ran on the guest kernel, inside a QEMU VM.")
        if coco_dev_pod(image) != 0:
            return 1
        if confidential_flow() != 0:
            return 1
        print("\nphase timings:")
        for title, seconds in timings:
            print(f"    {seconds:7.2f} s  {title}")
        return 0
    finally:
        subprocess.run(["umount", "-R", "-l", str(base / "run")], capture_output=True,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)


def coco_dev_pod(image: BuildResult) -> int:
    """A coco-dev CRI pod whose image only the guest pulls (tests/e2e/coco_dev.py)."""
    from tests.e2e.coco_dev import coco_dev_cri
    from tests.support import oci

    with phase("coco-dev: registry in a netns, containerd 2.1.9 CRI, images pushed"), \
            coco_dev_cri("2.1.9", "podsandbox", image) as env:
        ref = env.refs["busybox"]
        print(f"    registry {env.registries.plain.host} (netns {env.registries.pair.peer}); "
              f"image {ref}")
        mark = len(env.registries.plain.access_log())
        with phase("coco-dev: RunPodSandbox (initdata: registry settings) + container"):
            pod = env.run_pod("demo", initdata=env.initdata())
            env.start(pod, "hello", ref, ["sh", "-c", "echo hello from $(uname -r) in the "
                                          "guest; ls /"])
            said = env.logs(pod, "hello", until="hello from")
        ip = env.pod_ip(pod)
        blobs = sorted({a.blob or "" for a in env.registries.plain.blob_fetches(mark)
                        if a.remote == ip})
        argv = " ".join(env.qemu_argv(pod))
        shared = [d for d in ("9p", "virtio-fs", "vhost-user-fs") if d in argv]
        print(f"\n    container says: {said.splitlines()[0]}")
        print(f"    image {ref} ({oci.busybox().manifest_digest}) pulled in the guest: "
              f"blobs fetched by the pod's IP {ip}:")
        for blob in blobs:
            print(f"      {blob}")
        print(f"    host filesystem shares on the VM: {shared or 'none'}\n")
        env.remove_pod(pod)
        if not blobs or shared:
            print("demo: the coco-dev pod's image was not pulled in the guest",
                  file=sys.stderr)
            return 1
        print("    → coco-dev (protects nothing: no TEE here) ran the confidential path: the "
              "image was pulled and verified inside the VM, nothing shared from the host.")
    return 0


def confidential_flow() -> int:
    from tests.support.kbs_net import SECRET_PATH
    from tests.support.proof import HostBytes
    from tests.support.proof_env import proof_env, sha256_lines

    print("\n==> confidential flow: coco-dev pod, image pulled in the guest, attestation, "
          "secret released", flush=True)
    with phase("confidential flow, in all (owner's KBS + registry, containerd, pod, scan)"), \
            proof_env(CONTAINERD, log_level="info") as env:
        kbs = env.kbs
        print(f"    KBS {kbs.url} (own netns, TLS from a test CA in the pod's initdata), "
              f"fresh secret stored as {SECRET_PATH}")
        print(f"    policy: release only to init-data {kbs.initdata_digest[:23]}…")
        host = HostBytes(env.base / "host-bytes")
        with phase("RunPodSandbox (coco-dev, initdata) + the container, to its exit"):
            pod_id, pod = env.run_pod("demo", kbs.initdata)
            try:
                command = ["/bin/sh", "-c", "wget -q -O - http://127.0.0.1:8006/cdh/resource/"
                           f"{SECRET_PATH} | sha256sum"]
                output = env.run_to_exit(pod_id, pod, env.container("app", command))
                pod_ip = env.client.pod_status(pod_id).network.ip
                env.snapshot_pod(host, pod_id)
            finally:
                env.end_pod(pod_id)
        pulls = [a for a in env.registry.access_log()
                 if a.remote.split(":")[0] == pod_ip and a.status == 200]
        manifests = [a.path for a in pulls if "/manifests/" in a.path]
        blobs = [a.blob for a in pulls if a.blob]
        print(f"\n    image:    {env.app_ref}")
        print(f"              the guest pulled {env.app_digest} itself: the registry served "
              f"{len(manifests)} manifest and {len(blobs)} blob request(s) to the pod's "
              f"address {pod_ip}")
        for release in kbs.releases():
            print(f"    KBS:      released {release.path} ({release.size} bytes) to "
                  f"{release.tee} evidence with init-data {release.init_data[:23]}… "
                  f"(this pod's: {release.init_data == kbs.initdata_digest})")
        seen = sha256_lines(output)
        print(f"    container saw sha256 {seen[0] if seen else '(nothing)'}")
        print(f"    owner stored  sha256 {kbs.secret_sha256}")
        with phase("scan the host-side byte sources"):
            env.host_bytes(host)
            findings = host.scan(kbs.secret)
        print(f"    scanned {len(host.sources)} host-side sources for the secret "
              "(raw, hex, base64, base64url at every alignment):")
        for line in host.described:
            print(f"      - {line}")
        if findings or seen != [kbs.secret_sha256] or not manifests:
            for finding in findings:
                print(f"demo: SECRET FOUND on the host: {finding}", file=sys.stderr)
            print("demo: the confidential flow did not show what it should", file=sys.stderr)
            return 1
        print("    → none of the secret's bytes appear in what the host handled.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
