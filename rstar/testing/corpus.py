"""Locally generated text for the tiny test models (no hub, no network).

The tokenizer of the tiny model is trained on this text, and the model is briefly trained on
it, so that sampling from it produces rStar-format steps that end at ``<end_of_step>`` /
``<end_of_code>`` / ``<end_of_answer>`` -- which is what backend and search tests need to see."""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

SFT_PROMPT = "<|user|>:\n{question}\n\n<|assistant|>: Let's think step by step and solve the problem with code."

_NAMES = ("Ann", "Bob", "Carla", "Dev", "Emma", "Femi", "Gus", "Hana")
_ITEMS = ("apples", "pencils", "marbles", "books", "stamps", "coins")


def _problem(rng: random.Random) -> tuple[str, list[tuple[str, str]], str]:
    """One arithmetic word problem: (question, [(comment, code)], answer)."""
    kind = rng.randrange(5)
    a, b, c = rng.randint(2, 60), rng.randint(2, 40), rng.randint(2, 9)
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    if kind == 0:
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        steps = [(f"{name} starts with {a} {item}", f"start = {a}"),
                 (f"Add the {b} new {item}", f"total = start + {b}")]
        ans = a + b
    elif kind == 1:
        q = f"A box holds {c} rows of {b} {item}. How many {item} are in {a} boxes?"
        steps = [("Compute the number per box", f"per_box = {c} * {b}"),
                 (f"Multiply by the {a} boxes", f"total = per_box * {a}")]
        ans = c * b * a
    elif kind == 2:
        q = f"What is the value of ${a}^2 - {b}$?"
        steps = [(f"Square {a}", f"sq = {a} ** 2"), (f"Subtract {b}", f"total = sq - {b}")]
        ans = a * a - b
    elif kind == 3:
        q = f"Solve for $x$: ${c}x + {b} = {c * a + b}$."
        steps = [("Define the symbol and the equation", "from sympy import symbols, Eq, solve\nx = symbols('x')\n"
                  f"eq = Eq({c} * x + {b}, {c * a + b})"),
                 ("Solve the equation", "total = solve(eq, x)[0]")]
        ans = a
    else:
        q = f"{name} reads {b} pages a day for {c} days. The book has {b * c + a} pages. How many pages are left?"
        steps = [("Pages read so far", f"read = {b} * {c}"),
                 ("Subtract from the book length", f"total = {b * c + a} - read")]
        ans = a
    return q, steps, str(ans)


def step_solution(rng: random.Random) -> str:
    """A full SFT-format trajectory: prompt, code steps, output block and boxed answer."""
    q, steps, ans = _problem(rng)
    text = SFT_PROMPT.format(question=q) + "<code>\n"
    for i, (comment, code) in enumerate(steps, 1):
        text += f"# Step {i}: {comment}\n{code}\n<end_of_step>\n\n"
    text += "# Now print the final answer\nprint(total)\n<end_of_code>\n"
    text += f"<output>{ans}<end_of_output>\n"
    text += f"<answer>From the result, we can see that the answer is \\boxed{{{ans}}}\n<end_of_answer>"
    return text


def generated_solutions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [step_solution(rng) for _ in range(n)]


def benchmark_questions(data_dir: Path | None = None, limit: int = 3000) -> list[str]:
    """Questions from the shared benchmark files if they are present (they widen the tokenizer's
    merges to real math text); an empty list when they are not."""
    if data_dir is None:
        env = os.environ.get("RSTAR_DATA_DIR")
        data_dir = Path(env) if env else Path(__file__).resolve().parents[3] / "shared" / "data"
    out: list[str] = []
    if not data_dir.is_dir():
        return out
    for f in sorted(data_dir.glob("*_test.json")):
        try:
            rows = json.loads(f.read_text())
        except (OSError, ValueError) as exc:  # a broken file must not break model building
            logger.warning("skipping %s: %s", f, exc)
            continue
        out.extend(str(r.get("question", "")) for r in rows[:500] if isinstance(r, dict))
        if len(out) >= limit:
            break
    return out[:limit]


def default_corpus(seed: int = 0) -> Iterator[str]:
    yield from generated_solutions(2000, seed)
    yield from benchmark_questions()
