"""The layer unpacker against hostile and tricky tar streams (each case refused or neutralised),
whiteouts and opaque directories in overlayfs's format, and the decompressing reader."""

from __future__ import annotations

import gzip
import io
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from guest.agent.errors import DataLoss, InvalidArgument
from guest.image_pull.digest import Digest
from guest.image_pull.store import LayerStore
from guest.image_pull.unpack import OPAQUE_XATTR, Decompressed, unpack
from tests.support.oci import TarBuilder


def extract(tmp_path: Path, tar: bytes) -> Path:
    dest = tmp_path / "layer"
    dest.mkdir()
    unpack(io.BytesIO(tar), dest, "test layer", lambda: None)
    return dest


def test_regular_tree_with_modes_owners_links_and_fifo(tmp_path: Path) -> None:
    tar = (TarBuilder().dir("bin").file("bin/tool", "#!x\n", 0o4755, uid=7, gid=8)
           .symlink("bin/alias", "tool").hardlink("bin/same", "bin/tool").fifo("pipe")
           .dir("etc", 0o750).bytes())
    root = extract(tmp_path, tar)
    tool = os.stat(root / "bin/tool")
    assert stat.S_IMODE(tool.st_mode) == 0o4755  # setuid kept inside the rootfs
    assert (tool.st_uid, tool.st_gid) == (7, 8)
    assert os.readlink(root / "bin/alias") == "tool"
    assert os.stat(root / "bin/same").st_ino == tool.st_ino
    assert stat.S_ISFIFO(os.lstat(root / "pipe").st_mode)
    assert stat.S_IMODE(os.stat(root / "etc").st_mode) == 0o750


@pytest.mark.parametrize("name", ["../evil", "a/../../evil", "./../evil"])
def test_parent_traversal_refuses_the_layer(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument, match="escapes the layer root"):
        extract(tmp_path, TarBuilder().file(name, "x").bytes())
    assert not (tmp_path / "evil").exists()


def test_absolute_names_land_inside(tmp_path: Path) -> None:
    root = extract(tmp_path, TarBuilder().file("/etc/abs", "inside").bytes())
    assert (root / "etc/abs").read_text() == "inside"


@pytest.mark.parametrize("target", ["/", "/etc", "../../..", str(Path("/tmp").resolve())])
def test_writing_through_a_symlink_is_refused(tmp_path: Path, target: str) -> None:
    tar = TarBuilder().symlink("link", target).file("link/planted", "pwned").bytes()
    with pytest.raises(InvalidArgument, match="not a directory"):
        extract(tmp_path, tar)
    assert not Path(target, "planted").exists()


def test_escaping_symlinks_are_kept_verbatim_but_never_followed(tmp_path: Path) -> None:
    root = extract(tmp_path, TarBuilder().symlink("up", "../../../etc/shadow")
                   .symlink("abs", "/etc/passwd").bytes())
    assert os.readlink(root / "up") == "../../../etc/shadow"
    assert os.readlink(root / "abs") == "/etc/passwd"


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside", "missing"])
def test_hard_links_only_to_earlier_entries_of_the_layer(tmp_path: Path, target: str) -> None:
    (tmp_path / "outside").write_text("secret")
    with pytest.raises(InvalidArgument):
        extract(tmp_path, TarBuilder().hardlink("stolen", target).bytes())
    assert (tmp_path / "outside").stat().st_nlink == 1


def test_hard_link_through_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real/file").write_text("secret")
    tar = TarBuilder().symlink("d", str(tmp_path / "real")).hardlink("copy", "d/file").bytes()
    with pytest.raises(InvalidArgument, match="not a directory"):
        extract(tmp_path, tar)
    assert (tmp_path / "real/file").stat().st_nlink == 1


def test_hard_link_to_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="to a directory"):
        extract(tmp_path, TarBuilder().dir("d").hardlink("x", "d").bytes())


def test_device_nodes_are_skipped(tmp_path: Path) -> None:
    dest = tmp_path / "layer"
    dest.mkdir()
    tar = TarBuilder().device("dev/mem").device("dev/sda", b"4").file("ok", "1").bytes()
    stats = unpack(io.BytesIO(tar), dest, "test", lambda: None)
    assert stats.skipped == ["dev/mem", "dev/sda"]
    assert not (dest / "dev/mem").exists() and (dest / "ok").exists()


def test_only_user_and_capability_xattrs_are_applied(tmp_path: Path) -> None:
    tar = TarBuilder().file("f", "x", pax={
        "SCHILY.xattr.user.note": "kept",
        "SCHILY.xattr.trusted.overlay.redirect": "/etc",
        "SCHILY.xattr.trusted.overlay.opaque": "y",
    }).bytes()
    root = extract(tmp_path, tar)
    assert os.getxattr(root / "f", "user.note") == b"kept"
    names = os.listxattr(root / "f")
    assert not any(n.startswith("trusted.") for n in names)


