"""Driving containerd's CRI plugin the way the kubelet does, for tests.

A gRPC client over our own ``runtime.v1`` protos (protocols/api/cri), the CRI part of a private
containerd's config (runtime handler, pinned pause image, private CNI config) for 2.x and 1.7,
and the CNI network those pods get (bridge + host-local in 198.18.0.0/15, nothing else).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc

from protocols.api.cri import api_pb2 as cri
from protocols.api.cri import api_pb2_grpc as cri_grpc

CRI_NAMESPACE: Final = "k8s.io"
HANDLER: Final = "coco"
RUNTIME_TYPE: Final = "io.containerd.coco.v2"
PAUSE_REF: Final = "docker.io/library/coco-pause:test"
# The pause container: sleeps until it is told to stop (SIGTERM ends it at once), idle as
# Kubernetes' pause is (a `sleep 1` loop here would fork and exec from the pod's 9p rootfs every
# second: `make bench-idle`).
PAUSE_ENTRYPOINT: Final = ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 2147483647 & wait"]
CNI_BIN_DIR: Final = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
RPC_TIMEOUT: Final = 240.0  # RunPodSandbox boots a TCG VM (~8 s); leave room on a busy host


@dataclass(frozen=True)
class CniNetwork:
    """A bridge network private to one test: its own bridge name, subnet and IPAM state."""

    name: str
    bridge: str  # at most 15 characters (IFNAMSIZ)
    subnet: str  # inside 198.18.0.0/15
    data_dir: Path
    default_route: bool = False  # pods route everything through the bridge (the host)

    def conflist(self) -> str:
        ipam: dict[str, object] = {"type": "host-local", "ranges": [[{"subnet": self.subnet}]],
                                   "dataDir": str(self.data_dir)}
        if self.default_route:
            ipam["routes"] = [{"dst": "0.0.0.0/0"}]
        return json.dumps({
            "cniVersion": "1.0.0",
            "name": self.name,
            "plugins": [{
                "type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                "ipam": ipam,
            }],
        }, indent=2)

    def write(self, conf_dir: Path) -> Path:
        conf_dir.mkdir(parents=True, exist_ok=True)
        path = conf_dir / f"10-{self.name}.conflist"
        path.write_text(self.conflist())
        return path

    def remove_bridge(self) -> None:
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)


def cri_config(version: str, *, profile: Path | None, cni_conf_dir: Path,
               pause_ref: str = PAUSE_REF, handler: str = HANDLER,
               sandboxer: str = "podsandbox", registry_config_path: Path | None = None,
               pod_annotations: Sequence[str] = ()) -> str:
    """The CRI part of a private containerd config: runtime handler, pause image, CNI.

    2.x (config version 3) splits CRI into ``io.containerd.cri.v1.images`` and
    ``io.containerd.cri.v1.runtime``; 1.7 (version 2) keeps it all under
    ``io.containerd.grpc.v1.cri`` with ``sandbox_image``. ``profile`` None leaves out the
    handler's ``options`` table (the shim then reads ``$COCO_SHIM_CONFIG``).
    ``registry_config_path``: a directory of ``<host>/hosts.toml`` for CRI's image pulls;
    ``pod_annotations``: the pod annotations CRI passes to the runtime (e.g. kata's).
    """
    # netns_mounts_under_state_dir: each pod's CNI network namespace is pinned under this
    # containerd's own state dir (``<state>/io.containerd.grpc.v1.cri/netns``, both versions)
    # instead of the host-wide /var/run/netns, where every engineer's containerd puts its
    # ``cni-…`` namespaces: one left behind is this containerd's, named by the leak check of
    # tests/support/containerd.py, and never outlives the test's temp dir.
    passed = ("  pod_annotations = [" + ", ".join(json.dumps(a) for a in pod_annotations)
              + "]\n") if pod_annotations else ""
    if version.startswith("1."):
        cri_plugin = '[plugins."io.containerd.grpc.v1.cri"]'
        runtime = f'{cri_plugin[:-1]}.containerd.runtimes.{handler}]'
        # 1.7 replaces its runtimes table by ours: keep runc, its default_runtime_name.
        runc = f'{cri_plugin[:-1]}.containerd.runtimes.runc]'
        return (f'{cri_plugin}\n  sandbox_image = "{pause_ref}"\n'
                '  netns_mounts_under_state_dir = true\n'
                f'{cri_plugin[:-1]}.cni]\n  bin_dir = "{CNI_BIN_DIR}"\n'
                f'  conf_dir = "{cni_conf_dir}"\n'
                f'{runc}\n  runtime_type = "io.containerd.runc.v2"\n'
                f'{runtime}\n  runtime_type = "{RUNTIME_TYPE}"\n{passed}'
                + (f'{runtime[:-1]}.options]\n  ConfigPath = "{profile}"\n' if profile else "")
                + (f'{cri_plugin[:-1]}.registry]\n  config_path = "{registry_config_path}"\n'
                   if registry_config_path else ""))
    images = "[plugins.'io.containerd.cri.v1.images'.pinned_images]"
    runtime_plugin = "plugins.'io.containerd.cri.v1.runtime'"
    runtime = f"[{runtime_plugin}.containerd.runtimes.{handler}]"
    return (f"{images}\n  sandbox = '{pause_ref}'\n"
            f"[{runtime_plugin}]\n  netns_mounts_under_state_dir = true\n"
            f"[{runtime_plugin}.cni]\n  bin_dirs = ['{CNI_BIN_DIR}']\n"
            f"  conf_dir = '{cni_conf_dir}'\n"
            f"{runtime}\n  runtime_type = '{RUNTIME_TYPE}'\n  sandboxer = '{sandboxer}'\n"
            f"{passed}"
            + (f"{runtime[:-1]}.options]\n  ConfigPath = '{profile}'\n" if profile else "")
            + ("[plugins.'io.containerd.cri.v1.images'.registry]\n"
               f"  config_path = '{registry_config_path}'\n" if registry_config_path else ""))


def pod_config(name: str, uid: str, log_dir: Path, *,
               annotations: Mapping[str, str] | None = None,
               sysctls: Mapping[str, str] | None = None, privileged: bool = False,
               share_pid: bool = False, cgroup_parent: str = "",
               resources: cri.LinuxContainerResources | None = None,
               overhead: cri.LinuxContainerResources | None = None) -> cri.PodSandboxConfig:
    """A pod as the kubelet sends it. ``share_pid``: the pod's containers share one PID
    namespace (shareProcessNamespace); ``resources``: the sum of its containers' limits;
    ``overhead``: the RuntimeClass's."""
    namespaces = cri.NamespaceOption(pid=cri.POD if share_pid else cri.CONTAINER)
    return cri.PodSandboxConfig(
        metadata=cri.PodSandboxMetadata(name=name, uid=uid, namespace="default", attempt=0),
        hostname=name, log_directory=str(log_dir), annotations=dict(annotations or {}),
        linux=cri.LinuxPodSandboxConfig(
            sysctls=dict(sysctls or {}), cgroup_parent=cgroup_parent, resources=resources,
            overhead=overhead,
            security_context=cri.LinuxSandboxSecurityContext(
                namespace_options=namespaces, privileged=privileged)))


def container_config(name: str, image: str, command: Sequence[str], *,
                     pod: cri.PodSandboxConfig | None = None, privileged: bool = False,
                     memory_limit: int = 0) -> cri.ContainerConfig:
    """A container as the kubelet describes it; ``pod`` lends its namespace options (the
    kubelet copies the pod's into every container)."""
    namespaces = (pod.linux.security_context.namespace_options if pod is not None
                  else cri.NamespaceOption(pid=cri.CONTAINER))
    return cri.ContainerConfig(
        metadata=cri.ContainerMetadata(name=name, attempt=0),
        image=cri.ImageSpec(image=image), command=list(command),
        log_path=f"{name}.log", linux=cri.LinuxContainerConfig(
            resources=cri.LinuxContainerResources(memory_limit_in_bytes=memory_limit),
            security_context=cri.LinuxContainerSecurityContext(
                privileged=privileged, namespace_options=namespaces)))


class CriClient:
    """RuntimeService + ImageService over containerd's gRPC socket (one channel)."""

    def __init__(self, address: Path, timeout: float = RPC_TIMEOUT) -> None:
        self.channel = grpc.insecure_channel(f"unix://{address}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CriClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self) -> cri.VersionResponse:
        response: cri.VersionResponse = self.runtime.Version(
            cri.VersionRequest(version="v1"), timeout=self.timeout)
        return response

    def image_status(self, ref: str) -> cri.Image | None:
        response: cri.ImageStatusResponse = self.images.ImageStatus(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=self.timeout)
        return response.image if response.HasField("image") else None

    def pull_image(self, ref: str, pod: cri.PodSandboxConfig | None = None) -> str:
        """CRI PullImage (on the host, as the kubelet asks it); the image's reference."""
        request = cri.PullImageRequest(image=cri.ImageSpec(image=ref))
        if pod is not None:
            request.sandbox_config.CopyFrom(pod)
        response: cri.PullImageResponse = self.images.PullImage(request, timeout=self.timeout)
        return response.image_ref

    def run_pod(self, config: cri.PodSandboxConfig, handler: str = HANDLER) -> str:
        response: cri.RunPodSandboxResponse = self.runtime.RunPodSandbox(
            cri.RunPodSandboxRequest(config=config, runtime_handler=handler),
            timeout=self.timeout)
        return response.pod_sandbox_id

    def pod_status(self, pod_id: str) -> cri.PodSandboxStatus:
        response: cri.PodSandboxStatusResponse = self.runtime.PodSandboxStatus(
            cri.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=self.timeout)
        return response.status

    def stop_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id),
                                    timeout=self.timeout)

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.RemovePodSandbox(cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id),
                                      timeout=self.timeout)

    def list_pods(self) -> list[cri.PodSandbox]:
        response: cri.ListPodSandboxResponse = self.runtime.ListPodSandbox(
            cri.ListPodSandboxRequest(), timeout=self.timeout)
        return list(response.items)

    def create_container(self, pod_id: str, config: cri.ContainerConfig,
                         pod: cri.PodSandboxConfig) -> str:
        response: cri.CreateContainerResponse = self.runtime.CreateContainer(
            cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config,
                                       sandbox_config=pod), timeout=self.timeout)
        return response.container_id

    def start_container(self, container_id: str) -> None:
        self.runtime.StartContainer(cri.StartContainerRequest(container_id=container_id),
                                    timeout=self.timeout)

    def container_status(self, container_id: str) -> cri.ContainerStatus:
        response: cri.ContainerStatusResponse = self.runtime.ContainerStatus(
            cri.ContainerStatusRequest(container_id=container_id), timeout=self.timeout)
        return response.status

    def exec_sync(self, container_id: str, cmd: Sequence[str],
                  timeout: int = 60) -> cri.ExecSyncResponse:
        response: cri.ExecSyncResponse = self.runtime.ExecSync(
            cri.ExecSyncRequest(container_id=container_id, cmd=list(cmd), timeout=timeout),
            timeout=self.timeout)
        return response

    def exec(self, container_id: str, cmd: Sequence[str], *, tty: bool,
             stdin: bool) -> str:
        """Exec: the URL of containerd's streaming server for this exec (as the kubelet
        hands it to the API server for `kubectl exec`)."""
        response: cri.ExecResponse = self.runtime.Exec(
            cri.ExecRequest(container_id=container_id, cmd=list(cmd), tty=tty, stdin=stdin,
                            stdout=True, stderr=not tty), timeout=self.timeout)
        return response.url

    def update_container_resources(self, container_id: str,
                                   resources: cri.LinuxContainerResources) -> None:
        self.runtime.UpdateContainerResources(
            cri.UpdateContainerResourcesRequest(container_id=container_id, linux=resources),
            timeout=self.timeout)

    def container_stats(self, container_id: str) -> cri.ContainerStats:
        response: cri.ContainerStatsResponse = self.runtime.ContainerStats(
            cri.ContainerStatsRequest(container_id=container_id), timeout=self.timeout)
        return response.stats

    def stop_container(self, container_id: str, timeout: int = 10) -> None:
        self.runtime.StopContainer(
            cri.StopContainerRequest(container_id=container_id, timeout=timeout),
            timeout=self.timeout)

    def remove_container(self, container_id: str) -> None:
        self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=container_id),
                                     timeout=self.timeout)

    def list_containers(self, pod_id: str = "") -> list[cri.Container]:
        response: cri.ListContainersResponse = self.runtime.ListContainers(
            cri.ListContainersRequest(filter=cri.ContainerFilter(pod_sandbox_id=pod_id)),
            timeout=self.timeout)
        return list(response.containers)


