"""``coco-shim install`` into a temporary prefix: clean install, idempotence, dry run, and the
committed examples in packaging/ match what the installer writes."""

from __future__ import annotations

import io
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from shim.cli import main as cli
from shim.cli.install import (
    DROPIN,
    HANDLERS,
    LAUNCHER,
    PROFILE_DIR,
    RUNTIMECLASSES,
    VMM_FOOTPRINT_MIB,
    InstallError,
    install,
    render_dropin,
    render_runtimeclasses,
    source_dir,
)

REPO = Path(__file__).resolve().parents[3]
PACKAGING = REPO / "packaging"


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: content and mtime (ns), to prove nothing was touched."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("version", ["2", "1.7"])
def test_clean_install_writes_dropin_profiles_and_runtimeclasses(tmp_path: Path,
                                                                 version: str) -> None:
    out = io.StringIO()
    changes = install(tmp_path, version, out=out)  # type: ignore[arg-type]
    written = {c.path.relative_to(tmp_path) for c in changes}
    assert written == {DROPIN, RUNTIMECLASSES, LAUNCHER,
                       *(PROFILE_DIR / h.profile for h in HANDLERS)}
    assert all(c.old is None for c in changes)
    assert out.getvalue().count("created ") == len(written)
    for handler in HANDLERS:
        installed = tmp_path / PROFILE_DIR / handler.profile
        assert installed.read_text() == (source_dir() / handler.profile).read_text()
        assert installed.stat().st_mode & 0o777 == 0o644
    dropin = tomllib.loads((tmp_path / DROPIN).read_text())
    assert dropin["version"] == (3 if version == "2" else 2)
    plugin = ("io.containerd.cri.v1.runtime" if version == "2" else "io.containerd.grpc.v1.cri")
    runtimes = dropin["plugins"][plugin]["containerd"]["runtimes"]
    for handler in HANDLERS:
        assert runtimes[handler.name]["runtime_type"] == "io.containerd.coco.v2"
        assert runtimes[handler.name]["options"]["ConfigPath"] == str(
            tmp_path / PROFILE_DIR / handler.profile)
    # 1.7 replaces the CRI table with ours: the default handler must still be there.
    assert ("runc" in runtimes) == (version == "1.7")


def test_launcher_runs_the_shim_isolated_without_site(tmp_path: Path) -> None:
    """The installed binary: executable, ``python -IS`` on an explicit path, and it works from
    any directory with an empty environment (as containerd runs it, no PYTHONPATH)."""
    install(tmp_path, "2", out=io.StringIO())
    launcher = tmp_path / LAUNCHER
    assert launcher.stat().st_mode & 0o777 == 0o755
    assert launcher.read_text().splitlines()[0] == f"#!{sys.executable} -IS"
    done = subprocess.run([str(launcher), "-h"], cwd=tmp_path, env={}, capture_output=True,
                          text=True, timeout=30, check=False)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("usage: containerd-shim-coco-v2")
    launcher.chmod(0o644)
    assert [c.path for c in install(tmp_path, "2", out=io.StringIO())] == [launcher]
    assert launcher.stat().st_mode & 0o777 == 0o755


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    install(tmp_path, "2", out=io.StringIO())
    before = snapshot(tmp_path)
    out = io.StringIO()
    assert install(tmp_path, "2", out=out) == []
    assert "up to date" in out.getvalue()
    assert snapshot(tmp_path) == before


def test_dry_run_writes_nothing_and_prints_the_diff(tmp_path: Path) -> None:
    out = io.StringIO()
    changes = install(tmp_path, "2", dry_run=True, out=out)
    assert list(tmp_path.iterdir()) == []
    assert len(changes) == len(HANDLERS) + 3  # drop-in, RuntimeClasses, launcher
    diff = out.getvalue()
    assert f"+++ {tmp_path / DROPIN}" in diff
    assert "+  runtime_type = \"io.containerd.coco.v2\"" in diff


