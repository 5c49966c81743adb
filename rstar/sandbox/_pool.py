"""The parent side: N fork servers, one dispatcher thread, an LRU cache, futures.

The dispatcher thread owns every server socket and is the only thread that starts servers,
so each server's PR_SET_PDEATHSIG is tied to a thread that lives exactly as long as the pool
(the death signal fires when the *thread* that forked the process exits).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import os
import select
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from rstar.sandbox._types import ExecResult, SandboxConfig, Status

log = logging.getLogger("rstar.sandbox")

_CACHEABLE = {Status.OK, Status.ERROR, Status.FORBIDDEN, Status.OUTPUT_LIMIT}
_GRACE_S = 5.0  # server-side deadline + this = the parent gives up on a server
_MAX_START_FAILURES = 3
_DIR_PREFIX = "rstar-sbx-"


def _key(program: str) -> bytes:
    return hashlib.blake2b(program.encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclasses.dataclass
class _Job:
    key: bytes
    program: str
    futures: list[concurrent.futures.Future[ExecResult]]
    id: int = 0


class _Server:
    """Parent's handle on one fork server process."""

    def __init__(self, index: int, sock: socket.socket, proc: subprocess.Popen[bytes],
                 base: str) -> None:
        self.index = index
        self.sock = sock
        self.proc = proc
        self.base = base
        self.buf = bytearray()
        self.ready = False
        self.job: _Job | None = None
        self.deadline = 0.0
        self.started = time.monotonic()
        self.worker: int | None = None  # its live (reuse-mode) child, as last reported


