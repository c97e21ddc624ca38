"""Build the reference guest initramfs from Debian packages, cached under a key of its inputs.

Inputs (all part of the cache key): the recipe in ``packaging/guest-image/`` (package list,
module list, strip list, init), this builder's own source, the Debian suite and mirror, the
kernel version and the bytes of every module copied, the protobuf runtime taken from the host
venv, the policy engine (regorus, jsonpatch) from the same venv, the project's ``protocols/`` and
``guest/`` packages, and SOURCE_DATE_EPOCH.

Same inputs give the same image bytes (see :mod:`guest.image.cpio`). The Debian package set is
unpacked once per (suite, mirror, package list) into ``<cache>/guest/base-<key>/`` and reused, so
a rebuild after a code change does not touch the network.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from guest.image.cpio import DeviceNode, lz4_library_version, write_initramfs
from guest.image.kmod import KernelModule, ModuleTree, modules_alias, modules_dep

IMAGE_NAME = "coco-guest.initrd"
# The device form: the same tree as a read-only EROFS image with its dm-verity hash tree
# appended (one file, shared by every pod of the node), the verity parameters beside it, and a
# tiny initramfs whose init (the recipe's init-root) mounts it and switch_roots into it.
ROOTFS_NAME = "coco-guest.erofs"
VERITY_NAME = "coco-guest.erofs.verity"
BOOT_INITRD_NAME = "coco-guest-boot.initrd"
VERITY_BLOCK = 4096
DEFAULT_EPOCH = 1735689600  # 2025-01-01T00:00:00Z; override with SOURCE_DATE_EPOCH
PAYLOAD_DIR = "opt/coco-guest"  # PYTHONPATH of the agent inside the image
DEVICES = (
    DeviceNode("dev/console", stat.S_IFCHR | 0o600, 5, 1),
    DeviceNode("dev/null", stat.S_IFCHR | 0o666, 1, 3),
    DeviceNode("dev/kmsg", stat.S_IFCHR | 0o644, 1, 11),  # init's milestones before devtmpfs
)
# Directories of the project copied into the image (with only what the agent imports).
PROJECT_PACKAGES = ("guest", "protocols")
EXCLUDED_PROJECT_DIRS = {"guest/image"}
PROTOBUF_DIRS = ("google/protobuf", "google/_upb")
RECIPE_FILES = ("packages.txt", "modules.txt", "modules-on-demand.txt", "strip.txt", "init",
                "fstab", "image-pull.toml", "init-root", "modules-root.txt",
                "modules-verity.txt")
# Pure-Python libraries copied from the venv (no Debian bookworm package): RFC 8785 JCS.
VENDORED_DIRS = ("rfc8785",)
# Debian's python3-* packages live here; the agent runs with -S (no site), so it is on
# PYTHONPATH explicitly (init and precompile).
DIST_PACKAGES = "usr/lib/python3/dist-packages"
# The agent policy's Rego engine and RFC 6902 patches (the venv's [guest] extra); the agent
# imports them only once a Rego policy is in force.
POLICY_ENGINE = ("regorus", "jsonpatch.py", "jsonpointer.py")


def _lines(path: Path) -> list[str]:
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


@dataclass(frozen=True)
class Recipe:
    """What goes into the image; every field is an input of the cache key."""

    recipe_dir: Path
    repo: Path
    modules_dir: Path
    site_packages: Path
    mirror: str
    suite: str = "bookworm"
    epoch: int = DEFAULT_EPOCH

    @property
    def packages(self) -> list[str]:
        return _lines(self.recipe_dir / "packages.txt")

    @property
    def modules(self) -> list[str]:
        return _lines(self.recipe_dir / "modules.txt")

    @property
    def modules_on_demand(self) -> list[str]:
        return _lines(self.recipe_dir / "modules-on-demand.txt")

    def module_order(self, tree: ModuleTree) -> tuple[list[KernelModule], list[KernelModule]]:
        """(modules loaded at boot, every module in the image), dependencies first."""
        boot = tree.load_order(self.modules)
        return boot, tree.load_order([*self.modules, *self.modules_on_demand, *self.modules_root,
                                           *self.modules_verity])

    @property
    def modules_root(self) -> list[str]:
        return _lines(self.recipe_dir / "modules-root.txt")

    @property
    def modules_verity(self) -> list[str]:
        return _lines(self.recipe_dir / "modules-verity.txt")

    @property
    def strip(self) -> list[str]:
        return _lines(self.recipe_dir / "strip.txt")

    @property
    def init(self) -> Path:
        return self.recipe_dir / "init"

    @property
    def kernel_version(self) -> str:
        return self.modules_dir.name

    def project_files(self) -> list[tuple[str, Path]]:
        """(path inside the payload, source) for the project's packages, sorted."""
        out: list[tuple[str, Path]] = []
        for package in PROJECT_PACKAGES:
            for path in sorted((self.repo / package).rglob("*")):
                rel = path.relative_to(self.repo).as_posix()
                if any(rel == d or rel.startswith(d + "/") for d in EXCLUDED_PROJECT_DIRS):
                    continue
                wanted = path.suffix in (".py", ".rego") or path.name == "py.typed"
                if path.is_file() and wanted and "__pycache__" not in path.parts:
                    out.append((rel, path))
        return out

    def protobuf_files(self) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        for sub in (*PROTOBUF_DIRS, *VENDORED_DIRS):
            for path in sorted((self.site_packages / sub).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyi":
                    out.append((path.relative_to(self.site_packages).as_posix(), path))
        if not out:
            raise FileNotFoundError(f"no protobuf runtime under {self.site_packages}")
        return out

    def policy_engine_files(self) -> list[tuple[str, Path]]:
        out: list[tuple[str, Path]] = []
        for name in POLICY_ENGINE:
            top = self.site_packages / name
            paths = sorted(top.rglob("*")) if top.is_dir() else [top]
            for path in paths:
                if not path.is_file():
                    if not path.exists():
                        raise FileNotFoundError(
                            f"{top} missing: install the [guest] extra into the venv"
                        )
                    continue
                if "__pycache__" not in path.parts and path.suffix != ".pyi":
                    out.append((path.relative_to(self.site_packages).as_posix(), path))
        return out

    def builder_files(self) -> list[tuple[str, Path]]:
        here = Path(__file__).resolve().parent
        return [(f"builder/{p.name}", p) for p in sorted(here.glob("*.py"))]

    def base_key(self) -> str:
        doc = json.dumps([self.suite, self.mirror, sorted(self.packages)]).encode()
        return hashlib.sha256(doc).hexdigest()[:16]

    def key(self, module_files: Iterable[Path]) -> str:
        digest = hashlib.sha256()

        def feed(label: str, data: bytes) -> None:
            digest.update(f"{label}\0{len(data)}\0".encode())
            digest.update(data)

        feed("base", self.base_key().encode())
        feed("epoch", str(self.epoch).encode())
        feed("kernel", self.kernel_version.encode())
        feed("lz4", lz4_library_version().encode())
        feed("strip", strip_version().encode())
        feed("mkfs.erofs", tool_version(["mkfs.erofs", "--version"]).encode())
        feed("veritysetup", tool_version(["veritysetup", "--version"]).encode())
        for name in RECIPE_FILES:
            feed(f"recipe/{name}", (self.recipe_dir / name).read_bytes())
        for label, path in [
            *self.builder_files(),
            *self.project_files(),
            *self.protobuf_files(),
            *self.policy_engine_files(),
        ]:
            feed(label, path.read_bytes())
        for path in module_files:
            feed(f"module/{path.name}", path.read_bytes())
        return digest.hexdigest()[:24]


@dataclass
class Progress:
    """Numbered steps with timings on stderr; a live counter when stderr is a terminal."""

    total: int
    stream: object = field(default_factory=lambda: sys.stderr)
    step_no: int = 0
    _t0: float = field(default_factory=time.monotonic)

    def _write(self, text: str) -> None:
        stream = self.stream
        stream.write(text)  # type: ignore[attr-defined]
        stream.flush()  # type: ignore[attr-defined]

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Callable[[str], None]]:
        self.step_no += 1
        start = time.monotonic()
        prefix = f"[{self.step_no}/{self.total}] {title}"
        self._write(prefix + " ...\n")
        live = bool(getattr(self.stream, "isatty", lambda: False)())

        def update(detail: str) -> None:
            if live:
                self._write(f"\r    {detail}\x1b[K")

        yield update
        if live:
            self._write("\r\x1b[K")
        self._write(f"    done in {time.monotonic() - start:.1f} s\n")

    def total_seconds(self) -> float:
        return time.monotonic() - self._t0