def test_dry_run_after_a_change_shows_only_that_change(tmp_path: Path) -> None:
    install(tmp_path, "2", out=io.StringIO())
    profile = tmp_path / PROFILE_DIR / "qemu-snp.toml"
    profile.write_text(profile.read_text().replace("vcpus = 1", "vcpus = 4"))
    before = snapshot(tmp_path)
    out = io.StringIO()
    changes = install(tmp_path, "2", dry_run=True, out=out)
    assert [c.path for c in changes] == [profile]
    assert "-vcpus = 4\n+vcpus = 1\n" in out.getvalue()
    assert snapshot(tmp_path) == before
    install(tmp_path, "2", out=io.StringIO())  # and a real run repairs it
    assert install(tmp_path, "2", dry_run=True, out=io.StringIO()) == []


def test_switching_containerd_version_rewrites_only_the_dropin(tmp_path: Path) -> None:
    install(tmp_path, "2", out=io.StringIO())
    changes = install(tmp_path, "1.7", out=io.StringIO())
    assert [c.path for c in changes] == [tmp_path / DROPIN]


def test_missing_source_profile_is_an_error_and_writes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "root"
    with pytest.raises(InstallError, match=r"qemu-snp\.toml"):
        install(prefix, "2", source=tmp_path / "empty", out=io.StringIO())
    assert not prefix.exists()


def test_cli_install_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["install", "--prefix", str(tmp_path), "--containerd-version", "1.7",
                     "--dry-run"]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "+version = 2" in capsys.readouterr().out
    assert cli.main(["install", "--prefix", str(tmp_path)]) == 0
    assert (tmp_path / DROPIN).exists()
    assert cli.main(["install", "--prefix", str(tmp_path / "x"), "--source",
                     str(tmp_path / "nowhere")]) == 2
    assert "coco-shim install:" in capsys.readouterr().err


def test_overhead_is_the_profiles_base_plus_the_measured_footprint() -> None:
    for handler in HANDLERS:
        hypervisor = tomllib.loads((source_dir() / handler.profile).read_text())["hypervisor"]
        assert (handler.base_memory_mib, handler.base_vcpus) == (
            hypervisor["memory_mib"], hypervisor["vcpus"]), handler.name
        assert handler.overhead_memory == f"{hypervisor['memory_mib'] + VMM_FOOTPRINT_MIB}Mi"
        assert handler.overhead_cpu == str(hypervisor["vcpus"])
    assert VMM_FOOTPRINT_MIB > 0


def test_committed_examples_match_the_installer() -> None:
    root = Path("/")
    for name, version in (("50-coco-shim.containerd2.toml", "2"),
                          ("50-coco-shim.containerd1.7.toml", "1.7")):
        committed = (PACKAGING / "containerd" / name).read_text()
        assert committed == render_dropin(version, root / PROFILE_DIR,  # type: ignore[arg-type]
                                          (root / DROPIN).parent), name
    assert (PACKAGING / "kubernetes" / "runtimeclasses.yaml").read_text() == \
        render_runtimeclasses()


def test_runtimeclasses_name_every_handler_with_its_overhead() -> None:
    docs = render_runtimeclasses().split("---\n")[1:]
    assert len(docs) == len(HANDLERS)
    for doc, handler in zip(docs, HANDLERS, strict=True):
        assert f"  name: {handler.name}\nhandler: {handler.name}\n" in doc
        assert f'memory: "{handler.overhead_memory}"' in doc
        body = "".join(line + "\n" for line in doc.splitlines() if not line.startswith("#"))
        assert body.startswith("apiVersion: node.k8s.io/v1\nkind: RuntimeClass\n")


def test_coco_dev_says_it_protects_nothing() -> None:
    """The coco-dev handler runs the confidential path without a TEE: its drop-in entry and
    its RuntimeClass say plainly that it protects nothing."""
    (dev,) = [h for h in HANDLERS if h.name == "coco-dev"]
    assert dev.profile == "qemu-coco-dev.toml"
    for text in (render_dropin("2", Path("/etc/coco-shim"), Path("/etc/containerd/conf.d")),
                 render_dropin("1.7", Path("/etc/coco-shim"), Path("/etc/containerd/conf.d")),
                 render_runtimeclasses()):
        warning = text.index("coco-dev PROTECTS NOTHING")
        # right above coco-dev's entry: after coco-pef's, before coco-dev's own lines
        assert text.rindex("coco-pef", 0, warning) < warning < text.index("coco-dev", warning + 1)
        assert text.find("coco-dev", 0, warning) == -1
