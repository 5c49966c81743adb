"""The fork server: preloads math/sympy/numpy/scipy once, then forks one short-lived, locked-down
child per program.

Started by :class:`rstar.sandbox.Sandbox` as ``python -m rstar.sandbox._server FD PPID BASE
CONFIG_JSON``. It talks to the parent over the inherited unix socket ``FD`` (4-byte big-endian
length + JSON). Every program runs in a fresh ``fork()`` of the warmed-up server, so each run
starts from the same clean state and nothing it does (globals, monkeypatched modules, leaked
threads, signal handlers) survives it. The child reports back over a pipe with a tiny binary
frame that the server parses defensively: the child is untrusted.
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
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, NoReturn

from rstar.sandbox import _linux

log = logging.getLogger("rstar.sandbox.server")

# Child -> server result frame: MAGIC, status byte, then stdout/value/error as u32 length
# (0xFFFFFFFF = None) + UTF-8 (surrogatepass).
MAGIC = b"RSB1"
CHILD_STATUS = {0: "ok", 1: "error", 2: "memory", 3: "output_limit", 4: "forbidden"}
_NONE = 0xFFFFFFFF
ERROR_CHARS = 8192
RUNNER_FAILED = 70  # child exit status when the runner itself could not report
EXTRA_STDLIB = ("fractions", "decimal", "itertools", "functools", "collections", "statistics",
                "random", "cmath", "re", "string", "datetime", "heapq", "bisect", "operator",
                "copy", "typing", "numbers", "tempfile", "threading")

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


def _encode(status: int, stdout: str, value: str | None, error: str | None) -> bytes:
    parts = [MAGIC, bytes((status,))]
    for s in (stdout, value, error):
        if s is None:
            parts.append(_NONE.to_bytes(4, "big"))
        else:
            b = s.encode("utf-8", "surrogatepass")
            parts.append(len(b).to_bytes(4, "big"))
            parts.append(b)
    return b"".join(parts)


def decode_child(data: bytes) -> tuple[str, str, str | None, str | None] | None:
    """Parse a child's frame; None if it is malformed or truncated (child is untrusted)."""
    if len(data) < 5 or data[:4] != MAGIC or data[4] not in CHILD_STATUS:
        return None
    pos = 5
    out: list[str | None] = []
    for _ in range(3):
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
    return CHILD_STATUS[data[4]], out[0], out[1], out[2]


def format_exception(e: BaseException) -> str:
    """Traceback-last-line style 'TypeName: message' (just 'TypeName' without a message)."""
    try:
        msg = str(e)
    except BaseException:  # noqa: BLE001 - a hostile __str__
        msg = "<unprintable>"
    name = type(e).__name__
    text = f"{name}: {msg}" if msg else name
    return text[:ERROR_CHARS]


def _run_program(code: str, wfd: int, cap: int, deadline: float) -> NoReturn:
    """Execute ``code`` as a notebook cell would and report over ``wfd``. Never returns."""
    write, exit_, monotonic = os.write, os._exit, time.monotonic
    count_threads = __import__("_thread")._count

    def send(status: int, stdout: str, value: str | None, error: str | None) -> NoReturn:
        data = memoryview(_encode(status, stdout, value, error))
        while data:
            data = data[write(wfd, data):]
        exit_(0)

    def overflow(partial: str) -> NoReturn:
        send(3, partial, None, f"OutputLimitExceeded: more than {cap} characters of output")

    out = _Capture(cap, overflow)
    sys.stdout = out
    sys.stderr = _Discard()
    sys.stdin = io.StringIO("")
    status, value, error = 0, None, None
    set_limit, limit = sys.setrecursionlimit, sys.getrecursionlimit()
    saved_builtins = dict(builtins.__dict__)
    bdict = builtins.__dict__

    def restore() -> None:  # the program may have deleted or replaced builtins we use below
        set_limit(limit)
        bdict.clear()
        bdict.update(saved_builtins)

    try:
        tree = ast.parse(code, "<string>", "exec")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        env: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        exec(compile(tree, "<string>", "exec"), env)
        result = None
        if last is not None:
            result = eval(compile(ast.Expression(last.value), "<string>", "eval"), env)
        restore()
        if result is not None:
            value = repr(result)
            if len(value) > cap:
                send(3, out.getvalue(), None,
                     f"OutputLimitExceeded: final value longer than {cap} characters")
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
    send(status, out.getvalue(), value, error)


# ---------------------------------------------------------------------------- server side


