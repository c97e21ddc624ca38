"""Build a tiny test initramfs: busybox-static, kernel modules (decompressed), an /init script.

The /init reads ``coco.mode=`` from the kernel command line: ``poweroff`` powers off right
after boot, ``vsock`` runs an AF_VSOCK echo server on port 1024, ``disks`` prints the first 16
bytes of every virtio disk (``DISK /dev/vda <hex>``) then idles, anything else idles.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
HERE = Path(__file__).parent
VSOCK_MODULES = ("virtio_pci", "vmw_vsock_virtio_transport")
BLK_MODULES = ("virtio_pci", "virtio_blk")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /modules/$m.ko || echo "insmod $m failed"; done
echo COCO-GUEST-READY
case "$(cat /proc/cmdline)" in
  *coco.mode=poweroff*) poweroff -f ;;
  *coco.mode=vsock*) /vsock-echo 1024 & ;;
  *coco.mode=disks*) for d in /dev/vd?; do
      echo "DISK $d $(head -c 16 $d | od -A n -t x1 | tr -d ' \n')"; done ;;
esac
while true; do sleep 1000; done
"""


def _module_files(modules_dir: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in (modules_dir / "kernel").rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        found[name] = path
    return found


def _load(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def _depends(blob: bytes) -> list[str]:
    marker = blob.find(b"depends=")
    if marker < 0:
        return []
    value = blob[marker + len(b"depends="): blob.index(b"\0", marker)].decode()
    return [d.replace("-", "_") for d in value.split(",") if d]


def module_order(modules_dir: Path, roots: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """Modules needed for ``roots``, dependencies first (depth-first post-order)."""
    files = _module_files(modules_dir)
    order: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        if name not in files:
            return  # built into the kernel
        blob = _load(files[name])
        for dep in _depends(blob):
            visit(dep)
        order.append((name, blob))

    for root in roots:
        visit(root)
    return order


def build_vsock_echo(out: Path) -> Path:
    binary = out / "vsock-echo"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(binary), str(HERE / "vsock_echo.c")],
                   check=True, capture_output=True)
    return binary


def build_initramfs(dest: Path, modules_dir: Path, *, with_vsock: bool,
                    with_blk: bool = False) -> Path:
    """Write ``dest`` (newc cpio) and return it."""
    stage = dest.parent / (dest.name + ".d")
    for sub in ("bin", "proc", "sys", "dev", "modules"):
        (stage / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, stage / "bin" / "busybox")
    (stage / "init").write_text(INIT)
    (stage / "init").chmod(0o755)
    roots = (VSOCK_MODULES if with_vsock else ()) + (BLK_MODULES if with_blk else ())
    names = []
    for name, blob in module_order(modules_dir, roots):
        (stage / "modules" / f"{name}.ko").write_bytes(blob)
        names.append(name)
    if with_vsock:
        shutil.copy2(build_vsock_echo(dest.parent), stage / "vsock-echo")
    (stage / "modules.order").write_text("\n".join(names) + "\n")
    files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    with open(dest, "wb") as out:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=stage, check=True,
                       input="\n".join(files).encode(), stdout=out)
    shutil.rmtree(stage)
    return dest
