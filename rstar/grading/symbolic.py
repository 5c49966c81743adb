"""math-verify with the same verdicts, less time: what the grading worker runs.

Three changes to *how* math-verify computes, none to *what* it decides:

1. **SLL-first parsing.**  latex2sympy's ANTLR parser runs in full LL mode, whose context-sensitive
   predictions are recomputed on every parse (they are not cached in ANTLR's DFA).  Here a parse
   first runs in SLL mode; ANTLR guarantees that an SLL parse either returns the very tree LL would
   return or reports a syntax error, and on *any* error the parse is redone in LL mode, so the
   result (tree or exception) is LL's.  ``tests/test_grading_differential.py`` compares the two
   modes on every benchmark gold.
2. **A warm parser.**  ANTLR's Python runtime caches prediction decisions in a per-process DFA;
   a cold one makes the first few hundred parses 5-50x slower.  :func:`warm_up` parses a fixed
   corpus of generic answer shapes (:data:`WARMUP_CORPUS`, written for this purpose, not taken from
   any benchmark) once at worker start.  The DFA holds grammar decisions, not answers: it changes
   speed only.
3. **Numeric rejection before** ``simplify``.  math-verify's last resort for two expressions is
   ``simplify(a - b).is_zero`` (slow, and slowest when the answer is wrong).  If ``a - b`` evaluates
   to a clearly non-zero number at a point of its domain (free symbols set to fixed rationals that
   respect their assumptions; undefined functions set to one fixed smooth function), it is not
   identically zero, so ``simplify`` cannot prove it zero: the step returns False without running
   ``simplify``.  Anything that does not evaluate to a finite number, or is close to zero, falls
   through to ``simplify`` as before.

Call :func:`install` once per process; :func:`set_enabled` switches the changes off (the plain
math-verify path, for differential tests).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any

__all__ = [
    "install",
    "set_enabled",
    "enabled",
    "make_verifier",
    "wrap_for_parse",
    "warm_up",
    "parse_unmemoised",
    "clearly_different",
    "WARMUP_CORPUS",
    "STATS",
]

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_installed = False
_enabled = {"sll": True, "reject": True}
STATS = {"sll_parses": 0, "ll_fallbacks": 0, "rejected": 0, "simplify_calls": 0}

_TRAILING_LETTER_RE = re.compile(r"\d\s*[A-Za-z]$")


def wrap_for_parse(s: str) -> str:
    """Box the answer for ``parse()``; parenthesise sums ending in ``<digit><letter>``.

    math-verify strips a trailing one-letter "unit" after a digit, so ``6+9c`` parses as ``6+9``;
    ``(6+9c)`` parses as ``9c+6``.
    """
    if "\\boxed" in s:
        return s
    if _TRAILING_LETTER_RE.search(s) and re.search(r"[+\-*/]", s) and not re.search(r"[,=<>]", s):
        s = "(" + s + ")"
    return "\\boxed{" + s + "}"


def set_enabled(sll: bool = True, reject: bool = True) -> None:
    """Switch SLL-first parsing / numeric rejection on or off (both on after :func:`install`)."""
    _enabled["sll"] = bool(sll)
    _enabled["reject"] = bool(reject)


def enabled() -> dict[str, bool]:
    return dict(_enabled)


# ---- 1. SLL-first parsing -----------------------------------------------------------------------
def _install_sll() -> None:
    from antlr4.atn.PredictionMode import PredictionMode
    from latex2sympy2_extended import latex2sympy2 as l2s

    cls = l2s._Latex2Sympy
    orig_create = cls.create_parser
    orig_parse = cls.parse

    def create_parser(self: Any, latex_str: str) -> Any:
        parser = orig_create(self, latex_str)
        if getattr(self, "_rstar_sll", False):
            parser._interp.predictionMode = PredictionMode.SLL
        return parser

    def parse(self: Any, latex_str: str) -> Any:
        if not _enabled["sll"]:
            return orig_parse(self, latex_str)
        self._rstar_sll = True
        try:
            STATS["sll_parses"] += 1
            return orig_parse(self, latex_str)
        except Exception:
            # A syntax error in SLL mode may be a real error or an input that needs LL: redo in
            # LL, whose result (tree or exception) is what plain latex2sympy gives.
            STATS["ll_fallbacks"] += 1
            self._rstar_sll = False
            return orig_parse(self, latex_str)
        finally:
            self._rstar_sll = False

    cls.create_parser = create_parser
    cls.parse = parse


# ---- 3. numeric rejection -----------------------------------------------------------------------
# Fixed, "generic" evaluation points: distinct per symbol, away from 0, 1 and small integers.
_POINTS = (
    (61, 47), (37, 53), (113, 71), (29, 83), (89, 57), (103, 37), (17, 41), (151, 97),
    (43, 79), (127, 61), (71, 109), (23, 31),
)
_INT_POINTS = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
_REL_TOL = 1e-6


@lru_cache(maxsize=1)
def _allowed_assumptions() -> tuple[frozenset, frozenset]:
    from sympy import Symbol

    real = frozenset(Symbol("x", real=True).assumptions0.items())
    integer = frozenset(Symbol("n", integer=True).assumptions0.items())
    return real, integer


def _symbol_value(sym: Any, i: int, attempt: int) -> Any:
    """A value in the symbol's domain, or None when its assumptions are unusual (then: no rejection)."""
    from sympy import Integer, Rational

    items = frozenset(sym.assumptions0.items())
    real, integer = _allowed_assumptions()
    k = (i + 5 * attempt) % len(_POINTS)
    if items <= real:  # no assumptions, or only what real=True implies
        p, q = _POINTS[k]
        return Rational(p, q)
    if items <= integer:  # integer=True (and what it implies); could be negative, but positive is fine
        return Integer(_INT_POINTS[k])
    return None


