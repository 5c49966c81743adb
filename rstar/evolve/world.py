"""The nano world: synthetic arithmetic word problems with exact answers.

Why it exists: self-evolution has to be *shown* on a 2-core machine with a model the project
trains itself. The world gives (a) an endless, seeded supply of problems whose difficulty is the
number of operations, (b) exact integer answers, (c) train / seed / eval splits that are disjoint by
construction, and (d) a reference solver that writes correct solutions in the rStar step format
(standing in for the paper's bootstrap model when building the seed set).

Splits are decided by a hash of the problem's *arithmetic skeleton* (start value plus the
operations and operands, ignoring names, objects and wording), so no evaluation problem shares its
arithmetic with any training problem, whatever the surface text.
"""

from __future__ import annotations

import ast
import hashlib
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from rstar.data import Problem
from rstar.search.steps import (
    ANSWER,
    CODE,
    END_OF_ANSWER,
    END_OF_CODE,
    END_OF_OUTPUT,
    END_OF_STEP,
    OUTPUT,
    observation_text,
)

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Step format: the strings come from rstar.search.steps (the protocol the search parses and
# training uses); the functions below are the only place this module assembles them.
# --------------------------------------------------------------------------------------------

FINAL_COMMENT = "# Now print the final answer"


def format_code_step(index: int, comment: str, code: str) -> str:
    """One intermediate step: a reasoning comment, one line of Python, ``<end_of_step>``.

    The first step opens the code block; later steps start with the newline the model writes
    after the previous stop string."""
    head = f"{CODE}\n" if index == 0 else "\n"
    return f"{head}# Step {index + 1}: {comment}\n{code}\n{END_OF_STEP}"


def format_final_code_step(var: str) -> str:
    """The step that prints the result and closes the code block."""
    return f"\n{FINAL_COMMENT}\nprint({var})\n{END_OF_CODE}"


def format_observation(output: str) -> str:
    """What the system appends after ``<end_of_code>``: the executed block's output."""
    return observation_text(output)


def format_answer_step(sentence: str, answer: str) -> str:
    """The final answer step, with the answer in ``\\boxed{}``."""
    return f"\n{ANSWER}{sentence} The answer is \\boxed{{{answer}}}\n{END_OF_ANSWER}"


# --------------------------------------------------------------------------------------------
# Vocabulary of the world
# --------------------------------------------------------------------------------------------
NAMES: tuple[str, ...] = (
    "Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivan", "Jill", "Kai", "Lena",
    "Mila", "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wes", "Yara",
    "Zoe", "Leo", "Mia", "Noah", "Ivy", "Theo",
)  # fmt: skip
OBJECTS: tuple[str, ...] = (
    "apples", "marbles", "stickers", "coins", "cookies", "pencils", "stamps", "shells", "cards",
    "eggs", "beads", "books", "candies", "buttons", "flowers", "toys", "balloons", "rocks",
)  # fmt: skip
CONTAINERS: tuple[str, ...] = ("bags", "boxes", "jars", "packs", "baskets", "bundles")
QUESTION_TEMPLATES: tuple[str, ...] = (
    "How many {obj} does {h} have now?",
    "How many {obj} does {h} have in the end?",
    "How many {obj} does {h} have?",
    "What is the number of {obj} {h} has now?",
)
START_TEMPLATES: tuple[str, ...] = (
    "{h} has {v} {obj}.",
    "{h} starts with {v} {obj}.",
    "{h} owns {v} {obj}.",
    "At first, {h} has {v} {obj}.",
)
# Operation kinds. Each template is (sentence, code); {h}/{x} holder name/variable, {g}/{y} new
# holder name/variable (comparisons switch the holder), {f} another person, {k}/{m}/{p} operands.
TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    "add": (
        ("{h} buys {k} more {obj}.", "{x} = {x} + {k}"),
        ("{f} gives {h} {k} {obj}.", "{x} = {x} + {k}"),
        ("{h} finds {k} {obj}.", "{x} = {x} + {k}"),
        ("{h} gets {k} more {obj} from {f}.", "{x} = {x} + {k}"),
    ),
    "sub": (
        ("{h} gives {k} {obj} to {f}.", "{x} = {x} - {k}"),
        ("{h} loses {k} {obj}.", "{x} = {x} - {k}"),
        ("{h} sells {k} {obj}.", "{x} = {x} - {k}"),
        ("{h} uses {k} of the {obj}.", "{x} = {x} - {k}"),
    ),
    "groups": (
        ("{h} buys {k} {c} with {m} {obj} in each.", "{x} = {x} + {k} * {m}"),
        ("{h} gets {k} {c} of {m} {obj} each.", "{x} = {x} + {k} * {m}"),
    ),
    "mul": (
        ("{h} makes the number of {obj} {k} times as large.", "{x} = {x} * {k}"),
        ("The {obj} of {h} become {k} times as many.", "{x} = {x} * {k}"),
    ),
    "double": (
        ("{h} doubles the number of {obj}.", "{x} = {x} * 2"),
        ("The number of {obj} {h} has doubles.", "{x} = {x} * 2"),
    ),
    "div": (
        ("{h} splits the {obj} into {k} equal groups and keeps one group.", "{x} = {x} // {k}"),
        ("{h} shares the {obj} equally among {k} people, {h} included.", "{x} = {x} // {k}"),
    ),
    "half": (
        ("{h} keeps only half of the {obj}.", "{x} = {x} // 2"),
        ("{h} gives half of the {obj} to {f}.", "{x} = {x} // 2"),
    ),
    "pct_off": (
        ("{h} gives away {p}% of the {obj}.", "{x} = {x} - {x} * {p} // 100"),
        ("{h} loses {p}% of the {obj}.", "{x} = {x} - {x} * {p} // 100"),
    ),
    "pct_on": (
        ("{h} gets {p}% more {obj}.", "{x} = {x} + {x} * {p} // 100"),
    ),
    "more_than": (
        ("{g} has {k} more {obj} than {h}.", "{y} = {x} + {k}"),
    ),
    "fewer_than": (
        ("{g} has {k} fewer {obj} than {h}.", "{y} = {x} - {k}"),
    ),
    "twice_as": (
        ("{g} has twice as many {obj} as {h}.", "{y} = {x} * 2"),
    ),
    "thrice_as": (
        ("{g} has three times as many {obj} as {h}.", "{y} = {x} * 3"),
    ),
    "half_as": (
        ("{g} has half as many {obj} as {h}.", "{y} = {x} // 2"),
    ),
}  # fmt: skip
OP_KINDS: tuple[str, ...] = tuple(TEMPLATES)
SWITCH_KINDS = frozenset({"more_than", "fewer_than", "twice_as", "thrice_as", "half_as"})
PERCENTS: tuple[int, ...] = (10, 20, 25, 50, 75)


