#!/usr/bin/env python3
"""What the guest pull's CPU stages cost in the reference guest under TCG, without a pod.

Boots the reference guest image's kernel and initramfs (1 vCPU, 1 GiB, ``-cpu max``, TCG) with
a small cpio prepended whose ``/bench.sh`` runs instead of the agent (``rdinit=``): the guest's
own Python measures SHA-256 (``hashlib``: which implementation, and with OpenSSL's CPU feature
masks: default, without SHA-NI, without AVX/AVX2, integer only), CRC-32, gzip and raw
inflate, and writes to tmpfs, over 64 MiB; the guest's CPU flags are printed first. Prints
the guest's lines; leaves nothing behind.

    heavy python bench/guest_hash.py [--qemu /usr/bin/qemu-system-x86_64]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from guest.image.cpio import write_initramfs
from tests import envinfo
from tests.support.guest import guest_image

# OPENSSL_ia32cap masks: word 1 is CPUID.1 (ECX:EDX), word 2 CPUID.7 (EBX). SHA-NI is
# CPUID.7 EBX bit 29, AVX2 bit 5; AVX is CPUID.1 ECX bit 28, SSSE3 bit 9.
MASKS = {"default": "", "no SHA-NI": ":~0x20000000",
         "no SHA-NI/AVX/AVX2": "~0x1000000000000000:~0x20000020",
         "integer only": "~0x1000020000000000:~0x20000020"}

SCRIPT = """#!/bin/sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t tmpfs -o size=300m tmp /tmp
/bin/busybox grep -m1 flags /proc/cpuinfo
export PYTHONPATH=/opt/coco-guest:/usr/lib/python3/dist-packages
{runs}
/usr/bin/python3.11 -S /bench.py rest
echo "bench: done"
/bin/busybox poweroff -f
"""

BENCH = r'''
import hashlib, os, sys, time, zlib
MIB = 64
data = os.urandom(MIB << 20)
def timed(label, fn):
    started = time.perf_counter(); fn(); took = time.perf_counter() - started
    print(f"bench: {label:44s} {took:6.2f} s  {MIB / took:6.1f} MiB/s", flush=True)
if sys.argv[1] == "hash":
    print(f"bench: hashlib.sha256 is {hashlib.sha256.__name__} "
          f"(OPENSSL_ia32cap={os.environ.get('OPENSSL_ia32cap', '')!r})", flush=True)
    def sha256():
        digest = hashlib.sha256()
        for i in range(0, len(data), 1 << 20):
            digest.update(data[i:i + (1 << 20)])
    timed("sha256, 1 MiB updates", sha256)
    sys.exit()
timed("crc32", lambda: zlib.crc32(data))
packer = zlib.compressobj(1, zlib.DEFLATED, 31)
blob = packer.compress(data) + packer.flush()
def inflate(wbits, start):
    inflater = zlib.decompressobj(wbits)
    for i in range(start, len(blob), 1 << 20):
        out = inflater.decompress(blob[i:i + (1 << 20)], 1 << 20)
        while inflater.unconsumed_tail:
            out = inflater.decompress(inflater.unconsumed_tail, 1 << 20)
timed("gzip inflate (level 1, 1 MiB pieces)", lambda: inflate(31, 0))
timed("raw inflate, no CRC (the same stream)", lambda: inflate(-15, 10))
def write():
    fd = os.open("/tmp/out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for i in range(0, len(data), 1 << 20):
        os.write(fd, data[i:i + (1 << 20)])
    os.close(fd)
timed("write to tmpfs, 1 MiB writes", write)
'''


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qemu", default="/usr/bin/qemu-system-x86_64")
    args = parser.parse_args()
    env = envinfo.load()
    image = guest_image()
    work = Path(tempfile.mkdtemp(prefix=f"coco-guest-hash-{os.getpid()}-", dir="/tmp"))
    try:
        tree = work / "tree"
        tree.mkdir()
        runs = "\n".join(f"OPENSSL_ia32cap='{mask}' /usr/bin/python3.11 -S /bench.py hash"
                         for mask in MASKS.values())
        (tree / "bench.sh").write_text(SCRIPT.format(runs=runs))
        (tree / "bench.sh").chmod(0o755)
        (tree / "bench.py").write_text(BENCH)
        extra = work / "extra.cpio"
        write_initramfs(tree, extra, mtime=0, compression="none")
        initrd = work / "initrd"
        initrd.write_bytes(extra.read_bytes() + image.image.read_bytes())  # ours, then the image
        argv = [args.qemu, "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1024",
                "-machine", "q35", "-nographic", "-no-reboot", "-kernel", str(env.kernel),
                "-initrd", str(initrd), "-append", "console=ttyS0 quiet rdinit=/bench.sh"]
        done = subprocess.run(argv, capture_output=True, text=True, errors="replace",
                              timeout=600, check=False)
        lines = [line[line.index(key):].strip() for line in done.stdout.splitlines()
                 for key in ("bench:", "flags") if key in line]
        print(f"{args.qemu}, -accel tcg -cpu max, 1 vCPU, the reference guest's Python")
        print("\n".join(lines))
        return 0 if lines and lines[-1] == "bench: done" else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
