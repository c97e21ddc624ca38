"""The guest image: built from Debian packages, cached by key, reproducible, lean."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from guest.image.build import BuildResult, build
from guest.image.cpio import read_initramfs
from tests import envinfo
from tests.integration.guest.conftest import REPO
from tests.support.guest import guest_recipe

pytestmark = pytest.mark.integration


def listing(result: BuildResult, initrd: Path | None = None) -> list[str]:
    raw = read_initramfs((initrd or result.image).read_bytes())
    out = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True, check=True)
    return out.stdout.decode().splitlines()


def test_image_holds_what_the_guest_needs(guest_image: BuildResult) -> None:
    names = set(listing(guest_image))
    for required in (
        "init",
        "bin/busybox",
        "usr/bin/crun",
        "usr/bin/python3.11",
        "dev/console",
        "etc/coco/modules.order",
        # what the agent imports: sourceless bytecode only (the builder's precompile)
        "opt/coco-guest/guest/agent/__main__.pyc",
        "opt/coco-guest/protocols/ttrpc/server.pyc",
        "opt/coco-guest/protocols/api/kata/agent_pb2.pyc",
        "opt/coco-guest/google/protobuf/message.pyc",
        "usr/lib/python3.11/asyncio/base_events.pyc",
        "etc/coco/fstab.boot",
        "lib/modules/coco/vmw_vsock_virtio_transport.ko",
        "lib/modules/coco/9p.ko",
        "lib/modules/coco/overlay.ko",
        "lib/modules/coco/dm_verity.ko",
        f"lib/modules/{envinfo.load().kernel_version}/modules.dep",
        "pause_bundle/config.json",  # guest pull: the sandbox container, never pulled
        "pause_bundle/rootfs/pause",
        "etc/ssl/certs/ca-certificates.crt",
        "etc/coco/image-pull.toml",
    ):
        assert required in names, required
    assert not any(n.startswith("opt/coco-guest/guest/image/") for n in names)  # host-only
    assert not any(
        n.startswith("usr/share/doc/") or n.startswith("usr/share/locale/") for n in names
    )
    assert not any(n.endswith(".pyi") for n in names)
    assert not any("__pycache__" in n for n in names)
    for source in ("opt/coco-guest/guest/agent/__main__.py",
                   "usr/lib/python3.11/asyncio/base_events.py"):
        assert source not in names, f"{source}: the pyc beside it suffices"
    assert not {"usr/bin/perl", "usr/bin/openssl", "usr/bin/catatonit"} & set(names)
    # upb names libstdc++ but uses none of it: the builder unlinks it, so the image has none
    assert not any("libstdc++" in n for n in names), "libstdc++ in the image"
    manifest = json.loads(guest_image.manifest.read_text())
    assert any(p.startswith("google/_upb/_message") for p in manifest["cxx_runtime_unlinked"])
    assert guest_image.size < 40 * 2**20


# In the image's own interpreter, as init starts it: the agent's entry, the agent, then what it
# imports once listening; every module must come from a pyc, a shared object, or be built in
# (compiling a .py at boot costs the guest start-up time under TCG).
_LOADERS = """
import sys
from guest.agent.entry import import_asyncio_without_ssl
import_asyncio_without_ssl()
import guest.agent.__main__ as agent
from guest.agent.policy import deferred_confidential_default
agent.import_machinery(deferred_confidential_default())
for name, module in sorted(sys.modules.items()):
    loader = getattr(getattr(module, "__spec__", None), "loader", None)
    print(name, type(loader).__name__)
