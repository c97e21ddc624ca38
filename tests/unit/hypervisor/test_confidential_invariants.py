"""The confidential invariants live in one place (``CONFIDENTIAL_INVARIANTS``) and hold for
coco-dev and every TEE profile alike: each is listed here and broken once per profile, and
each break is refused both by the TOML loader and by the launch's invariant check."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.cmdline import NinePShare, VirtioFsShare
from hypervisor.config import load_profile, parse_profile
from hypervisor.errors import ConfigError, InvariantError
from hypervisor.profile import (
    CONFIDENTIAL_INVARIANTS,
    GUEST_CONFIDENTIAL_PARAM,
    KERNEL_PARAMS_ANNOTATION,
    HybridVsock,
    KernelVsock,
    RuntimeProfile,
    TeeKind,
    VmInstance,
    build_command_line,
    confidential_conflicts,
)
from tests.unit.hypervisor.test_config import CONFIGS, root  # noqa: F401 (fixture)
from tests.unit.hypervisor.test_profiles import PROFILES, RUN

CONFIDENTIAL = ["coco-dev", "sev", "sev-es", "snp", "tdx", "s390-pv", "pef"]


def test_the_invariants_listed() -> None:
    assert [i.name for i in CONFIDENTIAL_INVARIANTS] == [
        "no-host-share", "static-sizing", "measured-cmdline", "guest-knows", "no-balloon"]


def coco_dev() -> RuntimeProfile:
    return replace(PROFILES["none"], name="coco-dev", confidential_without_tee=True,
                   kernel_params=f"console=ttyS0 {GUEST_CONFIDENTIAL_PARAM}")


def confidential_profile(name: str) -> RuntimeProfile:
    if name == "coco-dev":
        return coco_dev()
    return PROFILES[name]


def launch_argv(prof: RuntimeProfile, **vm: object) -> list[str]:
    vsock = HybridVsock(Path("/run/vm/vhost.sock")) if not prof.tee.confidential else (
        KernelVsock(3, 9))
    base: dict[str, object] = dict(run_dir=RUN, vsock=vsock,
                                   accel="tcg" if not prof.tee.confidential else None)
    base.update(vm)
    return build_command_line(prof, VmInstance(**base)).to_argv()  # type: ignore[arg-type]


BREAKS: list[tuple[str, object]] = [
    ("no-host-share", {"shares": (NinePShare("share0", "kataShared", Path("/s")),)}),
    ("no-host-share", {"shares": (VirtioFsShare("fs0", "kataShared", Path("/v.sock")),)}),
    ("static-sizing", {"memory_slots": 4, "max_memory_mib": 8192}),
    ("static-sizing", {"max_vcpus": 8}),
    ("measured-cmdline", {"enable_annotations": (KERNEL_PARAMS_ANNOTATION,)}),
    ("no-balloon", {"free_page_reporting": True}),
]


@pytest.mark.parametrize("name", CONFIDENTIAL)
def test_every_confidential_profile_is_confidential(name: str) -> None:
    prof = confidential_profile(name)
    assert prof.confidential
    assert confidential_conflicts(prof) == []
    argv = launch_argv(prof)  # launches as it is
    assert not any("balloon" in a for a in argv)


@pytest.mark.parametrize("name", CONFIDENTIAL)
@pytest.mark.parametrize(("invariant", "change"), BREAKS,
                         ids=[f"{b[0]}-{i}" for i, b in enumerate(BREAKS)])
def test_each_invariant_holds_for_each_confidential_profile(name: str, invariant: str,
                                                           change: dict[str, object]) -> None:
    prof = confidential_profile(name)
    vm = {k: v for k, v in change.items() if k == "shares"}
    prof = replace(prof, **{k: v for k, v in change.items()  # type: ignore[arg-type]
                            if k != "shares"})
    shares = vm.get("shares", ())
    assert any(f"({invariant})" in c.message
               for c in confidential_conflicts(prof, shares))  # type: ignore[arg-type]
    with pytest.raises(InvariantError, match=rf"\({invariant}\)"):
        launch_argv(prof, **vm)


def test_a_development_profile_is_not_bound_by_them() -> None:
    dev = PROFILES["none"]
    assert not dev.confidential
    assert confidential_conflicts(dev, (NinePShare("s", "kataShared", Path("/s")),)) == []


def test_coco_dev_without_the_guest_flag_is_refused() -> None:
    prof = replace(coco_dev(), kernel_params="console=ttyS0")
    with pytest.raises(InvariantError, match=r"\(guest-knows\).*coco.agent.confidential=1"):
        launch_argv(prof)


def test_a_tee_needs_no_guest_flag() -> None:
    assert confidential_conflicts(PROFILES["snp"]) == []
    assert PROFILES["snp"].tee is TeeKind.SNP


def test_coco_dev_keeps_what_only_a_missing_tee_allows() -> None:
    """TCG, hybrid vsock and a console log (QEMU writes the capped log's FIFO): refused on a
    TEE, allowed on coco-dev."""
    argv = " ".join(launch_argv(coco_dev()))
    assert "-accel tcg" in argv and "vhost-user-vsock" in argv and "console.pipe" in argv
    assert "confidential-guest-support" not in argv


def test_shipped_coco_dev_profile(root: Path) -> None:  # noqa: F811
    prof = load_profile(CONFIGS / "qemu-coco-dev.toml",
                        variables={"guest_image_dir": "/guest"}, qemu_root=root)
    assert prof.confidential and prof.tee is TeeKind.NONE
    assert GUEST_CONFIDENTIAL_PARAM in prof.kernel_params.split()
    assert "io.katacontainers.config.hypervisor.cc_init_data" in prof.enable_annotations
    assert "io.katacontainers.config.agent.policy" in prof.enable_annotations
    assert not prof.free_page_reporting
    argv = " ".join(launch_argv(prof))
    assert "9p" not in argv and "balloon" not in argv


COCO_DEV_TOML = """
[hypervisor]
tee = "none"
qemu_path = "/usr/bin/qemu-system-x86_64"
kernel_params = "{params}"
{hv}
[runtime]
confidential = true
{rt}
"""


@pytest.mark.parametrize(("params", "hv", "rt", "key", "invariant"), [
    ("quiet", "", "", "hypervisor.kernel_params", "guest-knows"),
    (GUEST_CONFIDENTIAL_PARAM, "max_vcpus = 4", "", "hypervisor.max_vcpus", "static-sizing"),
    (GUEST_CONFIDENTIAL_PARAM, "memory_slots = 2\nmax_memory_mib = 4096", "",
     "hypervisor.memory_slots", "static-sizing"),
    (GUEST_CONFIDENTIAL_PARAM, "", f'enable_annotations = ["{KERNEL_PARAMS_ANNOTATION}"]',
     "runtime.enable_annotations", "measured-cmdline"),
    (GUEST_CONFIDENTIAL_PARAM, "free_page_reporting = true", "",
     "hypervisor.free_page_reporting", "no-balloon"),
])
def test_the_loader_refuses_a_broken_coco_dev_profile(params: str, hv: str, rt: str, key: str,
                                                      invariant: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_profile(COCO_DEV_TOML.format(params=params, hv=hv, rt=rt), "coco.toml",
                      check_files=False)
    assert key in str(info.value) and f"({invariant})" in str(info.value)


def test_a_tee_profile_cannot_turn_confidential_off() -> None:
    text = """
[hypervisor]
tee = "tdx"
qemu_path = "/usr/bin/qemu-system-x86_64"
accelerator = "kvm"
vsock = "kernel"
[runtime]
confidential = false
"""
    with pytest.raises(ConfigError, match=r"runtime\.confidential"):
        parse_profile(text, "tdx.toml", check_files=False)