@dataclass(frozen=True)
class BuildResult:
    image: Path  # the initramfs form: the whole tree in one initramfs
    sha256: str
    size: int
    key: str
    cached: bool
    manifest: Path

    @property
    def rootfs(self) -> Path:
        """The device form's root image (EROFS + dm-verity hash tree)."""
        return self.image.parent / ROOTFS_NAME

    @property
    def verity(self) -> Path:
        """The root image's dm-verity parameters (JSON, see :func:`write_rootfs`)."""
        return self.image.parent / VERITY_NAME

    @property
    def boot_initrd(self) -> Path:
        """The device form's tiny initramfs (init-root, modules, busybox, dmsetup)."""
        return self.image.parent / BOOT_INITRD_NAME


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def unpack_base(recipe: Recipe, dest: Path) -> None:
    """mmdebstrap the package set (extract only) into dest/root, once."""
    if (dest / ".done").exists():
        return
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    root = dest / "root"
    argv = [
        "mmdebstrap",
        "--quiet",
        "--variant=extract",
        f"--include={','.join(recipe.packages)}",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        recipe.suite,
        str(root),
        recipe.mirror,
    ]
    env = {**os.environ, "SOURCE_DATE_EPOCH": str(recipe.epoch)}
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({result.returncode}):\n{result.stderr[-4000:]}")
    (dest / ".done").write_text(" ".join(argv) + "\n")


