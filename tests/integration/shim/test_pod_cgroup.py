"""The pod's host cgroup for real (this host's cgroup v2 hierarchy): a process moved in shows
it in /proc/<pid>/cgroup, and ``delete`` after a dead daemon kills what is left in the
cgroups on its crash record and removes them, leaving the parent it did not make."""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest

from shim.binary.delete import delete
from shim.binary.flags import Flags
from shim.core import cgroup
from shim.core.crash_record import ShimState

pytestmark = pytest.mark.integration


@pytest.fixture
def kubelet_cgroup() -> Iterator[Path]:
    root = cgroup.unified_mount()
    assert root is not None, "no cgroup v2 hierarchy on this host"
    parent = root / f"coco-cgtest-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    parent.mkdir()
    try:
        yield parent
    finally:
        cgroup.remove_made([p for p in parent.rglob("*") if p.is_dir()] + [parent], 5.0)


def test_delete_empties_and_removes_the_recorded_cgroups(
        kubelet_cgroup: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COCO_SHIM_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("COCO_SHIM_SOCKET_DIR", str(tmp_path / "s"))
    root = cgroup.unified_mount()
    assert root is not None
    record = ShimState.of("default", "pod1")
    relative = PurePosixPath(kubelet_cgroup.relative_to(root)) / "pod42" / "sandbox"
    made = cgroup.PodCgroup.create(root, relative, record.add_cgroup)
    assert made.made == [kubelet_cgroup / "pod42", kubelet_cgroup / "pod42/sandbox"]
    assert record.cgroups() == made.made
    # A QEMU the dead daemon left behind, in the pod's cgroup but not on the pid record.
    stray = subprocess.Popen(["sleep", "60"])
    try:
        made.add(stray.pid)
        assert cgroup.own_cgroup(stray.pid) == PurePosixPath("/") / relative
        assert cgroup.populated(made.path)
        delete(Flags(action="delete", namespace="default", id="pod1"))
        assert stray.wait(timeout=10) == -signal.SIGKILL  # cgroup.kill
        assert not (kubelet_cgroup / "pod42").exists()
        assert kubelet_cgroup.is_dir()  # not on the record: not ours
        assert not record.path.exists()
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()


def test_a_parent_in_use_by_another_pod_is_kept_and_its_processes_live(
        kubelet_cgroup: Path) -> None:
    """Pods A and B of one namespace (`ctr run`'s /<namespace>/<id>): A made the parent, B
    runs below it when A goes: B's process survives and the parent stays."""
    root = cgroup.unified_mount()
    assert root is not None
    parent = PurePosixPath(kubelet_cgroup.relative_to(root)) / "default"
    pod_a = cgroup.PodCgroup.create(root, parent / "a")
    pod_b = cgroup.PodCgroup.create(root, parent / "b")
    assert pod_a.made == [kubelet_cgroup / "default", kubelet_cgroup / "default/a"]
    assert pod_b.made == [kubelet_cgroup / "default/b"]
    other = subprocess.Popen(["sleep", "60"])
    try:
        pod_b.add(other.pid)
        assert pod_a.remove(1.0) == []
        assert other.poll() is None and pod_b.path.is_dir()
        assert not (kubelet_cgroup / "default/a").exists()
    finally:
        other.kill()
        other.wait()
    assert pod_b.remove(5.0) == []
