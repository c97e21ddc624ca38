"""The guest-pull rootfs strategy (every confidential profile): the Storage exactly as kata
builds it, nothing of the host snapshot touched, no image reference refused by name, and the
initdata/policy annotations never in what the guest receives."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.profile import GUEST_CONFIDENTIAL_PARAM, RuntimeProfile
from shim.core.errors import InvalidArgument
from shim.pod import guest_spec
from shim.pod.mounts import Mount
from shim.pod.rootfs import GuestPull, HostShare, rootfs_for
from tests.unit.hypervisor.test_profiles import PROFILES

IMAGE = "198.18.77.1:5000/coco/app:1"
INITDATA = "io.katacontainers.config.hypervisor.cc_init_data"
POLICY = "io.katacontainers.config.agent.policy"


def spec(annotations: dict[str, str], mounts: list[dict[str, object]] | None = None
         ) -> dict[str, object]:
    return {"ociVersion": "1.1.0", "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs"}, "annotations": annotations, "mounts": mounts or []}


def coco_dev() -> RuntimeProfile:
    return replace(PROFILES["none"], confidential_without_tee=True,
                   kernel_params=GUEST_CONFIDENTIAL_PARAM)


@pytest.mark.parametrize("name", ["snp", "tdx", "sev", "sev-es", "s390-pv", "pef"])
def test_every_confidential_profile_pulls_in_the_guest(name: str, tmp_path: Path) -> None:
    assert isinstance(rootfs_for(PROFILES[name], tmp_path), GuestPull)


def test_coco_dev_pulls_in_the_guest_and_dev_shares(tmp_path: Path) -> None:
    assert isinstance(rootfs_for(coco_dev(), tmp_path), GuestPull)
    assert isinstance(rootfs_for(PROFILES["none"], tmp_path), HostShare)


async def test_the_storage_is_katas(tmp_path: Path) -> None:
    strategy = GuestPull()
    await strategy.open()
    assert strategy.vm_shares() == () and strategy.sandbox_storages() == []
    annotations = {"io.kubernetes.cri.image-name": IMAGE,
                   "io.kubernetes.cri.container-type": "container",
                   "io.kubernetes.cri.sandbox-id": "pod1", INITDATA: "H4sI…",
                   POLICY: "cGFja2FnZQ=="}
    snapshot = tmp_path / "snapshot"  # must never be touched
    prepared = await strategy.add("c1", tmp_path / "bundle", spec(annotations),
                                  [Mount("overlay", str(snapshot), options=("lowerdir=/x",))])
    (storage,) = prepared.storages
    assert storage.driver == "image_guest_pull"
    assert storage.source == IMAGE
    assert storage.fstype == "overlay"
    assert storage.mount_point == "/run/kata-containers/c1/rootfs"
    assert prepared.root_path == storage.mount_point
    (option,) = storage.driver_options
    key, _, body = option.partition("=")
    assert key == "image_guest_pull"
    metadata = json.loads(body)["metadata"]
    assert metadata == {"io.kubernetes.cri.image-name": IMAGE,
                        "io.kubernetes.cri.container-type": "container",
                        "io.kubernetes.cri.sandbox-id": "pod1"}
    assert not snapshot.exists() and not (tmp_path / "bundle").exists()
    await strategy.remove("c1")
    await strategy.close()


async def test_the_sandbox_container_is_the_guests_pause(tmp_path: Path) -> None:
    prepared = await GuestPull().add("pod1", tmp_path, spec({
        "io.kubernetes.cri.container-type": "sandbox",
        "io.kubernetes.cri.image-name": "registry.k8s.io/pause:3.10"}), [])
    assert prepared.storages[0].source == "pause"


async def test_no_image_reference_is_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"io\.kubernetes\.cri\.image-name.*ctr run"):
        await GuestPull().add("c1", tmp_path, spec({}), [])


async def test_host_bind_mounts_do_not_reach_the_guest(tmp_path: Path) -> None:
    mounts: list[dict[str, object]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/etc/hosts", "type": "bind", "source": "/var/lib/x/hosts",
         "options": ["rbind", "ro"]},
        {"destination": "/etc/resolv.conf", "source": "/var/lib/x/resolv", "options": ["bind"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
    ]
    prepared = await GuestPull().add("c1", tmp_path, spec(
        {"io.kubernetes.cri.image-name": IMAGE}, mounts), [])
    assert [m["destination"] for m in prepared.mounts] == ["/proc", "/tmp"]


def test_the_guest_spec_has_no_initdata_nor_policy_annotation() -> None:
    doc = spec({INITDATA: "H4sI", POLICY: "cGFja2FnZQ==", "keep": "me"})
    oci = guest_spec.for_guest(doc, "/run/kata-containers/c1/rootfs", [])
    assert dict(oci.Annotations) == {"keep": "me"}
    assert oci.Root.Path == "/run/kata-containers/c1/rootfs"