def strip_tree(root: Path, patterns: list[str]) -> int:
    removed = 0
    for pattern in patterns:
        for path in sorted(root.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed += 1
    for cache in sorted(root.rglob("__pycache__"), reverse=True):
        shutil.rmtree(cache)
        removed += 1
    return removed


# Shared libraries loaded with dlopen(), which no DT_NEEDED names: glibc's NSS modules and
# libgcc_s (pthread_cancel, unwinding), and everything in a subfolder of a library folder
# (OpenSSL's engines and providers...). Everything else must be reachable from an executable
# or a Python extension module, or it goes.
DLOPENED = ("libnss_*", "libgcc_s.so*", "ld-linux*")
LIBRARY_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")
ELF_MAGIC = b"\x7fELF"


def _is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def needed_libraries(root: Path, binaries: list[Path]) -> set[str]:
    """Library file names the image's own dynamic loader resolves for ``binaries`` (paths
    inside the image), transitively (``ld.so --list``, run in a chroot)."""
    found: set[str] = set()
    loader = "/lib64/ld-linux-x86-64.so.2"
    for binary in binaries:
        result = subprocess.run([_chroot(), str(root), loader, "--list", f"/{binary}"],
                                capture_output=True, text=True, check=False)
        for line in result.stdout.splitlines():
            if "=>" in line:
                target = line.split("=>", 1)[1].split("(", 1)[0].strip()
                if target == "not found":
                    raise RuntimeError(f"/{binary}: {line.strip()} (image {root})")
                found.add(Path(target).name)
    return found


def prune_libraries(root: Path) -> list[str]:
    """Remove the shared and static libraries nothing in the image loads; their names."""
    lib_dirs = [root / d for d in LIBRARY_DIRS]
    roots: list[Path] = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file() or path.parent in lib_dirs:
            continue
        if _is_elf(path):
            roots.append(path.relative_to(root))
    needed = needed_libraries(root, roots)
    keep: set[str] = set()
    for lib_dir in lib_dirs:
        for path in lib_dir.iterdir():
            if path.name in needed or any(path.match(g) for g in DLOPENED):
                keep.add(path.name)
                if path.is_symlink():  # the soname link: keep what it points to
                    keep.add(Path(os.readlink(path)).name)
    removed: list[str] = []
    for lib_dir in lib_dirs:
        for path in sorted(lib_dir.iterdir()):
            library = ".so" in path.name or path.suffix == ".a"
            if library and not path.is_dir() and path.name not in keep:
                path.unlink()
                removed.append(f"{lib_dir.relative_to(root)}/{path.name}")
    return removed


def busybox_applets(root: Path) -> list[str]:
    """The applet paths the guest's own busybox reports (run in a chroot of the image)."""
    result = subprocess.run(
        [_chroot(), str(root), "/bin/busybox", "--list-full"],
        capture_output=True,
        text=True,
        check=True,
    )
    return sorted(line.strip() for line in result.stdout.splitlines() if line.strip())


def install_busybox_links(root: Path) -> int:
    count = 0
    for applet in busybox_applets(root):
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
        count += 1
    return count


# Run inside the image (chroot): import what the agent imports, then byte-compile exactly those
# files with unchecked-hash pycs (no timestamps, so reproducible; the image is immutable), in
# the legacy place beside the source (``x.pyc``), and remove the source: the image carries one
# copy of each module the agent imports, and the kernel unpacks fewer bytes at boot. Modules
# nothing here imports keep their source (a rarely used path still works, compiled in memory).
# Tracebacks keep file names and line numbers, not the source lines.
_PRECOMPILE = """
import os, py_compile, sys
import guest.agent.entry, guest.agent.__main__ as agent  # init's command line, then the agent
agent.import_machinery()  # what the agent imports once listening (the AgentService's build)
import guest.attestation.components, guest.attestation.__main__, guest.tee.snp, guest.tee.tdx
import guest.agent.rego, guest.agent.policy_explain, guest.agent.policy_input  # a Rego policy
import jsonpatch, regorus  # loaded once a Rego policy is in force
import guest.image_pull.registry, guest.image_pull.unpack  # imported on the first pull
files = sorted({m.__file__ for m in list(sys.modules.values())
                if getattr(m, "__file__", None) and m.__file__.endswith(".py")})
for path in files:
    py_compile.compile(path, cfile=path + "c", dfile=path, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    os.unlink(path)
print(len(files))
"""


# The host programs the builder runs, and the Debian package of each (scripts/setup-env.sh).
_TOOL_PACKAGES = {"chroot": "coreutils", "strip": "binutils", "patchelf": "patchelf",
                         "mkfs.erofs": "erofs-utils", "veritysetup": "cryptsetup-bin"}


def _tool(name: str) -> str:
    """The host program ``name`` (also looked for in the sbin folders root's PATH may lack),
    or FileNotFoundError naming the Debian package that has it."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise FileNotFoundError(f"{name} not found: apt-get install {_TOOL_PACKAGES[name]}")
    return found


def _chroot() -> str:
    return _tool("chroot")


def precompile(root: Path) -> int:
    """Byte-compile the modules the agent imports, with the image's own interpreter."""
    result = subprocess.run(
        [_chroot(), str(root), "/usr/bin/python3.11", "-s", "-c", _PRECOMPILE],
        env={"PYTHONPATH": f"/{PAYLOAD_DIR}:/{DIST_PACKAGES}", "PATH": "/usr/bin:/bin",
             "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1",
             # no column tables in the code objects: smaller pycs, less to unmarshal at boot
             # (tracebacks keep their line numbers, lose the ^^^ markers)
             "PYTHONNODEBUGRANGES": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"precompiling the agent in the image failed:\n{result.stderr}")
    return int(result.stdout.strip() or 0)


# protobuf's upb extension is C, linked by a C++ driver: its DT_NEEDED names libstdc++ although
# it takes no symbol from it. Such an entry is dropped (patchelf) when no undefined dynamic
# symbol of the object is C++'s (mangled ``_Z…``, or versioned GLIBCXX_/CXXABI_), so the image
# need not carry libstdc++ (2.1 MB) and the agent's loader no longer maps and relocates it
# before Check; prune_libraries then removes the library if nothing else loads it, and fails
# the build if something still does and it is missing.
CXX_RUNTIME = "libstdc++.so.6"


def needed_entries(path: Path) -> list[str]:
    """The DT_NEEDED names of an ELF object (readelf)."""
    out = subprocess.run(["readelf", "-d", "-W", str(path)], capture_output=True, text=True,
                         check=True).stdout
    return [line.rsplit("[", 1)[1].rstrip("]") for line in out.splitlines()
            if "(NEEDED)" in line and "[" in line]


def cxx_symbols(readelf_dyn_syms: str) -> list[str]:
    """The undefined C++ symbols in ``readelf --dyn-syms -W`` output."""
    found: list[str] = []
    for line in readelf_dyn_syms.splitlines():
        fields = line.split()
        if len(fields) < 8 or fields[6] != "UND":
            continue
        name = fields[7]
        if name.startswith("_Z") or "@GLIBCXX" in name or "@CXXABI" in name:
            found.append(name)
    return found


def drop_unused_cxx_runtime(root: Path) -> list[str]:
    """Remove libstdc++ from the DT_NEEDED of the shared objects under ``root`` that use none
    of it; their paths (relative to ``root``)."""
    dropped: list[str] = []
    for path in sorted(root.rglob("*.so")):
        if path.is_symlink() or not path.is_file() or not _is_elf(path):
            continue
        if CXX_RUNTIME not in needed_entries(path):
            continue
        symbols = subprocess.run(["readelf", "--dyn-syms", "-W", str(path)],
                                 capture_output=True, text=True, check=True).stdout
        if cxx_symbols(symbols):
            continue
        subprocess.run([_patchelf(), "--remove-needed", CXX_RUNTIME, str(path)], check=True)
        dropped.append(path.relative_to(root).as_posix())
    return dropped


def _patchelf() -> str:
    return _tool("patchelf")


def strip_binaries(root: Path) -> list[str]:
    """``strip --strip-unneeded`` the shared objects that still carry a symbol table (the
    venv's wheels: regorus, protobuf's upb; Debian's are stripped already); their paths."""
    stripped: list[str] = []
    for path in sorted(root.rglob("*.so")):
        if path.is_symlink() or not path.is_file() or not _is_elf(path):
            continue
        symbols = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True,
                                 text=True, check=True).stdout
        if " .symtab " in symbols or " .debug_" in symbols:
            subprocess.run([_strip(), "--strip-unneeded", str(path)], check=True)
            stripped.append(path.relative_to(root).as_posix())
    return stripped


def _strip() -> str:
    return _tool("strip")


def strip_version() -> str:
    """Part of the image's cache key: another binutils may strip to other bytes."""
    result = subprocess.run([_strip(), "--version"], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()[0]


def _copy(files: Iterable[tuple[str, Path]], dest: Path) -> int:
    count = 0
    for rel, src in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
        target.chmod(0o644)
        count += 1
    return count


def _skip_dev(base_root: Path) -> Callable[[str, list[str]], list[str]]:
    """The base's /dev holds real device nodes; the image gets its own (DEVICES, devtmpfs)."""

    def ignore(directory: str, names: list[str]) -> list[str]:
        return names if Path(directory) == base_root / "dev" else []

    return ignore


def _copy_regular(src: str, dst: str) -> str:
    """copy2 for regular files only: reading a device node (/dev/zero...) would never end."""
    if not stat.S_ISREG(os.lstat(src).st_mode):
        raise ValueError(f"{src}: not a regular file")
    return str(shutil.copy2(src, dst))


def assemble(recipe: Recipe, base_root: Path, stage: Path, tree: ModuleTree) -> dict[str, object]:
    """Fill stage with the image tree; return facts for the manifest."""
    shutil.copytree(
        base_root, stage, symlinks=True, ignore=_skip_dev(base_root), copy_function=_copy_regular
    )
    removed = strip_tree(stage, recipe.strip)
    links = install_busybox_links(stage)
    write_pause_bundle(stage / "pause_bundle", base_root / PAUSE_PROGRAM)
    ca_certificates = write_ca_bundle(base_root, stage)
    payload = stage / PAYLOAD_DIR
    payload.mkdir(parents=True, exist_ok=True)
    copied = _copy(recipe.project_files(), payload)
    copied += _copy(recipe.protobuf_files(), payload)
    copied += _copy(recipe.policy_engine_files(), payload)
    order, every = recipe.module_order(tree)
    mod_dir = stage / "lib/modules/coco"
    mod_dir.mkdir(parents=True, exist_ok=True)
    for module in every:
        (mod_dir / f"{module.name}.ko").write_bytes(module.load_bytes())
    etc = stage / "etc/coco"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "image-pull.toml").write_bytes((recipe.recipe_dir / "image-pull.toml").read_bytes())
    (etc / "fstab.boot").write_bytes((recipe.recipe_dir / "fstab").read_bytes())
    (etc / "modules.order").write_text("".join(f"{m.name}\n" for m in order))
    # modules.dep and modules.alias for busybox modprobe: init loads the boot list, then a
    # driver for each virtio device present (its modalias); filesystems load when first
    # mounted (the kernel's request_module() runs /sbin/modprobe fs-9p, fs-ext4, ...).
    kver_dir = stage / "lib/modules" / recipe.kernel_version
    kver_dir.mkdir(parents=True, exist_ok=True)
    (kver_dir / "coco").symlink_to("../coco")
    (kver_dir / "modules.dep").write_text(modules_dep(every, tree.builtin, "coco/"))
    (kver_dir / "modules.alias").write_text(modules_alias(every))
    (stage / "init").write_bytes(recipe.init.read_bytes())
    (stage / "init").chmod(0o755)
    for sub in ("dev", "proc", "sys", "run", "tmp", "mnt", "root", "var/run", "newroot"):
        (stage / sub).mkdir(parents=True, exist_ok=True)
    (stage / "tmp").chmod(0o1777)
    (stage / "etc/hostname").write_text("coco-guest\n")
    # The root is read-only in the device form: the one file the agent writes under /etc (the
    # pod's DNS) lives on /run's tmpfs.
    resolv = stage / "etc/resolv.conf"
    if resolv.exists() or resolv.is_symlink():
        resolv.unlink()
    resolv.symlink_to("/run/resolv.conf")
    (stage / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (stage / "etc/group").write_text("root:x:0:\ntty:x:5:\n")
    unlinked = drop_unused_cxx_runtime(payload)
    pruned = prune_libraries(stage)
    stripped = strip_binaries(stage)
    compiled = precompile(stage)
    return {
        "precompiled_modules": compiled,
        "modules": [m.name for m in order],
        "modules_on_demand": [m.name for m in every if m not in order],
        "stripped_paths": removed,
        "cxx_runtime_unlinked": unlinked,
        "pruned_libraries": pruned,
        "stripped_binaries": stripped,
        "busybox_links": links,
        "payload_files": copied,
        "ca_certificates": ca_certificates,
    }


PAUSE_PROGRAM = "usr/bin/catatonit"  # Debian's static catatonit, run as "pause -P"
CA_SOURCES = "usr/share/ca-certificates/mozilla"
CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"


def pause_bundle_config() -> dict[str, object]:
    """config.json of /pause_bundle: the process the agent runs for a pod's sandbox container
    (catatonit -P waits, reaps, and exits on SIGTERM/SIGINT)."""
    return {
        "ociVersion": "1.1.0",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": ["/pause", "-P"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
    }


def write_pause_bundle(dest: Path, program: Path) -> None:
    """A pause bundle (config.json + rootfs/pause) at dest, from a static program."""
    (dest / "rootfs").mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(pause_bundle_config(), indent=2) + "\n")
    shutil.copyfile(program, dest / "rootfs/pause")
    (dest / "rootfs/pause").chmod(0o755)


def write_ca_bundle(base_root: Path, stage: Path) -> int:
    """Concatenate the package's CA certificates, sorted (reproducible); return the count."""
    certs = sorted((base_root / CA_SOURCES).glob("*.crt"))
    target = stage / CA_BUNDLE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"".join(c.read_bytes().rstrip(b"\n") + b"\n" for c in certs))
    return len(certs)


