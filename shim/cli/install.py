"""``coco-shim install``: register the runtime with containerd, one CRI handler per profile.

What gets written, under a prefix (``/`` on a real node):

- ``etc/coco-shim/qemu-*.toml``: the runtime profiles (from ``firmware-configs/``);
- ``etc/containerd/conf.d/50-coco-shim.toml``: a containerd drop-in with one runtime handler per
  profile (``coco-snp``, ``coco-tdx``, ``coco-se``, ``coco-pef``, ``coco-dev``, ``coco-none``),
  each pointing at its profile through the runtime options' ``ConfigPath``. ``coco-dev`` (the
  confidential code path without TEE hardware) protects nothing and says so in the drop-in and
  its RuntimeClass;
- ``usr/share/coco-shim/kubernetes/runtimeclasses.yaml``: a ``RuntimeClass`` per handler, with
  the pod overhead of its VM;
- ``usr/local/bin/containerd-shim-coco-v2``: the binary containerd runs (on its ``PATH``), a
  launcher starting the installing interpreter isolated and without ``site`` on the module
  path it resolved (:mod:`shim.core.interpreter`: no ``site``, no editable-install finder).

Files are compared first and only changed ones are rewritten (atomically), so a second run
changes nothing; a dry run prints the unified diff of what would change and writes nothing.
The same renderers produce the committed examples in ``packaging/`` (a unit test keeps them in
step).

containerd merges drop-ins differently by version (measured with ``config dump``): 2.x merges
tables key by key, so the drop-in only adds handlers; 1.7 replaces a plugin's whole table, so
the 1.7 drop-in's ``[plugins."io.containerd.grpc.v1.cri"]`` stands in for the main config's
(it re-declares ``runc``, the default handler, without which the CRI plugin does not load).
"""

from __future__ import annotations

import difflib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TextIO

ContainerdVersion = Literal["2", "1.7"]

RUNTIME_TYPE: Final = "io.containerd.coco.v2"
POD_ANNOTATIONS: Final = ("io.katacontainers.*",)
DROPIN: Final = Path("etc/containerd/conf.d/50-coco-shim.toml")
PROFILE_DIR: Final = Path("etc/coco-shim")
RUNTIMECLASSES: Final = Path("usr/share/coco-shim/kubernetes/runtimeclasses.yaml")
LAUNCHER: Final = Path("usr/local/bin/containerd-shim-coco-v2")
REPO: Final = Path(__file__).resolve().parents[2]
HEADER: Final = "# Written by `coco-shim install`; rerun it rather than editing this file.\n"


# The host memory a pod VM takes beyond its guest RAM (QEMU outside the guest's pages,
# vhost-device-vsock, the shim daemon: all in the pod's cgroup), measured by
# `make bench-overhead` (bench/overhead.py; figures and command in the README, "Pod sizing and
# accounting"), rounded up.
VMM_FOOTPRINT_MIB: Final = 320


@dataclass(frozen=True)
class Handler:
    """One CRI runtime handler (= Kubernetes RuntimeClass handler) and its runtime profile.

    The pod VM is its profile's base size (``vcpus``, ``memory_mib``) plus the pod's limits
    (shim/pod/sizing.py). The kubelet charges the pod cgroup for its limits + the RuntimeClass
    overhead, while the host spends guest RAM + the VMM's footprint: the overhead is the base
    + the measured footprint, so the pod cannot OOM-kill its own VM at its limit.
    """

    name: str
    profile: str  # file name in firmware-configs/
    base_memory_mib: int  # the profile's memory_mib
    base_vcpus: int  # the profile's vcpus
    warning: str = ""  # said above the handler and its RuntimeClass

    @property
    def overhead_memory(self) -> str:  # Kubernetes quantity
        return f"{self.base_memory_mib + VMM_FOOTPRINT_MIB}Mi"

    @property
    def overhead_cpu(self) -> str:
        return str(self.base_vcpus)


HANDLERS: Final = (
    Handler("coco-snp", "qemu-snp.toml", 2048, 1),
    Handler("coco-tdx", "qemu-tdx.toml", 2048, 1),
    Handler("coco-se", "qemu-se.toml", 2048, 1),
    Handler("coco-pef", "qemu-pef.toml", 2048, 1),
    Handler("coco-dev", "qemu-coco-dev.toml", 1024, 1,
            "coco-dev PROTECTS NOTHING: the confidential code path (guest pull, initdata, "
            "agent policy) without TEE hardware; the host can read and change everything in "
            "the VM. Development and CI only."),
    Handler("coco-none", "qemu-none.toml", 512, 1,
            "coco-none is not confidential: a development VM whose container rootfs is shared "
            "from the host over 9p."),
)


class InstallError(RuntimeError):
    """The installation cannot proceed (missing source profile, unwritable prefix)."""


# --- rendering ------------------------------------------------------------------------------


