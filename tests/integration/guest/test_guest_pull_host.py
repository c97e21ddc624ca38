"""Guest pull through the real agent on the host, against real registries in a test netns.

The agent runs (as in test_agent_host.py) on a unix socket, here inside the pod end of a veth
pair; distribution 2.8 registries run in the peer namespace (tests/support/registry.py): one
with TLS from a test CA and bearer-token auth, one plain HTTP marked insecure in the agent's
image-pull configuration. Containers run with the host's runc on the overlay the agent mounts.
One agent and one registry pair serve the whole module; tests run in file order.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from guest.image.build import write_pause_bundle
from protocols.api.kata import agent_pb2, oci_pb2
from protocols.ttrpc import Client, Code, TtrpcError
from tests.integration.guest.agentproc import AgentProcess
from tests.integration.guest.conftest import remove_cgroup_parent
from tests.integration.guest.support import AgentClient, spec
from tests.support import oci
from tests.support.registry import RegistryEnv, registry_env

pytestmark = pytest.mark.integration

SUBNET = 78
CATATONIT = Path("/usr/bin/catatonit")


@dataclass
class Env:
    registries: RegistryEnv
    agent: AgentProcess
    work: Path  # the agent's layer cache (image-pull work_dir)
    refs: dict[str, str]

    @property
    def shared(self) -> Path:
        return self.agent.workdir / "shared"

    def mount_point(self, cid: str) -> str:
        return str(self.shared / cid / "rootfs")

    def agent_mounts(self) -> list[str]:
        assert self.agent.proc is not None
        lines = Path(f"/proc/{self.agent.proc.pid}/mountinfo").read_text().splitlines()
        return [line.split()[4] for line in lines]


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    if not CATATONIT.exists():
        raise AssertionError(f"{CATATONIT} missing: apt-get install catatonit (or: make env)")
    with registry_env(subnet=SUBNET) as registries:
        folder = Path(tempfile.mkdtemp(prefix="coco-guest-pull-"))
        agent = AgentProcess(folder / "agent", netns=registries.pair.pod)
        agent.workdir.mkdir()
        work = folder / "images"
        config = folder / "image-pull.toml"
        config.write_text(registries.guest_pull_toml(work, timeout=30))
        write_pause_bundle(folder / "pause_bundle", CATATONIT)
        refs = {
            "busybox": registries.push([oci.busybox()], registries.secure, "busybox"),
            "layered": registries.push([oci.layered()], registries.secure, "layered"),
            "named": registries.push([oci.named_user()], registries.secure, "app"),
            "multiarch": registries.push(oci.multiarch(), registries.plain, "multiarch"),
        }
        try:
            agent.start("--image-pull-config", str(config),
                        "--pause-bundle", str(folder / "pause_bundle"))
            yield Env(registries, agent, work, refs)
        finally:
            agent.stop()
            print(agent.output()[-6000:])
            remove_cgroup_parent(agent.cgroup_parent)
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def agent(env: Env) -> AsyncIterator[AgentClient]:
    client = await Client.connect_unix(env.agent.socket, timeout=10)
    try:
        yield AgentClient(client)
    finally:
        await client.close()


def pull_storage(env: Env, cid: str, image: str, *, sandbox: bool = False) -> agent_pb2.Storage:
    """The Storage the shim sends for a guest-pulled rootfs (Kata's contract)."""
    metadata = {"io.kubernetes.cri.image-name": image,
                "io.kubernetes.cri.container-type": "sandbox" if sandbox else "container"}
    return agent_pb2.Storage(
        driver="image_guest_pull",
        driver_options=["image_guest_pull=" + json.dumps({"metadata": metadata})],
        source="pause" if sandbox else image,
        fstype="overlay",
        mount_point=env.mount_point(cid),
    )


def pulled_spec(env: Env, cid: str, args: list[str] | None) -> oci_pb2.Spec:
    """A spec that leaves args (when None), env, cwd and the user to the image."""
    result = spec(env.mount_point(cid), args or ["placeholder"])
    if args is None:
        del result.Process.Args[:]
    del result.Process.Env[:]
    return result


async def run(agent: AgentClient, env: Env, cid: str, image: str,
              args: list[str] | None) -> tuple[bytes, int]:
    await agent.call("CreateContainer", agent_pb2.CreateContainerRequest(
        container_id=cid, storages=[pull_storage(env, cid, image)],
        OCI=pulled_spec(env, cid, args)), timeout=60)
    await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id=cid))
    output, status = await asyncio.gather(agent.read_all(cid), agent.wait(cid))
    return output, status


