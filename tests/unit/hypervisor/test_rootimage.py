"""The root image a profile attaches: its dm-verity parameters, the disk and the kernel
parameter per profile, and what the config loader refuses."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from hypervisor.config import parse_profile
from hypervisor.errors import ConfigError, InvariantError
from hypervisor.profile import HybridVsock, TeeKind, VmInstance, build_command_line
from hypervisor.rootimage import RootImage, RootImageError, VerityRoot, verity_file
from tests.unit.hypervisor.test_profiles import PROFILES, instance

ROOT_HASH = "ab" * 32
SALT = "cd" * 32
VERITY = VerityRoot(data_blocks=100, hash_start_block=100, root_hash=ROOT_HASH, salt=SALT)
IMAGE = Path("/g/coco-guest.erofs")


def append_of(argv: list[str]) -> str:
    return argv[argv.index("-append") + 1] if "-append" in argv else ""


def test_verity_parameter_carries_every_table_field() -> None:
    assert VERITY.kernel_param() == f"coco.root=verity:100:100:{ROOT_HASH}:{SALT}"
    assert RootImage(IMAGE).kernel_param() == "coco.root=blk"


@pytest.mark.parametrize(("field", "value", "message"), [
    ("root_hash", "AB" * 32, "root_hash must be 64 lowercase hex"),
    ("salt", "cd" * 31, "salt must be 64 lowercase hex"),
    ("hash_start_block", 99, "the hash tree must follow the data"),
])
def test_bad_verity_parameters_are_refused(field: str, value: object, message: str) -> None:
    fields: dict[str, object] = {**vars(VERITY), field: value}
    with pytest.raises(RootImageError, match=message):
        VerityRoot(**fields)  # type: ignore[arg-type]


def test_verity_file_is_read_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "x.verity"
    doc = {"data_blocks": 100, "hash_start_block": 100, "root_hash": ROOT_HASH, "salt": SALT,
           "hash": "sha256", "block_size": 4096}
    path.write_text(json.dumps(doc))
    assert VerityRoot.from_file(path) == VERITY
    path.write_text(json.dumps({**doc, "hash": "sha1"}))
    with pytest.raises(RootImageError, match="only sha256 over 4096-byte blocks"):
        VerityRoot.from_file(path)
    path.write_text(json.dumps({k: v for k, v in doc.items() if k != "salt"}))
    with pytest.raises(RootImageError, match="missing 'salt'"):
        VerityRoot.from_file(path)
    assert verity_file(IMAGE) == Path("/g/coco-guest.erofs.verity")


def test_development_profile_attaches_the_image_read_only_without_verity() -> None:
    profile = replace(PROFILES["none"], image=RootImage(IMAGE))
    argv = build_command_line(profile, instance("none")).to_argv()
    joined = " ".join(argv)
    assert ("-drive if=none,id=drive-image0,file=/g/coco-guest.erofs,format=raw,readonly=on,"
            "aio=threads -device virtio-blk-pci,id=image0,drive=drive-image0") in joined
    assert append_of(argv) == "console=ttyS0 coco.root=blk"


@pytest.mark.parametrize("name", ["sev", "sev-es", "snp", "tdx", "pef"])
def test_tee_profiles_put_the_root_hash_on_the_measured_command_line(name: str) -> None:
    profile = replace(PROFILES[name], image=RootImage(IMAGE, VERITY))
    argv = build_command_line(profile, instance(name)).to_argv()
    assert append_of(argv) == f"panic=1 {VERITY.kernel_param()}"
    assert "id=drive-image0,file=/g/coco-guest.erofs,format=raw,readonly=on" in " ".join(argv)


def test_coco_dev_gets_verity_too() -> None:
    profile = replace(PROFILES["none"], confidential_without_tee=True,
                      kernel_params="console=ttyS0 coco.agent.confidential=1",
                      image=RootImage(IMAGE, VERITY))
    argv = build_command_line(profile, instance("none")).to_argv()
    assert VERITY.kernel_param() in append_of(argv).split()


@pytest.mark.parametrize("name", ["snp", "tdx"])
def test_a_confidential_profile_never_mounts_an_unchecked_root(name: str) -> None:
    profile = replace(PROFILES[name], image=RootImage(IMAGE))
    with pytest.raises(InvariantError, match="has no dm-verity parameters"):
        build_command_line(profile, instance(name))


def test_s390_pv_keeps_its_command_line_inside_the_genprotimg_image() -> None:
    profile = replace(PROFILES["s390-pv"], image=RootImage(IMAGE, VERITY))
    argv = build_command_line(profile, instance("s390-pv")).to_argv()
    assert "-append" not in argv
    assert "virtio-blk-ccw,id=image0" in " ".join(argv)


def _profile_text(tmp_path: Path, confidential: bool) -> str:
    (tmp_path / "qemu").touch()
    (tmp_path / "k").touch()
    (tmp_path / "coco-guest.erofs").touch()
    return ('[hypervisor]\ntee = "none"\nqemu_path = "qemu"\nkernel = "k"\n'
            'image = "coco-guest.erofs"\n'
            + ('kernel_params = "coco.agent.confidential=1"\n'
               '[runtime]\nconfidential = true\n' if confidential else ""))


def test_config_reads_the_verity_file_on_a_confidential_profile(tmp_path: Path) -> None:
    text = _profile_text(tmp_path, confidential=True)
    with pytest.raises(ConfigError, match="needs the image's dm-verity parameters"):
        parse_profile(text, source="p.toml", base_dir=tmp_path)
    (tmp_path / "coco-guest.erofs.verity").write_text(json.dumps({
        "data_blocks": 100, "hash_start_block": 100, "root_hash": ROOT_HASH, "salt": SALT,
        "hash": "sha256", "block_size": 4096}))
    profile = parse_profile(text, source="p.toml", base_dir=tmp_path)
    assert profile.image == RootImage(tmp_path / "coco-guest.erofs", VERITY)
    vm = VmInstance(run_dir=tmp_path, vsock=HybridVsock(tmp_path / "v.sock"))
    assert VERITY.kernel_param() in append_of(build_command_line(profile, vm).to_argv())


def test_config_development_profile_ignores_verity(tmp_path: Path) -> None:
    profile = parse_profile(_profile_text(tmp_path, confidential=False), source="p.toml",
                            base_dir=tmp_path)
    assert profile.image == RootImage(tmp_path / "coco-guest.erofs")
    assert profile.tee is TeeKind.NONE