# --- remotecommand over WebSocket (what `kubectl exec -it` speaks to the streaming server) ----

STDIN, STDOUT, STDERR, ERROR = 0, 1, 2, 3
REMOTECOMMAND_PROTOCOL: Final = "v4.channel.k8s.io"  # one channel byte before each payload


class TerminalSession:
    """An interactive exec: stdin in, the terminal's output out, the exit status at the end.

    containerd's streaming server (the kubelet's remotecommand code) speaks the channel
    protocol over WebSocket: every binary message starts with its channel number; v4 ends with
    a JSON status on the error channel (``{"status": "Success"}`` or a NonZeroExitCode
    failure whose cause carries the exit code).
    """

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        import websocket  # test dependency (websocket-client)

        ws_url = "ws" + url.removeprefix("http")
        self._ws = websocket.create_connection(ws_url, timeout=timeout,
                                               subprotocols=[REMOTECOMMAND_PROTOCOL])
        self.output = bytearray()
        self.status: dict[str, object] | None = None

    def send(self, data: bytes) -> None:
        self._ws.send_binary(bytes([STDIN]) + data)

    def read_until(self, marker: bytes) -> bytes:
        """Terminal output until ``marker`` has appeared (raises if the stream ends first)."""
        while marker not in self.output:
            if not self._receive():
                raise EOFError(f"exec ended before {marker!r}; output {bytes(self.output)!r}")
        return bytes(self.output)

    def wait_status(self) -> dict[str, object]:
        while self.status is None and self._receive():
            pass
        if self.status is None:
            raise EOFError(f"exec ended without a status; output {bytes(self.output)!r}")
        return self.status

    def _receive(self) -> bool:
        import websocket

        try:
            message = self._ws.recv()
        except websocket.WebSocketConnectionClosedException:
            return False
        if isinstance(message, str):
            message = message.encode()
        if not message:
            return True
        channel, payload = message[0], message[1:]
        if channel in (STDOUT, STDERR):
            self.output += payload
        elif channel == ERROR and payload:
            self.status = json.loads(payload)
        return True

    def close(self) -> None:
        self._ws.close()


def exit_code_of(status: Mapping[str, object]) -> int:
    """The exit code a remotecommand v4 status reports (0 for Success)."""
    if status.get("status") == "Success":
        return 0
    details = status.get("details")
    causes = details.get("causes", []) if isinstance(details, dict) else []
    for cause in causes:
        if isinstance(cause, dict) and cause.get("reason") == "ExitCode":
            return int(cause["message"])
    raise ValueError(f"no exit code in {status}")