def test_whiteouts_and_opaque_dirs_in_overlay_format(tmp_path: Path) -> None:
    tar = (TarBuilder().dir("data").whiteout("data/.wh.gone").dir("opq")
           .whiteout("opq/.wh..wh..opq").file("opq/new", "n").whiteout("implicit/.wh..wh..opq")
           .file("keep", "k").whiteout(".wh.keep").bytes())
    dest = tmp_path / "layer"
    dest.mkdir()
    stats = unpack(io.BytesIO(tar), dest, "test", lambda: None)
    gone = os.lstat(dest / "data/gone")
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    assert os.getxattr(dest / "opq", OPAQUE_XATTR) == b"y"
    assert os.getxattr(dest / "implicit", OPAQUE_XATTR) == b"y"
    assert (dest / "opq/new").read_text() == "n"
    assert (dest / "keep").read_text() == "k"  # a whiteout never hides its own layer's entry
    assert not any(p.name.startswith(".wh.") for p in dest.rglob("*"))
    assert (stats.whiteouts, stats.opaque_dirs) == (1, 2)


@pytest.mark.parametrize("name", ["d/.wh..", "d/.wh."])
def test_malformed_whiteouts_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidArgument, match="malformed whiteout"):
        extract(tmp_path, TarBuilder().dir("d").whiteout(name).bytes())


def test_later_entries_replace_earlier_ones(tmp_path: Path) -> None:
    tar = (TarBuilder().dir("x").file("x/inner", "i").file("x", "now a file")
           .file("y", "first").file("y", "second").bytes())
    root = extract(tmp_path, tar)
    assert (root / "x").read_text() == "now a file"
    assert (root / "y").read_text() == "second"


def test_decompressed_gzip_multi_member_and_plain(tmp_path: Path) -> None:
    data = b"a" * 100_000 + b"b" * 100_000
    two_members = gzip.compress(data[:100_000]) + gzip.compress(data[100_000:])
    reader = Decompressed(io.BytesIO(two_members), "layer")
    out = b"".join(iter(lambda: reader.read(4096), b""))
    assert out == data and reader.diff_id == Digest.of(data)
    plain = Decompressed(io.BytesIO(data), "layer")
    assert b"".join(iter(lambda: plain.read(65536), b"")) == data


def zstd(data: bytes, *extra: str) -> bytes:
    return subprocess.run(["zstd", "-q", "-c", *extra], input=data, capture_output=True,
                          check=True).stdout


def test_decompressed_zstd_frames_through_libzstd() -> None:
    data = bytes(range(256)) * 20_000 + b"tail" * 50_000
    two_frames = zstd(data[:1_000_000]) + zstd(data[1_000_000:], "-19")
    reader = Decompressed(io.BytesIO(two_frames), "layer")
    assert reader.kind == "zstd"
    out = b"".join(iter(lambda: reader.read(10240), b""))
    assert out == data and reader.diff_id == Digest.of(data)


@pytest.mark.parametrize("compress", [gzip.compress, zstd])
def test_decompressed_refuses_truncated_and_corrupt_streams(compress: Any) -> None:
    data = bytes(range(256)) * 4000
    truncated = compress(data)[:-20]
    with pytest.raises(DataLoss, match="ends early"):
        Decompressed(io.BytesIO(truncated), "layer").drain()
    damaged = bytearray(compress(data))
    damaged[len(damaged) // 2] ^= 0xFF
    damaged[len(damaged) // 2 + 1] ^= 0xFF
    with pytest.raises(DataLoss, match="corrupt"):
        Decompressed(io.BytesIO(bytes(damaged)), "layer").drain()


def test_store_is_private_and_commits_only_whole_layers(tmp_path: Path) -> None:
    store = LayerStore(tmp_path / "images")
    assert stat.S_IMODE(os.stat(store.root).st_mode) == 0o700
    staged = store.stage()
    (staged / "fs/file").write_text("x")
    digest = Digest.of(b"blob")
    assert store.layer(digest) is None
    path = store.commit_layer(digest, staged, Digest.of(b"tar"))
    assert (path / "file").read_text() == "x" and store.layer(digest) == path
    assert store.layer_diff_id(digest) == str(Digest.of(b"tar"))
    assert store.staging_entries() == []


def test_decompressed_diff_id_of_a_plain_tar_is_its_raw_digest_only_for_plain_sha256() -> None:
    data = bytes(range(256)) * 1000
    plain = Decompressed(io.BytesIO(data), "layer", raw_digest=Digest.of(data))
    assert b"".join(iter(lambda: plain.read(65536), b"")) == data
    assert plain.diff_id == Digest.of(data)
    squeezed = gzip.compress(data)
    # a compressed layer's diff ID is always hashed from its uncompressed bytes
    packed = Decompressed(io.BytesIO(squeezed), "layer", raw_digest=Digest.of(squeezed))
    packed.drain()
    assert packed.diff_id == Digest.of(data) != Digest.of(squeezed)
    # a sha512 blob digest says nothing about the sha256 diff ID: hashed
    wide = Decompressed(io.BytesIO(data), "layer", raw_digest=Digest.of(data, "sha512"))
    wide.drain()
    assert wide.diff_id == Digest.of(data)
