"""CRI end to end: a Python CRI client (as the kubelet) → containerd's CRI plugin → runtime
handler ``coco`` → our shim → one QEMU VM per pod. Three ways: containerd 2.1.9 and 1.7.24 in
``podsandbox`` mode (a pause container boots the VM through the task API), and 2.1.9 with
``sandboxer = "shim"`` (the sandbox API boots it at pod level, no pause container).

In podsandbox mode the runtime profile reaches the shim only through the handler's
``options.ConfigPath``: ``$COCO_SHIM_CONFIG`` points at a file that does not exist. CNI
(Debian's bridge + host-local, a private conf dir, 198.18.200.0/24) sets up the pod's network
namespace on the host; the pause image is the local busybox layer with a sleeping entrypoint,
pinned as the sandbox image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from guest.image.build import BuildResult
from protocols.api.cri import api_pb2 as cri
from shim.pod.mounts import mounts_under
from tests import envinfo
from tests.e2e.conftest import SHIM_EXIT_GRACE, describe, pod_boots, shim_env
from tests.support.containerd import Containerd, coco_processes, private_containerd
from tests.support.cri import (
    CRI_NAMESPACE,
    PAUSE_ENTRYPOINT,
    PAUSE_REF,
    CniNetwork,
    CriClient,
    TerminalSession,
    container_config,
    cri_config,
    exit_code_of,
    pod_config,
)
from tests.support.guest import dev_profile_text
from tests.support.images import BUSYBOX_REF, busybox_oci_archive

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

REPO = Path(__file__).resolve().parents[2]
SLEEPER = ["/bin/sh", "-c", "trap 'exit 0' TERM; echo started; while :; do sleep 1; done"]
STATS_WAIT = 20.0
POD_SUBNET = "198.18.200.0/24"  # benchmarking range: never routed anywhere


@dataclass
class CriContainerd:
    cd: Containerd
    base: Path
    client: CriClient
    sandboxer: str
    run_dir: Path  # the shim's COCO_SHIM_RUN_DIR

    def containers(self) -> list[str]:
        """containerd's own containers in the CRI namespace (pause containers included)."""
        listing = self.cd.ctr("containers", "list", "--quiet", namespace=CRI_NAMESPACE)
        return listing.stdout.decode().split()

    def qemus(self) -> list[int]:
        found = []
        for pid in coco_processes(self.base):
            try:
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:  # exited meanwhile
                continue
        return found


@pytest.fixture(scope="module", params=[("2.1.9", "podsandbox"), ("1.7.24", "podsandbox"),
                                        ("2.1.9", "shim")], ids=lambda p: "-".join(p))
