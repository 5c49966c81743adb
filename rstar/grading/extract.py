"""Answer extraction from model text.

Why not the official extractor: rStar-Math's ``extract_math_answer`` first cuts the text at the
first ``".\\n"`` (so ``"Thus.\\nSo \\boxed{3}."`` yields ``"Thus"``) and returns the whole text
when no box closes.  Here the last *complete* top-level ``\\boxed``/``\\fbox`` wins, braces are
matched, and an unclosed last box (a truncated generation) yields ``None``, not a stale answer.
"""

from __future__ import annotations

import re

__all__ = ["extract_boxed", "extract_answer", "strip_answer", "unwrap_text"]

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_OPEN = "<answer>"
_ANSWER_CLOSE = "<end_of_answer>"
_ANSWER_IS_RE = re.compile(
    r"(?:final\s+answer|answer)\s*(?:is|=|:)\s*:?\s*(.+?)\s*(?:\.\s*)?$", re.IGNORECASE | re.DOTALL
)
_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textrm|textit|mbox|mathrm|mathbf|operatorname)\s*\{")


def _match_brace(s: str, open_idx: int) -> int:
    """Index of the ``}`` closing the ``{`` at ``open_idx`` (``\\{`` and ``\\}`` are literals), or -1."""
    depth = 0
    i = open_idx
    n = len(s)
    while i < n:
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _boxes(text: str) -> list[str | None]:
    """Contents of the top-level boxes, in order; ``None`` for a box that never closes."""
    out: list[str | None] = []
    pos = 0
    while True:
        m = _BOX_RE.search(text, pos)
        if m is None:
            return out
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _match_brace(text, j)
            if end < 0:
                out.append(None)
                return out
            out.append(text[j + 1 : end])
            pos = end + 1
        else:
            # ``\boxed 5`` (TeX allows a single-token argument): up to whitespace, '$' or end.
            k = j
            while k < len(text) and not text[k].isspace() and text[k] not in "$}":
                k += 1
            tok = text[j:k]
            out.append(tok if tok else None)
            pos = max(k, m.end())


def unwrap_text(s: str) -> str:
    """``\\text{...}`` (and ``\\mbox``/``\\textbf``) around the *whole* answer removed, repeatedly."""
    while True:
        t = s.strip()
        m = _TEXT_CMD_RE.match(t)
        if not m or m.group(0).startswith("\\mathrm") or m.group(0).startswith("\\mathbf") \
                or m.group(0).startswith("\\operatorname"):
            return t
        end = _match_brace(t, m.end() - 1)
        if end != len(t) - 1:
            return t
        s = t[m.end() : end]


def strip_answer(s: str) -> str:
    """Cosmetic clean-up of an extracted answer: math delimiters, a ``\\text`` wrapper, a final period."""
    t = s.strip()
    for _ in range(3):
        before = t
        if t.startswith("$$") and t.endswith("$$") and len(t) >= 4:
            t = t[2:-2].strip()
        elif t.startswith("$") and t.endswith("$") and len(t) >= 2:
            t = t[1:-1].strip()
        if (t.startswith("\\(") and t.endswith("\\)")) or (t.startswith("\\[") and t.endswith("\\]")):
            t = t[2:-2].strip()
        t = unwrap_text(t)
        t = re.sub(r"(?:\\[,;:!]|\\quad|\\qquad|~|\s)+$", "", t)
        # A trailing sentence period (not a decimal point: ``5.`` is still 5, "x." is the sentence end).
        if t.endswith(".") and not t.endswith("\\."):
            t = t[:-1].rstrip()
        t = t.rstrip(" ,;")
        if t == before:
            break
    return t


def extract_boxed(text: str) -> str | None:
    """Content of the last complete top-level ``\\boxed{}``/``\\fbox{}``; ``None`` if none (or it is cut off)."""
    if not text:
        return None
    boxes = _boxes(text)
    if not boxes or boxes[-1] is None:
        return None
    inner = boxes[-1]
    # ``\boxed{\boxed{3}}`` or ``\boxed{\text{\boxed{3}}}``: the innermost wins.
    if _BOX_RE.search(inner):
        nested = extract_boxed(inner)
        if nested is not None:
            inner = nested
    ans = strip_answer(inner)
    return ans if ans else None


def extract_answer(text: str) -> str | None:
    """The answer of a final step: the boxed answer inside the last ``<answer> ... <end_of_answer>``.

    Falls back to ``answer is X`` inside the answer block, and to the last box of the whole text
    when there is no answer block (plain chain-of-thought output).
    """
    if not text:
        return None
    start = text.rfind(_ANSWER_OPEN)
    if start < 0:
        return extract_boxed(text)
    block = text[start + len(_ANSWER_OPEN) :]
    end = block.find(_ANSWER_CLOSE)
    if end >= 0:
        block = block[:end]
    boxed = extract_boxed(block)
    if boxed is not None:
        return boxed
    if _BOX_RE.search(block):
        return None  # a box was opened but never closed: truncated, no answer
    m = _ANSWER_IS_RE.search(block.strip())
    if m:
        ans = strip_answer(m.group(1))
        return ans or None
    return None
