"""The reproducible initramfs writer: same tree, same bytes; the kernel's newc format."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from guest.image.cpio import LZ4_LEGACY_BLOCK, DeviceNode, read_initramfs, write_initramfs

CONSOLE = DeviceNode("dev/console", stat.S_IFCHR | 0o600, 5, 1)


def make_tree(root: Path, order: list[str]) -> None:
    for name in order:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"content of {name}\n")
    (root / "bin").mkdir(exist_ok=True)
    (root / "bin/sh").symlink_to("busybox")
    (root / "dev").mkdir(exist_ok=True)
    os.chmod(root / order[0], 0o755)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_tree_same_bytes_whatever_the_mtimes_and_creation_order(tmp_path: Path) -> None:
    files = ["init", "etc/a", "etc/b", "usr/lib/x.py", "a-b", "a/c"]
    make_tree(tmp_path / "one", files)
    make_tree(tmp_path / "two", list(reversed(files)))
    os.chmod(tmp_path / "two/init", 0o755)
    os.chmod(tmp_path / "two/a/c", 0o644)
    os.chmod(tmp_path / "one/a/c", 0o644)
    os.utime(tmp_path / "two/etc/a", (1, 1))
    write_initramfs(tmp_path / "one", tmp_path / "1.gz", mtime=1000, devices=(CONSOLE,))
    write_initramfs(tmp_path / "two", tmp_path / "2.gz", mtime=1000, devices=(CONSOLE,))
    assert digest(tmp_path / "1.gz") == digest(tmp_path / "2.gz")
    write_initramfs(tmp_path / "one", tmp_path / "3.gz", mtime=2000, devices=(CONSOLE,))
    assert digest(tmp_path / "1.gz") != digest(tmp_path / "3.gz")


def test_archive_lists_with_cpio(tmp_path: Path) -> None:
    make_tree(tmp_path / "root", ["init", "etc/x"])
    image = tmp_path / "img.gz"
    entries = write_initramfs(tmp_path / "root", image, mtime=0, devices=(CONSOLE,))
    raw = read_initramfs(image.read_bytes())
    listing = subprocess.run(
        ["cpio", "-itv"], input=raw, capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in lines]
    assert names[0] == "."
    assert names.index("etc") < names.index("etc/x")
    assert "dev/console" in names
    console = next(line for line in lines if line.endswith("dev/console"))
    assert console.startswith("crw-------") and "5,   1" in console
    assert any(line.startswith("lrwxrwxrwx") and "bin/sh -> busybox" in line for line in lines)
    assert any(line.startswith("-rwxr-xr-x") and line.endswith(" init") for line in lines)
    assert len(lines) == entries


def test_gzip_header_has_no_name_or_time(tmp_path: Path) -> None:
    make_tree(tmp_path / "root", ["init"])
    image = tmp_path / "img.gz"
    write_initramfs(tmp_path / "root", image, mtime=0, compression="gzip")
    header = image.read_bytes()[:10]
    assert header[3] == 0  # no FNAME flag
    assert header[4:8] == b"\0\0\0\0"  # MTIME 0


def test_refuses_special_files(tmp_path: Path) -> None:
    (tmp_path / "root").mkdir()
    os.mkfifo(tmp_path / "root/fifo")
    with pytest.raises(ValueError, match="unsupported file type"):
        write_initramfs(tmp_path / "root", tmp_path / "x.gz", mtime=0)


def test_compressions_hold_the_same_cpio(tmp_path: Path) -> None:
    """LZ4 in the kernel's legacy format (blocks of 8 MiB of input), gzip and none hold the
    same archive (a file past one block covers the block framing; the guest boots prove the
    kernel reads it)."""
    make_tree(tmp_path / "root", ["init", "etc/x"])
    (tmp_path / "root/big").write_bytes(os.urandom(4096) * (LZ4_LEGACY_BLOCK * 3 // 2 // 4096))
    raws = {}
    for compression in ("lz4", "gzip", "none"):
        image = tmp_path / f"img.{compression}"
        write_initramfs(tmp_path / "root", image, mtime=0, compression=compression)
        raws[compression] = read_initramfs(image.read_bytes())
    assert raws["lz4"] == raws["gzip"] == raws["none"]
    assert (tmp_path / "img.lz4").read_bytes()[:4] == bytes.fromhex("02214c18")
    assert (tmp_path / "img.lz4").stat().st_size < len(raws["none"])
    with pytest.raises(ValueError, match="compression must be one of"):
        write_initramfs(tmp_path / "root", tmp_path / "x", mtime=0, compression="xz")