def crictd(request: pytest.FixtureRequest, guest_image: BuildResult) -> Iterator[CriContainerd]:
    version, sandboxer = request.param
    env = envinfo.load()
    base = Path(tempfile.mkdtemp(prefix="coco-cri-", dir="/tmp"))
    profile = base / "profile.toml"
    profile.write_text(dev_profile_text(env.kernel, guest_image.image))
    tag = uuid.uuid4().hex[:6]
    network = CniNetwork(name=f"coco-cri-{tag}", bridge=f"cococri{tag}",
                         subnet=POD_SUBNET, data_dir=base / "cni-ipam")
    network.write(base / "cni")
    run_dir = base / "run"
    # sandboxer "shim": containerd 2.1.9 fails every container of a pod whose handler has
    # non-runc options ("can't unmarshal type runtimeoptions.v1.Options to output
    # containerd.runc.v1.Options", containerd PR 12986), so there the profile comes from
    # $COCO_SHIM_CONFIG; in podsandbox mode only from the handler's ConfigPath.
    shim_mode = sandboxer == "shim"
    config_env = profile if shim_mode else base / "no-such.toml"
    shim_vars = {**shim_env(base, profile), "COCO_SHIM_CONFIG": str(config_env),
                 "COCO_SHIM_RUN_DIR": str(run_dir),
                 # The shim (spawned by containerd) runs this working tree's code, whatever
                 # checkout the virtualenv's editable install points at.
                 "PYTHONPATH": str(REPO)}
    extra_path = [Path(sys.executable).parent, env.vhost_device_vsock.parent]
    config = cri_config(version, profile=None if shim_mode else profile,
                        cni_conf_dir=base / "cni", sandboxer=sandboxer)
    try:
        with private_containerd(version, extra_config=config, extra_path=extra_path,
                                env=shim_vars) as cd:
            for ref, archive, entrypoint in (
                    (BUSYBOX_REF, base / "busybox.tar", None),
                    (PAUSE_REF, base / "pause.tar", PAUSE_ENTRYPOINT)):
                busybox_oci_archive(archive, ref, entrypoint=entrypoint)
                cd.ctr("images", "import", "--platform", "linux/amd64", str(archive),
                       namespace=CRI_NAMESPACE)
            with CriClient(cd.address) as client:
                yield CriContainerd(cd, base, client, sandboxer, run_dir)
        deadline = time.monotonic() + SHIM_EXIT_GRACE
        while (leftovers := coco_processes(base)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leftovers, f"processes left behind: {describe(leftovers)}"
    finally:
        for pid in coco_processes(base):
            os.kill(pid, 9)
        network.remove_bridge()
        for target in mounts_under(run_dir):  # after a failure: whatever the shim left mounted
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_cri_sees_the_runtime_and_images(crictd: CriContainerd) -> None:
    version = crictd.client.version()
    assert version.runtime_name == "containerd"
    assert version.runtime_api_version == "v1"
    for ref in (BUSYBOX_REF, PAUSE_REF):
        assert crictd.client.image_status(ref) is not None, ref


def pod_dirs(crictd: CriContainerd) -> list[Path]:
    return [p for p in crictd.run_dir.iterdir() if p.is_dir()] if crictd.run_dir.exists() else []


HTTPD = ["/bin/sh", "-c", "mkdir -p /www && echo \"hello from $(hostname)\" > /www/index.html"
         " && exec httpd -f -p 8080 -h /www"]


def test_pods_with_two_containers_reach_each_other_and_the_host(crictd: CriContainerd) -> None:
    """Two pods, one VM each (two pod VMs serve both proofs; a third pod of its own used to
    boot for the first).

    Pod web-a runs two containers in its one VM: RunPodSandbox boots the VM once (CNI ran in
    the pod's netns on the host; in podsandbox mode a pause container booted it, with the
    shim sandboxer the sandbox API did), both containers run there, ExecSync's output and exit
    status come from the guest, ContainerStats decodes the guest cgroup's numbers, a
    container stops with its exit code and its log reached the kubelet's log dir.

    The pod network: CNI's veth in each pod netns is mirrored into the pod VM, the container
    sees the pod IP on eth0, the two pods talk HTTP both ways, and the host (the bridge's
    gateway address, inside the test's own 198.18.200.0/24) reaches a server in a container.
    After the pods' removal no VM, pod directory, mount or network namespace is left."""
    client, log_dir = crictd.client, crictd.base / "net-logs"
    log_dir.mkdir()
    pods: dict[str, tuple[str, str, cri.PodSandboxConfig]] = {}
    second = ""
    try:
        for name in ("web-a", "web-b"):
            config = pod_config(name, uuid.uuid4().hex, log_dir)
            pod_id = client.run_pod(config)
            if name == "web-a":
                sandbox = client.pod_status(pod_id)
                assert sandbox.state == cri.SANDBOX_READY
                # CNI ran in the pod's network namespace on the host (bridge + host-local).
                assert ip_address(sandbox.network.ip) in ip_network(POD_SUBNET), sandbox
                assert len(crictd.qemus()) == 1, crictd.cd.log_tail()
                # One boot: the daemon's early boot is adopted by the pause container's
                # Create (podsandbox), or cancelled by CreateSandbox before it launched
                # anything (shim).
                assert pod_boots(crictd.cd, pod_id) == 1, crictd.cd.log_tail()
                # podsandbox: a pause container booted the VM; shim: the sandbox API did.
                assert (pod_id in crictd.containers()) == (crictd.sandboxer == "podsandbox")
            cid = client.create_container(pod_id, container_config(f"{name}-httpd", BUSYBOX_REF,
                                                                   HTTPD), config)
            client.start_container(cid)
            pods[name] = (pod_id, cid, config)
        pod_a, httpd_a, config_a = pods["web-a"]
        second = client.create_container(pod_a, container_config("second", BUSYBOX_REF,
                                                                 SLEEPER), config_a)
        client.start_container(second)
        for cid in (httpd_a, second):
            status = client.container_status(cid)
            assert status.state == cri.CONTAINER_RUNNING, status
        # Both containers of web-a (and its pause container, in podsandbox mode) live in its
        # VM: one QEMU per pod.
        assert len(crictd.qemus()) == 2, describe(crictd.qemus())
        # Their network namespaces are where the teardown's leak check looks (not vacuous).
        assert len(crictd.cd.cni_netns()) == 2, crictd.cd.cni_netns()

        # ExecSync: output and exit status come back; the answers come from the guest.
        hostname = client.exec_sync(second, ["uname", "-n"])
        assert (hostname.exit_code, hostname.stdout, hostname.stderr) == (0, b"web-a\n", b"")
        kernel = client.exec_sync(httpd_a, ["cat", "/proc/version"])
        assert kernel.exit_code == 0
        assert kernel.stdout.split()[2] != Path("/proc/version").read_bytes().split()[2]
        failed = client.exec_sync(second, ["sh", "-c", "echo oops >&2; exit 3"])
        assert (failed.exit_code, failed.stdout, failed.stderr) == (3, b"", b"oops\n")
        # ContainerStats decodes the shim's cgroup v2 Metrics (containerd 2.1.9's first answer
        # may still be all zeros; the next ones carry the guest cgroup's numbers).
        deadline = time.monotonic() + STATS_WAIT
        while True:
            stats = client.container_stats(second)
            assert stats.attributes.id == second and stats.cpu.timestamp > 0
            if stats.cpu.usage_core_nano_seconds.value > 0 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert stats.cpu.usage_core_nano_seconds.value > 0, stats
        assert stats.memory.usage_bytes.value > 0, stats

        ips = {name: client.pod_status(pod_id).network.ip for name, (pod_id, _, _) in
               pods.items()}
        for name, (_, cid, _) in pods.items():
            eth0 = client.exec_sync(cid, ["ip", "-4", "-o", "addr", "show", "eth0"])
            assert eth0.exit_code == 0 and f" {ips[name]}/" in eth0.stdout.decode(), eth0
        # Pod B fetches from pod A and back: VM → tap → veth → bridge → veth → tap → VM.
        for src, dst in (("web-b", "web-a"), ("web-a", "web-b")):
            got = wait_exec(client, pods[src][1],
                            # No wget -T: busybox 1.35's static wget crashes on it.
                            ["timeout", "10", "wget", "-q", "-O", "-",
                             f"http://{ips[dst]}:8080/"])
            assert got.stdout.decode().strip() == f"hello from {dst}", got
        # The host side of the pod network (the bridge gateway) reaches the server in pod A.
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{ips['web-a']}:8080/", timeout=5) as reply:
                    body = reply.read().decode().strip()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert body == "hello from web-a"

        # A container of the pod stops with its exit code (its SIGTERM trap) and is removed;
        # its output reached the pod's log directory.
        client.stop_container(second, timeout=10)
        status = client.container_status(second)
        assert status.state == cri.CONTAINER_EXITED, status
        assert status.exit_code == 0, status
        client.remove_container(second)
        second = ""
        assert [c.id for c in client.list_containers(pod_a)] == [httpd_a]
        log = (log_dir / "second.log").read_text()
        assert "started" in log, log
    finally:
        if second:
            client.stop_container(second, timeout=5)
            client.remove_container(second)
        for pod_id, cid, _ in pods.values():
            client.stop_container(cid, timeout=5)
            client.remove_container(cid)
            client.stop_pod(pod_id)
            client.remove_pod(pod_id)
    assert [p.id for p in client.list_pods()] == []
    # The shim tears each pod down after StopPodSandbox returns: the VM stops, then its run
    # directory goes, with nothing left mounted (CRI bind-mounts files: hostname, hosts,
    # resolv.conf).
    deadline = time.monotonic() + SHIM_EXIT_GRACE
    while (crictd.qemus() or pod_dirs(crictd)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert crictd.qemus() == []
    assert pod_dirs(crictd) == []
    assert mounts_under(crictd.run_dir) == [crictd.run_dir] or mounts_under(crictd.run_dir) == []
    # No network namespace of these pods stays behind (CRI pins them under its state dir).
    assert crictd.cd.cni_netns() == []


def wait_exec(client: CriClient, cid: str, cmd: list[str],
              timeout: float = 30) -> cri.ExecSyncResponse:
    """ExecSync until it exits 0 (the server in the other pod may still be starting)."""
    deadline = time.monotonic() + timeout
    while True:
        result = client.exec_sync(cid, cmd)
        if result.exit_code == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.5)


# A pod-level safe sysctl and an unsafe one, both scoped to the IPC namespace.
POD_SYSCTLS = {"kernel.shm_rmid_forced": "1", "fs.mqueue.msg_max": "100"}
IPC_MAKER = ["sh", "-c", "touch /dev/mqueue/coco-ipc && trap 'exit 0' TERM && "
             "while :; do sleep 1; done", "coco-ipc-maker"]
NAMESPACE_REPORT = ["sh", "-c", "cat /proc/sys/kernel/shm_rmid_forced /proc/sys/fs/mqueue/msg_max"
                    " && readlink /proc/self/ns/ipc && readlink /proc/self/ns/uts && hostname"
                    " && ls /dev/mqueue"]
OOM_LIMIT = 24 << 20
MEMORY_HOG = ["sh", "-c", "a=xxxxxxxx; while :; do a=$a$a; done"]  # doubles past any limit
EXIT_WAIT = 60.0
STOP_TIMEOUT = 30  # StopContainer's grace period: a dropped SIGTERM would wait all of it
PROMPT_STOP = 10.0


def wait_exited(client: CriClient, cid: str) -> cri.ContainerStatus:
    deadline = time.monotonic() + EXIT_WAIT
    while (status := client.container_status(cid)).state != cri.CONTAINER_EXITED:
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    return status


def test_what_the_kubelet_relies_on(crictd: CriContainerd) -> None:
    """One pod, the behaviours a kubelet depends on: pod sysctls seen by every container
    through the pod's shared IPC namespace (and UTS, PID with shareProcessNamespace); `exec -it`
    with containerd's 64-character ids; OOMKilled with exit 137; a privileged container
    creating and deleting a bridge (kernel modules loaded on demand); StopContainer right
    after StartContainer."""
    client, log_dir = crictd.client, crictd.base / "kubelet-logs"
    log_dir.mkdir()
    pod = pod_config("kubelet-pod", uuid.uuid4().hex, log_dir, sysctls=POD_SYSCTLS,
                     privileged=True, share_pid=True)
    pod_id = client.run_pod(pod)
    try:
        maker, reader = (client.create_container(pod_id, container_config(
            name, BUSYBOX_REF, command, pod=pod, privileged=privileged), pod)
            for name, command, privileged in (("ipc-maker", IPC_MAKER, False),
                                              ("reader", SLEEPER, True)))
        assert len(pod_id) == len(maker) == len(reader) == 64  # real CRI ids
        for cid in (maker, reader):
            client.start_container(cid)
        wait_exec(client, maker, ["test", "-e", "/dev/mqueue/coco-ipc"])

        # Sysctls, IPC and UTS: both containers are in the pod's namespaces, where the pod's
        # sysctls apply and the message queue made by one is seen by the other.
        reports = [client.exec_sync(cid, NAMESPACE_REPORT) for cid in (maker, reader)]
        for report in reports:
            assert report.exit_code == 0, report
            lines = report.stdout.decode().split()
            assert lines[:2] == ["1", "100"], report
            assert lines[2].startswith("ipc:[") and lines[3].startswith("uts:["), report
            assert lines[4:] == ["kubelet-pod", "coco-ipc"], report
        assert reports[0].stdout == reports[1].stdout
        # shareProcessNamespace: the reader sees the maker's process (the pattern does not
        # match itself; processes may come and go during the scan).
        seen = client.exec_sync(reader, ["sh", "-c", "for f in /proc/[0-9]*/cmdline; do"
                                         " grep -qs 'coco-ipc-make[r]' $f && echo $f; done; true"])
        assert seen.exit_code == 0 and seen.stdout.startswith(b"/proc/"), seen
        # PID 1 of that namespace is no workload: the pause container (podsandbox) or, with
        # the sandbox API (no pause container), the image's pause program the agent starts.
        init = client.exec_sync(reader, ["sh", "-c", "tr '\\0' ' ' </proc/1/cmdline"])
        expected = ("/pause_bundle/rootfs/pause -P " if crictd.sandboxer == "shim"
                    else " ".join(PAUSE_ENTRYPOINT) + " ")
        assert (init.exit_code, init.stdout.decode()) == (0, expected), init

        # A privileged container uses the kernel's bridge support (loaded on demand).
        bridge = client.exec_sync(reader, ["sh", "-c",
                                           "brctl addbr foobar && ip -o link show foobar"
                                           " && brctl delbr foobar && echo deleted"])
        assert bridge.exit_code == 0, bridge
        assert b": foobar: " in bridge.stdout and bridge.stdout.endswith(b"deleted\n"), bridge

        # exec -it: containerd's 64-character container and exec ids, an interactive round
        # trip over the terminal, and the exit code at the end.
        session = TerminalSession(client.exec(reader, ["sh"], tty=True, stdin=True))
        try:
            session.send(b"echo $((6 * 7))-from-the-tty\n")
            assert b"42-from-the-tty" in session.read_until(b"42-from-the-tty")
            session.send(b"exit 3\n")
            assert exit_code_of(session.wait_status()) == 3
        finally:
            session.close()

        # A container past its memory limit is OOMKilled (exit 137), as the kubelet reports.
        hog = client.create_container(pod_id, container_config(
            "hog", BUSYBOX_REF, MEMORY_HOG, pod=pod, memory_limit=OOM_LIMIT), pod)
        client.start_container(hog)
        status = wait_exited(client, hog)
        assert (status.reason, status.exit_code) == ("OOMKilled", 137), status

        # StopContainer a moment after StartContainer: the SIGTERM reaches the workload, which
        # is the init of its own PID namespace (it would drop a signal it has no handler for).
        quick = client.create_container(pod_id, container_config(
            "quick", BUSYBOX_REF, SLEEPER), pod)
        started = time.monotonic()
        client.start_container(quick)
        client.stop_container(quick, timeout=STOP_TIMEOUT)
        stopped_in = time.monotonic() - started
        status = client.container_status(quick)
        assert (status.state, status.exit_code) == (cri.CONTAINER_EXITED, 0), status
        assert stopped_in < PROMPT_STOP, f"StopContainer took {stopped_in:.1f} s"

        # The first container's exit kills nobody else: the namespace's init is a pause
        # program in both modes.
        client.stop_container(maker, timeout=5)
        assert client.exec_sync(reader, ["true"]).exit_code == 0
        assert client.container_status(reader).state == cri.CONTAINER_RUNNING
        for cid in (maker, quick, hog, reader):
            client.stop_container(cid, timeout=5)
            client.remove_container(cid)
    finally:
        client.stop_pod(pod_id)
        client.remove_pod(pod_id)
