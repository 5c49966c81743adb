"""The rStar-Math step protocol: special strings, step parsing, code blocks, observations.

A solution is a sequence of steps. Code steps are Python with the reasoning in comments and
end with ``<end_of_step>``; the last step of a block ends with ``<end_of_code>``, after which
the system appends ``\\n<output>…<end_of_output>`` (the executed block's output); the model
then writes ``<answer>… \\boxed{…}<end_of_answer>``. Everything here is pure string work,
shared by the search (inference) and by training (issue 7), so both see the same text.

Deviations from the official code (rstar-math.md §2.3-2.4, §9.2), each deliberate:

* A step is an answer when it contains ``\\boxed`` (official) *or* an ``<answer>`` tag /
  ``<end_of_answer>`` stop; an answer step with no extractable answer is an invalid terminal
  (the official code would execute ``<answer>…`` as Python and count an error).
* A step that ended without one of the stop strings (length / eos) and holds no answer is
  an invalid terminal (``"truncated"``): it cannot be continued as a step.
* Answers are extracted with ``rstar.grading.extract_answer`` (no ``".\\n"`` truncation bug).
* Validity of code comes from the sandbox status, never from the word "error".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

CODE = "<code>"
END_OF_STEP = "<end_of_step>"
END_OF_CODE = "<end_of_code>"
OUTPUT = "<output>"
END_OF_OUTPUT = "<end_of_output>"
ANSWER = "<answer>"
END_OF_ANSWER = "<end_of_answer>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"

#: Every special string of the format (the tokenizer should hold each as one token).
SPECIAL_TOKENS: tuple[str, ...] = (
    CODE,
    END_OF_STEP,
    END_OF_CODE,
    OUTPUT,
    END_OF_OUTPUT,
    ANSWER,
    END_OF_ANSWER,
    USER,
    ASSISTANT,
)

#: Stop strings of step generation (fine-tuned policies and the paper's eval configs).
STEP_STOPS: tuple[str, ...] = (END_OF_STEP, END_OF_CODE, END_OF_ANSWER)
#: The bootstrap config also stops on ``<end_of_output>`` (a model that writes its own output).
BOOTSTRAP_STOPS: tuple[str, ...] = (END_OF_STEP, END_OF_CODE, END_OF_ANSWER, END_OF_OUTPUT)
#: Greedy decoding takes the whole code block as one step, then the answer.
GREEDY_STOPS: tuple[str, ...] = (END_OF_CODE, END_OF_ANSWER)


class StepKind(str, Enum):
    """What a generated step is."""

    CODE = "code"  # a code step: ends with <end_of_step> (block continues) or <end_of_code>
    ANSWER = "answer"  # a final answer step: terminal, answer extracted
    TRUNCATED = "truncated"  # no stop string and no answer: invalid terminal


@dataclass(frozen=True)
class ParsedStep:
    """A generated step, classified.

    Attributes:
        text: the step text exactly as generated, including the stop string.
        kind: code, answer or truncated.
        closes_block: a code step that ends the code block (``<end_of_code>``), so the
            observation is appended and the next step starts a new block.
        answer: the extracted answer of an answer step (None when none could be found).
    """

    text: str
    kind: StepKind
    closes_block: bool
    answer: str | None

    @property
    def is_code(self) -> bool:
        return self.kind is StepKind.CODE


_extract_answer = None


def _extract(text: str) -> str | None:
    global _extract_answer
    if _extract_answer is None:
        from rstar.grading import extract_answer

        _extract_answer = extract_answer
    return _extract_answer(text)


def classify_step(text: str, stop: str | None = None) -> tuple[StepKind, bool, str | None]:
    """``(kind, closes_block, answer)`` of one generated step: what ``parse_step`` returns,
    without building the ``ParsedStep`` (the search calls this once per candidate)."""
    if stop is None:
        stripped = text.rstrip()
        for s in (END_OF_ANSWER, END_OF_CODE, END_OF_STEP, END_OF_OUTPUT):
            if stripped.endswith(s):
                stop = s
                break
    if "boxed" in text or ANSWER in text or stop == END_OF_ANSWER:
        return StepKind.ANSWER, False, _extract(text)
    if stop == END_OF_STEP or stop == END_OF_CODE or stop == END_OF_OUTPUT:
        # A bootstrap model may close its block by writing <output> itself: treat the
        # block as closed (what it wrote after <end_of_code> is dropped by the program).
        return StepKind.CODE, END_OF_CODE in text or stop == END_OF_OUTPUT, None
    return StepKind.TRUNCATED, False, None


def parse_step(text: str, stop: str | None = None) -> ParsedStep:
    """Classify one generated step (``text`` includes the stop string that ended it).

    ``stop`` is the stop string reported by the backend (None when generation ended by
    length or eos); when None it is inferred from the end of ``text``."""
    kind, closes, answer = classify_step(text, stop)
    return ParsedStep(text, kind, closes, answer)


def step_code(text: str) -> str:
    """The Python code of one step: markers removed, text before ``<code>`` dropped, text
    after ``<end_of_code>`` dropped (what the official ``extract_program`` keeps)."""
    if CODE in text:
        text = text.split(CODE)[-1]
    if END_OF_CODE in text:
        text = text.split(END_OF_CODE)[0]
    if OUTPUT in text:  # a bootstrap model that wrote its own output block
        text = text.split(OUTPUT)[0]
    return text.replace(END_OF_STEP, "")


def closes_block(text: str) -> bool:
    """Whether a stored step text ends a code block (after it, a new block starts)."""
    return END_OF_CODE in text or END_OF_OUTPUT in text


def block_code(path_texts: Sequence[str], skip: Sequence[bool] | None = None) -> str:
    """The code of the current block so far: the code of every step after the last closed
    block on the path (``skip[i]`` leaves out ``path_texts[i]``), concatenated. A new step's
    program is ``block_step_program(block_code(path, skip), step)``."""
    start = 0
    for i in range(len(path_texts) - 1, -1, -1):
        if closes_block(path_texts[i]):
            start = i + 1
            break
    parts = []
    for i in range(start, len(path_texts)):
        if skip is not None and skip[i]:
            continue
        parts.append(step_code(path_texts[i]))
    return "".join(parts)


def block_step_program(block: str, new_step: str) -> str:
    """The program to execute for ``new_step`` after the block code ``block``."""
    return _normalise_program(block + step_code(new_step))


def block_program(path_texts: Sequence[str], new_step: str, skip: Sequence[bool] | None = None) -> str:
    """The program to execute for ``new_step``: the code of every step of the current block
    (the steps after the last closed block on the path) followed by the new step's code.

    ``skip[i]`` (optional) leaves out ``path_texts[i]`` (the official code skips steps whose
    execution timed out, so one slow step does not doom the rest of the block)."""
    return block_step_program(block_code(path_texts, skip), new_step)


def normalise_program(program: str) -> str:
    """A program as executed: the blank lines at both ends removed, one final newline.

    (The lines of ``program.split("\\n")`` whose ``strip()`` is empty are dropped from both
    ends and the rest joined with ``"\\n"``, plus a final ``"\\n"``; steps start with
    ``"\\n"``, so the sandbox's cache sees one key per program.)"""
    n = len(program)
    if not n:
        return ""
    if not program[0].isspace():
        start = 0
    elif n > 1 and program[0] == "\n" and not program[1].isspace():
        start = 1  # the usual shape: one leading newline
    else:
        body = program.lstrip()
        if not body:
            return ""
        start = program.rfind("\n", 0, n - len(body)) + 1
    if not program[-1].isspace():
        return program[start:] + "\n"
    if program[-1] == "\n" and not program[-2].isspace():
        return program[start:]  # the usual shape: one trailing newline
    end = program.find("\n", len(program.rstrip()))
    return program[start:end if end >= 0 else n] + "\n"


_normalise_program = normalise_program


def observation_text(observation: str) -> str:
    """What follows an ``<end_of_code>`` step in the solution: ``\\n<output>obs<end_of_output>``.

    ``observation`` is already formatted (``ExecResult.observation``: rounding and cut)."""
    return f"\n{OUTPUT}{observation}{END_OF_OUTPUT}"


def next_error_count(parent_errors: int, exec_ok: bool) -> int:
    """Consecutive failing code steps along a path: parent's + 1 on failure, 0 on success."""
    return parent_errors + 1 if not exec_ok else 0


def join_steps(texts: Iterable[str]) -> str:
    """A partial solution (or a full response for SFT): the step texts concatenated."""
    return "".join(texts)


_STEP_SPLIT = re.compile(
    "(" + "|".join(re.escape(s) for s in (END_OF_STEP, END_OF_ANSWER)) + "|"
    + re.escape(END_OF_CODE) + r"(?:\n" + re.escape(OUTPUT) + r".*?" + re.escape(END_OF_OUTPUT) + ")?"
    + ")",
    re.S,
)


def split_steps(solution: str) -> list[str]:
    """Split a full solution into its step texts (the inverse of ``join_steps``): each step
    ends with its marker; an ``<end_of_code>`` step keeps its appended output block."""
    out: list[str] = []
    pos = 0
    for m in _STEP_SPLIT.finditer(solution):
        out.append(solution[pos : m.end()])
        pos = m.end()
    if pos < len(solution):
        out.append(solution[pos:])
    return out
