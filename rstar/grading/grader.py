"""Answer equivalence: fast paths, a memo cache, and math-verify in worker processes.

Order of a check (each step either decides or passes on):
1. memo cache (bounded LRU keyed by the cleaned strings);
2. normalised string equality -> equal;
3. multiple-choice letters, plain numbers / fractions / percentages, plain words -> decided here,
   the way math-verify would decide them (checked by ``tests/test_grading_differential.py``);
4. math-verify (``verify(parse(gold), parse(pred))``, sped up by :mod:`rstar.grading.symbolic`
   without changing its verdicts) in a worker process with a hard deadline; a timeout, crash or
   parse failure counts as *not equal*.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import re
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

from rstar.grading.cache import LRUCache
from rstar.grading.extract import extract_answer
from rstar.grading.normalize import (
    choice_letter,
    clean_answer,
    gold_alternatives,
    normalize_answer,
    numbers_equal,
    parse_number,
)
from rstar.grading.pool import CheckResult, VerifyPool

logger = logging.getLogger(__name__)

__all__ = ["Grader", "GraderStats", "answers_equal", "default_grader"]

Gold = str | Sequence[str]


@dataclass
class GraderStats:
    """Where checks were decided (for benchmarks and logs)."""

    checks: int = 0
    cache_hits: int = 0
    fast: int = 0
    symbolic: int = 0
    timeouts: int = 0
    errors: int = 0
    max_symbolic_s: float = 0.0


@lru_cache(maxsize=65536)
def _prep(s: str) -> tuple[str, str]:
    """(cleaned for the parser, normalised for equality); memoised because golds repeat a lot."""
    if "<answer>" in s:
        ans = extract_answer(s)
        s = ans if ans is not None else ""
    c = clean_answer(s)
    return c, normalize_answer(c)


_WORDS_RE = re.compile(r"^[A-Za-z]+(?:[\s'\-]+[A-Za-z]+)*$")
_TEXT_WRAP_RE = re.compile(r"\\(?:text|textbf|textrm|mbox|mathrm)\s*\{([^{}]*)\}")


def _words(clean: str) -> str | None:
    t = _TEXT_WRAP_RE.sub(r"\1", clean).replace("\\ ", " ")
    t = " ".join(t.split())
    return t.lower() if _WORDS_RE.match(t) else None


_ASSIGN_RE = re.compile(r"^([A-Za-z])(?:_\{?(\w+)\}?)?=(?![=<>])")
_SPACE_RE = re.compile(r"\s+|\\[,;:! ]|\\q?quad")


def _assigned_var(clean: str) -> str | None:
    """``x`` for ``x = 3``, ``y_2`` for ``y_{2}=x``; None when the answer is not an assignment."""
    m = _ASSIGN_RE.match(_SPACE_RE.sub("", clean))
    if m is None:
        return None
    return m.group(1) + ("_" + m.group(2) if m.group(2) else "")


_LATEX_CMD_RE = re.compile(r"\\[A-Za-z]+")
_LETTER_RUN_RE = re.compile(r"[A-Za-z]{2,}")


def _mathy(clean: str) -> bool:
    """Formula-like text: no prose (a run of 2+ letters outside LaTeX commands), no display math."""
    if "\n" in clean or "\\[" in clean or "\\(" in clean:
        return False
    return _LETTER_RUN_RE.search(_LATEX_CMD_RE.sub(" ", clean)) is None


def _fast(pc: str, pn: str, gc: str, gn: str, symmetric: bool) -> bool | None:
    """Decide cheaply when it is safe to; None means "ask the symbolic engine".

    Every decision here is meant to be the one math-verify would reach (checked against it by
    ``tests/test_grading_differential.py``), apart from the documented deliberate differences:
    plain words, choice letters, the percent rule of :func:`numbers_equal`, and thin-space
    thousands separators (``10\\,000``, joined by :func:`normalize_answer`).
    """
    if not pn or not gn:
        return False
    pv, gv = _assigned_var(pc), _assigned_var(gc)
    if pv is not None and gv is not None and pv != gv:
        return None  # x = 1 vs y = 1: math-verify compares them as relations, not values
    if pn == gn:
        return True
    g_letter = choice_letter(gc)
    if g_letter is not None and g_letter.isupper():
        p_letter = choice_letter(pc, lenient=not symmetric)
        if p_letter is not None:
            return p_letter.upper() == g_letter
        if not symmetric:
            return False  # gold is a choice letter, the prediction names no choice
    gnum = parse_number(gn)
    pnum = parse_number(pn)
    if gnum is not None and pnum is not None:
        return numbers_equal(gnum, pnum)
    gw, pw = _words(gc), _words(pc)
    if gw is not None and pw is not None:
        long_word = max(len(w) for w in (gw + " " + pw).split()) >= 3
        if long_word or {gw, pw} <= {"yes", "no"}:
            return gw == pw
    # A plain number never equals a tuple/list/interval or a word: no need to parse either side.
    if gnum is not None or pnum is not None:
        other_n, other_c = (pn, pc) if gnum is not None else (gn, gc)
        if _is_composite(other_n) and _mathy(other_c):
            return False
        w = _words(other_c)
        if w is not None and max(len(x) for x in w.split()) >= 3:
            return False
    return None


_DECIMAL_COMMA_RE = re.compile(r"^[-+]?0\d{0,2}(?:,\d{3})+(?:\.\d+)?$")


def _split_top(inner: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(inner):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == "," and depth == 0:
            parts.append(inner[start:i])
            start = i + 1
    parts.append(inner[start:])
    return parts


def _is_composite(norm: str) -> bool:
    """A list/set/tuple/interval of at least two *different plain numbers* (``1,2``, ``(1,2]``, ``\\{1,3\\}``).

    Only then is it surely not equal to one number in math-verify's eyes: a set or list of equal
    elements (``2, 2``, ``1+1, 2``) collapses to one element, a closed interval ``[2,2]`` to a point,
    and ``0,245`` is the decimal 0.245.
    """
    if _DECIMAL_COMMA_RE.match(norm):
        return False
    inner = norm
    for op, cl in (("(", ")"), ("[", "]"), ("(", "]"), ("[", ")"), ("\\{", "\\}")):
        if norm.startswith(op) and norm.endswith(cl) and len(norm) > len(op) + len(cl):
            body = norm[len(op) : -len(cl)]
            if _balanced(body):
                inner = body
                break
    parts = _split_top(inner)
    if len(parts) < 2:
        return False
    values = []
    for part in parts:
        n = parse_number(part)
        if n is None or n.percent:
            return False
        values.append(n.value)
    return len(set(values)) >= 2


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


class Grader:
    """Checks model answers against gold answers (and answers against each other, for votes).

    Thread-safe; usable from any thread and from asyncio code (see :meth:`ais_equiv`).  The
    symbolic engine runs in ``workers`` subprocesses started on first need.
    """

    def __init__(
        self,
        timeout_s: float = 5.0,
        cache_size: int = 200_000,
        workers: int = 1,
        *,
        symbolic: str = "fast",
        parser_warmup: bool = True,
    ) -> None:
        """``symbolic="plain"`` runs math-verify unmodified in the workers (same verdicts, slower:
        for comparisons); ``parser_warmup=False`` skips the idle-time parser warm-up."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if symbolic not in ("fast", "plain"):
            raise ValueError(f"symbolic must be 'fast' or 'plain', got {symbolic!r}")
        self.timeout_s = float(timeout_s)
        self.workers = workers
        self.symbolic = symbolic
        self.parser_warmup = parser_warmup
        self._cache: LRUCache[bool] = LRUCache(cache_size)
        self._pool: VerifyPool | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.stats = GraderStats()

    # -- public API -------------------------------------------------------------------------
    def is_equiv(self, pred: str | None, gold: Gold) -> bool:
        """Is the model answer ``pred`` (raw or extracted) equivalent to ``gold``?

        ``gold`` may be a list of accepted answers, or the string form of one (``"['3', '-3']"``).
        """
        if pred is None:
            return False
        return any(self._check("pg", pred, g) for g in self._alternatives(gold))

    async def ais_equiv(self, pred: str | None, gold: Gold) -> bool:
        """:meth:`is_equiv` without blocking the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, self.is_equiv, pred, gold)

    def equal(self, a: str | None, b: str | None) -> bool:
        """Symmetric answer-vs-answer equivalence (for votes): either direction of math-verify."""
        if a is None or b is None:
            return False
        return self._check("sym", a, b)

    def grade_many(self, preds: Sequence[str | None], golds: Sequence[Gold]) -> list[bool]:
        """Batched :meth:`is_equiv`: fast paths and cache first, then unique symbolic checks in parallel."""
        if len(preds) != len(golds):
            raise ValueError(f"{len(preds)} predictions but {len(golds)} gold answers")
        results = [False] * len(preds)
        pending: dict[tuple[str, str, str], list[int]] = {}
        for i, (p, gold) in enumerate(zip(preds, golds)):
            if p is None:
                continue
            for g in self._alternatives(gold):
                key, decided = self._decide_cheap("pg", p, g)
                if decided is True:
                    results[i] = True
                    break
                if decided is None:
                    pending.setdefault(key, []).append(i)
        todo = [k for k, idx in pending.items() if not all(results[i] for i in idx)]
        for key, equal in zip(todo, self._run_symbolic(todo)):
            if equal:
                for i in pending[key]:
                    results[i] = True
        return results

    def close(self) -> None:
        """Stop the worker processes (a later check restarts them)."""
        with self._lock:
            pool, self._pool = self._pool, None
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True)
        if pool is not None:
            pool.close()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def cache_info(self) -> dict[str, int]:
        s = self._cache.stats()
        return {"size": s.size, "capacity": s.capacity, "hits": s.hits, "misses": s.misses}

    # -- internals --------------------------------------------------------------------------
    @staticmethod
    def _alternatives(gold: Gold) -> list[str]:
        if isinstance(gold, str):
            return gold_alternatives(gold)
        alts = [g for g in gold if isinstance(g, str)]
        if not alts:
            raise TypeError(f"gold must be a string or a sequence of strings, got {gold!r}")
        return alts

    def _decide_cheap(self, mode: str, a: str, b: str) -> tuple[tuple[str, str, str], bool | None]:
        ac, an = _prep(a)
        bc, bn = _prep(b)
        if mode == "sym" and (an, ac) > (bn, bc):
            ac, an, bc, bn = bc, bn, ac, an
        key = (mode, ac, bc)
        self.stats.checks += 1
        hit = self._cache.get(key)
        if hit is not None:
            self.stats.cache_hits += 1
            return key, hit
        fast = _fast(ac, an, bc, bn, symmetric=(mode == "sym"))
        if fast is not None:
            self.stats.fast += 1
            self._cache.put(key, fast)
        return key, fast

    def _check(self, mode: str, a: str, b: str) -> bool:
        key, decided = self._decide_cheap(mode, a, b)
        if decided is not None:
            return decided
        return self._run_symbolic([key])[0]

    def _get_pool(self) -> VerifyPool:
        with self._lock:
            if self._pool is None:
                self._pool = VerifyPool(
                    self.workers,
                    self.timeout_s,
                    plain=self.symbolic == "plain",
                    parser_warmup=self.parser_warmup,
                )
                weakref.finalize(self, VerifyPool.close, self._pool)
            return self._pool

    def _symbolic_one(self, key: tuple[str, str, str]) -> bool:
        mode, a, b = key
        res: CheckResult = self._get_pool().check(mode, a, b)
        st = self.stats
        st.symbolic += 1
        st.max_symbolic_s = max(st.max_symbolic_s, res.seconds)
        if res.status == "timeout":
            st.timeouts += 1
        elif res.status != "ok":
            st.errors += 1
        self._cache.put(key, res.equal)
        return res.equal

    def _run_symbolic(self, keys: list[tuple[str, str, str]]) -> list[bool]:
        if not keys:
            return []
        if self.workers == 1 or len(keys) == 1:
            return [self._symbolic_one(k) for k in keys]
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="rstar-grade")
            ex = self._executor
        return list(ex.map(self._symbolic_one, keys))


_default: Grader | None = None
_default_lock = threading.Lock()


def default_grader() -> Grader:
    """The process-wide grader behind :func:`answers_equal` (5 s timeout, one worker)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Grader()
            atexit.register(_default.close)
        return _default


def answers_equal(a: str | None, b: str | None) -> bool:
    """Are two model answers the same answer?  Symmetric; cached; used for majority votes."""
    return default_grader().equal(a, b)
