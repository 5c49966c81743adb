"""A small pool of symbolic-check worker processes with hard per-call deadlines.

Why processes: math-verify's timeouts use SIGALRM, which only works in the main thread, and a
sympy simplification can also get stuck in C code that no signal interrupts.  Each worker is a
plain ``python -m rstar.grading._worker`` subprocess (no multiprocessing: no ``__main__``
re-import, no daemon restrictions, usable from any thread or event loop).  A call that does not
answer within its deadline gets its worker killed and replaced; the call returns "timeout".
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["VerifyPool", "CheckResult"]

_PKG_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class CheckResult:
    equal: bool
    status: str  # "ok" | "timeout" | "error: ..." | "crash"
    seconds: float


class _Worker:
    """One subprocess; used by one caller at a time (the pool hands out free workers)."""

    def __init__(self, start_timeout_s: float, args: tuple[str, ...] = ()) -> None:
        self.start_timeout_s = start_timeout_s
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self.ready = False
        self.tasks = 0

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rstar.grading._worker", *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
            start_new_session=True,  # a Ctrl-C in the terminal should not kill graders mid-check
        )
        self._buf = b""
        self.ready = False
        self.tasks = 0

    def _readline(self, deadline: float) -> bytes | None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            r, _, _ = select.select([fd], [], [], left)
            if not r:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError("grading worker exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def ensure_ready(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        if self.ready:
            return
        line = self._readline(time.monotonic() + self.start_timeout_s)
        if line is None:
            self.kill()
            raise RuntimeError(
                f"grading worker did not start within {self.start_timeout_s:.0f}s "
                "(is math-verify installed in this interpreter?)"
            )
        msg = json.loads(line)
        if msg[0] != "ready":
            self.kill()
            raise RuntimeError(f"grading worker sent {msg!r} instead of 'ready'")
        self.ready = True

    def call(self, mode: str, a: str, b: str, timeout_s: float) -> CheckResult:
        assert self.proc is not None and self.proc.stdin is not None
        t0 = time.monotonic()
        soft = max(0.001, min(timeout_s * 0.9, timeout_s - 0.05))
        self.proc.stdin.write((json.dumps([mode, a, b, soft]) + "\n").encode("utf-8"))
        self.proc.stdin.flush()
        line = self._readline(t0 + timeout_s)
        self.tasks += 1
        if line is None:
            self.kill()
            return CheckResult(False, "timeout", time.monotonic() - t0)
        equal, status = json.loads(line)
        return CheckResult(bool(equal), str(status), time.monotonic() - t0)

    def wait_warm(self, timeout_s: float) -> tuple[int, float]:
        """Block until the worker's parser warm-up is done: (corpus items, seconds spent)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b'["warm"]\n')
        self.proc.stdin.flush()
        line = self._readline(time.monotonic() + timeout_s)
        if line is None:
            self.kill()
            raise RuntimeError(f"grading worker did not finish its warm-up within {timeout_s:.0f}s")
        msg = json.loads(line)
        return int(msg[1]), float(msg[2])

    def clear(self, timeout_s: float) -> None:
        """Empty the worker's memo of parsed answers."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b'["clear"]\n')
        self.proc.stdin.flush()
        if self._readline(time.monotonic() + timeout_s) is None:
            self.kill()

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        self.ready = False
        if proc is None:
            return
        try:
            proc.kill()
        except OSError:
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL not reaped in time
            logger.warning("grading worker %d did not exit after SIGKILL", proc.pid)


class VerifyPool:
    """``workers`` symbolic-check processes, started lazily, replaced after a timeout or crash."""

    def __init__(
        self,
        workers: int = 1,
        timeout_s: float = 5.0,
        *,
        start_timeout_s: float = 120.0,
        max_tasks_per_worker: int = 200_000,
        plain: bool = False,
        parser_warmup: bool = True,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.workers = workers
        self.timeout_s = float(timeout_s)
        self.max_tasks_per_worker = max_tasks_per_worker
        args = (("--plain",) if plain else ()) + (() if parser_warmup else ("--no-warmup",))
        self.plain = plain
        self._all = [_Worker(start_timeout_s, args) for _ in range(workers)]
        self._free: queue.Queue[_Worker] = queue.Queue()
        for w in self._all:
            self._free.put(w)
        self._closed = False
        self._lock = threading.Lock()
        self.timeouts = 0
        self.restarts = 0

    def check(self, mode: str, a: str, b: str) -> CheckResult:
        """One symbolic check; ``mode`` is ``"pg"`` (prediction, gold) or ``"sym"`` (answer, answer)."""
        if self._closed:
            raise RuntimeError("VerifyPool is closed")
        w = self._free.get()
        try:
            w.ensure_ready()
            try:
                res = w.call(mode, a, b, self.timeout_s)
            except (EOFError, OSError, ValueError) as e:
                logger.warning("grading worker crashed (%s); restarting it", e)
                w.kill()
                res = CheckResult(False, "crash", 0.0)
            if res.status in ("timeout", "crash"):
                with self._lock:
                    self.timeouts += res.status == "timeout"
                    self.restarts += 1
                if res.status == "timeout":
                    logger.info("symbolic check timed out after %.2fs; worker replaced", res.seconds)
                w.start()  # boot the replacement now so it is warm by the next call
            elif w.tasks >= self.max_tasks_per_worker:
                w.kill()  # recycle: sympy caches grow without bound
                w.start()
            return res
        finally:
            self._free.put(w)

    def warm_up(self, parser: bool = False) -> list[tuple[int, float]]:
        """Start every worker and wait until all are ready (otherwise they start on first use).

        With ``parser``, also wait until each has parsed its warm-up corpus (which otherwise runs
        in the worker's idle time); returns (corpus items, seconds) per worker.
        """
        taken = [self._free.get() for _ in self._all]
        try:
            for w in taken:
                if w.proc is None:
                    w.start()
            for w in taken:
                w.ensure_ready()
            return [w.wait_warm(w.start_timeout_s) for w in taken] if parser else []
        finally:
            for w in taken:
                self._free.put(w)

    def clear_caches(self) -> None:
        """Empty every running worker's memo of parsed answers (benchmarks that must start cold)."""
        taken = [self._free.get() for _ in self._all]
        try:
            for w in taken:
                if w.proc is not None and w.ready:
                    w.clear(self.timeout_s)
        finally:
            for w in taken:
                self._free.put(w)

    def close(self) -> None:
        self._closed = True
        for w in self._all:
            w.kill()
