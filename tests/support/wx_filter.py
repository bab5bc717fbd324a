"""Runs a command under the seccomp filter systemd installs for MemoryDenyWriteExecute=yes.

    python -m tests.support.wx_filter [--deny-memfd] -- COMMAND [ARG...]

The filter is systemd's (src/shared/seccomp-util.c, seccomp_memory_deny_write_execute): mmap with
both PROT_WRITE and PROT_EXEC, mprotect or pkey_mprotect with PROT_EXEC, and shmat with SHM_EXEC
fail with EPERM; everything else is allowed. It is written here as classic BPF and loaded with
prctl through ctypes, so it needs neither libseccomp's Python bindings nor root
(PR_SET_NO_NEW_PRIVS comes first, as NoNewPrivileges=yes does in the unit). --deny-memfd also
refuses memfd_create, to show what libffi falls back to without it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import sys
from dataclasses import dataclass

PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
SHM_EXEC = 0o100000

# Classic BPF opcodes (linux/filter.h).
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
BPF_AND_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
BPF_RET_K = 0x06  # BPF_RET | BPF_K

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
OFFSET_NR = 0
OFFSET_ARCH = 4
OFFSET_ARG2_LOW = 16 + 2 * 8  # little endian: the low half comes first


@dataclass(frozen=True)
class Arch:
    """An architecture's audit id and syscall numbers (asm/unistd.h)."""

    audit: int
    mmap: int
    mprotect: int
    pkey_mprotect: int
    shmat: int
    memfd_create: int


ARCHES = {
    "x86_64": Arch(0xC000003E, mmap=9, mprotect=10, pkey_mprotect=329, shmat=30, memfd_create=319),
    "aarch64": Arch(
        0xC00000B7, mmap=222, mprotect=226, pkey_mprotect=288, shmat=196, memfd_create=279
    ),
}


class SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    ]


class SockFprog(ctypes.Structure):
    _fields_ = [
        ("len", ctypes.c_ushort),
        ("filter", ctypes.POINTER(SockFilter)),
    ]


def _stmt(code: int, k: int) -> tuple[int, int, int, int]:
    return (code, 0, 0, k)


def _jeq(k: int, jt: int, jf: int) -> tuple[int, int, int, int]:
    return (BPF_JEQ_K, jt, jf, k)


def program(*, deny_memfd: bool = False) -> list[tuple[int, int, int, int]]:
    """The filter for this machine's architecture, as (code, jt, jf, k) instructions."""
    machine = platform.machine()
    if machine not in ARCHES:
        raise RuntimeError(f"no syscall table for {machine} in tests/support/wx_filter.py")
    arch = ARCHES[machine]
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    # Each check: does (arg2 & mask) == mask? Then EPERM. Jump offsets count from the next one.
    checks = [
        (arch.mmap, mmap.PROT_WRITE | mmap.PROT_EXEC),
        (arch.mprotect, mmap.PROT_EXEC),
        (arch.pkey_mprotect, mmap.PROT_EXEC),
        (arch.shmat, SHM_EXEC),
    ]
    body: list[tuple[int, int, int, int]] = []
    for number, mask in checks:
        body += [
            _jeq(number, 0, 5),
            _stmt(BPF_LD_W_ABS, OFFSET_ARG2_LOW),
            _stmt(BPF_AND_K, mask),
            _jeq(mask, 0, 1),
            _stmt(BPF_RET_K, deny),
            _stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
        ]
    if deny_memfd:
        body += [_jeq(arch.memfd_create, 0, 1), _stmt(BPF_RET_K, deny)]
    return [
        _stmt(BPF_LD_W_ABS, OFFSET_ARCH),
        # Another ABI (x32, compat): refuse it, as SystemCallArchitectures=native does.
        _jeq(arch.audit, 1, 0),
        _stmt(BPF_RET_K, deny),
        _stmt(BPF_LD_W_ABS, OFFSET_NR),
        *body,
        _stmt(BPF_RET_K, SECCOMP_RET_ALLOW),
    ]


def install(*, deny_memfd: bool = False) -> None:
    """Load the filter into this process; it is inherited across fork and exec."""
    instructions = program(deny_memfd=deny_memfd)
    filters = (SockFilter * len(instructions))(*(SockFilter(*i) for i in instructions))
    prog = SockFprog(len(instructions), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    # prctl(option, arg2, arg3, arg4, arg5): the unused ones must be 0 or it fails with EINVAL.
    libc.prctl.argtypes = [ctypes.c_int, *[ctypes.c_ulong] * 4]
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_SECCOMP)")


def main(argv: list[str]) -> None:
    if "--" not in argv or argv[-1] == "--":
        sys.exit("usage: python -m tests.support.wx_filter [--deny-memfd] -- COMMAND [ARG...]")
    split = argv.index("--")
    install(deny_memfd="--deny-memfd" in argv[:split])
    command = argv[split + 1 :]
    os.execvp(command[0], command)  # noqa: S606 - the command line is the caller's own


if __name__ == "__main__":
    main(sys.argv[1:])