async def remove(agent: AgentClient, cid: str) -> None:
    await agent.call("RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid))


async def test_tls_bearer_pull_then_second_container_fetches_no_blob(
    agent: AgentClient, env: Env
) -> None:
    secure = env.registries.secure
    before = len(secure.access_log())
    ref = env.refs["busybox"]
    output, status = await run(agent, env, "bb1", ref, ["sh", "-c", "echo pulled; echo $PATH"])
    assert (output, status) == (b"pulled\n/bin\n", 0)  # PATH from the image's Env
    fetched = secure.blob_fetches(before)
    assert {a.blob for a in fetched} == {oci.busybox_layer().digest,
                                         oci.sha256(oci.busybox().config_bytes())}
    assert {a.remote for a in fetched} == {env.registries.pair.pod_ip}  # the agent's address
    tokens = env.registries.token_requests()
    assert any(t["scope"] == ["repository:busybox:pull"] and not t["authenticated"]
               and t["remote"] == env.registries.pair.pod_ip for t in tokens)

    mark = len(secure.access_log())
    output, status = await run(agent, env, "bb2", ref, ["cat", "/bin/busybox"])
    assert status == 0 and len(output) > 100_000
    assert secure.blob_fetches(mark) == []  # layers and config came from the guest's cache
    assert any("/manifests/" in a.path for a in secure.access_log()[mark:])
    assert env.mount_point("bb1") in env.agent_mounts()
    for cid in ("bb1", "bb2"):
        await remove(agent, cid)
        assert env.mount_point(cid) not in env.agent_mounts()
        assert not (env.shared / cid).exists()
    assert not list((env.work / "containers").iterdir())


async def test_whiteouts_opaque_dirs_and_a_shared_base_layer(agent: AgentClient, env: Env) -> None:
    secure = env.registries.secure
    before = len(secure.access_log())
    output, status = await run(agent, env, "layers", env.refs["layered"], [
        "sh", "-c", "ls /data; echo --; ls -A /opq; echo --; echo $FROM_IMAGE"])
    assert status == 0
    assert output.decode().split("--\n") == ["keep\n", "new\n", "layered\n"]
    image = oci.layered()
    fetched = {a.blob for a in secure.blob_fetches(before)}
    assert fetched == {image.layers[1].digest, image.layers[2].digest,
                       oci.sha256(image.config_bytes())}  # busybox's base layer was cached
    await remove(agent, "layers")


async def test_index_platform_over_plain_http(agent: AgentClient, env: Env) -> None:
    plain = env.registries.plain
    output, status = await run(agent, env, "arch", env.refs["multiarch"], None)
    assert (output, status) == (b"amd64\n", 0)  # the image's Cmd, the guest's platform
    amd64, arm64 = oci.multiarch()
    paths = [a.path for a in plain.access_log() if a.remote == env.registries.pair.pod_ip]
    assert any(amd64.manifest_digest in p for p in paths)
    assert not any(arm64.manifest_digest in p or arm64.layers[1].digest in p for p in paths)
    await remove(agent, "arch")


async def test_named_user_workdir_and_env_from_the_image(agent: AgentClient, env: Env) -> None:
    output, status = await run(agent, env, "user1", env.refs["named"], None)
    assert status == 0
    assert output == b"uid=1234(app) gid=2345(appgrp) groups=2345(appgrp),3456(extra)\n"
    output, status = await run(agent, env, "user2", env.refs["named"],
                               ["sh", "-c", "pwd; echo $GREETING; touch here && echo wrote"])
    assert (output, status) == (b"/home/app\nfrom-image\nwrote\n", 0)
    for cid in ("user1", "user2"):
        await remove(agent, cid)


async def test_sandbox_container_runs_the_pause_bundle(agent: AgentClient, env: Env) -> None:
    before = len(env.registries.secure.access_log())
    started = time.time() - 1
    await agent.call("CreateContainer", agent_pb2.CreateContainerRequest(
        container_id="pod", storages=[pull_storage(env, "pod", "pause", sandbox=True)],
        OCI=spec(env.mount_point("pod"), ["/never/run"])))
    await agent.call("StartContainer", agent_pb2.StartContainerRequest(container_id="pod"))
    await asyncio.to_thread(wait_for_blocked_sigterm, started)
    await agent.call("SignalProcess",
                     agent_pb2.SignalProcessRequest(container_id="pod", signal=signal.SIGTERM))
    assert await agent.wait("pod") in (0, 128 + signal.SIGTERM)
    assert len(env.registries.secure.access_log()) == before  # nothing pulled
    await remove(agent, "pod")
    assert not (env.shared / "pod").exists()


def wait_for_blocked_sigterm(since: float, timeout: float = 20) -> None:
    """Until the pause process (catatonit, a signalfd user) blocks SIGTERM: a signal sent to
    a PID-namespace init before it has a handler is dropped by the kernel."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in psutil.process_iter(["cmdline", "create_time"]):
            if proc.info["cmdline"] != ["/pause", "-P"] or proc.info["create_time"] < since:
                continue
            status = Path(f"/proc/{proc.pid}/status").read_text()
            blocked = int(next(x.split()[1] for x in status.splitlines()
                               if x.startswith("SigBlk:")), 16)
            if blocked & (1 << (signal.SIGTERM - 1)):
                return
        time.sleep(0.05)
    raise AssertionError("the pause process never blocked SIGTERM")


async def test_corrupted_blob_fails_naming_the_digest_and_leaves_nothing(
    agent: AgentClient, env: Env
) -> None:
    marker = oci.Layer.gzip(oci.TarBuilder().file("marker", "corrupt-test\n").bytes())
    image = oci.Image((oci.busybox_layer(), marker), {"Env": ["PATH=/bin"], "Cmd": ["sh"]})
    ref = env.registries.push([image], env.registries.secure, "corruptible")
    with env.registries.secure.corrupted(marker.digest), pytest.raises(TtrpcError) as info:
        await agent.call("CreateContainer", agent_pb2.CreateContainerRequest(
            container_id="bad", storages=[pull_storage(env, "bad", ref)],
            OCI=pulled_spec(env, "bad", ["true"])), timeout=60)
    assert info.value.code == Code.DATA_LOSS, info.value
    assert ref in info.value.message and marker.digest in info.value.message
    assert not (env.shared / "bad").exists()
    assert env.mount_point("bad") not in env.agent_mounts()
    assert not list((env.work / "staging").iterdir())
    assert not (env.work / "layers/sha256" / marker.digest.removeprefix("sha256:")).exists()
    assert not list((env.work / "containers").iterdir())
    output, status = await run(agent, env, "good", ref, ["cat", "/marker"])  # repaired blob
    assert (output, status) == (b"corrupt-test\n", 0)
    await remove(agent, "good")


@pytest.mark.parametrize("host", ["198.18.78.1:5999", "198.18.78.9:5000"])
async def test_unreachable_registry_fails_fast_and_clearly(
    agent: AgentClient, env: Env, host: str
) -> None:
    """No listener (refused at once) and no such host (ARP gives up): both bounded."""
    started = time.monotonic()
    with pytest.raises(TtrpcError) as info:
        await agent.call("CreateContainer", agent_pb2.CreateContainerRequest(
            container_id="nowhere", storages=[pull_storage(env, "nowhere", f"{host}/x:1")],
            OCI=pulled_spec(env, "nowhere", ["true"])), timeout=60)
    assert info.value.code == Code.UNAVAILABLE, info.value
    assert "unreachable" in info.value.message and host in info.value.message
    assert time.monotonic() - started < 10  # the test agent allows 2 s to connect
    assert not (env.shared / "nowhere").exists()


async def test_large_image_pull_keeps_the_agent_small(agent: AgentClient, env: Env) -> None:
    """A 64 MiB incompressible layer streams through: the agent's peak RSS grows little."""
    assert env.agent.proc is not None
    image = oci.large()
    ref = env.registries.push([image], env.registries.secure, "large")
    status_file = Path(f"/proc/{env.agent.proc.pid}/status")
    started = time.monotonic()
    output, status = await run(agent, env, "big", ref, ["sh", "-c", "ls -l /payload.bin"])
    elapsed = time.monotonic() - started
    status_text = await asyncio.to_thread(status_file.read_text)
    peak = int(next(line.split()[1] for line in status_text.splitlines()
                    if line.startswith("VmHWM:"))) << 10
    print(f"pulled {len(image.layers[1].blob) >> 20} MiB in {elapsed:.2f} s, "
          f"agent peak RSS {peak >> 20} MiB")
    assert status == 0 and str(64 << 20).encode() in output
    assert peak < 120 << 20
    await remove(agent, "big")
