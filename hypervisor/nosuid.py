"""Exec a program under a seccomp filter: no setuid/setgid mode, no chown to uid 0.

``python -I hypervisor/nosuid.py PROGRAM ARG...``: installs the filter (libseccomp through
ctypes; the standard library only, so it runs isolated by path) and execs PROGRAM, which
keeps it for life, across further execs:

- the calls that give a file a mode (chmod, fchmod, fchmodat, fchmodat2, mknod, mknodat, and
  open, openat and creat when they create) fail with EPERM when the mode has S_ISUID or
  S_ISGID (mkdir ignores both bits);
- the calls that give a file an owner (chown, lchown, fchown, fchownat) to uid 0 do nothing
  and return 0: what QEMU's ``security_model=none`` already does with an owner it cannot
  set on a new file, extended to an explicit chown, so that a guest's dpkg or tar (which
  chown what they unpack to root) keep working while the host file stays ``nobody``'s.
  Group 0 stays possible (containers that run with gid 0, as OpenShift's do, keep their
  files; a setgid bit is refused above).

openat2, whose mode sits behind a pointer a filter cannot read, fails with ENOSYS (glibc and
QEMU fall back to openat).

Why: QEMU serving a 9p share (``security_model=none``) applies the guest's chown and chmod on
the host. It runs as ``nobody`` (:class:`hypervisor.cmdline.ReducedPrivileges`) keeping
CAP_CHOWN and CAP_FOWNER, so that a file a non-root guest user creates is that user's (QEMU
chowns, then chmods it): this filter is what keeps those capabilities from making a file
root's, setuid or setgid. QEMU's own ``-sandbox`` filter stacks on top of this one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import sys
from typing import Final

SCMP_ACT_ALLOW: Final = 0x7FFF0000
SCMP_CMP_MASKED_EQ: Final = 7
FCHMODAT2_NR: Final = {"x86_64": 452, "aarch64": 452, "s390x": 452, "ppc64le": 452}
O_TMPFILE_BIT: Final = 0o20000000  # __O_TMPFILE (x86_64, arm64, s390x, ppc64le)

# syscall → (index of its mode argument, index of its open flags argument or None)
MODE_CALLS: Final[dict[str, tuple[int, int | None]]] = {
    "chmod": (1, None), "fchmod": (1, None), "fchmodat": (2, None),
    "mknod": (1, None), "mknodat": (2, None),
    "creat": (1, None), "open": (2, 1), "openat": (3, 2),
}
PRIVILEGE_BITS: Final = (stat.S_ISUID, stat.S_ISGID)
# syscall → index of its uid argument
OWNER_CALLS: Final[dict[str, int]] = {"chown": 1, "lchown": 1, "fchown": 1, "fchownat": 2}
ID_MASK: Final = 0xFFFFFFFF  # uid_t: the low 32 bits of the register


class ScmpArgCmp(ctypes.Structure):
    """libseccomp's ``struct scmp_arg_cmp``."""

    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _masked(arg: int, bit: int, value: int | None = None) -> ScmpArgCmp:
    """``(arg & bit) == value`` (``value`` defaults to ``bit``: the bits are set)."""
    return ScmpArgCmp(arg, SCMP_CMP_MASKED_EQ, bit, bit if value is None else value)


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


def rules() -> list[tuple[str | int, int, list[ScmpArgCmp]]]:
    """(syscall, action, comparisons ANDed): every way the filter says no."""
    out: list[tuple[str | int, int, list[ScmpArgCmp]]] = []
    calls: dict[str | int, tuple[int, int | None]] = {k: v for k, v in MODE_CALLS.items()}
    machine = os.uname().machine
    if machine in FCHMODAT2_NR:  # newer than libseccomp 2.5's tables: by number
        calls[FCHMODAT2_NR[machine]] = (2, None)
    for call, (mode_arg, flags_arg) in calls.items():
        for bit in PRIVILEGE_BITS:
            if flags_arg is None:
                out.append((call, _act_errno(errno.EPERM), [_masked(mode_arg, bit)]))
            else:  # open/openat: only when they create (O_CREAT or O_TMPFILE)
                for creating in (os.O_CREAT, O_TMPFILE_BIT):
                    out.append((call, _act_errno(errno.EPERM),
                                [_masked(flags_arg, creating), _masked(mode_arg, bit)]))
    for name, uid_arg in OWNER_CALLS.items():
        out.append((name, _act_errno(0), [_masked(uid_arg, ID_MASK, 0)]))
    out.append(("openat2", _act_errno(errno.ENOSYS), []))
    return out


def install() -> None:
    """Load the filter into this process (inherited by what it execs). OSError says why."""
    lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(ScmpArgCmp)]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for call, action, cmps in rules():
            number = call if isinstance(call, int) else \
                lib.seccomp_syscall_resolve_name(call.encode())
            if number < 0:
                raise OSError(f"libseccomp does not know the syscall {call}")
            array = (ScmpArgCmp * len(cmps))(*cmps)
            rc = lib.seccomp_rule_add_array(ctx, action, number, len(cmps), array)
            if rc < 0:
                raise OSError(-rc, f"seccomp rule for {call}: {os.strerror(-rc)}")
        rc = lib.seccomp_load(ctx)
        if rc < 0:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: nosuid.py PROGRAM [ARG...]", file=sys.stderr)
        return 2
    try:
        install()
        os.execv(argv[0], argv)
    except OSError as err:
        print(f"nosuid: {argv[0]}: {err}", file=sys.stderr)
        return 127
    return 0  # not reached: execv does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
