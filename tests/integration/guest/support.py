"""Shared pieces of the guest-agent tests: a busybox rootfs, OCI specs, an agent client."""

from __future__ import annotations

import shutil
from pathlib import Path

from google.protobuf.message import Message

from protocols.api.kata import agent_pb2, health_pb2, oci_pb2
from protocols.ttrpc import Client

BUSYBOX = Path("/bin/busybox")  # busybox-static on the host (installed by setup-env.sh)
APPLETS = (
    "sh",
    "echo",
    "cat",
    "sleep",
    "true",
    "false",
    "ls",
    "id",
    "env",
    "hostname",
    "head",
    "grep",
)
AGENT = "grpc.AgentService"
HEALTH = "grpc.Health"
STANDARD_NAMESPACES = ("pid", "ipc", "uts", "mount")


def make_busybox_rootfs(root: Path) -> Path:
    """A minimal container rootfs: static busybox and a few applet links."""
    for sub in ("bin", "proc", "dev", "sys", "tmp", "etc"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in APPLETS:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    return root


def process(args: list[str], *, terminal: bool = False) -> oci_pb2.Process:
    return oci_pb2.Process(
        Terminal=terminal,
        Args=args,
        Env=["PATH=/bin", "HOME=/"],
        Cwd="/",
        User=oci_pb2.User(UID=0, GID=0),
        NoNewPrivileges=True,
    )


def spec(rootfs: str, args: list[str], *, terminal: bool = False) -> oci_pb2.Spec:
    mounts = [
        oci_pb2.Mount(destination="/proc", type="proc", source="proc"),
        oci_pb2.Mount(
            destination="/dev",
            type="tmpfs",
            source="tmpfs",
            options=["nosuid", "strictatime", "mode=755", "size=65536k"],
        ),
        oci_pb2.Mount(
            destination="/dev/pts",
            type="devpts",
            source="devpts",
            options=["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"],
        ),
        oci_pb2.Mount(
            destination="/dev/shm",
            type="tmpfs",
            source="shm",
            options=["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        ),
        oci_pb2.Mount(
            destination="/sys",
            type="sysfs",
            source="sysfs",
            options=["nosuid", "noexec", "nodev", "ro"],
        ),
    ]
    return oci_pb2.Spec(
        Version="1.0.2",
        Process=process(args, terminal=terminal),
        Root=oci_pb2.Root(Path=rootfs, Readonly=False),
        Hostname="coco-test",
        Mounts=mounts,
        Linux=oci_pb2.Linux(
            Namespaces=[oci_pb2.LinuxNamespace(Type=t) for t in STANDARD_NAMESPACES],
            MaskedPaths=["/proc/kcore"],
            ReadonlyPaths=["/proc/sys"],
        ),
    )


class AgentClient:
    """Typed shortcuts over a ttrpc Client for the RPCs the tests use."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def call(
        self, method: str, request: Message, response: type[Message] | None = None, **kw: float
    ) -> Message:
        service = HEALTH if method in ("Check", "Version") else AGENT
        from google.protobuf import empty_pb2

        return await self.client.call(
            service, method, request, response or empty_pb2.Empty, timeout=kw.get("timeout", 15)
        )

    async def check(self) -> int:
        reply = await self.call("Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
        assert isinstance(reply, health_pb2.HealthCheckResponse)
        return reply.status

    async def read_all(
        self, container_id: str, exec_id: str = "", stream: str = "ReadStdout"
    ) -> bytes:
        """Read a stream to EOF (an empty chunk)."""
        out = b""
        while True:
            reply = await self.call(
                stream,
                agent_pb2.ReadStreamRequest(container_id=container_id, exec_id=exec_id, len=65536),
                agent_pb2.ReadStreamResponse,
            )
            assert isinstance(reply, agent_pb2.ReadStreamResponse)
            if not reply.data:
                return out
            out += reply.data

    async def wait(self, container_id: str, exec_id: str = "") -> int:
        reply = await self.call(
            "WaitProcess",
            agent_pb2.WaitProcessRequest(container_id=container_id, exec_id=exec_id),
            agent_pb2.WaitProcessResponse,
            timeout=60,
        )
        assert isinstance(reply, agent_pb2.WaitProcessResponse)
        return reply.status