def _concrete_function(name: str, nargs: int) -> Callable[..., Any]:
    """One fixed smooth function per undefined function name (an instance of "any f")."""
    from sympy import Rational, cos

    h = sum(ord(c) for c in name) % 7
    c1, c2, c3 = Rational(13 + h, 10), Rational(2 + h, 5), Rational(7, 10 + h)

    def f(*args: Any) -> Any:
        t = sum((j + 1) * a for j, a in enumerate(args))
        return cos(c1 * t + c2) + c3 * t

    return f


_SKIP_TYPES: tuple | None = None


def _skip_types() -> tuple:
    global _SKIP_TYPES
    if _SKIP_TYPES is None:
        from sympy import Derivative, Integral, Limit, Product, Sum
        from sympy.core.relational import Relational
        from sympy.logic.boolalg import BooleanFunction
        from sympy.matrices.expressions import MatrixExpr
        from sympy.sets.sets import Set

        _SKIP_TYPES = (Integral, Sum, Product, Limit, Derivative, MatrixExpr, Set, Relational, BooleanFunction)
    return _SKIP_TYPES


def _magnitude(v: Any) -> Any:
    """|v| as a sympy Float for a finite (possibly huge, possibly complex) number, else None."""
    from sympy import Float, Number

    try:
        re_, im_ = v.as_real_imag()
    except Exception:
        return None
    if not (isinstance(re_, Number) and isinstance(im_, Number)):
        return None
    if not (re_.is_finite and im_.is_finite):  # nan, oo, zoo
        return None
    re_, im_ = Float(re_, 20), Float(im_, 20)
    return max(abs(re_), abs(im_))


def clearly_different(a: Any, b: Any, attempts: int = 2) -> bool:
    """True when ``a - b`` is provably not identically zero by evaluation at a point of its domain.

    Conservative: any doubt (non-expression, unusual assumptions, integrals and sums, a value that
    is not a finite number, a difference within ``1e-6`` of the operands' size) gives False.
    """
    from sympy import Expr
    from sympy.core.function import AppliedUndef

    if not (isinstance(a, Expr) and isinstance(b, Expr)):
        return False
    skip = _skip_types()
    if a.has(*skip) or b.has(*skip):
        return False
    undef = a.atoms(AppliedUndef) | b.atoms(AppliedUndef)
    if undef:
        concrete = {u: _concrete_function(u.func.__name__, len(u.args))(*u.args) for u in undef}
        try:
            a = a.xreplace(concrete)
            b = b.xreplace(concrete)
        except Exception:
            return False
    try:
        diff = a - b
    except Exception:
        return False
    if not isinstance(diff, Expr) or diff.has(*skip):
        return False
    syms = sorted(diff.free_symbols | a.free_symbols | b.free_symbols, key=lambda s: s.name)
    for attempt in range(attempts):
        subs = {}
        for i, s in enumerate(syms):
            v = _symbol_value(s, i, attempt)
            if v is None:
                return False
            subs[s] = v
        try:
            d = _magnitude(diff.evalf(n=20, subs=subs, maxn=60))
            va = _magnitude(a.evalf(n=20, subs=subs, maxn=60))
            vb = _magnitude(b.evalf(n=20, subs=subs, maxn=60))
            if d is None or va is None or vb is None:
                continue
            if bool(d > _REL_TOL * max(1, va, vb)):
                return True
        except Exception:
            continue
        if not syms:
            return False  # a constant: one evaluation says all there is
    return False


