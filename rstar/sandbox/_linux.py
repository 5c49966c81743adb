"""Thin ctypes wrappers over the Linux isolation primitives the sandbox uses.

Nothing here needs a compiler or an extra package: prctl, capset, unshare, seccomp (a BPF
program assembled with ``struct``) and Landlock are plain system calls. Every helper raises
``OSError`` on failure so callers can fall back and record what is actually enforced.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
SECCOMP_MODE_FILTER = 2
CLONE_THREAD = 0x00010000
CLONE_NEWNET = 0x40000000

MACHINE = platform.machine()

# Syscall numbers per architecture (only those the filter names). aarch64 uses the generic
# table and has no fork/vfork syscalls.
_X86_64 = {
    "fork": 57, "vfork": 58, "clone": 56, "clone3": 435, "execve": 59, "execveat": 322,
    "kill": 62, "tkill": 200, "tgkill": 234, "rt_sigqueueinfo": 129, "rt_tgsigqueueinfo": 297,
    "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438, "ptrace": 101,
    "process_vm_readv": 310, "process_vm_writev": 311, "mount": 165, "umount2": 166,
    "pivot_root": 155, "chroot": 161, "unshare": 272, "setns": 308, "reboot": 169,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "bpf": 321, "perf_event_open": 298, "keyctl": 250, "add_key": 248,
    "request_key": 249, "setrlimit": 160, "prlimit64": 302, "swapon": 167, "swapoff": 168,
    "sethostname": 170, "setdomainname": 171, "socket": 41, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "userfaultfd": 323,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "fanotify_init": 300,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442, "acct": 163, "settimeofday": 164,
    "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305, "syslog": 103,
    "quotactl": 179, "vhangup": 153, "kcmp": 312, "iopl": 172, "ioperm": 173,
    "capset": 126, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
    "landlock_restrict_self": 446,
}
_AARCH64 = {
    "clone": 220, "clone3": 435, "execve": 221, "execveat": 281, "kill": 129, "tkill": 130,
    "tgkill": 131, "rt_sigqueueinfo": 138, "rt_tgsigqueueinfo": 240, "pidfd_open": 434,
    "pidfd_send_signal": 424, "pidfd_getfd": 438, "ptrace": 117, "process_vm_readv": 270,
    "process_vm_writev": 271, "mount": 40, "umount2": 39, "pivot_root": 41, "chroot": 51,
    "unshare": 97, "setns": 268, "reboot": 142, "kexec_load": 104, "kexec_file_load": 294,
    "init_module": 105, "finit_module": 273, "delete_module": 106, "bpf": 280,
    "perf_event_open": 241, "keyctl": 219, "add_key": 217, "request_key": 218,
    "setrlimit": 164, "prlimit64": 261, "swapon": 224, "swapoff": 225, "sethostname": 161,
    "setdomainname": 162, "socket": 198, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "userfaultfd": 282, "open_by_handle_at": 265,
    "name_to_handle_at": 264, "fanotify_init": 262, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "acct": 89, "settimeofday": 170, "clock_settime": 112, "adjtimex": 171,
    "clock_adjtime": 266, "syslog": 116, "quotactl": 60, "vhangup": 58, "kcmp": 272,
    "capset": 91, "landlock_create_ruleset": 444, "landlock_add_rule": 445,
    "landlock_restrict_self": 446,
}
_ARCHES = {"x86_64": (0xC000003E, _X86_64), "aarch64": (0xC00000B7, _AARCH64)}
SYSCALLS: dict[str, int] | None = _ARCHES[MACHINE][1] if MACHINE in _ARCHES else None


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def _syscall(name: str, *args: object) -> int:
    if SYSCALLS is None:
        raise OSError(errno.ENOSYS, f"unsupported architecture {MACHINE}")
    return _check(_libc.syscall(SYSCALLS[name], *args))


def prctl(option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
    return _check(_libc.prctl(option, a2, a3, a4, a5))


def set_pdeathsig(sig: int) -> None:
    """Ask the kernel to send ``sig`` when our parent (thread) dies: no orphans."""
    prctl(PR_SET_PDEATHSIG, sig)


def unshare_network() -> None:
    """Move this (single-threaded) process into a fresh, empty network namespace."""
    _check(_libc.unshare(CLONE_NEWNET))


def drop_capabilities() -> None:
    """Clear effective/permitted/inheritable capabilities (a root child becomes an ordinary
    uid-0 process: no CAP_KILL, CAP_SYS_ADMIN, CAP_SYS_RESOURCE, CAP_DAC_OVERRIDE...)."""
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)  # two zeroed __user_cap_data_struct
    hbuf = ctypes.create_string_buffer(header, len(header))
    dbuf = ctypes.create_string_buffer(data, len(data))
    _syscall("capset", hbuf, dbuf)


# --------------------------------------------------------------------------------- seccomp

_BPF_LD_W_ABS = 0x20
_BPF_JEQ = 0x15
_BPF_JGE = 0x35
_BPF_JSET = 0x45
_BPF_RET = 0x06
RET_KILL_PROCESS = 0x80000000
RET_ALLOW = 0x7FFF0000
RET_ERRNO = 0x00050000

# Denied outright (the process is killed with SIGSYS, reported as FORBIDDEN): creating
# processes or programs, touching other processes, namespaces/mounts, kernel state, raising
# resource limits, network sockets, and io_uring (which would bypass this filter).
DENIED = (
    "fork", "vfork", "execve", "execveat", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root",
    "chroot", "unshare", "setns", "reboot", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "bpf", "perf_event_open", "keyctl", "add_key",
    "request_key", "setrlimit", "swapon", "swapoff", "sethostname", "setdomainname", "socket",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd",
    "open_by_handle_at", "name_to_handle_at", "fanotify_init", "open_tree", "move_mount",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr", "acct", "settimeofday",
    "clock_settime", "adjtimex", "clock_adjtime", "syslog", "quotactl", "vhangup", "kcmp",
    "iopl", "ioperm",
)
# Signals may only target the process itself (or its own group, pid 0).
_PID_CHECKED = ("kill", "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo")


def _ins(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


class SeccompProgram:
    """A BPF filter template; the child's own pid is patched in just before installing."""

    def __init__(self) -> None:
        if SYSCALLS is None:
            raise OSError(errno.ENOSYS, f"seccomp filter not written for {MACHINE}")
        arch, nr = _ARCHES[MACHINE]
        ins: list[bytes] = []
        self._pid_slots: list[int] = []
        ins.append(_ins(_BPF_LD_W_ABS, 0, 0, 4))  # seccomp_data.arch
        ins.append(_ins(_BPF_JEQ, 1, 0, arch))
        ins.append(_ins(_BPF_RET, 0, 0, RET_KILL_PROCESS))
        ins.append(_ins(_BPF_LD_W_ABS, 0, 0, 0))  # seccomp_data.nr
        if MACHINE == "x86_64":  # x32 ABI numbers alias the native ones: refuse them
            ins.append(_ins(_BPF_JGE, 0, 1, 0x40000000))
            ins.append(_ins(_BPF_RET, 0, 0, RET_KILL_PROCESS))
        # clone: only threads (CLONE_THREAD in the flags, args[0]).
        ins.append(_ins(_BPF_JEQ, 0, 4, nr["clone"]))
        ins.append(_ins(_BPF_LD_W_ABS, 0, 0, 16))
        ins.append(_ins(_BPF_JSET, 0, 1, CLONE_THREAD))
        ins.append(_ins(_BPF_RET, 0, 0, RET_ALLOW))
        ins.append(_ins(_BPF_RET, 0, 0, RET_KILL_PROCESS))
        # clone3 hides its flags in memory: ENOSYS makes glibc fall back to clone.
        ins.append(_ins(_BPF_JEQ, 0, 1, nr["clone3"]))
        ins.append(_ins(_BPF_RET, 0, 0, RET_ERRNO | errno.ENOSYS))
        # prlimit64: reading (new_limit == NULL, args[2]) only.
        ins.append(_ins(_BPF_JEQ, 0, 6, nr["prlimit64"]))
        ins.append(_ins(_BPF_LD_W_ABS, 0, 0, 16 + 8 * 2))
        ins.append(_ins(_BPF_JEQ, 0, 3, 0))
        ins.append(_ins(_BPF_LD_W_ABS, 0, 0, 16 + 8 * 2 + 4))
        ins.append(_ins(_BPF_JEQ, 0, 1, 0))
        ins.append(_ins(_BPF_RET, 0, 0, RET_ALLOW))
        ins.append(_ins(_BPF_RET, 0, 0, RET_KILL_PROCESS))
        for name in _PID_CHECKED:
            # if nr == name: hi(args[0]) must be 0 and lo(args[0]) in {self, 0}
            ins.append(_ins(_BPF_JEQ, 0, 7, nr[name]))
            ins.append(_ins(_BPF_LD_W_ABS, 0, 0, 20))
            ins.append(_ins(_BPF_JEQ, 0, 4, 0))
            ins.append(_ins(_BPF_LD_W_ABS, 0, 0, 16))
            self._pid_slots.append(len(ins))
            ins.append(_ins(_BPF_JEQ, 1, 0, 0))  # k = own pid, patched per child
            ins.append(_ins(_BPF_JEQ, 0, 1, 0))
            ins.append(_ins(_BPF_RET, 0, 0, RET_ALLOW))
            ins.append(_ins(_BPF_RET, 0, 0, RET_KILL_PROCESS))
        for name in DENIED:
            if name in nr:
                ins.append(_ins(_BPF_JEQ, 0, 1, nr[name]))
                ins.append(_ins(_BPF_RET, 0, 0, RET_KILL_PROCESS))
        ins.append(_ins(_BPF_RET, 0, 0, RET_ALLOW))
        self._template = b"".join(ins)
        self.length = len(ins)

    def install(self, pid: int) -> None:
        """Install for the calling (single-threaded) process; irreversible."""
        buf = ctypes.create_string_buffer(self._template, len(self._template))
        for slot in self._pid_slots:
            struct.pack_into("HBBI", buf, slot * 8, _BPF_JEQ, 1, 0, pid)
        prog = struct.pack("HP", self.length, ctypes.addressof(buf))  # struct sock_fprog
        pbuf = ctypes.create_string_buffer(prog, len(prog))
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.addressof(pbuf), 0, 0))


