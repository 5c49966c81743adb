"""Symbolic-check worker process: ``python -m rstar.grading._worker [--plain] [--no-warmup]``.

Runs math-verify (sped up by :mod:`rstar.grading.symbolic`; ``--plain`` runs it unchanged) in its
own main thread, so a SIGALRM interval timer can interrupt a slow check (math-verify's own signal
timeouts are disabled: they only work in a main thread, and take whole seconds).  The parent kills
the process if even that does not answer in time (stuck in C code).

Protocol, one JSON array per line each way (replies on the original stdout; fd 1 is redirected to
stderr so stray prints from libraries cannot corrupt it):

- on start-up the worker sends ``["ready", pid]``;
- ``[mode, a, b, soft_timeout_s]`` -> ``[equal, status]`` (one check);
- ``["warm"]`` -> ``["warm", items, seconds]`` once the parser warm-up is complete;
- ``["clear"]`` -> ``["clear"]`` after emptying the memo of parsed answers (for cold benchmarks).

Parser warm-up (the corpus of :mod:`rstar.grading.symbolic`) runs in idle time: one corpus item at
a time, only while no request is waiting, and an item in progress is abandoned (and retried later)
within 10 ms of a request arriving.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import sys
import time
from typing import Any


class _Deadline(BaseException):
    """Raised by the interval timer; a BaseException so math-verify's ``except Exception`` can't eat it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Deadline()


class _Yield(BaseException):
    """Raised in a warm-up parse when a request arrives: the request goes first."""


class _LineReader:
    """Lines from fd 0 with a ``pending()`` that does not block (for idle-time warm-up)."""

    def __init__(self, fd: int = 0) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False

    def pending(self) -> bool:
        if b"\n" in self.buf or self.eof:
            return True
        r, _, _ = select.select([self.fd], [], [], 0)
        return bool(r)

    def readline(self) -> bytes | None:
        """The next line (without the newline), or None at end of input."""
        while b"\n" not in self.buf:
            if self.eof:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                self.eof = True
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    plain = "--plain" in args
    warm = "--no-warmup" not in args and os.environ.get("RSTAR_GRADER_WARMUP", "1") != "0"

    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)

    import math_verify.grader as mv_grader
    import math_verify.parser as mv_parser

    from rstar.grading import symbolic

    symbolic.install()
    symbolic.set_enabled(sll=not plain, reject=not plain)

    # We enforce time ourselves; silence the one-off "timeout disabled" warnings.
    for mod in (mv_grader, mv_parser):
        if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True
    parsed, ver = symbolic.make_verifier()

    def check(mode: str, a: str, b: str, soft: float) -> tuple[bool, str]:
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, max(float(soft), 0.001))
                if mode == "pg":  # a = prediction, b = gold; math-verify is gold-first
                    result = ver(b, a)
                else:  # symmetric: answer vs answer
                    result = ver(b, a) or ver(a, b)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Deadline:
            return False, "timeout"
        except Exception as e:  # malformed input or a sympy failure counts as "not equal"
            return False, f"error: {type(e).__name__}"
        return bool(result), "ok"

    signal.signal(signal.SIGALRM, _on_alarm)
    # Start-up warm-up so the first real check does not pay sympy's lazy initialisation.
    try:
        ver("\\frac{1}{2}", "0.5")
        ver("x+1", "1+x")
    except Exception:  # pragma: no cover - warm-up is best effort
        pass
    proto.write(json.dumps(["ready", os.getpid()]) + "\n")

    corpus = list(symbolic.WARMUP_CORPUS) if (warm and not plain) else []
    warm_items, warm_s = 0, 0.0
    reader = _LineReader(0)

    def warm_step(yield_to_requests: bool) -> None:
        """Parse one corpus item.  In idle time, a 10 ms timer abandons the item as soon as a
        request arrives (the item is retried later), so a check never waits behind the warm-up."""
        nonlocal warm_items, warm_s
        item = corpus[0]
        t0 = time.perf_counter()
        active = [True]

        def on_tick(signum: int, frame: Any) -> None:
            if not active[0]:
                return  # a tick that was already pending when the item finished
            if yield_to_requests and reader.pending():
                raise _Yield()
            if time.perf_counter() - t0 > 2.0:  # a safety net: items take milliseconds
                raise _Deadline()

        signal.signal(signal.SIGALRM, on_tick)
        yielded = False
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.01, 0.01)
            try:
                symbolic.parse_unmemoised(item)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                active[0] = False
        except _Yield:
            yielded = True
        except (_Deadline, Exception):
            pass
        active[0] = False
        signal.signal(signal.SIGALRM, _on_alarm)
        warm_s += time.perf_counter() - t0
        if not yielded:
            corpus.pop(0)
            warm_items += 1

    while True:
        while corpus and not reader.pending():
            warm_step(yield_to_requests=True)
        line = reader.readline()
        if line is None:
            return
        try:
            msg = json.loads(line)
        except ValueError:
            proto.write(json.dumps([False, "error: bad request"]) + "\n")
            continue
        if msg and msg[0] == "clear":
            parsed.cache_clear()
            proto.write(json.dumps(["clear"]) + "\n")
        elif msg and msg[0] == "warm":
            while corpus:
                warm_step(yield_to_requests=False)
            proto.write(json.dumps(["warm", warm_items, round(warm_s, 3)]) + "\n")
        else:
            try:
                mode, a, b, soft = msg
            except ValueError:
                proto.write(json.dumps([False, "error: bad request"]) + "\n")
                continue
            proto.write(json.dumps(list(check(mode, a, b, soft))) + "\n")


if __name__ == "__main__":
    main()
