"""R5: a runtime profile's annotation allow-list, per shipped profile, for every container of
the pod (not only the one whose Create boots the VM)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.profile import RuntimeProfile
from shim.core import errors
from shim.pod.profile import KATA_ANNOTATIONS, AnnotationPolicy
from shim.task.process import CreateTask
from tests.unit.hypervisor.test_config import SHIPPED, load
from tests.unit.hypervisor.test_config import root as root  # the fake QEMU root fixture
from tests.unit.shim.conftest import make_harness
from tests.unit.shim.fakes import FakeAgent, FakeBooter

SANDBOX = "io.kubernetes.cri.sandbox-id"
# Kata annotations a pod spec may carry: every shipped profile's, and some none of them allows.
OTHERS = ("io.katacontainers.config.hypervisor.path",
          "io.katacontainers.config.hypervisor.machine_type",
          "io.katacontainers.config.hypervisor.firmware",
          "io.katacontainers.config.hypervisor.default_vcpus",
          "io.katacontainers.config.hypervisor.default_memory",
          "io.katacontainers.config.hypervisor.kernel_params",
          "io.katacontainers.config.hypervisor.cc_init_data",
          "io.katacontainers.config.agent.policy",
          "io.katacontainers.config.runtime.disable_guest_seccomp",
          "io.katacontainers.config_path")


def _profile(name: str, root: Path) -> RuntimeProfile:
    profile = load(name, root)
    assert isinstance(profile, RuntimeProfile)
    return profile


@pytest.mark.parametrize("name", SHIPPED)
async def test_every_annotation_off_the_list_is_refused_for_every_container(
        name: str, root: Path, tmp_path: Path) -> None:
    policy = AnnotationPolicy.of(_profile(name, root))
    refused = sorted(set(OTHERS) - policy.allowed)
    assert refused, f"{name} allows every annotation we know"
    for index, key in enumerate(refused):
        pod_dir = tmp_path / str(index)
        pod_dir.mkdir()
        agent = FakeAgent()
        h = make_harness(pod_dir, agent, FakeBooter(agent, pid=4242,
                                                    enable_annotations=tuple(policy.allowed)))
        try:
            # The first container: refused before the VM boots.
            with pytest.raises(errors.InvalidArgument,
                               match=f"annotation {key} is not allowed by runtime profile"):
                await h.tasks.create(CreateTask(id="pod", bundle=str(h.bundle(
                    "pod", {key: "x"}))))
            assert h.booter.vms == []
            # A clean first container boots the pod; a later one is held to the same list.
            await h.tasks.create(CreateTask(id="pod", bundle=str(h.bundle("pod-ok"))))
            with pytest.raises(errors.InvalidArgument,
                               match=f"annotation {key} is not allowed by runtime profile"):
                await h.tasks.create(CreateTask(id="app", bundle=str(h.bundle(
                    "app", {SANDBOX: "pod", key: "x"}))))
            assert "app" not in agent.containers
            assert len(h.booter.vms) == 1
            await h.tasks.delete("pod")
        finally:
            await h.aclose()


@pytest.mark.parametrize("name", SHIPPED)
def test_the_list_is_exactly_the_profiles(name: str, root: Path) -> None:
    profile = _profile(name, root)
    policy = AnnotationPolicy.of(profile)
    assert policy.allowed == frozenset(profile.enable_annotations)
    assert all(key.startswith(KATA_ANNOTATIONS) for key in policy.allowed)
    for key in policy.allowed - {"io.katacontainers.config.agent.policy"}:
        policy.check({"annotations": {key: "1"}})  # allowed keys pass
    policy.check({"annotations": {"io.kubernetes.cri.container-type": "sandbox"}})