def tool_version(argv: list[str]) -> str:
    """First line a tool prints for its version (part of the cache key: another version may
    write other bytes). mkfs.erofs prints it and exits 1, so the status is not checked."""
    result = subprocess.run([_tool(argv[0]), *argv[1:]], capture_output=True, text=True,
                            check=False)
    lines = (result.stdout + result.stderr).splitlines()
    if not lines:
        raise RuntimeError(f"{argv[0]} printed no version")
    return lines[0]


def write_rootfs(stage: Path, image: Path, *, epoch: int, key: str) -> dict[str, object]:
    """The tree as an uncompressed EROFS image (reproducible: fixed timestamps, root owner,
    UUID and verity salt from the cache key), then its dm-verity hash tree (sha256, 4 KiB
    blocks, no superblock: every parameter goes on the kernel command line) appended to the
    same file. Returns the verity parameters (also the content of the ``.verity`` file)."""
    seed = hashlib.sha256(f"coco-guest-rootfs\0{key}".encode()).hexdigest()
    fs_uuid = f"{seed[0:8]}-{seed[8:12]}-{seed[12:16]}-{seed[16:20]}-{seed[20:32]}"
    salt = hashlib.sha256(seed.encode()).hexdigest()
    # The console, null and kmsg nodes stage 2 uses before it mounts devtmpfs over /dev.
    for node in DEVICES:
        path = stage / node.path
        if not path.exists():
            os.mknod(path, node.mode, os.makedev(node.major, node.minor))
    subprocess.run([_tool("mkfs.erofs"), "--quiet", f"-T{epoch}", f"-U{fs_uuid}", "--all-root",
                    "-x-1", str(image), str(stage)], check=True, capture_output=True)
    data_bytes = image.stat().st_size
    if data_bytes % VERITY_BLOCK:
        raise RuntimeError(f"{image}: {data_bytes} bytes is not a whole number of 4 KiB blocks")
    blocks = data_bytes // VERITY_BLOCK
    result = subprocess.run(
        [_tool("veritysetup"), "format", "--no-superblock", "--hash=sha256",
         f"--data-block-size={VERITY_BLOCK}", f"--hash-block-size={VERITY_BLOCK}",
         f"--data-blocks={blocks}", f"--hash-offset={data_bytes}", f"--salt={salt}",
         str(image), str(image)],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"veritysetup format failed:\n{result.stderr}")
    root_hash = ""
    for line in result.stdout.splitlines():
        if line.startswith("Root hash:"):
            root_hash = line.split(":", 1)[1].strip()
    if len(root_hash) != 64:
        raise RuntimeError(f"no root hash in veritysetup's output:\n{result.stdout}")
    return {"data_blocks": blocks, "hash_start_block": blocks, "block_size": VERITY_BLOCK,
            "hash": "sha256", "root_hash": root_hash, "salt": salt,
            "size": image.stat().st_size}


