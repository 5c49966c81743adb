"""Extraction, normalisation and the Grader's behaviour (timeouts, threads, asyncio, cache)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

import pytest

from rstar.grading import Grader, answers_equal, extract_answer, extract_boxed, normalize_answer
from rstar.grading.cache import LRUCache
from rstar.grading.normalize import (
    choice_letter,
    gold_alternatives,
    numbers_equal,
    parse_number,
    repair_escapes,
)

# Equal, so no numeric shortcut applies, and sympy's simplify takes minutes on it.
HANG_GOLD, HANG_PRED = "(x^2-1)^{200}", "(x+1)^{200}(x-1)^{200}"


@pytest.fixture(scope="module")
def grader():
    g = Grader(timeout_s=5.0, workers=2)
    yield g
    g.close()


# ---- extraction ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("So x = 2.\nThus the answer is $\\boxed{3}$.", "3"),  # official extractor returns "So x = 2"
        ("<answer>Thus.\nSo \\boxed{3}.", "3"),
        ("First \\boxed{1}, then corrected: \\boxed{2}", "2"),
        ("The value \\boxed{7} is what we wanted, as shown", "7"),
        ("$\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{1}{\\sqrt{2}}"),
        ("\\boxed{\\dfrac{3}{4}}", "\\dfrac{3}{4}"),
        ("\\fbox{12}", "12"),
        ("the answer is \\boxed 5 and done", "5"),
        ("\\boxed{\\text{(B)}}", "(B)"),
        ("\\boxed{\\text{Monday}}.", "Monday"),
        ("\\boxed{5\\text{ cm}}", "5\\text{ cm}"),
        ("\\boxed{50\\%}", "50\\%"),
        ("\\boxed{x = 3.}", "x = 3"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{(-\\infty, 3]}", "(-\\infty, 3]"),
        ("\\boxed{\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}}", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}"),
        ("\\boxed{\\boxed{8}}", "8"),
        ("\\boxed {9}", "9"),
        ("no box here", None),
        ("", None),
        ("\\boxed{3} then \\boxed{4", None),  # truncated last box: no stale answer
        ("\\boxed{}", None),
        ("\\boxed{2.5}.", "2.5"),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<code>x=1<end_of_step>\n<answer>The answer is: $\\boxed{36}$<end_of_answer>", "36"),
        ("<answer>\\boxed{1} wrong. Final: \\boxed{2}<end_of_answer> \\boxed{9}", "2"),
        ("<answer>The answer is 42.<end_of_answer>", "42"),
        ("<answer>Final answer: \\frac{1}{2}<end_of_answer>", "\\frac{1}{2}"),
        ("<answer>\\boxed{3<end_of_answer>", None),
        ("<answer>I could not solve it<end_of_answer>", None),
        ("no tags, but \\boxed{11}", "11"),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---- normalisation --------------------------------------------------------------------------------
def test_repair_escapes_fixes_json_damage_only():
    assert repair_escapes("\x0crac{1}{2}") == "\\frac{1}{2}"
    assert repair_escapes("(\tfrac32, 1)") == "(\\tfrac32, 1)"
    assert repair_escapes("3 \times 4") == "3 \\times 4"
    assert repair_escapes("line1\tThe next") == "line1\tThe next"  # a real tab in prose stays


def test_gold_alternatives():
    assert gold_alternatives("['3', '-3']") == ["3", "-3"]
    assert gold_alternatives("[1, 2]") == ["[1, 2]"]  # a closed interval, not a list of answers
    assert gold_alternatives("[1,2)") == ["[1,2)"]
    assert gold_alternatives("['\\\\left(\\tfrac32, 1\\\\right)']") == ["\\left(\\tfrac32, 1\\right)"]


@pytest.mark.parametrize(
    "s, value, approx, percent",
    [
        ("1,000", Fraction(1000), False, False),
        ("\\frac{3}{4}", Fraction(3, 4), False, False),
        ("\\dfrac34", Fraction(3, 4), False, False),
        ("-\\frac{1}{2}", Fraction(-1, 2), False, False),
        ("0.25", Fraction(1, 4), True, False),
        (".5", Fraction(1, 2), True, False),
        ("50\\%", Fraction(50), False, True),
        ("\\$1,234.50", Fraction(246900, 200), True, False),
        ("7/2", Fraction(7, 2), False, False),
    ],
)
def test_parse_number(s, value, approx, percent):
    n = parse_number(normalize_answer(s))
    assert n is not None and n.value == value and n.approx == approx and n.percent == percent


@pytest.mark.parametrize("s", ["1,2", "(1,2)", "x+1", "\\sqrt{2}", "1/0", "abc", "2^{10}"])
def test_parse_number_rejects_non_numbers(s):
    assert parse_number(normalize_answer(s)) is None


def test_percent_policy():
    n = lambda s: parse_number(normalize_answer(s))  # noqa: E731
    assert numbers_equal(n("50\\%"), n("0.5"))
    assert numbers_equal(n("0.5"), n("50\\%"))
    assert numbers_equal(n("50"), n("50\\%"))
    assert not numbers_equal(n("50"), n("0.5"))  # no x100 leniency without a percent sign


def test_choice_letter():
    assert choice_letter("\\text{(B)}") == "B"
    assert choice_letter("(C)") == "C"
    assert choice_letter("(B) 12") is None
    assert choice_letter("(B) 12", lenient=True) == "B"
    assert choice_letter("12") is None


def test_lru_cache_is_bounded():
    c: LRUCache[int] = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1
    c.put("c", 3)  # evicts "b", the least recently used
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3
    assert len(c) == 2
    with pytest.raises(ValueError):
        LRUCache(-1)


# ---- Grader ---------------------------------------------------------------------------------------
def test_none_and_empty_are_wrong(grader):
    assert grader.is_equiv(None, "3") is False
    assert grader.is_equiv("", "3") is False
    assert grader.is_equiv("3", "") is False


def test_list_gold_as_sequence(grader):
    assert grader.is_equiv("-3", ["3", "-3"])
    assert not grader.is_equiv("4", ["3", "-3"])
    with pytest.raises(TypeError):
        grader.is_equiv("3", [3])


def test_memo_cache_hits(grader):
    before = grader.stats.cache_hits
    assert grader.is_equiv("\\frac{x}{2}", "0.5x")
    sym_after_first = grader.stats.symbolic
    assert grader.is_equiv("\\frac{x}{2}", "0.5x")
    assert grader.stats.cache_hits == before + 1
    assert grader.stats.symbolic == sym_after_first
    assert grader.cache_info()["size"] >= 1


def test_grade_many_matches_is_equiv_and_checks_lengths(grader):
    preds = ["\\frac{x}{2}", "0.5", "x^2-1", "(x-1)(x+1)", None, "\\sqrt{4}", "3"]
    golds = ["0.5x", "\\frac12", "(x-1)(x+1)", "x^2+1", "3", "2", "['3', '-3']"]
    assert grader.workers == 2  # the batched path runs symbolic checks in parallel
    many = grader.grade_many(preds, golds)
    one = [grader.is_equiv(p, q) for p, q in zip(preds, golds)]
    with pytest.raises(ValueError):
        grader.grade_many(["1"], [])
    assert many == one == [True, True, True, False, False, True, True]


def test_answers_equal_is_symmetric():
    for a, b in [("x=3", "3"), ("0.5", "\\frac12"), ("\\{1,2\\}", "\\{2,1\\}"), ("(x+1)^2", "x^2+2x+1")]:
        assert answers_equal(a, b) and answers_equal(b, a)
    assert not answers_equal("(1,2)", "(2,1)")
    assert not answers_equal("50", "0.5")
    assert not answers_equal(None, "1")


def test_hang_returns_false_within_timeout():
    with Grader(timeout_s=1.0) as g:
        g._get_pool().warm_up()
        t = time.monotonic()
        assert g.is_equiv(HANG_PRED, HANG_GOLD) is False
        elapsed = time.monotonic() - t
        assert elapsed < 1.0 + 0.5, elapsed
        assert g.stats.timeouts == 1
        # The stuck worker was replaced: the next symbolic check still works.
        assert g.is_equiv("\\frac{x}{2}", "0.5x") is True
        # And the timed-out pair is memoised as not equal (no second stall).
        t = time.monotonic()
        assert g.is_equiv(HANG_PRED, HANG_GOLD) is False
        assert time.monotonic() - t < 0.1


def test_works_from_threads(grader):
    pairs = [("\\frac{x}{2}", "x/2"), ("2\\sqrt{2}", "\\sqrt{8}"), ("x^2", "x^3"), ("\\{1,3\\}", "\\{3,1\\}")] * 3
    pairs = [(p + " " * i, q) for i, (p, q) in enumerate(pairs)]  # distinct strings, same meaning
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda pq: grader.is_equiv(*pq), pairs))
    assert got == [True, True, False, True] * 3


def test_works_inside_asyncio(grader):
    async def main():
        return await asyncio.gather(
            grader.ais_equiv("\\frac{2x}{4}", "x/2"), grader.ais_equiv("x+2", "x+3"), grader.ais_equiv("1,000", "1000")
        )

    assert asyncio.run(main()) == [True, False, True]


def test_invalid_arguments():
    with pytest.raises(ValueError):
        Grader(timeout_s=0)
    with pytest.raises(ValueError):
        Grader(workers=0)
