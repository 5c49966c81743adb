"""Symbolic-check worker process: ``python -m rstar.grading._worker``.

Runs math-verify in its own main thread, so a SIGALRM interval timer can interrupt a slow check
(math-verify's own signal timeouts are disabled: they only work in a main thread, and take whole
seconds).  The parent kills the process if even that does not answer in time (stuck in C code).
Protocol: one JSON object per line on stdin (``[mode, a, b, soft_timeout_s]``), one JSON line
back on the original stdout (``[result, status]``); fd 1 is redirected to stderr so stray prints
from libraries cannot corrupt it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from functools import lru_cache
from typing import Any


class _Deadline(BaseException):
    """Raised by the interval timer; a BaseException so math-verify's ``except Exception`` can't eat it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Deadline()


_TRAILING_LETTER_RE = re.compile(r"\d\s*[A-Za-z]$")


def _wrap(s: str) -> str:
    """Box the answer for parse(); parenthesise sums ending in ``<digit><letter>``.

    math-verify strips a trailing one-letter "unit" after a digit, so ``6+9c`` parses as ``6+9``;
    ``(6+9c)`` parses as ``9c+6``.
    """
    if "\\boxed" in s:
        return s
    if _TRAILING_LETTER_RE.search(s) and re.search(r"[+\-*/]", s) and not re.search(r"[,=<>]", s):
        s = "(" + s + ")"
    return "\\boxed{" + s + "}"


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)

    import math_verify.grader as mv_grader
    import math_verify.parser as mv_parser
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # We enforce time ourselves; silence the one-off "timeout disabled" warnings.
    for mod in (mv_grader, mv_parser):
        if hasattr(mod, "TIMEOUT_WARNING_SHOWN"):
            mod.TIMEOUT_WARNING_SHOWN = True
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    @lru_cache(maxsize=8192)
    def parsed(s: str) -> tuple:
        return tuple(parse(_wrap(s), extraction_config=config, parsing_timeout=None))

    def ver(gold: str, pred: str) -> bool:
        g, p = parsed(gold), parsed(pred)
        if not g or not p:
            return False
        return bool(verify(list(g), list(p), timeout_seconds=None, allow_set_relation_comp=True))

    signal.signal(signal.SIGALRM, _on_alarm)
    # Import-time warm-up so the first real check does not pay sympy's lazy initialisation.
    try:
        ver("\\frac{1}{2}", "0.5")
        ver("x+1", "1+x")
    except Exception:  # pragma: no cover - warm-up is best effort
        pass
    proto.write(json.dumps(["ready", os.getpid()]) + "\n")

    for line in sys.stdin:
        status = "ok"
        result = False
        try:
            try:
                mode, a, b, soft = json.loads(line)
                signal.setitimer(signal.ITIMER_REAL, max(float(soft), 0.001))
                if mode == "pg":  # a = prediction, b = gold; math-verify is gold-first
                    result = ver(b, a)
                else:  # symmetric: answer vs answer
                    result = ver(b, a) or ver(a, b)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Deadline:
            status, result = "timeout", False
        except Exception as e:  # malformed input or a sympy failure counts as "not equal"
            status, result = f"error: {type(e).__name__}", False
        proto.write(json.dumps([bool(result), status]) + "\n")


if __name__ == "__main__":
    main()
