"""Kernel steering: UDP REGISTERs land on the worker that owns their AOR.

With plain ``SO_REUSEPORT`` the kernel picks a worker by a hash of the
4-tuple, so with N workers a REGISTER reaches the owner of its AOR only one
time in N; the others are handed over a socket pair, which costs a second
wake-up and a second read (measured: about half the server's CPU per REGISTER
with two workers).  ``attach`` gives the group of UDP sockets of one listener
a small eBPF program (``SO_ATTACH_REUSEPORT_EBPF``) that reads the To URI of
the datagram and returns ``shard_of(aor, n)``: socket i of the group, which
the supervisor bound i-th and gave to worker i.

The program is a hint, never the authority: workers still check the shard of
every request with the full parser and hand over what is not theirs.  It
hashes the To URI's bytes from the scheme to the end of the host, before any
port (scheme and host lower-cased; with ``by_user``, to the end of the user),
which is the canonical AOR whenever the URI has no escapes and no password,
its host is no bracketed IPv6 address and its scheme is sip: (the AOR of a
sips: URI is its sip: form); anything else (To after
``STEER_SCAN`` bytes, another spelling, no To) gets the kernel's usual hash
and at worst a hand-off.  ``fastsip.stable_hash`` is the same function
(FNV-1a 64 with a final mix), so both sides agree.

Loading needs ``CAP_BPF`` (or root); where the kernel or the sandbox refuses,
``attach`` says why and the server runs with hand-offs, as before.
"""
from __future__ import annotations

import ctypes
import os
import platform
import socket
import struct

SO_ATTACH_REUSEPORT_EBPF = 52
BPF_PROG_LOAD = 5
BPF_PROG_TEST_RUN = 10
BPF_PROG_TYPE_SOCKET_FILTER = 1
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())

STEER_SCAN = 640            # loop iterations: bytes read until the To URI ends
NO_SOCKET = 0xFFFFFFFF      # any index >= the group size: the kernel's own hash

FNV_OFFSET = 0xcbf29ce484222325
FNV_PRIME = 0x100000001b3           # 2**40 + 0x1b3
MIX1 = 0xff51afd7ed558ccd
MIX2 = 0xc4ceb9fe1a85ec53
TERMINATORS = b";>? \t\r\n,"


