"""pass@k, votes and report tables."""

from __future__ import annotations

import json
from fractions import Fraction
from itertools import combinations
from math import comb

import pytest

from rstar.metrics import (
    accuracy,
    group_answers,
    majority_vote,
    mean_pass_at_k,
    pass_at_k,
    report,
    top_n_vote,
    weighted_vote,
)


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    correct = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    n, c, k = 2000, 3, 500
    exact = 1 - Fraction(comb(n - c, k), comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(1000, 0, 100) == 0.0
    assert pass_at_k(1000, 1000, 1) == 1.0
    assert pass_at_k(64, 16, 1) == pytest.approx(0.25)


def test_pass_at_k_rejects_bad_input():
    for args in [(0, 0, 1), (5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_mean_pass_at_k_and_accuracy():
    assert mean_pass_at_k([[True, False], [False, False]], 1) == pytest.approx(0.25)
    assert mean_pass_at_k([[True, False], [False, False]], 2) == pytest.approx(0.5)
    assert accuracy([True, False, True, True]) == 0.75
    with pytest.raises(ValueError):
        accuracy([])


def eq_num(a: str, b: str) -> bool:
    """A test equivalence: numeric value equality (no worker processes needed)."""
    return float(Fraction(a)) == float(Fraction(b))


def test_grouping_is_equivalence_aware():
    assert group_answers(["1/2", "0.5", "3", None, "", "0.50"], eq_num) == [[0, 1, 5], [2]]


def test_majority_vote_default_equivalence():
    # 0.5 / \frac12 / 50\% group together with the real grader (fast paths, no symbolic call)
    assert majority_vote(["3", "0.5", "\\frac{1}{2}", "3", "50\\%"]) == "0.5"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_tie_break_is_deterministic():
    # 2 vs 2 votes: first-seen group wins when nothing else differs
    assert majority_vote(["4", "7", "7", "4"], equal=eq_num) == "4"
    assert majority_vote(["7", "4", "4", "7"], equal=eq_num) == "7"
    # with weights: equal totals -> more members -> higher single score -> first seen
    assert majority_vote(["4", "7", "7"], weights=[1.0, 0.5, 0.5], equal=eq_num) == "7"
    assert majority_vote(["4", "7"], weights=[0.5, 0.9], equal=eq_num) == "7"
    assert majority_vote(["4", "7", "4"], weights=[0.5, 1.0, 0.5], equal=eq_num) == "4"


def test_weighted_vote_sums_scores():
    answers = ["1", "2", "2", "2", "1"]
    scores = [0.9, 0.1, 0.2, 0.1, 0.8]
    assert majority_vote(answers, equal=eq_num) == "2"
    assert weighted_vote(answers, scores, equal=eq_num) == "1"
    with pytest.raises(ValueError):
        weighted_vote(answers, scores[:2], equal=eq_num)


def test_top_n_vote_paper_recipe():
    answers = ["5", "5", "5", "6", "6", None]
    scores = [0.1, 0.2, 0.15, 0.9, 0.8, 0.99]
    assert top_n_vote(answers, scores, n=6, equal=eq_num) == "5"  # plain majority over everything
    assert top_n_vote(answers, scores, n=2, equal=eq_num) == "6"  # the 2 best by PPM score
    assert top_n_vote(answers, scores, n=1, equal=eq_num) == "6"  # None never counts, even at 0.99
    assert top_n_vote(answers, scores, n=3, equal=eq_num, weighted=True) == "6"
    assert top_n_vote([None], [1.0], n=4, equal=eq_num) is None
    with pytest.raises(ValueError):
        top_n_vote(answers, scores, n=0, equal=eq_num)


def test_report_text_and_json():
    rep = report({"math500": [True, True, False, True], "aime2024": [False, True]},
                 extra={"math500": {"maj@8": 0.8}})
    d = json.loads(rep.to_json())
    assert d["benchmarks"]["math500"] == {"n": 4.0, "correct": 3.0, "accuracy": 0.75, "maj@8": 0.8}
    assert d["average"]["accuracy"] == pytest.approx(0.625)
    assert d["columns"] == ["accuracy", "maj@8"]
    text = rep.to_text()
    lines = text.splitlines()
    assert lines[0].split() == ["benchmark", "n", "accuracy", "maj@8"]
    assert lines[2].split() == ["math500", "4", "75.0", "80.0"]
    assert lines[3].split() == ["aime2024", "2", "50.0", "-"]
    assert lines[4].split() == ["average", "6", "62.5", "80.0"]
    with pytest.raises(ValueError):
        report({"x": []})
    with pytest.raises(KeyError):
        report({"x": [True]}, extra={"y": {"a": 1.0}})