# What the tiny initramfs (init-root) runs: busybox for the shell and insmod, dmsetup for
# dm-verity; their libraries are found with the image's own loader.
BOOT_PROGRAMS = ("bin/busybox", "sbin/dmsetup")


def assemble_boot(recipe: Recipe, stage: Path, boot: Path, tree: ModuleTree) -> list[str]:
    """Fill boot with the device form's initramfs, taken from the assembled stage: init-root,
    busybox, dmsetup and their libraries, the root modules in load order. Returns the modules."""
    programs = [Path(p) for p in BOOT_PROGRAMS]
    libraries = needed_libraries(stage, programs)
    for rel in programs:
        (boot / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(stage / rel, boot / rel)
    lib_dir = boot / "lib/x86_64-linux-gnu"
    lib_dir.mkdir(parents=True)
    for name in sorted(libraries):
        for lib_root in LIBRARY_DIRS:
            source = stage / lib_root / name
            if source.exists():
                shutil.copy2(source.resolve(), lib_dir / name)
                break
        else:
            raise FileNotFoundError(f"{name}: needed by the boot programs, not in the image")
    loader = "ld-linux-x86-64.so.2"  # the loader itself (ld.so --list names it without "=>")
    shutil.copy2((stage / LIBRARY_DIRS[0] / loader).resolve(), lib_dir / loader)
    (boot / "lib64").mkdir()
    (boot / "lib64" / loader).symlink_to(f"/lib/x86_64-linux-gnu/{loader}")
    order = tree.load_order(recipe.modules_root)
    verity = [m for m in tree.load_order([*recipe.modules_root, *recipe.modules_verity])
              if m not in order]
    # busybox modprobe (one process for the whole list: each costs tens of ms under TCG)
    # reads /lib/modules/<version>/modules.dep
    mod_dir = boot / "lib/modules" / recipe.kernel_version
    mod_dir.mkdir(parents=True)
    for module in [*order, *verity]:
        (mod_dir / f"{module.name}.ko").write_bytes(module.load_bytes())
    (mod_dir / "modules.dep").write_text(modules_dep([*order, *verity], tree.builtin, ""))
    (boot / "modules.order").write_text("".join(f"{m.name}\n" for m in order))
    (boot / "modules-verity.order").write_text("".join(f"{m.name}\n" for m in verity))
    (boot / "init").write_bytes((recipe.recipe_dir / "init-root").read_bytes())
    (boot / "init").chmod(0o755)
    for sub in ("dev", "proc", "newroot"):
        (boot / sub).mkdir()
    return [m.name for m in [*order, *verity]]


def tree_size(root: Path) -> int:
    return sum(p.lstat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


KEEP_IMAGES = 6  # older keys are pruned (each code change makes a new key)


@contextlib.contextmanager
def _locked(guest_cache: Path) -> Iterator[None]:
    """One builder at a time per cache (test sessions may run side by side)."""
    with (guest_cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prune(guest_cache: Path, keep: Path) -> None:
    """Drop leftovers of interrupted builds and all but the newest images."""
    for stale in guest_cache.glob("stage-*"):
        shutil.rmtree(stale, ignore_errors=True)
    images = sorted(
        (d for d in guest_cache.iterdir() if (d / IMAGE_NAME).exists() and d != keep),
        key=lambda d: (d / IMAGE_NAME).stat().st_mtime,
        reverse=True,
    )
    for old in images[KEEP_IMAGES - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def build(recipe: Recipe, cache: Path, *, force: bool = False) -> BuildResult:
    guest_cache = cache / "guest"
    guest_cache.mkdir(parents=True, exist_ok=True)
    with _locked(guest_cache):
        return _build(recipe, guest_cache, force=force)


def _build(recipe: Recipe, guest_cache: Path, *, force: bool) -> BuildResult:
    progress = Progress(total=7)
    tree = ModuleTree(recipe.modules_dir)

    with progress.step("computing the cache key of the inputs"):
        _, every = recipe.module_order(tree)
        key = recipe.key(m.path for m in every)
    out_dir = guest_cache / key
    image = out_dir / IMAGE_NAME
    manifest_path = out_dir / "manifest.json"
    complete = all((out_dir / n).exists() for n in (ROOTFS_NAME, VERITY_NAME, BOOT_INITRD_NAME))
    if image.exists() and manifest_path.exists() and complete and not force:
        manifest = json.loads(manifest_path.read_text())
        sys.stderr.write(f"    cached image {image} (key {key})\n")
        return BuildResult(
            image, manifest["sha256"], image.stat().st_size, key, True, manifest_path
        )

    base = guest_cache / f"base-{recipe.base_key()}"
    with progress.step(f"unpacking Debian {recipe.suite}: {' '.join(recipe.packages)}"):
        unpack_base(recipe, base)

    stage = guest_cache / f"stage-{key}-{os.getpid()}"
    boot_stage = guest_cache / f"stage-{key}-{os.getpid()}-boot"
    _prune(guest_cache, keep=out_dir)
    try:
        with progress.step("assembling the tree (strip, busybox, agent, protobuf, modules)"):
            facts = assemble(recipe, base / "root", stage, tree)
            facts["tree_bytes"] = tree_size(stage)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp_image = out_dir / f".{IMAGE_NAME}.{os.getpid()}"
        with progress.step("writing the sorted cpio, LZ4 (legacy format)") as update:
            entries = write_initramfs(
                stage,
                tmp_image,
                mtime=recipe.epoch,
                devices=DEVICES,
                progress=lambda n: update(f"{n} entries") if n % 250 == 0 else None,
            )
        with progress.step("writing the device form: EROFS root + dm-verity, tiny initramfs"):
            tmp_rootfs = out_dir / f".{ROOTFS_NAME}.{os.getpid()}"
            tmp_rootfs.unlink(missing_ok=True)
            verity = write_rootfs(stage, tmp_rootfs, epoch=recipe.epoch, key=key)
            boot_stage.mkdir()
            root_modules = assemble_boot(recipe, stage, boot_stage, tree)
            tmp_boot = out_dir / f".{BOOT_INITRD_NAME}.{os.getpid()}"
            write_initramfs(boot_stage, tmp_boot, mtime=recipe.epoch, devices=DEVICES)
        with progress.step("hashing and recording the manifest"):
            device_form = {
                "rootfs": {"sha256": _sha256(tmp_rootfs), "verity": verity},
                "boot_initrd": {"sha256": _sha256(tmp_boot), "size": tmp_boot.stat().st_size,
                                "modules": root_modules},
            }
            sha = _sha256(tmp_image)
            size = tmp_image.stat().st_size
            manifest = {
                "key": key,
                "sha256": sha,
                "size": size,
                "entries": entries,
                "kernel_version": recipe.kernel_version,
                "suite": recipe.suite,
                "mirror": recipe.mirror,
                "packages": recipe.packages,
                "source_date_epoch": recipe.epoch,
                **facts,
                "device_form": device_form,
            }
            os.replace(tmp_rootfs, out_dir / ROOTFS_NAME)
            (out_dir / VERITY_NAME).write_text(json.dumps(verity, indent=2, sort_keys=True) + "\n")
            os.replace(tmp_boot, out_dir / BOOT_INITRD_NAME)
            os.replace(tmp_image, image)
            manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(boot_stage, ignore_errors=True)
    sys.stderr.write(f"    built in {progress.total_seconds():.1f} s\n")
    return BuildResult(image, sha, size, key, False, manifest_path)
