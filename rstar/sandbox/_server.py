"""The fork server: preloads math/sympy/numpy/scipy once, then runs programs in locked-down
children forked from it.

Started by :class:`rstar.sandbox.Sandbox` as ``python -m rstar.sandbox._server FD PPID BASE
CONFIG_JSON``. It talks to the parent over the inherited unix socket ``FD`` (4-byte big-endian
length + JSON). Two modes:

* **reuse** (``fresh_process_per_run=False``, the pool's default): a child is forked and
  locked down once, then runs programs one after another, each in fresh globals, and is
  recycled (exits; the next program gets a fresh fork) whenever anything could leak into the
  next program: a non-OK/ERROR outcome, a program the static screen (``_screen``) marks as
  tainting, a runtime fingerprint mismatch (``_state``), more threads or fds than it
  started with, accumulated CPU time or address-space growth over budget, or
  ``max_runs_per_child`` programs.
* **strict** (``fresh_process_per_run=True``): one fresh fork per program, which exits after
  it; nothing it does survives it.

Server -> child: ``struct(">IdB")`` (program length, wall deadline on CLOCK_MONOTONIC, last)
+ the program as UTF-8. Child -> server: in reuse mode a screen frame ``b"P" + tainted +
len + reason`` sent *before* the program starts (so the program cannot change it), then the
result frame ``b"R" + u32 length + body``, parsed defensively: the child is untrusted.
"""

from __future__ import annotations

import ast
import builtins
import gc
import importlib
import io
import json
import logging
import math
import os
import select
import shutil
import signal
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from rstar.sandbox import _linux
from rstar.sandbox._screen import screen
from rstar.sandbox._state import Pristine

log = logging.getLogger("rstar.sandbox.server")

# Result frame body: MAGIC, status byte, then stdout/value/error/recycle as u32 length
# (0xFFFFFFFF = None) + UTF-8 (surrogatepass). ``recycle`` is why the child will not take
# another program ("reason" or "reason: detail"), None when it can.
MAGIC = b"RSB2"
CHILD_STATUS = {0: "ok", 1: "error", 2: "memory", 3: "output_limit", 4: "forbidden"}
_NONE = 0xFFFFFFFF
ERROR_CHARS = 8192
RUNNER_FAILED = 70  # child exit status when the runner itself could not report
EXTRA_STDLIB = ("fractions", "decimal", "itertools", "functools", "collections", "statistics",
                "random", "cmath", "re", "string", "datetime", "heapq", "bisect", "operator",
                "copy", "typing", "numbers", "tempfile", "threading", "resource")
# Submodules step programs import often, loaded with their package so that importing them
# is not a new module (which would recycle a reused child).
EXTRA_PRELOAD = {"sympy": ("sympy.abc",),
                 "numpy": ("numpy.random", "numpy.linalg", "numpy.fft", "numpy.polynomial")}
_REQ = struct.Struct(">IdB")
_CPU_BACKSTOP_S = 1  # reuse mode: RLIMIT_CPU = CPU limit + this, a kernel backstop
_CPU_POLL_S = 0.1  # reuse mode: the server checks a running program's CPU time this often
_CHILD_FDS = 5  # 0, 1, 2 (/dev/null), the request pipe, the result pipe
_HZ = os.sysconf("SC_CLK_TCK")

