"""The nano world: determinism, difficulty, disjoint splits, exact answers, step format."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from rstar.data import Problem
from rstar.evolve.world import (
    ANSWER,
    CODE,
    END_OF_ANSWER,
    END_OF_CODE,
    END_OF_OUTPUT,
    END_OF_STEP,
    OUTPUT,
    World,
    WorldConfig,
    difficulty_of,
    reference_solution,
    reference_steps,
    run_world_code,
    solution_code,
)


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=7))


def _exec_print(code: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})  # noqa: S102 - our own reference code, checked independently of the world
    return buf.getvalue().strip()


def test_deterministic_and_seed_dependent(world: World) -> None:
    a = world.problems("train", 60)
    b = World(WorldConfig(seed=7)).problems("train", 60)
    c = World(WorldConfig(seed=8)).problems("train", 60)
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.id for p in a] == [p.id for p in b]
    assert len({p.question for p in a} & {p.question for p in c}) < 3


def test_longer_list_extends_shorter(world: World) -> None:
    short = world.problems("seed", 20, difficulties=[1, 2])
    long = world.problems("seed", 50, difficulties=[1, 2])
    assert [p.id for p in long[:20]] == [p.id for p in short]
    assert [p.question for p in long[:20]] == [p.question for p in short]


def test_problems_are_rstar_problems_with_unique_ids(world: World) -> None:
    ps = world.problems("eval", 100)
    assert all(isinstance(p, Problem) for p in ps)
    assert len({p.id for p in ps}) == 100
    assert len({p.question for p in ps}) == 100
    assert all(p.source == "nano" and p.meta["split"] == "eval" for p in ps)


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5, 6])
def test_difficulty_is_the_number_of_operations(world: World, d: int) -> None:
    ps = world.problems("train", 25, difficulties=[d])
    for p in ps:
        assert difficulty_of(p) == d
        code = solution_code(reference_solution(p))
        assignments = [line for line in code.splitlines() if re.match(r"^[a-z]+ = ", line)]
        assert len(assignments) == d + 1  # the start value plus one line per operation
        # The question states each operation in its own sentence: start + d ops + the question.
        assert len(re.findall(r"[.?](?: |$)", p.question)) == d + 2


def test_difficulty_cycle_and_bounds(world: World) -> None:
    ps = world.problems("train", 12, difficulties=[2, 5])
    assert [difficulty_of(p) for p in ps] == [2, 5] * 6
    with pytest.raises(ValueError):
        world.problems("train", 1, difficulties=[7])
    with pytest.raises(ValueError):
        world.problems("nope", 1)


def test_splits_are_disjoint(world: World) -> None:
    per_split = {s: world.problems(s, 400) for s in ("train", "seed", "eval")}
    skeletons = {s: {p.meta["skeleton"] for p in ps} for s, ps in per_split.items()}
    questions = {s: {p.question for p in ps} for s, ps in per_split.items()}
    for a in skeletons:
        for b in skeletons:
            if a < b:
                assert not skeletons[a] & skeletons[b], (a, b)
                assert not questions[a] & questions[b], (a, b)
    # Membership is a property of the arithmetic skeleton, not of the stream that drew it.
    for s, ps in per_split.items():
        assert all(world.split_of(p.meta["skeleton"]) == s for p in ps)


def test_skeleton_ignores_wording() -> None:
    # Two different worlds (seeds) draw the same skeleton with different words; the split agrees.
    w0, w1 = World(WorldConfig(seed=0)), World(WorldConfig(seed=1))
    by_skel = {p.meta["skeleton"]: p for p in w0.problems("train", 300, difficulties=[1])}
    shared = [p for p in w1.problems("train", 300, difficulties=[1]) if p.meta["skeleton"] in by_skel]
    assert shared, "expected some shared difficulty-1 skeletons between seeds"
    assert all(w0.split_of(p.meta["skeleton"]) == "train" for p in shared)


def test_answers_are_exact_by_plain_exec(world: World) -> None:
    for split in ("train", "eval"):
        for p in world.problems(split, 150):
            code = solution_code(reference_solution(p))
            printed = _exec_print(code)
            assert printed == p.answer, (p.question, code)
            assert int(p.answer) >= 1 and int(p.answer) <= world.config.max_value
            assert run_world_code(code) == p.answer


def test_reference_solution_step_format(world: World) -> None:
    for p in world.problems("train", 40):
        steps = reference_steps(p)
        d = difficulty_of(p)
        assert len(steps) == d + 3  # d+1 code steps, the print step, the answer step
        assert steps[0].startswith(CODE + "\n# Step 1: ")
        for s in steps[: d + 1]:
            assert s.endswith(END_OF_STEP) and s.count(END_OF_STEP) == 1
            comment, code = s.removeprefix(CODE).strip("\n").removesuffix(END_OF_STEP).strip("\n").split("\n")
            assert comment.startswith("# Step ") and " = " in code
        last_code = steps[d + 1]
        assert f"print(" in last_code and END_OF_CODE in last_code
        assert last_code.endswith(f"{OUTPUT}{p.answer}{END_OF_OUTPUT}")
        answer = steps[-1]
        assert answer.startswith("\n" + ANSWER) and answer.endswith(END_OF_ANSWER)
        assert f"\\boxed{{{p.answer}}}" in answer
        assert "".join(steps) == reference_solution(p)


def test_reference_solution_parses_with_search_steps(world: World) -> None:
    from rstar.search.steps import StepKind, block_program, parse_step, split_steps

    for p in world.problems("train", 30):
        steps = reference_steps(p)
        assert split_steps(reference_solution(p)) == steps
        parsed = [parse_step(s) for s in steps]
        assert all(x.kind is StepKind.CODE for x in parsed[:-1])
        assert [x.closes_block for x in parsed[:-1]] == [False] * (len(steps) - 2) + [True]
        assert parsed[-1].kind is StepKind.ANSWER and parsed[-1].answer == p.answer
        # The program the search would execute for the closing step prints the answer.
        assert _exec_print(block_program(steps[:-2], steps[-2].split(OUTPUT)[0])) == p.answer


def test_run_world_code_refuses_other_programs() -> None:
    assert run_world_code("a = 3\nb = a * 4 - 2\nprint(b)") == "10"
    assert run_world_code("a = 7 // 2\nprint(a)") == "3"
    for bad in ("import os\nprint(1)", "a = 2 ** 10\nprint(a)", "print(x)", "a = (1).__class__\nprint(a)",
                "a = 1\nprint(a", "a = 10 ** 9 * 10 ** 9\nprint(a)", "a = 1 // 0\nprint(a)"):  # fmt: skip
        assert run_world_code(bad) is None, bad


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        WorldConfig(min_ops=3, max_ops=2)
    with pytest.raises(ValueError):
        WorldConfig(split_fractions={"train": 0.5, "eval": 0.4})