def stable_hash_py(aor: bytes) -> int:
    """``fastsip.stable_hash`` in Python: FNV-1a 64 of the bytes, then the
    MurmurHash3 finaliser (the program computes exactly this)."""
    h = FNV_OFFSET
    for c in aor:
        h = ((h ^ c) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 33
    h = (h * MIX1) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 33
    h = (h * MIX2) & 0xFFFFFFFFFFFFFFFF
    return h ^ (h >> 33)


# --------------------------------------------------------------------------
# A minimal eBPF assembler: just what the program below uses
# --------------------------------------------------------------------------

R0, R1, R2, R3, R6, R7, R8, R9, R10 = 0, 1, 2, 3, 6, 7, 8, 9, 10

_ALU = {"add": 0x00, "mul": 0x20, "or": 0x40, "lsh": 0x60, "rsh": 0x70, "mod": 0x90,
        "xor": 0xa0, "mov": 0xb0}
_JMP = {"ja": 0x00, "jeq": 0x10, "jgt": 0x20, "jge": 0x30, "jne": 0x50, "jlt": 0xa0}


class _Asm:
    """Instructions with symbolic jump labels, resolved by ``code()``."""

    def __init__(self):
        self.ins = []       # [code, dst, src, off or label, imm]
        self.labels = {}

    def label(self, name):
        self.labels[name] = len(self.ins)

    def alu(self, op, dst, src=None, imm=0):              # 64-bit ALU
        self.ins.append([0x07 | _ALU[op] | (0x08 if src is not None else 0), dst, src or 0, 0,
                         imm])

    def jmp(self, op, dst, target, src=None, imm=0):
        self.ins.append([0x05 | _JMP[op] | (0x08 if src is not None else 0), dst, src or 0,
                         target, imm])

    def goto(self, target):
        self.jmp("ja", 0, target)

    def ld_imm64(self, dst, value):
        self.ins.append([0x18, dst, 0, 0, value & 0xFFFFFFFF])
        self.ins.append([0x00, 0, 0, 0, value >> 32])

    def ldx_w(self, dst, src, off):                       # dst = *(u32 *)(src + off)
        self.ins.append([0x61, dst, src, off, 0])

    def ldx_dw(self, dst, src, off):
        self.ins.append([0x79, dst, src, off, 0])

    def stx_dw(self, dst, off, src):                      # *(u64 *)(dst + off) = src
        self.ins.append([0x7b, dst, src, off, 0])

    def ld_byte(self, src):
        """R0 = packet byte at offset ``src`` (legacy LD_IND; R6 must hold the
        context; clobbers R1-R5)."""
        self.ins.append([0x50, 0, src, 0, 0])

    def exit(self):
        self.ins.append([0x95, 0, 0, 0, 0])

    def code(self) -> bytes:
        out = []
        for pc, (op, dst, src, off, imm) in enumerate(self.ins):
            if isinstance(off, str):
                off = self.labels[off] - pc - 1
            out.append(struct.pack("<BBhi", op, (src << 4) | dst, off,
                                   imm - (1 << 32) if imm >= 1 << 31 else imm))
        return b"".join(out)


def program(n: int, by_user: bool = False) -> bytes:
    """The steering program for a group of ``n`` sockets (``by_user``: for a
    registrar whose AORs are keyed by the user alone).

    Registers: R6 the context, R7 the read position, R8 the hash, R9 the
    iteration count (one bound for every loop, so the verifier sees each
    loop end).  Stack: [-16] where the To value starts.  The length is read
    from the context at every bound check, not kept: a kept copy would carry
    what each comparison taught the verifier, and the loop states would never
    look alike to it (the program would be "too large" to verify).
    """
    a = _Asm()
    a.alu("mov", R6, R1)
    a.alu("mov", R7, imm=0)
    a.alu("mov", R9, imm=0)

    def step(fail):
        """Count an iteration; go to ``fail`` at the bound or at the end of the
        datagram; else R0 = the byte at R7, and R7 moves past it."""
        a.jmp("jge", R9, fail, imm=STEER_SCAN)
        a.alu("add", R9, imm=1)
        a.ldx_w(R2, R6, 0)              # __sk_buff.len: the UDP payload's length
        a.jmp("jge", R7, fail, src=R2)
        a.ld_byte(R7)
        a.alu("add", R7, imm=1)

    # 1. A line starting "To" or "t" (any case), optional blanks, then ':'
    a.label("line")
    a.jmp("jge", R9, "fail", imm=STEER_SCAN)
    a.alu("add", R9, imm=1)
    a.ldx_w(R2, R6, 0)
    a.alu("mov", R3, R7)
    a.alu("add", R3, imm=4)
    a.jmp("jgt", R3, "fail", src=R2)    # bytes i .. i+3 are in the datagram
    a.ld_byte(R7)
    a.alu("add", R7, imm=1)
    a.jmp("jne", R0, "line", imm=ord("\n"))
    a.ld_byte(R7)
    a.alu("or", R0, imm=0x20)
    a.jmp("jne", R0, "line", imm=ord("t"))
    a.alu("add", R7, imm=1)
    a.ld_byte(R7)
    a.jmp("jeq", R0, "colon", imm=ord(":"))
    a.jmp("jeq", R0, "blanks", imm=ord(" "))
    a.jmp("jeq", R0, "blanks", imm=ord("\t"))
    a.alu("or", R0, imm=0x20)
    a.jmp("jne", R0, "line", imm=ord("o"))
    a.alu("add", R7, imm=1)
    a.label("blanks")                   # R7 at a blank or the colon
    step("fail")
    a.jmp("jeq", R0, "value", imm=ord(":"))
    a.jmp("jeq", R0, "blanks", imm=ord(" "))
    a.jmp("jeq", R0, "blanks", imm=ord("\t"))
    a.goto("line")
    a.label("colon")
    a.alu("add", R7, imm=1)
    # 2. The value: name-addr (URI after '<' on this line) or addr-spec
    a.label("value")
    a.stx_dw(R10, -16, R7)
    a.label("angle")
    step("fail")
    a.jmp("jeq", R0, "uri", imm=ord("<"))
    a.jmp("jeq", R0, "addrspec", imm=ord("\r"))
    a.jmp("jeq", R0, "addrspec", imm=ord("\n"))
    a.goto("angle")
    a.label("addrspec")
    a.ldx_dw(R7, R10, -16)
    a.label("lws")
    step("fail")
    a.jmp("jeq", R0, "lws", imm=ord(" "))
    a.jmp("jeq", R0, "lws", imm=ord("\t"))
    a.alu("add", R7, imm=-1)            # R7 back at the URI's first byte
    # 3. Hash scheme (lower-cased) and ':', user as it is, '@', host lower-cased;
    #    a ':' after the scheme ends the AOR (a port; or a password, left to the workers)
    a.label("uri")
    a.ld_imm64(R8, FNV_OFFSET)

    def mix_in():
        a.alu("xor", R8, src=R0)
        a.alu("mov", R1, R8)
        a.alu("lsh", R1, imm=40)
        a.alu("mul", R8, imm=0x1b3)
        a.alu("add", R8, src=R1)

    def lower():
        skip = f"l{len(a.ins)}"
        a.jmp("jlt", R0, skip, imm=ord("A"))
        a.jmp("jgt", R0, skip, imm=ord("Z"))
        a.alu("or", R0, imm=0x20)
        a.label(skip)

    def terminators(target):
        for c in TERMINATORS:
            a.jmp("jeq", R0, target, imm=c)

    a.label("scheme")
    step("fail")
    terminators("fail")
    lower()
    mix_in()
    a.jmp("jne", R0, "scheme", imm=ord(":"))
    a.label("user")
    step("end")
    terminators("end")
    a.jmp("jeq", R0, "end", imm=ord(":"))
    if by_user:                         # the AOR ends with the user
        a.jmp("jeq", R0, "end", imm=ord("@"))
        mix_in()
        a.goto("user")
    else:
        mix_in()
        a.jmp("jne", R0, "user", imm=ord("@"))
        a.label("host")
        step("end")
        terminators("end")
        a.jmp("jeq", R0, "end", imm=ord(":"))
        lower()
        mix_in()
        a.goto("host")
    # 4. The shard: the final mix, modulo n
    a.label("end")
    for k in (MIX1, MIX2, None):
        a.alu("mov", R1, R8)
        a.alu("rsh", R1, imm=33)
        a.alu("xor", R8, src=R1)
        if k is not None:
            a.ld_imm64(R1, k)
            a.alu("mul", R8, src=R1)
    a.alu("mov", R0, R8)
    a.alu("mod", R0, imm=n)
    a.exit()
    a.label("fail")
    a.ld_imm64(R0, NO_SOCKET)
    a.exit()
    return a.code()


# --------------------------------------------------------------------------
# Loading and attaching
# --------------------------------------------------------------------------

class SteerError(OSError):
    pass


def _bpf(cmd: int, attr) -> int:
    if SYS_BPF is None:
        raise SteerError(0, f"no bpf system call number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    r = libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_long(cmd), attr,
                     ctypes.c_long(ctypes.sizeof(attr)))
    if r < 0:
        err = ctypes.get_errno()
        raise SteerError(err, os.strerror(err))
    return r


def load(n: int, by_user: bool = False) -> int:
    """Load the program for ``n`` sockets: its file descriptor (SteerError
    with the verifier's last word when the kernel refuses it)."""
    code = program(n, by_user)
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"Dual MIT/GPL")

    def attempt(log):
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_SOCKET_FILTER, len(code) // 8,
                         ctypes.addressof(insns), ctypes.addressof(lic), 1 if log else 0,
                         len(log) if log else 0, ctypes.addressof(log) if log else 0)
        struct.pack_into("16s", attr, 48, b"fastsip_steer")
        return _bpf(BPF_PROG_LOAD, attr)

    try:
        return attempt(None)
    except SteerError as exc:
        log = ctypes.create_string_buffer(1 << 24)     # again, for the verifier's reason
        try:
            attempt(log)
        except SteerError:
            pass
        lines = log.value.decode("ascii", "replace").strip().splitlines()
        why = next((ln for ln in reversed(lines) if not ln.startswith("processed ")), "")
        raise SteerError(exc.errno, exc.strerror + (f" ({why})" if why else "")) from None