WARMUP_SYMPY = """
import sympy as sp
x, y, z = sp.symbols('x y z')
n = sp.Symbol('n', integer=True, positive=True)
sp.solve(x**2 - 5*x + 6, x); sp.solve([x + y - 3, x - y - 1], [x, y]); sp.solveset(x**2 - 4, x)
sp.simplify(sp.sin(x)**2 + sp.cos(x)**2); sp.factor(x**3 - y**3); sp.expand((x + 1)**5)
sp.Rational(3, 4) + sp.sqrt(8); sp.N(sp.pi, 20); sp.nsimplify(0.5); sp.Eq(x + 1, 2)
sp.integrate(x**2, (x, 0, 1)); sp.diff(sp.exp(x) * x, x); sp.limit(sp.sin(x) / x, x, 0)
sp.summation(n, (n, 1, 10)); sp.binomial(10, 3); sp.isprime(97); sp.factorint(360)
sp.gcd(12, 18); sp.lcm(4, 6); sp.Matrix([[1, 2], [3, 4]]).det(); sp.roots(sp.Poly(x**2 + 1, x))
sp.nsolve(x**2 - 2, x, 1); sp.floor(sp.Rational(7, 2)); sp.trigsimp(sp.sin(2*x)); sp.log(8, 2)
str(sp.sqrt(2) / 2); repr(sp.Rational(1, 3)); sp.latex(x**2); sp.N(sp.sqrt(2)); sp.Abs(-x)
"""
WARMUP_NUMPY = """
import numpy as np
a = np.arange(10.0); a.sum(); a.mean(); np.linalg.solve(np.eye(2), np.ones(2)); repr(a)
np.round(np.array([1.23456]), 2); np.polyfit(a, a, 1); np.roots([1, -3, 2]); str(np.float64(1.5))
"""
WARMUP_SCIPY = """
import scipy.optimize, scipy.special, scipy.integrate
scipy.optimize.brentq(lambda t: t * t - 2, 0, 2); scipy.special.comb(10, 3)
scipy.integrate.quad(lambda t: t, 0, 1)
"""




@dataclass
class ServerConfig:
    timeout_s: float
    cpu_time_s: float
    memory_mb: int
    max_output_chars: int
    max_open_files: int
    max_file_mb: int
    isolate_network: bool
    preload: tuple[str, ...]
    warmup: bool
    # Defaults: a pool that does not send these (an older one) gets one fork per program.
    fresh_process_per_run: bool = True
    max_runs_per_child: int = 256
    recycle_cpu_s: float = 0.5
    recycle_memory_mb: int = 64


# ------------------------------------------------------------------------- framing helpers


def send_frame(sock: socket.socket, obj: dict[str, Any]) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> dict[str, Any] | None:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    body = _recv_exact(sock, struct.unpack(">I", head)[0])
    return None if body is None else json.loads(body)


# ---------------------------------------------------------------------------- child side


class _Capture(io.TextIOBase):
    """sys.stdout of a run: keeps at most ``cap`` characters, then ends the run."""

    def __init__(self, cap: int, overflow: Any) -> None:
        self._parts: list[str] = []
        self._n = 0
        self._cap = cap
        self._overflow = overflow

    def write(self, s: str) -> int:  # type: ignore[override]
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self._cap - self._n
        self._n += len(s)
        if len(s) > room:
            self._parts.append(s[:room])
            self._overflow(self.getvalue())
        self._parts.append(s)
        return len(s)

    def getvalue(self) -> str:
        return "".join(self._parts)

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False


class _Discard(io.TextIOBase):
    def write(self, s: str) -> int:  # type: ignore[override]
        return len(s)

    def writable(self) -> bool:
        return True


def _encode(status: int, stdout: str, value: str | None, error: str | None,
            recycle: str | None) -> bytes:
    parts = [MAGIC, bytes((status,))]
    for s in (stdout, value, error, recycle):
        if s is None:
            parts.append(_NONE.to_bytes(4, "big"))
        else:
            b = s.encode("utf-8", "surrogatepass")
            parts.append(len(b).to_bytes(4, "big"))
            parts.append(b)
    body = b"".join(parts)
    return b"R" + len(body).to_bytes(4, "big") + body


def _screen_frame(taint: str | None) -> bytes:
    reason = (taint or "").encode("ascii", "replace")[:255]
    return b"P" + bytes((taint is not None, len(reason))) + reason