from google.protobuf.internal import api_implementation
print("protobuf-backend", api_implementation.Type())
"""


def run_in_image(image: Path, code: str, *args: str) -> str:
    """Run ``code`` (``args`` its sys.argv[1:]) with the image's own interpreter in a chroot of
    its unpacked tree, as init starts the agent (-S, the payload and Debian's dist-packages on
    the path); its stdout."""
    raw = read_initramfs(image.read_bytes())
    root = Path(tempfile.mkdtemp(prefix="coco-test-imageroot-"))
    try:
        subprocess.run(["cpio", "-idm", "--quiet", "--no-absolute-filenames"], input=raw,
                       cwd=root, check=True, capture_output=True)
        return subprocess.run(
            [shutil.which("chroot") or "/usr/sbin/chroot", str(root), "/usr/bin/python3.11",
             "-S", "-c", code, *args],
            env={"PYTHONPATH": "/opt/coco-guest:/usr/lib/python3/dist-packages",
                 "PYTHONDONTWRITEBYTECODE": "1", "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout
    finally:
        shutil.rmtree(root)


def test_agent_imports_nothing_from_source(guest_image: BuildResult) -> None:
    out = run_in_image(guest_image.image, _LOADERS)
    loaders = dict(line.split() for line in out.splitlines())
    # upb loads in the image without libstdc++ (else protobuf would fall back to pure Python)
    assert loaders.pop("protobuf-backend") == "upb"
    assert "google._upb._message" in loaders
    assert "guest.agent.entry" in loaders and "guest.image_pull.puller" in loaders
    compiled_at_boot = sorted(n for n, kind in loaders.items() if kind == "SourceFileLoader")
    assert compiled_at_boot == []


def test_manifest_records_the_build(guest_image: BuildResult) -> None:
    manifest = json.loads(guest_image.manifest.read_text())
    assert manifest["sha256"] == hashlib.sha256(guest_image.image.read_bytes()).hexdigest()
    assert manifest["size"] == guest_image.size
    assert manifest["kernel_version"] == envinfo.load().kernel_version
    order = (REPO / "packaging/guest-image/modules.txt").read_text()
    assert "virtio_pci" in order and "virtio_pci" in manifest["modules"]


def test_rebuild_is_bit_for_bit_identical(guest_image: BuildResult) -> None:
    cache = envinfo.load().cache
    first = build(guest_recipe(), cache, force=True)
    again = build(guest_recipe(), cache, force=True)
    # (Another engineer editing protocols/ or guest/ mid-session changes the key: compare
    # builds of the same key.)
    assert again.key == first.key
    assert again.sha256 == first.sha256
    # the device form too: EROFS + hash tree, its verity parameters, the tiny initramfs
    for name in ("rootfs", "verity", "boot_initrd"):
        assert (hashlib.sha256(getattr(again, name).read_bytes()).hexdigest()
                == hashlib.sha256(getattr(first, name).read_bytes()).hexdigest()), name
    if first.key == guest_image.key:
        assert first.sha256 == guest_image.sha256
    cached = build(guest_recipe(), cache)
    assert cached.cached and cached.sha256 == again.sha256


def test_command_prints_the_sha256_last() -> None:
    result = subprocess.run(
        ["bash", str(REPO / "scripts/build-guest-image.sh")],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    last = result.stdout.strip().splitlines()[-1]
    assert len(last) == 64 and int(last, 16) >= 0
    assert "[1/7]" in result.stderr


def test_device_form_holds_the_root_image_and_a_tiny_initramfs(guest_image: BuildResult) -> None:
    names = set(listing(guest_image, guest_image.boot_initrd))
    kmods = f"lib/modules/{envinfo.load().kernel_version}"
    for required in ("init", "bin/busybox", "sbin/dmsetup", "modules.order",
                     "modules-verity.order", f"{kmods}/erofs.ko", f"{kmods}/virtio_blk.ko",
                     f"{kmods}/dm_verity.ko", f"{kmods}/modules.dep", "dev/console",
                     "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"):
        assert required in names, required
    assert not any(n.startswith("usr/") for n in names)  # nothing of stage 2's tree
    assert guest_image.boot_initrd.stat().st_size < 4 * 2**20
    verity = json.loads(guest_image.verity.read_text())
    assert verity["data_blocks"] * 4096 < guest_image.rootfs.stat().st_size == verity["size"]
    with guest_image.rootfs.open("rb") as f:
        f.seek(1024)  # the EROFS superblock's magic
        assert f.read(4) == (0xE0F5E1E2).to_bytes(4, "little")
    manifest = json.loads(guest_image.manifest.read_text())
    assert manifest["device_form"]["rootfs"]["verity"] == verity


# The guest's own code: every module of these packages, and every import statement in them
# (top level, in functions: the lazy ones, under TYPE_CHECKING too), must import in the image.
# This is what proves strip.txt removed nothing the guest uses.
GUEST_CODE = ("guest/agent", "guest/attestation", "guest/image_pull", "guest/tee")


def guest_imports() -> list[tuple[str, str]]:
    """(module, name or "") for every module of GUEST_CODE and every import in it."""
    wanted: set[tuple[str, str]] = set()
    for top in GUEST_CODE:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            package = parts[:-1]  # what a relative import is relative to
            if parts[-1] == "__init__":
                parts = parts[:-1]
            wanted.add((".".join(parts), ""))
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    wanted.update((alias.name, "") for alias in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = package[: len(package) - node.level + 1] if node.level else []
                    module = ".".join([*base, *([node.module] if node.module else [])])
                    if module != "__future__":
                        wanted.update((module, alias.name) for alias in node.names)
    return sorted(wanted)


_IMPORT_ALL = """
import importlib, json, sys
failed = []
for module, name in json.loads(sys.argv[1]):
    try:
        mod = importlib.import_module(module)
        if name and not hasattr(mod, name):
            importlib.import_module(module + "." + name)
    except Exception as exc:  # report them all, not the first
        failed.append(f"{module} {name}: {type(exc).__name__}: {exc}")
print(json.dumps(failed))
"""


def test_every_import_of_the_guest_code_resolves_in_the_image(guest_image: BuildResult) -> None:
    wanted = guest_imports()
    assert ("guest.agent.entry", "") in wanted and ("regorus", "") in wanted
    out = run_in_image(guest_image.image, _IMPORT_ALL, json.dumps(wanted))
    assert json.loads(out) == []


# The codecs the guest's paths look up (strip.txt keeps them, drops the code-page tables): the
# agent's UTF-8, ASCII, Latin-1 (HTTP headers, by its iso-8859-1 name too), host names (IDNA,
# punycode), JSON's UTF-16/32 detection, the escape codecs.
KEPT_CODECS = ("utf-8", "ascii", "us-ascii", "latin-1", "iso-8859-1", "idna", "punycode",
               "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
               "utf-32-be", "raw-unicode-escape", "unicode-escape", "charmap")
STRIPPED_CODECS = ("cp1252", "cp437", "mac-roman", "koi8-r", "iso-8859-2", "shift-jis")

_CODECS = """
import codecs, json, sys
found = {}
for name in json.loads(sys.argv[1]):
    try:
        found[name] = codecs.lookup(name).name
    except LookupError:
        found[name] = None
print(json.dumps(found))
"""


def test_the_codecs_the_guest_uses_are_kept_and_the_tables_stripped(
    guest_image: BuildResult,
) -> None:
    out = run_in_image(guest_image.image, _CODECS, json.dumps(KEPT_CODECS + STRIPPED_CODECS))
    found = json.loads(out)
    assert [n for n in KEPT_CODECS if found[n] is None] == []
    assert {n: found[n] for n in STRIPPED_CODECS} == dict.fromkeys(STRIPPED_CODECS)