def render_dropin(version: ContainerdVersion, profile_dir: Path, dropin_dir: Path,
                  handlers: Sequence[Handler] = HANDLERS) -> str:
    """The containerd drop-in registering ``handlers`` (config version 3 for 2.x, 2 for 1.7).

    ``profile_dir`` is where the profiles are installed, ``dropin_dir`` where this file is (for
    the ``imports`` line config.toml needs).
    """
    pattern = _toml_string(f"{dropin_dir}/*.toml")
    imports = f"# Needs `imports = [{pattern}]` at the top of config.toml."
    annotations = ", ".join(f'"{a}"' for a in POD_ANNOTATIONS)
    if version == "2":
        table = "plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes"
        lines = [HEADER.rstrip("\n"), imports, "version = 3"]
        extra = ["  sandboxer = \"podsandbox\""]
    else:
        table = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes'
        lines = [HEADER.rstrip("\n"), imports,
                 "# containerd 1.7 replaces a plugin's whole table with an imported one: this "
                 "file's",
                 "# CRI table stands in for config.toml's, so move any other CRI settings here.",
                 "version = 2",
                 "",
                 f"[{table}.runc]",
                 "  runtime_type = \"io.containerd.runc.v2\""]
        extra = []
    for handler in handlers:
        lines += ["", *_comment(handler.warning),
                  f"[{table}.{handler.name}]",
                  f"  runtime_type = \"{RUNTIME_TYPE}\"",
                  *extra,
                  f"  pod_annotations = [{annotations}]",
                  f"[{table}.{handler.name}.options]",
                  f"  ConfigPath = {_toml_string(str(profile_dir / handler.profile))}"]
    return "\n".join(lines) + "\n"


def _comment(text: str) -> list[str]:
    """``text`` as ``#`` lines of at most 96 characters."""
    if not text:
        return []
    import textwrap

    return [f"# {line}" for line in textwrap.wrap(text, 94)]


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for what a path can hold)."""
    return json.dumps(value)


def render_runtimeclasses(handlers: Sequence[Handler] = HANDLERS) -> str:
    """Kubernetes ``RuntimeClass`` manifests, one document per handler."""
    docs = []
    for handler in handlers:
        docs.append(
            "".join(f"{line}\n" for line in _comment(handler.warning))
            + "apiVersion: node.k8s.io/v1\n"
            "kind: RuntimeClass\n"
            "metadata:\n"
            f"  name: {handler.name}\n"
            f"handler: {handler.name}\n"
            "overhead:\n"
            "  podFixed:\n"
            f"    memory: \"{handler.overhead_memory}\"\n"
            f"    cpu: \"{handler.overhead_cpu}\"\n")
    return HEADER + "---\n" + "---\n".join(docs)


# --- planning and applying ------------------------------------------------------------------


@dataclass(frozen=True)
class FileChange:
    path: Path
    old: str | None  # None: the file does not exist yet
    new: str

    def diff(self) -> str:
        before = [] if self.old is None else self.old.splitlines(keepends=True)
        return "".join(difflib.unified_diff(
            before, self.new.splitlines(keepends=True),
            fromfile="/dev/null" if self.old is None else str(self.path),
            tofile=str(self.path)))


def source_dir() -> Path:
    """Where the runtime profiles come from: the ``firmware-configs/`` beside the package."""
    return REPO / "firmware-configs"


def desired_files(prefix: Path, version: ContainerdVersion,
                  source: Path) -> dict[Path, str]:
    """Every file the installation consists of, by absolute path (``prefix`` is absolute)."""
    profile_dir = prefix / PROFILE_DIR
    files: dict[Path, str] = {}
    for handler in HANDLERS:
        try:
            files[profile_dir / handler.profile] = (source / handler.profile).read_text()
        except OSError as err:
            raise InstallError(f"runtime profile {source / handler.profile}: {err}") from err
    files[prefix / DROPIN] = render_dropin(version, profile_dir, (prefix / DROPIN).parent)
    files[prefix / RUNTIMECLASSES] = render_runtimeclasses()
    from shim.core import interpreter

    files[prefix / LAUNCHER] = interpreter.render_launcher(sys.executable,
                                                           interpreter.module_path())
    return files


def file_mode(path: Path) -> int:
    """0755 for what goes in a ``bin`` directory (the launcher), else 0644."""
    return 0o755 if path.parent.name == "bin" else 0o644


def plan(files: dict[Path, str]) -> list[FileChange]:
    """The files whose content differs from what is on disk (in path order)."""
    changes = []
    for path, new in sorted(files.items()):
        try:
            old: str | None = path.read_text()
        except FileNotFoundError:
            old = None
        except OSError as err:
            raise InstallError(f"cannot read {path}: {err}") from err
        if old != new or (old is not None and stat.S_IMODE(path.stat().st_mode)
                                              != file_mode(path)):
            changes.append(FileChange(path, old, new))
    return changes


def apply(changes: Iterable[FileChange]) -> None:
    """Write each file atomically (temp file in the same directory, then rename), mode 0644
    (0755 in a ``bin`` directory)."""
    for change in changes:
        try:
            change.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{change.path.name}.", dir=change.path.parent)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(change.new)
                os.chmod(tmp, file_mode(change.path))
                os.replace(tmp, change.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as err:
            raise InstallError(f"cannot write {change.path}: {err}") from err


def install(prefix: Path, version: ContainerdVersion, *, dry_run: bool = False,
            source: Path | None = None, out: TextIO | None = None) -> list[FileChange]:
    """Bring the files under ``prefix`` up to date; return what changed (or would change)."""
    out = out or sys.stdout
    changes = plan(desired_files(prefix.resolve(), version, source or source_dir()))
    if dry_run:
        for change in changes:
            out.write(change.diff())
    else:
        apply(changes)
        for change in changes:
            print(f"{'created' if change.old is None else 'updated'} {change.path}", file=out)
    if not changes:
        print(f"coco-shim install: everything under {prefix} is up to date", file=out)
    return changes