@dataclass
class WorldConfig:
    """Knobs of the problem world. Defaults keep numbers short (few digit tokens) and answers ≥ 1."""

    seed: int = 0
    min_ops: int = 1
    max_ops: int = 6
    max_start: int = 60
    max_value: int = 999  # every intermediate value stays in [1, max_value]
    # Fractions of the skeleton-hash space per split (disjoint by construction). "seed" is the
    # small pool of solved examples that stands in for the bootstrap model's data.
    split_fractions: dict[str, float] = field(
        default_factory=lambda: {"train": 0.7, "seed": 0.1, "eval": 0.2}
    )
    source: str = "nano"

    def __post_init__(self) -> None:
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        total = sum(self.split_fractions.values())
        if any(v <= 0 for v in self.split_fractions.values()) or abs(total - 1.0) > 1e-9:
            raise ValueError(f"split_fractions must be positive and sum to 1, got {self.split_fractions}")


def difficulty_of(problem: Problem) -> int:
    """Number of operations of a world problem."""
    return int(problem.meta["difficulty"])


def _unit_hash(text: str) -> float:
    """A uniform number in [0, 1) from a string; stable across runs and platforms."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


class World:
    """Deterministic generator of nano-world problems.

    ``problems(split, n)`` returns the first n problems of one seeded stream per (seed, split,
    difficulties), so a longer list extends a shorter one (the seed-budget experiments rely on it)."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        self._bounds: list[tuple[str, float, float]] = []
        lo = 0.0
        for name, frac in self.config.split_fractions.items():
            self._bounds.append((name, lo, lo + frac))
            lo += frac

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.config.split_fractions)

    def split_of(self, skeleton: str) -> str:
        """The split a skeleton belongs to (by hash, so splits never share a skeleton)."""
        u = _unit_hash(f"rstar-nano-split/{skeleton}")
        for name, lo, hi in self._bounds:
            if lo <= u < hi:
                return name
        return self._bounds[-1][0]

    # ---------------------------------------------------------------- sampling one problem
    def _sample(self, rng: random.Random, difficulty: int) -> tuple[str, list[tuple[str, str]], str, str, int] | None:
        """(skeleton, [(sentence, code)], question, final sentence, answer), or None on a dead end."""
        cfg = self.config
        obj = rng.choice(OBJECTS)
        # people[1:3] may take over via comparisons; people[3] is only ever the "other" person {f},
        # so nobody who received or gave something is later defined by a comparison.
        people = rng.sample(NAMES, 4)
        holder, others, f = people[0], people[1:3], people[3]
        v = rng.randint(2, cfg.max_start)
        x = holder.lower()
        steps = [(rng.choice(START_TEMPLATES).format(h=holder, v=v, obj=obj), f"{x} = {v}")]
        skel = [f"s{v}"]
        used_switch = 0
        for _ in range(difficulty):
            options = list(OP_KINDS)
            rng.shuffle(options)
            for kind in options:
                if kind in SWITCH_KINDS and used_switch >= len(others):
                    continue
                params = self._operands(rng, kind, v)
                if params is None:
                    continue
                new_v, ops = params
                if not 1 <= new_v <= cfg.max_value:
                    continue
                break
            else:
                return None
            template, code = rng.choice(TEMPLATES[kind])
            g = others[used_switch] if kind in SWITCH_KINDS else holder
            fmt = dict(h=holder, x=holder.lower(), g=g, y=g.lower(), f=f, obj=obj,
                       c=rng.choice(CONTAINERS), **ops)  # fmt: skip
            steps.append((template.format(**fmt), code.format(**fmt)))
            # Skeleton: what the code computes, not how the sentence says it.
            skel.append(code.format(**{**fmt, "x": "v", "y": "v"}).split("=", 1)[1].strip())
            if kind in SWITCH_KINDS:
                used_switch += 1
                holder = g
            v = new_v
        question = " ".join(s for s, _ in steps) + " " + rng.choice(QUESTION_TEMPLATES).format(obj=obj, h=holder)
        final = f"{holder} has {v} {obj}."
        return "|".join(skel), steps, question, final, v

    @staticmethod
    def _operands(rng: random.Random, kind: str, v: int) -> tuple[int, dict[str, int]] | None:
        """Operands for one operation on value v and the new value, or None if it does not fit."""
        if kind == "add" or kind == "more_than":
            k = rng.randint(2, 30)
            return v + k, {"k": k}
        if kind == "sub" or kind == "fewer_than":
            if v < 3:
                return None
            k = rng.randint(2, min(30, v - 1))
            return v - k, {"k": k}
        if kind == "groups":
            k, m = rng.randint(2, 6), rng.randint(2, 12)
            return v + k * m, {"k": k, "m": m}
        if kind == "mul":
            k = rng.randint(3, 5)
            return v * k, {"k": k}
        if kind in ("double", "twice_as"):
            return v * 2, {}
        if kind == "thrice_as":
            return v * 3, {}
        if kind == "div":
            ks = [k for k in range(3, 7) if v % k == 0 and v // k >= 1]
            if not ks:
                return None
            k = rng.choice(ks)
            return v // k, {"k": k}
        if kind in ("half", "half_as"):
            return (v // 2, {}) if v % 2 == 0 else None
        if kind in ("pct_off", "pct_on"):
            ps = [p for p in PERCENTS if (v * p) % 100 == 0 and not (kind == "pct_off" and p == 100)]
            if not ps:
                return None
            p = rng.choice(ps)
            return (v - v * p // 100 if kind == "pct_off" else v + v * p // 100), {"p": p}
        raise ValueError(kind)

    # ---------------------------------------------------------------- public API
    def problems(
        self,
        split: str,
        n: int,
        *,
        difficulties: Sequence[int] | None = None,
        stream: str = "",
    ) -> list[Problem]:
        """The first n problems of a split; problem i has difficulty ``difficulties[i % len]``.

        ``stream`` names an independent sequence within the same split (same disjointness)."""
        if split not in self.config.split_fractions:
            raise ValueError(f"unknown split {split!r}; have {self.splits}")
        diffs = list(difficulties) if difficulties else list(range(self.config.min_ops, self.config.max_ops + 1))
        for d in diffs:
            if not self.config.min_ops <= d <= self.config.max_ops:
                raise ValueError(f"difficulty {d} outside [{self.config.min_ops}, {self.config.max_ops}]")
        return list(self._iter(split, n, diffs, stream))

    def _iter(self, split: str, n: int, diffs: list[int], stream: str) -> Iterator[Problem]:
        cfg = self.config
        rng = random.Random(f"rstar-nano/{cfg.seed}/{split}/{stream}/{','.join(map(str, diffs))}")
        seen: set[str] = set()
        tag = f"{cfg.source}{cfg.seed}-{split}{('-' + stream) if stream else ''}"
        for i in range(n):
            d = diffs[i % len(diffs)]
            for _attempt in range(5_000):
                sample = self._sample(rng, d)
                if sample is None:
                    continue
                skeleton, steps, question, final, value = sample
                if skeleton in seen or self.split_of(skeleton) != split:
                    continue
                seen.add(skeleton)
                if _attempt > 1_000:
                    log.warning("split %r difficulty %d: %d draws for one new problem (pool nearly exhausted)",
                                split, d, _attempt)  # fmt: skip
                break
            else:
                raise RuntimeError(f"could not draw problem {i} (difficulty {d}) for split {split!r}: space exhausted")
            meta = {
                "difficulty": d,
                "split": split,
                "world_seed": cfg.seed,
                "skeleton": skeleton,
                "steps": [list(s) for s in steps],
                "final": final,
            }
            yield Problem(id=f"{tag}-{i:05d}", question=question, answer=str(value), source=cfg.source, meta=meta)


# --------------------------------------------------------------------------------------------
# Reference solver and a safe evaluator for the world's code
# --------------------------------------------------------------------------------------------
def reference_steps(problem: Problem) -> list[str]:
    """The reference solution as a list of step texts, exactly as the search would store them
    per node (the observation is appended to the ``<end_of_code>`` step, as the system does)."""
    meta = problem.meta
    plan: list[list[str]] = meta["steps"]
    final_var = plan[-1][1].split("=", 1)[0].strip()
    texts = [format_code_step(i, sentence, code) for i, (sentence, code) in enumerate(plan)]
    texts.append(format_final_code_step(final_var) + format_observation(str(problem.answer)))
    texts.append(format_answer_step(meta["final"], str(problem.answer)))
    return texts


def reference_solution(problem: Problem) -> str:
    """A correct solution in the rStar step format (the text after the prompt)."""
    return "".join(reference_steps(problem))


def solution_code(solution: str) -> str | None:
    """The Python program of a solution's code block (between ``<code>`` and ``<end_of_code>``)."""
    if CODE not in solution:
        return None
    body = solution.split(CODE, 1)[1]
    body = body.split(END_OF_CODE, 1)[0]
    return body.replace(END_OF_STEP, "").strip("\n")


_ALLOWED_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Div, ast.Mod)


def run_world_code(code: str, *, max_abs: int = 10**12) -> str | None:
    """Run nano-world code (assignments of integer arithmetic, then ``print``) without ``exec``.

    Why: evaluating many model generations in-process must be safe and fast; this interprets only
    the tiny language the world uses and returns the printed text, or None for anything else
    (syntax errors, unknown names, other statements, huge numbers)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    env: dict[str, int | float] = {}
    out: list[str] = []

    def ev(node: ast.AST) -> int | float:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            return node.value
        if isinstance(node, ast.Name):
            if node.id not in env:
                raise NameError(node.id)
            return env[node.id]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, _ALLOWED_BINOPS):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                r = a + b
            elif isinstance(node.op, ast.Sub):
                r = a - b
            elif isinstance(node.op, ast.Mult):
                r = a * b
            elif isinstance(node.op, ast.FloorDiv):
                r = a // b
            elif isinstance(node.op, ast.Div):
                r = a / b
            else:
                r = a % b
            if abs(r) > max_abs:
                raise OverflowError
            return r
        raise ValueError(ast.dump(node))

    try:
        for stmt in tree.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                env[stmt.targets[0].id] = ev(stmt.value)
            elif (
                isinstance(stmt, ast.Expr)
                and isinstance(stmt.value, ast.Call)
                and isinstance(stmt.value.func, ast.Name)
                and stmt.value.func.id == "print"
                and not stmt.value.keywords
            ):
                out.append(" ".join(str(ev(a)) for a in stmt.value.args))
            else:
                return None
    except (ArithmeticError, NameError, ValueError, RecursionError):
        return None
    return "\n".join(out)
