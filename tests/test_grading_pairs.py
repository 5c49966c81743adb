"""The hand-checked pair table (tests/equiv_pairs.py) and every benchmark gold against itself."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from rstar.data import load_problems
from rstar.grading import Grader, clean_answer

from equiv_pairs import PAIRS


@pytest.fixture(scope="module")
def grader():
    g = Grader(timeout_s=5.0, workers=2)
    yield g
    g.close()


def test_table_size_and_coverage():
    assert len(PAIRS) >= 150
    assert len({(p, g) for p, g, _, _ in PAIRS}) == len(PAIRS), "duplicate pairs in the table"
    styles = Counter(s for *_, s in PAIRS)
    for style in ("gsm8k", "math", "aime", "olympiad", "omni", "math-list"):
        assert styles[style] >= 2, style
    expected = Counter(e for _, _, e, _ in PAIRS)
    assert expected[True] >= 60 and expected[False] >= 50


@pytest.mark.parametrize("pred, gold, expected, style", PAIRS, ids=[f"{i}-{p[3]}" for i, p in enumerate(PAIRS)])
def test_pair(grader, pred, gold, expected, style):
    assert grader.is_equiv(pred, gold) is expected


def test_pairs_batched_agree(grader):
    got = grader.grade_many([p for p, *_ in PAIRS], [g for _, g, *_ in PAIRS])
    assert got == [e for _, _, e, _ in PAIRS]


FULL = ("math500", "gsm8k", "aime2024", "amc23")
SAMPLED = ("olympiadbench", "collegemath", "gaokao2023en", "omni-math", "math")


def _golds(name: str, data_dir, sample: int | None) -> list:
    ps = [p for p in load_problems(name, data_dir=data_dir) if p.answer]
    if sample is not None and len(ps) > sample:
        ps = random.Random(0).sample(ps, sample)
    return ps


@pytest.mark.parametrize("name", FULL + SAMPLED)
def test_every_gold_matches_itself_wrapped(grader, data_dir, name):
    """'The answer is $\\boxed{gold}$.' is graded correct against gold (all of FULL, 150 of the rest)."""
    ps = _golds(name, data_dir, None if name in FULL else 150)
    preds = [f"The answer is $\\boxed{{{p.answers[0]}}}$." for p in ps]
    got = grader.grade_many(preds, [p.answer for p in ps])
    bad = [(p.id, p.answer) for p, ok in zip(ps, got) if not ok]
    assert not bad, bad[:10]


def _symbolic_self_check(grader: Grader, ps: list) -> list:
    pool = grader._get_pool()
    bad = []
    for p in ps:
        c = clean_answer(p.answers[0])
        res = pool.check("pg", c, c)
        if not res.equal:
            bad.append((p.id, p.answer, res.status))
    return bad


@pytest.mark.parametrize("name", ["math500", "olympiadbench", "aime2024", "gsm8k"])
def test_math_verify_parses_golds_sample(grader, data_dir, name):
    """The symbolic engine (not just the fast path) accepts a sample of golds against themselves."""
    assert not _symbolic_self_check(grader, _golds(name, data_dir, 15))


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL + ("olympiadbench",))
def test_math_verify_parses_all_golds(grader, data_dir, name):
    assert not _symbolic_self_check(grader, _golds(name, data_dir, None))
