"""Cheap, exact-safe normalisation used by the grader's fast paths.

Everything here must only ever make *equal* answers look equal: a fast path that says True on
normalised-string equality, or that decides two plain numbers, never needs the symbolic engine.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from fractions import Fraction

from rstar.grading.extract import _BOX_RE, extract_boxed, strip_answer, unwrap_text

__all__ = [
    "repair_escapes",
    "clean_answer",
    "normalize_answer",
    "parse_number",
    "NumberValue",
    "numbers_equal",
    "choice_letter",
    "gold_alternatives",
]

# JSON/Python escape mangling seen in the benchmark files: "\frac" written as "\f"+"rac" becomes a
# form feed + "rac", "\tfrac" a TAB + "frac", "\times" a TAB + "imes".  Repair only before the
# LaTeX command names that we actually see, so real tabs/newlines in prose survive.
_TAB_CMDS = r"(?:frac|imes|ext|heta|an|au|riangle|o\b|op|ilde|extbf|extit|hinspace|frac)"
_REPAIRS = (
    (re.compile(r"\x0c(?=[A-Za-z])"), r"\\f"),
    (re.compile(r"\x08(?=[A-Za-z])"), r"\\b"),
    (re.compile(r"\x0b(?=[A-Za-z])"), r"\\v"),
    (re.compile(r"\x07(?=[A-Za-z])"), r"\\a"),
    (re.compile(r"\r(?=(?:ight|ho|angle|m\b|rbracket)[^a-z])"), r"\\r"),
    (re.compile(r"\t(?=" + _TAB_CMDS + ")"), r"\\t"),
)


def repair_escapes(s: str) -> str:
    """Undo ``"\\frac"`` -> form feed + ``"rac"`` style escape damage (see module comment)."""
    if not any(c in s for c in "\x0c\x08\x0b\x07\r\t"):
        return s
    for rx, rep in _REPAIRS:
        s = rx.sub(rep, s)
    return s


_UNIT_WORDS = (
    r"(?:square\s+|sq\.?\s+|cubic\s+)?(?:units?|cm|centimeters?|centimetres?|mm|millimeters?|m|meters?|"
    r"metres?|km|kilometers?|inch(?:es)?|in|feet|foot|ft|yards?|yd|miles?|mi|mph|hours?|hrs?|h|minutes?|"
    r"mins?|seconds?|secs?|s|days?|weeks?|months?|years?|dollars?|cents?|pounds?|lbs?|ounces?|oz|"
    r"grams?|g|kg|kilograms?|liters?|litres?|l|ml|gallons?|degrees?|people|persons?|students?|"
    r"apples?|eggs?|books?|pages?|miles\s+per\s+hour|km/h|m/s|cm\^2|m\^2|cm\^3|m\^3)"
)
_NUM_CORE = r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)"
_TRAILING_TEXT_UNIT_RE = re.compile(
    r"^(?P<num>.*?[\d}])\s*(?:\\(?:text|mbox|mathrm)\s*\{\s*[^{}]*\}(?:\s*\^\s*\{?\d\}?)?\s*)+$"
)
_TRAILING_WORD_UNIT_RE = re.compile(
    r"^(?P<num>" + _NUM_CORE + r")\s*" + _UNIT_WORDS + r"(?:\s*\^\s*\{?\d\}?)?\.?$", re.IGNORECASE
)
_DEGREE_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree|\^\s*\{\s*\\text\{\s*o\s*\}\s*\}")
_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad|\\displaystyle|\\left(?![a-z])|\\right(?![a-z])|\\big[lr]?|\\Big[lr]?")
# A leading 0 group ("0,245") is not a thousands separator: math-verify reads it as a decimal comma.
_GAP = r"(?:\s|\\[,;:! ]|\\q?quad(?![A-Za-z]))+"
_THIN_THOUSANDS_RE = re.compile(r"(?<![\d.,])\d{1,3}(?:\\,\d{3})+(?![\d.,])")
_DIGIT_GAP_RE = re.compile(r"(?<=\d)" + _GAP + r"(?=\d)|(?<=\d\.)" + _GAP + r"(?=\d)")
_COMMAND_GAP_RE = re.compile(r"(\\[A-Za-z]+)" + _GAP + r"(?=[A-Za-z])")
_THOUSANDS_RE = re.compile(r"^[-+]?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?$")


def _strip_units(t: str) -> str:
    m = _TRAILING_TEXT_UNIT_RE.match(t)
    if m and re.search(r"\d", m.group("num")):
        inner = t[m.end("num") :]
        # Keep multiple-choice / word answers such as "\text{(B)}": only strip after a number-ish head.
        if not re.search(r"\\(?:text|mbox)\s*\{\s*\(?[A-E]\)?\s*\}", inner):
            t = m.group("num").strip()
    m = _TRAILING_WORD_UNIT_RE.match(t)
    if m:
        t = m.group("num")
    return t


def clean_answer(s: str) -> str:
    """Light clean-up that keeps LaTeX parseable (what the symbolic engine sees).

    Repairs escapes, takes the box out of a boxed answer, drops math delimiters, a trailing period,
    currency and trailing units (``5\\text{ cm}``, ``90 square units``) and degree marks.
    """
    t = repair_escapes(s).strip()
    if _BOX_RE.search(t):
        boxed = extract_boxed(t)
        if boxed is not None:
            t = boxed
    t = strip_answer(t)
    t = t.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    t = re.sub(r"^\\\$\s*|^\$\s*(?=\d)", "", t)
    t = re.sub(r"\\\$", "", t)
    t = _DEGREE_RE.sub("", t).strip()
    t = _strip_units(t)
    t = re.sub(r"(\d)\s*\\%", r"\1\\%", t)
    return t.strip()


def _fix_fracs(t: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{x} -> \frac{1}{x}, \frac{a}2 -> \frac{a}{2}; \sqrt2 -> \sqrt{2}
    t = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", t)
    t = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", t)
    t = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", t)
    t = re.sub(r"\\sqrt\s*(\d|[a-zA-Z])(?![a-zA-Z])", r"\\sqrt{\1}", t)  # \sqrt23 is \sqrt{2}3 in LaTeX
    return t


def normalize_answer(s: str) -> str:
    """Canonical string for equality: :func:`clean_answer` plus spacing/``\\left``/``\\text`` removal.

    Used as a memo key and for the string-equality fast path; never sent to the parser.
    """
    t = clean_answer(s)
    t = re.sub(r"(\d),\\!\s*(?=\d)", r"\1,", t)  # 11,\! 111 is a thousands separator (not "11, \! 111")
    t = re.sub(r"(\d)\{,\}(?=\d)", r"\1,", t)
    # "6, 250" (a space after the comma) is a list of two numbers, not 6250.
    spaced_commas = bool(re.search(r"\s,|,\s", t))
    t = _fix_fracs(t)
    # Thin-space thousands separators ("1\,000") are joined -- a deliberate difference from
    # math-verify, which does not read them as 1000.  Any other gap between digits ("2 3",
    # "1\;000", "1. 5") or after a command name ("\sin x") separates tokens for the parser, so it is
    # kept (as "␣") instead of being squeezed out.
    t = _THIN_THOUSANDS_RE.sub(lambda m: m.group(0).replace("\\,", ""), t)
    t = _DIGIT_GAP_RE.sub("\u2423", t)
    t = _COMMAND_GAP_RE.sub("\\1\u2423", t)
    t = _SPACING_RE.sub("", t)
    t = re.sub(r"\\(?:text|textbf|textrm|mbox|mathrm)\s*\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\s+", "", t)
    if not spaced_commas and _THOUSANDS_RE.match(t):
        t = t.replace(",", "")
    # single-variable assignment "x=3" -> "3" (only one '=' and a lone letter on the left)
    m = re.match(r"^[A-Za-z](?:_\{?\w+\}?)?=([^=<>]+)$", t)
    if m:
        t = m.group(1)
    t = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", t)
    if t.endswith("."):
        t = t[:-1]
    return t


@dataclass(frozen=True)
class NumberValue:
    """A plain number: exact value, whether it was written as a decimal, whether it had ``%``.

    ``digits`` counts the significant digits of a decimal as written (0 for integers and fractions).
    """

    value: Fraction
    approx: bool
    percent: bool
    digits: int = 0


_INT_OR_DEC_RE = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)$")
_FRAC_RE = re.compile(r"^([-+]?)\\frac\{([-+]?\d+)\}\{([-+]?\d+)\}$")
_SLASH_RE = re.compile(r"^([-+]?\d+)/([-+]?\d+)$")


def parse_number(norm: str) -> NumberValue | None:
    """A :func:`normalize_answer` string that is a plain number, fraction or percentage, else None."""
    t = norm
    percent = False
    if t.endswith("\\%") or t.endswith("%"):
        percent = True
        t = t[:-2] if t.endswith("\\%") else t[:-1]
    if not t or len(t) > 60:
        return None
    if _INT_OR_DEC_RE.match(t):
        approx = "." in t
        digits = len(t.lstrip("+-").replace(".", "").lstrip("0")) if approx else 0
        return NumberValue(Fraction(t), approx, percent, digits)
    m = _FRAC_RE.match(t)
    if m:
        num, den = int(m.group(2)), int(m.group(3))
        if den == 0:
            return None
        v = Fraction(num, den)
        return NumberValue(-v if m.group(1) == "-" else v, False, percent)
    m = _SLASH_RE.match(t)
    if m:
        num, den = int(m.group(1)), int(m.group(2))
        if den == 0:
            return None
        return NumberValue(Fraction(num, den), False, percent)
    return None


# math-verify reads a decimal into a sympy Float carrying as many digits as written; past 15
# significant digits its precision differs from a 53-bit Float and the rounded values no longer
# compare equal, so such decimals are left to it.
_MAX_DECIMAL_DIGITS = 15


def _round6(x: Fraction) -> int | None:
    """``x`` rounded to 6 decimals (as an integer count of 1e-6), or None on an exact tie."""
    y = x * 10**6
    if y.denominator == 2:
        return None  # ...5 exactly: binary floats may round either way; let math-verify decide
    return round(y)


def _close(a: Fraction, a_approx: bool, b: Fraction, b_approx: bool) -> bool | None:
    if a == b:
        return True
    if not (a_approx or b_approx):
        return False
    # math-verify (float_rounding=6): a decimal equals a value when both round to the same 6
    # decimal places -- except an exact integer, which only equals a decimal of exactly its value
    # (sympy compares the rounded Float with the Integer, and they differ).
    if (not a_approx and a.denominator == 1) or (not b_approx and b.denominator == 1):
        return False
    ra, rb = _round6(a), _round6(b)
    if ra is None or rb is None:
        return None
    return ra == rb


def numbers_equal(gold: NumberValue, pred: NumberValue) -> bool | None:
    """Decide two plain numbers; None when only math-verify can say the same thing it would say.

    A ``%`` on either side means "value/100" *or* "the same number with a percent unit":
    ``50\\%`` equals ``0.5`` and ``50``; but ``50`` never equals ``0.5`` (the official rStar checker's
    x100/÷100 leniency is not reproduced: it accepts answers off by a factor of 100).
    """
    if max(gold.digits, pred.digits) > _MAX_DECIMAL_DIGITS:
        return None
    gs = {gold.value, gold.value / 100} if gold.percent else {gold.value}
    ps = {pred.value, pred.value / 100} if pred.percent else {pred.value}
    undecided = False
    for g in gs:
        for p in ps:
            r = _close(g, gold.approx, p, pred.approx)
            if r:
                return True
            undecided = undecided or r is None
    return None if undecided else False


_CHOICE_RE = re.compile(r"^\(?([A-Z])\)?$")
_CHOICE_PREFIX_RE = re.compile(r"^\(([A-Z])\)|^([A-Z])(?:[.:)]|\s|$)")


def choice_letter(s: str, *, lenient: bool = False) -> str | None:
    """Multiple-choice letter of ``(B)``, ``\\text{(B)}``, ``B``; with ``lenient`` also ``(B) 12``, ``B. 12``."""
    t = unwrap_text(strip_answer(repair_escapes(s)))
    t = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", t)
    t = re.sub(r"\\(?:left|right)(?![A-Za-z])|\\[,;!]", "", t).strip()
    m = _CHOICE_RE.match(t)
    if m:
        return m.group(1)
    if lenient:
        m = _CHOICE_PREFIX_RE.match(t)
        if m:
            return m.group(1) or m.group(2)
    return None


_LIST_LITERAL_RE = re.compile(r"^\[\s*(['\"]).*\1\s*\]$", re.DOTALL)


def gold_alternatives(gold: str) -> list[str]:
    """Several accepted answers: a list literal of strings (``"['3', '-3']"``) means any of them.

    The MATH test file stores 4 golds as JSON lists (rows with index 335, 2718, 2914, 2938); the
    loaders turn them into this string form, and the official code's ``str()`` of such a list gives
    the same text.  Anything else is one answer.
    """
    t = gold.strip()
    if _LIST_LITERAL_RE.match(t):
        try:
            val = ast.literal_eval(t)
        except (ValueError, SyntaxError):
            return [gold]
        if isinstance(val, list) and val and all(isinstance(v, str) for v in val):
            return [repair_escapes(v) for v in val]
    return [gold]