class ForkServer:
    """One preloaded process; runs programs one at a time, each in a fresh locked-down fork."""

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

    # -- startup -------------------------------------------------------------------------

    def setup(self) -> None:
        if self.cfg.isolate_network:
            try:
                _linux.unshare_network()
                self.isolation["network_namespace"] = True
            except OSError as e:
                self.problems.append(f"network namespace: {e}")
        for name in (*self.cfg.preload, *EXTRA_STDLIB):
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
        self.as_limit = self._vm_size() + self.cfg.memory_mb * 2**20
        self._probe()
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
                    self._lockdown(w, self.scratch, report=True)
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

    def _lockdown(self, wfd: int, rundir: str, report: bool = False) -> None:
        """Everything a child does before running user code (in this order for a reason:
        seccomp last, since it forbids some calls made before it)."""

        def step(layer: str, fn: Any) -> None:
            try:
                fn()
            except OSError as e:
                if not report:
                    raise
                os.write(wfd, f"{layer}:{e}".encode())
                os._exit(0)

        os.setpgid(0, 0)
        _linux.set_pdeathsig(signal.SIGKILL)
        if os.getppid() != self.pid:
            os._exit(0)
        for fd in (0, 1, 2):
            os.dup2(self.devnull, fd)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # too-big writes fail with EFBIG
        import resource

        cpu = max(1, math.ceil(self.cfg.cpu_time_s))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (self.as_limit, self.as_limit))
        resource.setrlimit(resource.RLIMIT_NOFILE,
                           (self.cfg.max_open_files, self.cfg.max_open_files))
        fsize = self.cfg.max_file_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self.ruleset is not None:
            step("landlock", self.ruleset.restrict)
        os.closerange(3, wfd)  # the parent socket, the ruleset, /dev/null...
        os.closerange(wfd + 1, 1 << 20)
        if self.drop_caps:
            step("capabilities", _linux.drop_capabilities)
        os.chdir(rundir)
        os.environ["TMPDIR"] = os.environ["HOME"] = rundir
        import tempfile

        tempfile.tempdir = rundir
        if self.seccomp is not None:
            seccomp = self.seccomp
            step("seccomp", lambda: seccomp.install(os.getpid()))

    # -- one run -------------------------------------------------------------------------

    def run(self, code: str) -> dict[str, Any]:
        self.seq += 1
        rundir = os.path.join(self.scratch, f"run{self.seq}")
        os.mkdir(rundir, 0o700)
        r, w = os.pipe()
        t0 = time.monotonic()
        deadline = t0 + self.cfg.timeout_s
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(r)
                self._lockdown(w, rundir)
                _run_program(code, w, self.cfg.max_output_chars, deadline)
            finally:
                os._exit(RUNNER_FAILED)
        os.close(w)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        try:
            return self._collect(pid, r, t0, deadline)
        finally:
            os.close(r)
            self._clean_scratch()

    def _kill(self, pid: int) -> None:
        for fn in (os.killpg, os.kill):
            try:
                fn(pid, signal.SIGKILL)
                return
            except OSError:
                continue

    def _collect(self, pid: int, r: int, t0: float, deadline: float) -> dict[str, Any]:
        cap = self.cfg.max_output_chars
        max_bytes = 4 * (2 * cap + ERROR_CHARS) + 64
        buf = bytearray()
        timed_out = over = False
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        poller.register(r, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        reading = True
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    self._kill(pid)
                    break
                events = poller.poll(remaining * 1000)
                exited = False
                for fd, _ in events:
                    if fd == r and reading:
                        chunk = os.read(r, 1 << 16)
                        if chunk:
                            buf += chunk
                            if len(buf) > max_bytes:
                                over = True
                        else:
                            reading = False
                            poller.unregister(r)
                    elif fd == pidfd:
                        exited = True
                if over:
                    self._kill(pid)
                    break
                if exited:
                    break
        finally:
            os.close(pidfd)
        _, wstatus, rusage = os.wait4(pid, 0)
        duration = time.monotonic() - t0
        if reading and not over:  # drain what the child wrote before it exited
            os.set_blocking(r, False)
            try:
                while len(buf) <= max_bytes:
                    chunk = os.read(r, 1 << 16)
                    if not chunk:
                        break
                    buf += chunk
            except BlockingIOError:
                pass
        res: dict[str, Any] = {"stdout": "", "value": None, "error": None,
                               "duration": duration}
        parsed = decode_child(bytes(buf)) if not over else None
        if parsed is not None:
            res["status"], res["stdout"], res["value"], res["error"] = parsed
            return res
        res.update(self._classify(wstatus, rusage, timed_out, over))
        return res

    def _classify(self, wstatus: int, rusage: Any, timed_out: bool, over: bool
                  ) -> dict[str, Any]:
        cpu_used = rusage.ru_utime + rusage.ru_stime
        cpu_limit = max(1, math.ceil(self.cfg.cpu_time_s))
        if over:
            return {"status": "output_limit",
                    "error": f"OutputLimitExceeded: more than {self.cfg.max_output_chars} "
                             "characters of output"}
        if timed_out:
            return {"status": "timeout", "error": f"TimeoutError: execution exceeded the "
                                                  f"{self.cfg.timeout_s:g} s wall-clock limit"}
        if os.WIFSIGNALED(wstatus):
            sig = os.WTERMSIG(wstatus)
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= cpu_limit - 0.1):
                return {"status": "timeout", "error": f"TimeoutError: execution exceeded the "
                                                      f"{cpu_limit} s CPU-time limit"}
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

    def _clean_scratch(self) -> None:
        try:
            entries = os.listdir(self.scratch)
        except OSError:
            return
        for name in entries:
            path = os.path.join(self.scratch, name)
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, onerror=_force_remove)
                else:
                    os.unlink(path)
            except OSError as e:
                log.warning("could not remove %s: %s", path, e)

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
    cfg = ServerConfig(**raw)
    sock = socket.socket(fileno=fd)
    server = ForkServer(sock, base, cfg)
    server.setup()
    try:
        server.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        shutil.rmtree(server.scratch, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
