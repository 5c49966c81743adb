"""Prompt text for the policy and the PPM: one function for inference and training.

The paper's official code builds the inference prompt with ``"\\n\\n"`` after the question
and the training rows with ``"\\n"`` (rstar-math.md §9.2 item 8); here ``build_prompt`` is
the only place either is made, so search, SFT rows and PPM pairs see identical text:

* ``sft`` (fine-tuned policies, rounds 2-4 and evaluation)::

      <|user|>:\\n{question}\\n\\n<|assistant|>: Let's think step by step and solve the problem with code.{partial}

* ``bootstrap`` (a strong instruction model, round 1): an instruction, two demonstration
  solutions written for this project in the step format (fixed order, so every prompt of a
  run shares one cacheable prefix; the official code reshuffles them per prompt), then
  ``Now! It's your turn.\\nQuestion: {question}\\n`` and the partial solution. No chat
  template unless ``chat_template`` is set (then the text before the partial solution is
  the user turn of the tokenizer's template).

A training row is ``prompt = build_prompt(question)`` and ``response = join_steps(steps)``;
``prompt + response`` is exactly the text the search generated after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rstar.search.steps import join_steps

SFT_HEADER = "<|user|>:\n{question}\n\n<|assistant|>: Let's think step by step and solve the problem with code."

BOOTSTRAP_INSTRUCTION = (
    "You are a powerful agent with broad math knowledge and great Python programming skills. "
    "Solve the math question step by step with code.\n"
    "- Write each step as Python code with the reasoning in comments; put every calculation in "
    "code. You may use the math, sympy, numpy and scipy libraries.\n"
    "- Start the code with <code>, end every step with <end_of_step>, and end the code with "
    "<end_of_code>. The printed output of the code is then shown between <output> and "
    "<end_of_output>.\n"
    "- In the last code step, write the comment \"# Now print the final answer\" and print the "
    "final answer.\n"
    "- Then write the answer between <answer> and <end_of_answer>, with the final value in "
    "\\boxed{}."
)

#: Two demonstrations in the exact step format (our own; the paper's are not reused).
DEMONSTRATIONS: tuple[tuple[str, str], ...] = (
    (
        "A baker makes 24 muffins. She sells 3/4 of them in the morning and half of the rest "
        "in the afternoon. How many muffins are left at the end of the day?",
        "<code>\n# Step 1: Compute the muffins sold in the morning\ntotal = 24\n"
        "morning = total * 3 // 4\n<end_of_step>\n"
        "# Step 2: Half of the remaining muffins are sold in the afternoon\n"
        "remaining = total - morning\nafternoon = remaining // 2\n<end_of_step>\n"
        "# Now print the final answer\nprint(remaining - afternoon)\n<end_of_code>\n"
        "<output>3<end_of_output>\n"
        "<answer>The baker has 24 - 18 - 3 = 3 muffins left, so the answer is \\boxed{3}.\n"
        "<end_of_answer>",
    ),
    (
        "What is the positive difference between the two solutions of $x^2 - 7x + 10 = 0$?",
        "<code>\n# Step 1: Define the variable and the equation\n"
        "from sympy import symbols, Eq, solve\nx = symbols('x')\n"
        "equation = Eq(x**2 - 7*x + 10, 0)\n<end_of_step>\n"
        "# Step 2: Solve the equation\nsolutions = solve(equation, x)\n<end_of_step>\n"
        "# Step 3: Compute the positive difference of the solutions\n"
        "difference = abs(solutions[0] - solutions[1])\n<end_of_step>\n"
        "# Now print the final answer\nprint(difference)\n<end_of_code>\n"
        "<output>3<end_of_output>\n"
        "<answer>The solutions are 2 and 5, so the positive difference is \\boxed{3}.\n"
        "<end_of_answer>",
    ),
)


@dataclass
class PromptConfig:
    """How prompts are built.

    Attributes:
        format: ``"sft"`` (user/assistant header, fine-tuned policies) or ``"bootstrap"``
            (instruction + demonstrations, a strong instruction model).
        chat_template: wrap the bootstrap text as the user turn of the tokenizer's chat
            template (off in the paper: raw completion prompts).
        num_few_shot: demonstrations in the bootstrap prompt (0, 1 or 2).
        instruction: replaces the bootstrap instruction when not empty.
    """

    format: Literal["sft", "bootstrap"] = "sft"
    chat_template: bool = False
    num_few_shot: int = 2
    instruction: str = ""

    def __post_init__(self) -> None:
        if self.format not in ("sft", "bootstrap"):
            raise ValueError(f"prompt format must be 'sft' or 'bootstrap', got {self.format!r}")
        if not 0 <= self.num_few_shot <= len(DEMONSTRATIONS):
            raise ValueError(f"num_few_shot must be in [0, {len(DEMONSTRATIONS)}], got {self.num_few_shot}")


def _bootstrap_body(question: str, cfg: PromptConfig) -> str:
    instruction = cfg.instruction or BOOTSTRAP_INSTRUCTION
    parts = [instruction, "\n\n"]
    k = cfg.num_few_shot
    if k:
        parts.append(f"The following are {k} demonstration example{'s' if k > 1 else ''}.\n\n")
        for q, sol in DEMONSTRATIONS[:k]:
            parts.append(f"Question: {q}\n{sol}\n\n")
    parts.append(f"Now! It's your turn.\nQuestion: {question}\n")
    return "".join(parts)


def build_prompt(
    question: str,
    partial: str | Sequence[str] = "",
    config: PromptConfig | None = None,
    *,
    tokenizer: Any = None,
) -> str:
    """The prompt text for ``question`` followed by the partial solution.

    ``partial`` is the concatenated step texts (or the list of them). With
    ``config.chat_template`` a tokenizer with a chat template is required."""
    cfg = config or PromptConfig()
    if not isinstance(partial, str):
        partial = join_steps(partial)
    if cfg.format == "sft":
        head = SFT_HEADER.format(question=question)
        if cfg.chat_template:
            head = _chat(tokenizer, head)
        return head + partial
    body = _bootstrap_body(question, cfg)
    if cfg.chat_template:
        body = _chat(tokenizer, body)
    return body + partial


def _chat(tokenizer: Any, user_text: str) -> str:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt.chat_template is set but the tokenizer has no chat template")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
    )


def training_row(question: str, steps: Sequence[str], config: PromptConfig | None = None,
                 *, tokenizer: Any = None) -> dict[str, str]:
    """An SFT row: ``{"prompt", "response"}`` with ``prompt + response`` the inference text."""
    return {"prompt": build_prompt(question, "", config, tokenizer=tokenizer), "response": join_steps(steps)}


def encode_prompt(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt prefix (special tokens as the model expects, e.g. a BOS)."""
    return list(tokenizer(text)["input_ids"])


def encode_continuation(tokenizer: Any, text: str) -> list[int]:
    """Token ids of text that follows a prompt (no BOS / special-token insertion)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