def decode_child(body: bytes) -> tuple[str, str, str | None, str | None, str | None] | None:
    """Parse a result frame's body; None if malformed or truncated (child is untrusted)."""
    data = body
    if len(data) < 5 or data[:4] != MAGIC or data[4] not in CHILD_STATUS:
        return None
    pos = 5
    out: list[str | None] = []
    for _ in range(4):
        if pos + 4 > len(data):
            return None
        n = int.from_bytes(data[pos:pos + 4], "big")
        pos += 4
        if n == _NONE:
            out.append(None)
            continue
        if pos + n > len(data):
            return None
        try:
            out.append(data[pos:pos + n].decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            return None
        pos += n
    if pos != len(data) or out[0] is None:
        return None
    return CHILD_STATUS[data[4]], out[0], out[1], out[2], out[3]


@dataclass
class _Frames:
    """What the server has read from a child so far."""

    screened: bool = False  # the screen frame arrived (the program compiled and started)
    taint: str | None = None
    body: bytes | None = None  # the result frame's body, once complete
    extra: bool = False  # bytes after the result frame
    malformed: bool = False


def parse_frames(buf: bytes | bytearray) -> _Frames:
    f = _Frames()
    pos = 0
    if buf[:1] == b"P":
        if len(buf) < 3 or len(buf) < 3 + buf[2]:
            return f
        f.screened = True
        if buf[1]:
            f.taint = bytes(buf[3:3 + buf[2]]).decode("ascii", "replace") or "tainted"
        pos = 3 + buf[2]
    if len(buf) <= pos:
        return f
    if buf[pos:pos + 1] != b"R":
        f.malformed = True
        return f
    if len(buf) < pos + 5:
        return f
    n = int.from_bytes(buf[pos + 1:pos + 5], "big")
    end = pos + 5 + n
    if len(buf) >= end:
        f.body = bytes(buf[pos + 5:end])
        f.extra = len(buf) > end
    return f


def format_exception(e: BaseException) -> str:
    """Traceback-last-line style 'TypeName: message' (just 'TypeName' without a message)."""
    try:
        msg = str(e)
    except BaseException:  # noqa: BLE001 - a hostile __str__
        msg = "<unprintable>"
    name = type(e).__name__
    text = f"{name}: {msg}" if msg else name
    return text[:ERROR_CHARS]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _child_main(rfd: int, wfd: int, cap: int, rundir: str, pristine: Pristine | None
                ) -> NoReturn:
    """A locked-down child: read programs from ``rfd`` and run them until told it is the
    last one, until one may have left state behind (reuse mode: ``pristine`` is the
    server's snapshot, inherited through fork), or until EOF."""
    exit_ = os._exit
    state: Pristine | str | None = None
    if pristine is not None:
        try:
            pristine.child_started()
            state = pristine
        except Exception as e:  # noqa: BLE001 - then the child exits after one program
            state = f"state: no snapshot ({type(e).__name__}: {e})"[:200]
    while True:
        head = _read_exact(rfd, _REQ.size)
        if head is None:
            exit_(0)
        n, deadline, last = _REQ.unpack(head)
        body = _read_exact(rfd, n)
        if body is None:
            exit_(0)
        code = body.decode("utf-8", "surrogatepass")
        if not _run_program(code, wfd, cap, deadline, state, bool(last), rundir):
            exit_(0)


def _run_program(code: str, wfd: int, cap: int, deadline: float,
                 state: Pristine | str | None, last: bool, rundir: str) -> bool:
    """Execute ``code`` as a notebook cell would and report over ``wfd``. Returns True when
    the child may run another program (reuse mode, nothing leaked), else the caller exits.
    ``state`` is None in strict mode, the pristine snapshot in reuse mode (a string: why
    there is none, and the child exits after this program)."""
    write_all, exit_, monotonic = _write_all, os._exit, time.monotonic
    count_threads = __import__("_thread")._count
    reuse = state is not None
    no_snapshot = state if isinstance(state, str) else None
    if no_snapshot is not None:
        state = None

    def send(status: int, stdout: str, value: str | None, error: str | None,
             recycle: str | None) -> None:
        write_all(wfd, _encode(status, stdout, value, error, recycle))

    def overflow(partial: str) -> NoReturn:
        send(3, partial, None, f"OutputLimitExceeded: more than {cap} characters of output",
             "status")
        exit_(0)

    out = _Capture(cap, overflow)
    sys.stdout = out
    sys.stderr = _Discard()
    sys.stdin = io.StringIO("")
    status, value, error = 0, None, None
    set_limit, limit = sys.setrecursionlimit, sys.getrecursionlimit()
    saved_builtins = dict(builtins.__dict__) if state is None else None
    restore_builtins = state.restore_builtins if state is not None else None
    bdict = builtins.__dict__
    taint: str | None = None

    def restore() -> None:  # the program may have deleted or replaced builtins we use below
        set_limit(limit)
        if restore_builtins is not None:
            restore_builtins()
        else:
            bdict.clear()
            bdict.update(saved_builtins)

    env: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
    result: Any = None
    try:
        tree = ast.parse(code, "<string>", "exec")
        last_expr = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        body = compile(tree, "<string>", "exec")
        tail = None
        if last_expr is not None:
            tail = compile(ast.Expression(last_expr.value), "<string>", "eval")
        if reuse:
            try:
                taint = screen(body) or (screen(tail) if tail is not None else None)
            except Exception as e:  # noqa: BLE001 - cannot tell: do not reuse
                taint = f"screen failed ({type(e).__name__})"
            write_all(wfd, _screen_frame(taint))  # before the program can run
        exec(body, env)
        if tail is not None:
            result = eval(tail, env)
        restore()
        if result is not None:
            value = repr(result)
            if len(value) > cap:
                send(3, out.getvalue(), None,
                     f"OutputLimitExceeded: final value longer than {cap} characters", "status")
                exit_(0)
        main = threading.main_thread()
        for t in threading.enumerate():
            if t is not main and not t.daemon:
                t.join(max(deadline - monotonic(), 0.0))
        for _ in range(20):  # a just-finished thread may need a moment to unregister
            if count_threads() == 0:
                break
            time.sleep(0.001)
        else:
            status = 4
            error = (f"SandboxViolation: {count_threads()} thread(s) still running after the "
                     "program ended")
    except MemoryError as e:
        restore()
        status, value, error = 2, None, format_exception(e)
    except BaseException as e:  # noqa: BLE001 - SystemExit/KeyboardInterrupt are failures too
        restore()
        status, value, error = 1, None, format_exception(e)
    stdout = out.getvalue()
    if not reuse:
        recycle: str | None = "strict"
    elif no_snapshot is not None or state is None:
        recycle = no_snapshot
    elif status > 1:
        recycle = "status"
    elif taint is not None:
        recycle = f"taint: {taint}"
    elif last:
        recycle = "runs"
    else:
        # Drop the program's objects now (a generator's ``finally`` or a file's close runs
        # here, not in the next program), then put known state back and check the rest.
        sys.stdout = sys.stderr
        result = None
        try:
            env.clear()
            changed = state.reset(rundir)
        except BaseException as e:  # noqa: BLE001
            changed = f"cleanup failed ({type(e).__name__})"
        recycle = f"state: {changed}" if changed is not None else None
    send(status, stdout, value, error, recycle)
    return recycle is None


# ---------------------------------------------------------------------------- server side


@dataclass
class _Child:
    pid: int
    pidfd: int
    req: int  # write end of the request pipe (non-blocking)
    res: int  # read end of the result pipe
    rundir: str
    stat: int  # /proc/PID/stat, kept open
    poller: Any  # select.poll with res and pidfd registered
    runs: int = 0
    cpu_ticks: int = 0  # the child's CPU time (clock ticks) when its last program ended
    waited: tuple[int, Any] | None = None  # (wait status, rusage) once reaped


class ForkServer:
    """One preloaded process; runs programs one at a time in locked-down forks of itself."""

    def __init__(self, sock: socket.socket, base: str, cfg: ServerConfig) -> None:
        self.sock = sock
        self.cfg = cfg
        self.pid = os.getpid()
        self.scratch = os.path.join(base, "w")
        os.makedirs(self.scratch, mode=0o700, exist_ok=True)
        self.isolation: dict[str, Any] = {"network_namespace": False, "landlock_abi": 0,
                                          "seccomp": False, "drop_capabilities": False,
                                          "rlimits": True}
        self.problems: list[str] = []
        self.ruleset: _linux.LandlockRuleset | None = None
        self.seccomp: _linux.SeccompProgram | None = None
        self.drop_caps = False
        self.seq = 0
        self.as_limit = 0
        self.devnull = os.open(os.devnull, os.O_RDWR)
        self.cpu_limit = max(1, math.ceil(cfg.cpu_time_s))
        self.recycle_ticks = cfg.recycle_cpu_s * _HZ
        self.base_as = 0  # the server's address space once warmed up (RLIMIT_AS base)
        self._set_mode(reuse=not cfg.fresh_process_per_run)
        self.pristine: Pristine | None = None
        self.child: _Child | None = None
        self.base_vsize = 0
        self.forks = 0  # since the last result sent

    # -- startup -------------------------------------------------------------------------

    def _set_mode(self, reuse: bool) -> None:
        self.reuse = reuse
        self.cpu_soft = self.cpu_limit + (_CPU_BACKSTOP_S if reuse else 0)
        self.growth = self.cfg.recycle_memory_mb * 2**20 if reuse else 0
        self.as_limit = self.base_as + self.cfg.memory_mb * 2**20 + self.growth

    def setup(self) -> None:
        if self.cfg.isolate_network:
            try:
                _linux.unshare_network()
                self.isolation["network_namespace"] = True
            except OSError as e:
                self.problems.append(f"network namespace: {e}")
        extra = [m for pkg in self.cfg.preload for m in EXTRA_PRELOAD.get(pkg, ())]
        for name in (*self.cfg.preload, *EXTRA_STDLIB, *extra):
            try:
                importlib.import_module(name)
            except Exception as e:  # noqa: BLE001 - a missing optional module is not fatal
                self.problems.append(f"preload {name}: {e}")
        if self.cfg.warmup:
            for mod, src in (("sympy", WARMUP_SYMPY), ("numpy", WARMUP_NUMPY),
                             ("scipy", WARMUP_SCIPY)):
                if mod in self.cfg.preload and mod in sys.modules:
                    try:
                        exec(compile(src, f"<warmup {mod}>", "exec"), {})
                    except Exception as e:  # noqa: BLE001
                        self.problems.append(f"warmup {mod}: {e}")
        try:
            self.ruleset = _linux.LandlockRuleset(self.scratch)
        except OSError as e:
            self.problems.append(f"landlock: {e}")
        try:
            self.seccomp = _linux.SeccompProgram()
        except OSError as e:
            self.problems.append(f"seccomp: {e}")
        self.drop_caps = os.geteuid() == 0
        self.base_as = self._vm_size()
        self._set_mode(self.reuse)
        self._probe()
        if self.reuse:
            # Taken here, not in each child: copying the module dicts in a child would touch
            # (and copy-on-write) thousands of pages, ~20-30 ms per child.
            try:
                self.pristine = Pristine()
            except Exception as e:  # noqa: BLE001
                self.problems.append(f"reuse mode off, no state snapshot: "
                                     f"{type(e).__name__}: {e}")
                self._set_mode(reuse=False)
        gc.collect()
        gc.freeze()  # children's GC then never walks (and copies) the preloaded heap

    @staticmethod
    def _vm_size() -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
        return 0

    def _probe(self) -> None:
        """Fork once with every layer on; drop (and report) any layer the kernel refuses."""
        for _ in range(4):
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    os.close(r)
                    self._lockdown((w,), self.scratch, report_fd=w)
                except BaseException:  # noqa: BLE001
                    code = 1
                os._exit(code)
            os.close(w)
            with os.fdopen(r, "rb") as f:
                failed = f.read().decode(errors="replace")
            os.waitpid(pid, 0)
            if not failed:
                break
            layer, _, why = failed.partition(":")
            self.problems.append(f"{layer}: {why}")
            if layer == "landlock":
                self.ruleset = None
            elif layer == "seccomp":
                self.seccomp = None
            elif layer == "capabilities":
                self.drop_caps = False
            else:
                break
        self.isolation["landlock_abi"] = self.ruleset.abi if self.ruleset else 0
        self.isolation["seccomp"] = self.seccomp is not None
        self.isolation["drop_capabilities"] = self.drop_caps

    # -- the child -----------------------------------------------------------------------

    def _lockdown(self, keep: tuple[int, ...], rundir: str, report_fd: int | None = None
                  ) -> None:
        """Everything a child does before running user code (in this order for a reason:
        seccomp last, since it forbids some calls made before it)."""

        def step(layer: str, fn: Any) -> None:
            try:
                fn()
            except OSError as e:
                if report_fd is None:
                    raise
                os.write(report_fd, f"{layer}:{e}".encode())
                os._exit(0)

        os.setpgid(0, 0)
        _linux.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(0)
        for fd in (0, 1, 2):
            os.dup2(self.devnull, fd)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too-big writes fail with EFBIG
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_soft, self.cpu_soft + 1))
        resource.setrlimit(resource.RLIMIT_AS, (self.as_limit, self.as_limit))
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (self.cfg.max_open_files, self.cfg.max_open_files))
        fsize = self.cfg.max_file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.ruleset is not None:
            step("landlock", self.ruleset.restrict)
        lo = 3
        for fd in sorted(keep):  # close the parent socket, the ruleset, /dev/null...
            os.closerange(lo, fd)
            lo = fd + 1
        os.closerange(lo, 1 << 20)
        if self.drop_caps:
            step("capabilities", _linux.drop_capabilities)
        os.chdir(rundir)
        os.environ["TMPDIR"] = os.environ["HOME"] = rundir
        import tempfile

        tempfile.tempdir = rundir
        if self.seccomp is not None:
            seccomp = self.seccomp
            step("seccomp", lambda: seccomp.install(os.getpid()))

    def _spawn(self) -> _Child:
        if self.pristine is not None:
            self.pristine.refresh()  # in case the server itself changed something since
        self.seq += 1
        rundir = os.path.join(self.scratch, f"run{self.seq}")
        os.mkdir(rundir, 0o700)
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(req_w)
                os.close(res_r)
                self._lockdown((req_r, res_w), rundir)
                _child_main(req_r, res_w, self.cfg.max_output_chars, rundir,
                            self.pristine if self.reuse else None)
            finally:
                os._exit(RUNNER_FAILED)
        os.close(req_r)
        os.close(res_w)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        os.set_blocking(req_w, False)
        self.forks += 1
        if self.reuse:
            self.base_vsize = self._vm_size()
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(res_r, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        stat_fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        self.child = _Child(pid, pidfd, req_w, res_r, rundir, stat_fd, poller)
        return self.child

    # -- one run -------------------------------------------------------------------------

    def run(self, code: str) -> dict[str, Any]:
        t0 = time.monotonic()
        deadline = t0 + self.cfg.timeout_s
        ch = self.child if self.child is not None else self._spawn()
        ch.runs += 1
        last = not self.reuse or ch.runs >= self.cfg.max_runs_per_child
        data = code.encode("utf-8", "surrogatepass")
        request = _REQ.pack(len(data), deadline, last) + data
        res, recycle = self._collect(ch, request, t0, deadline)
        if recycle is None:
            recycle = self._check_child(ch)
        if recycle is None and not self._clean_scratch(keep=ch.rundir):
            recycle = "scratch"
        if recycle is not None:
            self._reap(ch)
            self._clean_scratch()
        reason, _, detail = (recycle or "").partition(": ")
        res["recycled"] = reason or None
        res["recycle_detail"] = detail or None
        res["worker"] = self.child.pid if self.child is not None else None
        res["forks"] = self.forks
        self.forks = 0
        return res

    def _kill(self, pid: int) -> None:
        for fn in (os.killpg, os.kill):
            try:
                fn(pid, signal.SIGKILL)
                return
            except OSError:
                continue

    def _reap(self, ch: _Child) -> tuple[int, Any]:
        """Kill (if still running) and wait for a child, once; close its pipes."""
        if ch.waited is None:
            self._kill(ch.pid)
            _, wstatus, rusage = os.wait4(ch.pid, 0)
            ch.waited = (wstatus, rusage)
            for fd in (ch.req, ch.res, ch.pidfd, ch.stat):
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.child is ch:
            self.child = None
        return ch.waited

    @staticmethod
    def _stat(ch: _Child) -> tuple[int, int, int]:
        """(CPU clock ticks, threads, virtual size) of a child, from /proc/PID/stat."""
        data = os.pread(ch.stat, 4096, 0)
        rest = data[data.rindex(b")") + 2:].split()
        return int(rest[11]) + int(rest[12]), int(rest[17]), int(rest[20])

    def _check_child(self, ch: _Child) -> str | None:
        """Server-side checks before a child takes another program (None: it may)."""
        try:
            ticks, threads, vsize = self._stat(ch)
            fd_dir = f"/proc/{ch.pid}/fd"
            fds = os.stat(fd_dir).st_size or len(os.listdir(fd_dir))  # size: Linux >= 6.2
        except (OSError, ValueError, IndexError):
            return "status: child vanished"
        ch.cpu_ticks = ticks
        if threads != 1:
            return f"threads: {threads}"
        if fds != _CHILD_FDS:
            return f"fds: {fds}"
        if ticks >= self.recycle_ticks:
            return f"cpu: {ticks / _HZ:.2f} s"
        if vsize > self.base_vsize + self.growth:
            return f"memory: +{(vsize - self.base_vsize) >> 20} MB"
        return None

    def _collect(self, ch: _Child, request: bytes, t0: float, deadline: float
                 ) -> tuple[dict[str, Any], str | None]:
        """Send ``request``, wait for the result. Returns (result, why the child must not be
        reused or None); a child that must not be reused may still be running."""
        cap = self.cfg.max_output_chars
        max_bytes = 4 * (2 * cap + ERROR_CHARS) + 4096
        buf = bytearray()
        pending = memoryview(request)
        timed_out = over = cpu_over = exited = False
        frames = _Frames()
        try:  # usually the whole request fits in the pipe at once
            pending = pending[os.write(ch.req, pending):]
        except BlockingIOError:
            pass
        except OSError:  # the child is gone; its exit is noticed below
            pending = pending[:0]
        poller = ch.poller
        if pending:
            poller.register(ch.req, select.POLLOUT)
        reading = True
        next_cpu = t0 + _CPU_POLL_S if self.reuse else math.inf
        while True:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if now >= next_cpu:
                try:
                    ticks = self._stat(ch)[0]
                except (OSError, ValueError, IndexError):
                    ticks = ch.cpu_ticks
                if (ticks - ch.cpu_ticks) / _HZ >= self.cpu_limit:
                    cpu_over = True
                    break
                next_cpu = now + _CPU_POLL_S
            events = poller.poll(max(0.0, min(deadline, next_cpu) - now) * 1000)
            for fd, _ in events:
                if fd == ch.req:
                    try:
                        pending = pending[os.write(ch.req, pending[:1 << 16]):]
                    except BlockingIOError:
                        continue
                    except OSError:  # the child is gone; its exit is noticed below
                        pending = pending[:0]
                    if not pending:
                        poller.unregister(ch.req)
                elif fd == ch.res and reading:
                    chunk = os.read(ch.res, 1 << 16)
                    if chunk:
                        buf += chunk
                        over = len(buf) > max_bytes
                    else:
                        reading = False
                        poller.unregister(ch.res)
                elif fd == ch.pidfd:
                    exited = True
            if over:
                break
            frames = parse_frames(buf)
            if frames.body is not None or frames.malformed or exited:
                break
        duration = time.monotonic() - t0
        if pending:
            poller.unregister(ch.req)
        if exited and reading and not over:  # drain what the child wrote before it exited
            os.set_blocking(ch.res, False)
            try:
                while len(buf) <= max_bytes:
                    chunk = os.read(ch.res, 1 << 16)
                    if not chunk:
                        break
                    buf += chunk
            except BlockingIOError:
                pass
            frames = parse_frames(buf)
        res: dict[str, Any] = {"stdout": "", "value": None, "error": None,
                               "duration": duration}
        parsed = None
        if not (over or timed_out or cpu_over) and frames.body is not None:
            parsed = decode_child(frames.body)
        if parsed is not None:
            res["status"], res["stdout"], res["value"], res["error"], recycle = parsed
            if not self.reuse:
                recycle = "strict"
            elif frames.taint is not None:
                recycle = f"taint: {frames.taint}"
            elif res["status"] not in ("ok", "error"):
                recycle = "status"
            elif recycle is None and (exited or frames.extra):
                recycle = "status: protocol"
            elif recycle is None and ch.runs >= self.cfg.max_runs_per_child:
                recycle = "runs"
            return res, recycle
        if (frames.malformed or frames.body is not None) and not (
                exited or over or timed_out or cpu_over):
            self._reap(ch)
            res.update(status="error", error="SandboxError: malformed report from the runner")
            return res, "status: protocol"
        wstatus, rusage = self._reap(ch)
        res.update(self._classify(wstatus, rusage, timed_out, over, cpu_over))
        return res, "status"

    def _classify(self, wstatus: int, rusage: Any, timed_out: bool, over: bool,
                  cpu_over: bool) -> dict[str, Any]:
        cpu_used = rusage.ru_utime + rusage.ru_stime
        cpu_limit = self.cpu_limit
        cpu_error = f"TimeoutError: execution exceeded the {cpu_limit} s CPU-time limit"
        if over:
            return {"status": "output_limit",
                    "error": f"OutputLimitExceeded: more than {self.cfg.max_output_chars} "
                             "characters of output"}
        if timed_out:
            return {"status": "timeout", "error": f"TimeoutError: execution exceeded the "
                                                  f"{self.cfg.timeout_s:g} s wall-clock limit"}
        if cpu_over:
            return {"status": "timeout", "error": cpu_error}
        if os.WIFSIGNALED(wstatus):
            sig = os.WTERMSIG(wstatus)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL
                                         and cpu_used >= self.cpu_soft - 0.1):
                return {"status": "timeout", "error": cpu_error}
            if sig == signal.SIGSYS:
                return {"status": "forbidden",
                        "error": "SandboxViolation: forbidden system call (new processes, "
                                 "exec, network sockets, signals to other processes, ...)"}
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE,
                       signal.SIGABRT):
                return {"status": "error",
                        "error": f"Crash: {name} ({signal.strsignal(sig)})"}
            return {"status": "killed", "error": f"Killed: {name}"}
        code = os.WEXITSTATUS(wstatus)
        if code == RUNNER_FAILED:
            return {"status": "error", "error": "SandboxError: the program corrupted the "
                                                "interpreter state the runner needs"}
        return {"status": "error",
                "error": f"ProcessExit: the program exited with status {code}"}

    def _clean_scratch(self, keep: str | None = None) -> bool:
        """Remove everything in the scratch dir; ``keep`` (a live child's cwd) is emptied
        instead. False when ``keep`` could not be emptied (the child must not be reused)."""
        ok = True
        try:
            entries = os.listdir(self.scratch)
        except OSError:
            return keep is None
        if keep is not None and os.path.basename(keep) not in entries:
            return False
        for name in entries:
            path = os.path.join(self.scratch, name)
            if path == keep:
                try:  # never follow a symlink the program put in its place
                    is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
                except OSError:
                    is_dir = False
                if not is_dir:
                    ok = False
                    continue
                try:
                    inner = os.listdir(path)
                except OSError:
                    ok = False
                    continue
                for sub in inner:
                    ok = _remove(os.path.join(path, sub)) and ok
            else:
                _remove(path)
        return ok

    # -- main loop -----------------------------------------------------------------------

    def serve(self) -> None:
        send_frame(self.sock, {"ready": True, "pid": self.pid, "isolation": self.isolation,
                               "problems": self.problems})
        while True:
            req = recv_frame(self.sock)
            if req is None:
                return
            res = self.run(req["code"])
            res["id"] = req["id"]
            send_frame(self.sock, res)

    def close(self) -> None:
        if self.child is not None:
            self._reap(self.child)


def _remove(path: str) -> bool:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, onerror=_force_remove)
        else:
            os.unlink(path)
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)
    return not os.path.lexists(path)


def _force_remove(func: Any, path: str, exc: Any) -> None:
    """rmtree helper: a program may chmod its own files to 000."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
    except OSError:
        pass
    try:
        func(path)
    except OSError:
        pass


def main(argv: list[str]) -> None:
    fd, ppid, base, cfg_json = int(argv[0]), int(argv[1]), argv[2], argv[3]
    _linux.set_pdeathsig(signal.SIGKILL)
    if os.getppid() != ppid:  # the parent died before we armed the death signal
        os._exit(0)
    logging.basicConfig(level=logging.WARNING, format="rstar.sandbox server: %(message)s")
    raw = json.loads(cfg_json)
    raw["preload"] = tuple(raw["preload"])
    known = ServerConfig.__dataclass_fields__
    cfg = ServerConfig(**{k: v for k, v in raw.items() if k in known})
    sock = socket.socket(fileno=fd)
    server = ForkServer(sock, base, cfg)
    server.setup()
    try:
        server.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        server.close()
        shutil.rmtree(server.scratch, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