class Sandbox:
    """A reusable pool of preloaded fork servers that run untrusted Python programs.

    Thread-safe: ``submit``/``run``/``run_many`` may be called from any thread, ``arun`` from
    any event loop. Results never raise for program failures; see :class:`Status`.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        n = self.config.workers or len(os.sched_getaffinity(0))
        self._n = max(1, n)
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[bytes, ExecResult] = collections.OrderedDict()
        self._inflight: dict[bytes, _Job] = {}
        self._queue: collections.deque[_Job] = collections.deque()
        self._servers: list[_Server | None] = [None] * self._n
        self._next_id = 0
        self._closed = False
        self._broken: str | None = None
        self._start_failures = 0
        self._ready_event = threading.Event()
        self._isolation: dict[str, Any] = {}
        self._problems: list[str] = []
        self.stats = collections.Counter[str]()
        # why children were replaced, in detail (e.g. "taint: name getattr"), bounded
        self.recycle_details = collections.Counter[str]()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        root = self.config.tmp_root or tempfile.gettempdir()
        _remove_stale_dirs(root)
        self._root = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-", dir=root)
        self._thread = threading.Thread(target=self._loop, name="rstar-sandbox", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public interface

    def submit(self, program: str) -> concurrent.futures.Future[ExecResult]:
        """Queue ``program``; identical programs share one execution and the cache."""
        return self.submit_many((program,))[0]

    def submit_many(self, programs: Iterable[str]) -> list[concurrent.futures.Future[ExecResult]]:
        """``submit`` for several programs under one lock and one wake-up of the I/O thread
        (a search step's candidates arrive together). A cache hit's future is already done."""
        out: list[concurrent.futures.Future[ExecResult]] = []
        queued = False
        with self._lock:
            for program in programs:
                fut: concurrent.futures.Future[ExecResult] = concurrent.futures.Future()
                out.append(fut)
                if self._closed:
                    fut.set_result(_failure(Status.KILLED, "SandboxClosed: the sandbox is closed"))
                    continue
                key = _key(program)
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
                    self.stats["cache_hits"] += 1
                    fut.set_result(dataclasses.replace(hit, cached=True))
                    continue
                job = self._inflight.get(key)
                if job is not None:
                    job.futures.append(fut)
                    self.stats["deduplicated"] += 1
                    continue
                if self._broken is not None:
                    fut.set_result(_failure(Status.KILLED, self._broken))
                    continue
                job = _Job(key, program, [fut])
                self._inflight[key] = job
                self._queue.append(job)
                queued = True
        if queued:
            self._wake()
        return out

    def run(self, program: str) -> ExecResult:
        return self.submit(program).result()

    def run_many(self, programs: Sequence[str]) -> list[ExecResult]:
        """Run all programs concurrently across the pool; results in input order."""
        futures = self.submit_many(programs)
        concurrent.futures.wait(futures)  # one wake-up for the batch, not one per result
        return [f.result() for f in futures]

    async def arun(self, program: str) -> ExecResult:
        return await asyncio.wrap_future(self.submit(program))

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Block until at least one server is up; returns what isolation it enforces."""
        if not self._ready_event.wait(timeout):
            raise TimeoutError("no sandbox server became ready")
        with self._lock:
            if self._broken is not None and not self._isolation:
                raise RuntimeError(self._broken)
            return dict(self._isolation)

    @property
    def isolation(self) -> dict[str, Any]:
        """Layers the servers enforce (filled once one is ready), e.g. ``landlock_abi``."""
        with self._lock:
            return dict(self._isolation)

    @property
    def problems(self) -> list[str]:
        """Layers that could not be enabled, with the kernel's reason."""
        with self._lock:
            return list(self._problems)

    def server_pids(self) -> list[int]:
        with self._lock:
            return [s.proc.pid for s in self._servers if s is not None]

    def worker_pids(self) -> list[int]:
        """The live children of reuse-mode servers, as of their last reports."""
        with self._lock:
            return [s.worker for s in self._servers if s is not None and s.worker is not None]

    def close(self) -> None:
        """Stop every server (and its running child) and remove the scratch directories."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        self._thread.join()
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ----------------------------------------------------------------- dispatcher thread

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass

    def _loop(self) -> None:
        try:
            for i in range(self._n):
                self._start(i)
            while True:
                with self._lock:
                    closed = self._closed
                if closed:
                    break
                self._dispatch()
                timeout = self._next_timeout()
                for key, _ in self._sel.select(timeout):
                    if key.data is None:
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except BlockingIOError:
                            pass
                    else:
                        self._on_readable(key.data)
                self._check_deadlines()
        except Exception:  # pragma: no cover - a bug here must not leave processes behind
            log.exception("sandbox dispatcher crashed")
            with self._lock:
                self._broken = "SandboxError: dispatcher crashed"
        finally:
            self._shutdown()

    def _start(self, index: int) -> None:
        base = tempfile.mkdtemp(prefix=f"srv{index}-", dir=self._root)
        os.chmod(base, 0o700)
        parent_sock, child_sock = socket.socketpair()
        cfg = self.config
        server_cfg = {
            "timeout_s": cfg.timeout_s, "cpu_time_s": cfg.cpu_time_s,
            "memory_mb": cfg.memory_mb, "max_output_chars": cfg.max_output_chars,
            "max_open_files": cfg.max_open_files, "max_file_mb": cfg.max_file_mb,
            "isolate_network": cfg.isolate_network, "preload": list(cfg.preload),
            "warmup": cfg.warmup, "fresh_process_per_run": cfg.fresh_process_per_run,
            "max_runs_per_child": cfg.max_runs_per_child,
            "recycle_cpu_s": cfg.recycle_cpu_s, "recycle_memory_mb": cfg.recycle_memory_mb,
        }
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": pkg_root,
            "PYTHONHASHSEED": "0",  # same set/dict order in every server: cache-consistent
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONNOUSERSITE": "1",
            # single-threaded BLAS: the server must be safe to fork
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "NUMEXPR_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1",
            "BLIS_NUM_THREADS": "1", "GOTO_NUM_THREADS": "1",
            **_allocator_env(cfg),
            **cfg.extra_env,
        }
        cmd = [sys.executable, "-m", "rstar.sandbox._server", str(child_sock.fileno()),
               str(os.getpid()), base, json.dumps(server_cfg)]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                pass_fds=(child_sock.fileno(),), cwd=base, env=env,
                                start_new_session=True)
        child_sock.close()
        parent_sock.setblocking(True)
        srv = _Server(index, parent_sock, proc, base)
        self._servers[index] = srv
        self._sel.register(parent_sock, selectors.EVENT_READ, srv)

    def _dispatch(self) -> None:
        for srv in self._servers:
            if srv is None or not srv.ready or srv.job is not None:
                continue
            with self._lock:
                job = self._queue.popleft() if self._queue else None
                if job is None:
                    return
                self._next_id += 1
                job.id = self._next_id
            srv.job = job
            srv.deadline = time.monotonic() + self.config.timeout_s + _GRACE_S
            data = json.dumps({"id": job.id, "code": job.program}).encode("utf-8",
                                                                          "surrogatepass")
            try:
                srv.sock.sendall(struct.pack(">I", len(data)) + data)
            except OSError:
                self._server_died(srv, "sandbox server died")

    def _next_timeout(self) -> float | None:
        now = time.monotonic()
        deadlines = []
        for srv in self._servers:
            if srv is None:
                continue
            if srv.job is not None:
                deadlines.append(srv.deadline)
            elif not srv.ready:
                deadlines.append(srv.started + self.config.start_timeout_s)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for srv in self._servers:
            if srv is None:
                continue
            if srv.job is not None and now > srv.deadline:
                self._server_died(srv, "sandbox server unresponsive")
            elif not srv.ready and now > srv.started + self.config.start_timeout_s:
                self._server_died(srv, "sandbox server did not start in time")

    def _on_readable(self, srv: _Server) -> None:
        try:
            chunk = srv.sock.recv(1 << 20)
        except OSError:
            chunk = b""
        if not chunk:
            self._server_died(srv, "sandbox server died")
            return
        srv.buf += chunk
        while len(srv.buf) >= 4:
            n = struct.unpack(">I", srv.buf[:4])[0]
            if len(srv.buf) < 4 + n:
                break
            msg = json.loads(bytes(srv.buf[4:4 + n]))
            del srv.buf[:4 + n]
            self._on_message(srv, msg)

    def _on_message(self, srv: _Server, msg: dict[str, Any]) -> None:
        if msg.get("ready"):
            srv.ready = True
            with self._lock:
                self._start_failures = 0
                self._isolation = msg["isolation"]
                self._problems = msg["problems"]
            for p in msg["problems"]:
                log.warning("sandbox: %s", p)
            self._ready_event.set()
            return
        job = srv.job
        if job is None or msg.get("id") != job.id:
            log.error("sandbox: unexpected message from server %d", srv.index)
            return
        srv.job = None
        with self._lock:
            srv.worker = msg.get("worker")
            self.stats["children_forked"] += int(msg.get("forks", 0))
            reason = msg.get("recycled")
            if reason:
                self.stats["recycled"] += 1
                self.stats[f"recycled_{reason}"] += 1
                key = f"{reason}: {msg['recycle_detail']}" if msg.get("recycle_detail") \
                    else reason
                if key in self.recycle_details or len(self.recycle_details) < 512:
                    self.recycle_details[key] += 1
        result = ExecResult(status=Status(msg["status"]), stdout=msg["stdout"],
                            value=msg["value"], error=msg["error"],
                            duration_s=float(msg["duration"]), cached=False)
        self._finish(job, result)

    def _finish(self, job: _Job, result: ExecResult) -> None:
        with self._lock:
            self._inflight.pop(job.key, None)
            self.stats["runs"] += 1
            self.stats[result.status.value] += 1
            if self.config.cache_size > 0 and result.status in _CACHEABLE:
                self._cache[job.key] = result
                self._cache.move_to_end(job.key)
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        for i, fut in enumerate(job.futures):
            if not fut.done():
                fut.set_result(result if i == 0 else dataclasses.replace(result, cached=True))

    def _server_died(self, srv: _Server, why: str) -> None:
        """Kill and reap a server, fail its in-flight program as KILLED, start a new one."""
        was_ready = srv.ready
        self._stop_server(srv)
        self._servers[srv.index] = None
        if srv.job is not None:
            self._finish(srv.job, _failure(Status.KILLED, f"Killed: {why}"))
            srv.job = None
        with self._lock:
            closed = self._closed
            if not was_ready:
                self._start_failures += 1
                if self._start_failures >= _MAX_START_FAILURES * self._n:
                    self._broken = f"SandboxError: servers fail to start ({why})"
        log.warning("sandbox server %d: %s; restarting", srv.index, why)
        self.stats["restarts"] += 1
        if closed:
            return
        with self._lock:
            broken = self._broken
        if broken is not None:
            self._fail_queue(broken)
            self._ready_event.set()
            return
        self._start(srv.index)

    def _fail_queue(self, why: str) -> None:
        with self._lock:
            jobs = list(self._queue)
            self._queue.clear()
        for job in jobs:
            self._finish(job, _failure(Status.KILLED, why))

    def _stop_server(self, srv: _Server) -> None:
        try:
            self._sel.unregister(srv.sock)
        except (KeyError, ValueError):
            pass
        srv.sock.close()
        # Its reuse-mode child has its own process group and dies by PDEATHSIG when the
        # server does; hold a pidfd to it, taken while the server still lives, to make sure
        # it is gone before we return.
        with self._lock:
            worker, srv.worker = srv.worker, None
        worker_fd = _child_pidfd(worker, srv.proc.pid) if worker is not None else None
        try:
            os.killpg(srv.proc.pid, signal.SIGKILL)  # server + anything left in its group
        except OSError:
            pass
        srv.proc.wait()
        if worker_fd is not None:
            try:
                signal.pidfd_send_signal(worker_fd, signal.SIGKILL)
            except OSError:
                pass
            select.select([worker_fd], [], [], 5.0)
            os.close(worker_fd)
        shutil.rmtree(srv.base, ignore_errors=True)

    def _shutdown(self) -> None:
        for srv in self._servers:
            if srv is not None:
                self._stop_server(srv)
                if srv.job is not None:
                    self._finish(srv.job, _failure(Status.KILLED,
                                                   "SandboxClosed: the sandbox was closed"))
        self._servers = [None] * self._n
        self._fail_queue("SandboxClosed: the sandbox was closed")
        with self._lock:
            self._closed = True
        self._ready_event.set()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()


def _child_pidfd(pid: int, parent: int) -> int | None:
    """A pidfd for ``pid`` if it is (still) a child of ``parent``, else None. The server may
    have replaced the child it last reported; the pidfd pins the process, and the parent
    check made after taking it rules out a recycled pid."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        if int(data[data.rindex(b")") + 2:].split()[1]) == parent:
            return fd
    except (OSError, ValueError, IndexError):
        pass
    os.close(fd)
    return None


def _allocator_env(cfg: SandboxConfig) -> dict[str, str]:
    """Strict mode forks per program: objects in glibc malloc's heap, backed by transparent
    huge pages, make fork() copy a few hundred PMDs instead of ~30k PTEs (fork + exit 3x
    cheaper, measured). Reuse mode forks rarely; there pymalloc runs the programs faster
    (~25 % less child CPU on typical steps, measured), so it keeps Python's default."""
    if cfg.fresh_process_per_run:
        return {"PYTHONMALLOC": "malloc", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    return {}


def _failure(status: Status, error: str) -> ExecResult:
    return ExecResult(status=status, stdout="", value=None, error=error, duration_s=0.0)


def _remove_stale_dirs(root: str) -> None:
    """Scratch dirs of pools whose process died without closing (e.g. SIGKILL)."""
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        if not name.startswith(_DIR_PREFIX):
            continue
        pid = name[len(_DIR_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