def test_run(fd: int, payload: bytes) -> int:
    """Run the loaded program on one UDP payload (``BPF_PROG_TEST_RUN``): the
    socket index it returns.  For the tests.  (A test run takes an Ethernet
    frame and starts a socket filter after its 14-byte header.)"""
    data = b"\0" * 14 + payload      # (ethertype 0: no IP header is looked for)
    buf = ctypes.create_string_buffer(data, len(data))
    attr = ctypes.create_string_buffer(80)
    struct.pack_into("<IIIIQQI", attr, 0, fd, 0, len(data), 0, ctypes.addressof(buf), 0, 1)
    _bpf(BPF_PROG_TEST_RUN, attr)
    return struct.unpack_from("<I", attr, 4)[0]


def attach(socks: list, by_user: bool = False) -> str | None:
    """Steer the UDP group ``socks`` (socket i serves shard i).  Returns None
    when attached, else why not (the group then keeps the kernel's hash)."""
    if len(socks) < 2:
        return "one worker"
    try:
        fd = load(len(socks), by_user)
    except SteerError as exc:
        return f"the kernel refused the eBPF program: {exc.strerror}"
    try:
        socks[0].setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, fd)
    except OSError as exc:
        return f"SO_ATTACH_REUSEPORT_EBPF: {exc.strerror}"
    finally:
        os.close(fd)
    return None