# -------------------------------------------------------------------------------- Landlock

LL_EXECUTE = 1 << 0
LL_WRITE_FILE = 1 << 1
LL_READ_FILE = 1 << 2
LL_READ_DIR = 1 << 3
LL_REFER = 1 << 13
LL_TRUNCATE = 1 << 14
_LL_FS_V1 = (1 << 13) - 1
_LL_NET_TCP = 0x3  # BIND_TCP | CONNECT_TCP
_LL_SCOPE = 0x3  # ABSTRACT_UNIX_SOCKET | SIGNAL
_LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE


def landlock_abi() -> int:
    """Landlock ABI version, 0 when the kernel lacks it or it is disabled."""
    if SYSCALLS is None:
        return 0
    ret = _libc.syscall(SYSCALLS["landlock_create_ruleset"], None, 0, 1)
    return max(int(ret), 0)


class LandlockRuleset:
    """A ruleset built once in the server: read/execute anywhere except ``/proc``, write only
    beneath ``writable``; with ABI >= 4 no TCP bind/connect, with ABI >= 6 no signals or
    abstract unix sockets outside the sandboxed process. Children call :meth:`restrict`."""

    def __init__(self, writable: str, extra_read: tuple[str, ...] = ()) -> None:
        self.abi = landlock_abi()
        if self.abi < 1:
            raise OSError(errno.ENOSYS, "Landlock unavailable")
        fs = _LL_FS_V1
        if self.abi >= 2:
            fs |= LL_REFER
        if self.abi >= 3:
            fs |= LL_TRUNCATE
        self.handled_fs = fs
        self.net = self.abi >= 4
        self.scoped = self.abi >= 6
        if self.scoped:
            attr = struct.pack("QQQ", fs, _LL_NET_TCP, _LL_SCOPE)
        elif self.net:
            attr = struct.pack("QQ", fs, _LL_NET_TCP)
        else:
            attr = struct.pack("Q", fs)
        abuf = ctypes.create_string_buffer(attr, len(attr))
        self.fd = _syscall("landlock_create_ruleset", abuf, len(attr), 0)
        read = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
        for entry in sorted(os.listdir("/")):
            if entry == "proc":
                continue
            self._allow("/" + entry, read)
        for path in extra_read:
            self._allow(path, read)
        self._allow("/dev/null", LL_READ_FILE | LL_WRITE_FILE)
        self._allow(writable, fs)

    def _allow(self, path: str, access: int) -> None:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return
        try:
            if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                access &= _LL_FILE_RIGHTS
            access &= self.handled_fs
            attr = struct.pack("=Qi", access, pfd)  # struct landlock_path_beneath_attr (packed)
            abuf = ctypes.create_string_buffer(attr, len(attr))
            _syscall("landlock_add_rule", self.fd, 1, abuf, 0)  # LANDLOCK_RULE_PATH_BENEATH
        finally:
            os.close(pfd)

    def restrict(self) -> None:
        """Enforce on the calling process (needs no_new_privs, set here)."""
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall("landlock_restrict_self", self.fd, 0)

    def close(self) -> None:
        os.close(self.fd)