def _install_reject() -> None:
    import math_verify.grader as mv_grader

    orig = mv_grader.sympy_symbolic_eq

    def sympy_symbolic_eq(a: Any, b: Any) -> bool:
        if _enabled["reject"]:
            try:
                if clearly_different(a, b):
                    STATS["rejected"] += 1
                    return False
            except Exception:  # never let the shortcut change an outcome by failing
                pass
        STATS["simplify_calls"] += 1
        return orig(a, b)

    mv_grader.sympy_symbolic_eq = sympy_symbolic_eq


def install() -> None:
    """Patch latex2sympy / math-verify in this process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _install_sll()
        _install_reject()
        _installed = True


# ---- verification as the worker runs it ---------------------------------------------------------
def make_verifier(cache_size: int = 8192) -> tuple[Callable[[str], tuple], Callable[[str, str], bool]]:
    """``(parsed, ver)``: ``parsed(s)`` (memoised parse of a cleaned answer) and ``ver(gold, pred)``.

    No timeouts inside: the caller enforces time (the worker's interval timer).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]

    @lru_cache(maxsize=cache_size)
    def parsed(s: str) -> tuple:
        return tuple(parse(wrap_for_parse(s), extraction_config=config, parsing_timeout=None))

    def ver(gold: str, pred: str) -> bool:
        g, p = parsed(gold), parsed(pred)
        if not g or not p:
            return False
        return bool(verify(list(g), list(p), timeout_seconds=None, allow_set_relation_comp=True))

    return parsed, ver


# ---- 2. warm-up corpus --------------------------------------------------------------------------
# Generic answer shapes (numbers are arbitrary): what the parser's prediction DFA needs to have seen.
WARMUP_CORPUS: tuple[str, ...] = (
    "7", "-12", "3.25", "-0.5", "1,250", "\\frac{2}{9}", "-\\frac{7}{4}", "\\frac{-3}{8}", "\\dfrac{5}{6}",
    "4/7", "12\\%", "2.5\\%", "\\sqrt{7}", "3\\sqrt{2}", "\\frac{\\sqrt{5}}{2}", "\\frac{1}{\\sqrt{3}}",
    "\\sqrt[3]{4}", "2\\sqrt[4]{3}", "\\sqrt{2}+\\sqrt{3}", "\\sqrt{11}-\\sqrt{6}", "5-2\\sqrt{6}",
    "\\frac{3+\\sqrt{5}}{2}", "\\frac{-1\\pm\\sqrt{13}}{6}", "\\pi", "4\\pi", "\\frac{\\pi}{6}",
    "\\frac{5\\pi}{12}", "18\\pi^2", "2\\pi r", "e", "e^{2}", "2^{12}", "3^{-2}", "10^{6}", "2^{n}-1",
    "x^2+3x-4", "(x-2)(x+5)", "2x^{3}-x+1", "\\frac{x+1}{x-1}", "\\frac{2x}{x^2+1}", "a^2+b^2",
    "3a-2b", "ab+bc+ca", "\\frac{ab}{a+b}", "n(n+1)", "\\frac{n(n+1)}{2}", "\\frac{n^2+n}{4}",
    "\\binom{8}{3}", "\\dbinom{10}{4}", "C_{9}^{2}", "6!", "\\frac{12!}{5!7!}", "n!", "(2n)!",
    "\\log_2 5", "\\log 7", "\\ln 3", "\\ln(x+1)", "\\log_{3}(x)", "\\sin x", "\\cos 2\\theta",
    "\\tan\\frac{\\pi}{8}", "\\sin^2 x", "\\arcsin\\frac{1}{3}", "\\cot 20^\\circ", "30^\\circ",
    "45^{\\circ}", "\\sec x", "|x-3|", "\\left|2x+1\\right|", "\\lfloor x\\rfloor", "\\lceil \\sqrt{n}\\rceil",
    "\\left\\lfloor\\frac{n}{2}\\right\\rfloor", "\\infty", "-\\infty", "(2,5)", "(-1,4]", "[0,3)",
    "[1,\\infty)", "(-\\infty,2]", "(-\\infty,-1)\\cup(3,\\infty)", "[-2,0]\\cup[1,5]", "\\{1,3,5\\}",
    "\\{-2\\}", "\\emptyset", "\\varnothing", "(3,-4)", "(1,2,3)", "\\left(\\frac{1}{2},-\\frac{3}{4}\\right)",
    "(0,\\sqrt{3})", "1,2,4", "-3, 5", "x=4", "y=2x-1", "x=2,y=3", "a=1, b=-2", "x=\\pm 3", "x=1 \\text{ or } x=2",
    "f(x)=2x+3", "g(n)=n^2", "p(x)=x^3-2x", "y=\\frac{1}{2}x+4", "x^2+y^2=25", "\\frac{x^2}{4}+\\frac{y^2}{9}=1",
    "y^2=8x", "x+2y-3=0", "x<5", "x\\geq 2", "x \\le -1", "-2<x<3", "0\\leq a\\leq 1", "x>1 \\text{ and } x<4",
    "a\\neq b", "n \\in \\mathbb{Z}", "\\mathbb{R}", "x\\in(1,3)", "\\begin{pmatrix} 2 \\\\ -1 \\end{pmatrix}",
    "\\begin{pmatrix} 1 & 2 \\\\ 0 & 3 \\end{pmatrix}", "\\begin{bmatrix} 4 & 0 \\\\ 1 & 1 \\end{bmatrix}",
    "\\begin{pmatrix} \\frac{1}{3} \\\\ 0 \\\\ -2 \\end{pmatrix}", "\\det A", "\\vec{v}", "3+4i", "2-i",
    "\\frac{1+i}{2}", "e^{i\\theta}", "i", "\\overline{z}", "\\text{odd}", "\\text{(C)}", "\\textbf{(D) } 9",
    "\\text{Tuesday}", "\\text{no solution}", "5\\text{ cm}", "12 \\text{ meters}", "\\$4.50",
    "8\\text{ cm}^2", "60 \\mbox{ mph}", "\\mathrm{m}^3", "1.2 \\times 10^{5}", "3 \\cdot 7", "a \\cdot b",
    "2 \\times 3", "\\frac{3}{4} \\div 2", "\\frac{a}{b}+\\frac{c}{d}", "\\frac{\\frac{1}{2}}{3}",
    "\\left(\\frac{2}{3}\\right)^{4}", "\\left[\\frac{1}{2},1\\right]", "\\left\\{2,4\\right\\}",
    "x_{1}=2, x_{2}=5", "a_n=3n-1", "a_{n}=2^{n-1}", "S_{10}", "\\sum_{k=1}^{n} k", "\\int_0^1 x\\,dx",
    "\\lim_{x\\to 0}\\frac{\\sin x}{x}", "f'(x)", "\\frac{d}{dx}x^2", "\\max(a,b)", "\\min\\{3,4\\}",
    "\\gcd(12,18)", "\\operatorname{lcm}(4,6)", "12_{(3)}", "1011_2", "\\overline{AB}", "\\angle ABC",
    "\\triangle ABC", "90^\\circ", "\\frac{1}{2}ab\\sin C", "2R\\sin A", "\\sqrt{a^2+b^2}",
    "\\sqrt{\\frac{3}{2}}", "\\sqrt{x-1}+\\sqrt{x+1}", "\\frac{1}{x}+\\frac{1}{y}", "\\pm\\sqrt{2}",
    "\\mp 1", "\\approx 3.14", "\\sim", "k\\pi+\\frac{\\pi}{4}", "2k\\pi", "k \\in \\mathbb{Z}",
    "\\left(k\\pi-\\frac{\\pi}{3},k\\pi+\\frac{\\pi}{6}\\right)", "\\frac{\\sqrt{3}}{2}R", "-\\frac{1}{2}\\ln 2",
    "e^{-x}", "x e^{x}", "\\frac{e^x}{x}", "a^{\\frac{1}{3}}", "x^{-1}", "10^{-3}", "0.\\overline{3}",
)


def parse_unmemoised(s: str) -> list:
    """``parse()`` of a cleaned answer as :func:`make_verifier` does it, without its memo."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    return parse(wrap_for_parse(s), extraction_config=config, parsing_timeout=None)


def warm_up(budget_s: float = 6.0) -> tuple[int, float]:
    """Parse the corpus once, unmemoised (stops after ``budget_s``); returns (items parsed, seconds)."""
    t0 = time.perf_counter()
    n = 0
    for s in WARMUP_CORPUS:
        if time.perf_counter() - t0 > budget_s:
            break
        try:
            parse_unmemoised(s)
        except Exception:  # pragma: no cover - parse() returns [] on errors
            pass
        n += 1
    return n, time.perf_counter() - t0
