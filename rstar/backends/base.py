"""Generator / Scorer protocols shared by every backend, and the small helpers they share.

The search talks only to these protocols, so a backend (vLLM, transformers, an HTTP server, a
fake in tests) is swapped by configuration alone."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "eos")


@dataclass
class GenerationRequest:
    """One prompt (+ partial solution) to extend with ``n`` sampled continuations.

    ``prompt_ids`` is preferred over ``prompt``: token ids make a child's prompt an exact
    extension of its parent's, which is what prefix caching needs."""

    prompt_ids: list[int] | None = None
    prompt: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if (self.prompt_ids is None) == (self.prompt is None):
            raise ValueError("GenerationRequest needs exactly one of prompt_ids / prompt")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        else:
            self.stop = tuple(self.stop)
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


@dataclass
class Completion:
    """One sampled continuation."""

    text: str  # generated text, INCLUDING the stop string that ended it
    token_ids: list[int]  # generated ids, including the stop string's tokens
    stop: str | None  # the stop string matched, None if it ended otherwise
    finish_reason: str  # "stop" | "length" | "eos"

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@runtime_checkable
class Generator(Protocol):
    """Step generation: per request, ``n`` completions in sample order.

    A generator may also offer ``submit(request, *, dedup=False) -> asyncio.Future`` (a
    future on the running event loop that ``agenerate`` would have awaited, as
    ``HFGenerator`` does): the async search then waits on the future with a callback, with
    no task or coroutine per request.

    And ``backlog() -> int``: sequences queued behind the batch the server runs at once (0
    when none wait or it cannot tell; ``VLLMGenerator`` has it). While it is > 0 the server
    is the bottleneck, and the async search paces its turns
    (``SearchConfig.busy_turn_interval_ms``) at no cost in throughput."""

    tokenizer: Any

    def generate(
        self, requests: Sequence[GenerationRequest], *, dedup: bool = False
    ) -> list[list[Completion]]: ...

    async def agenerate(self, request: GenerationRequest, *, dedup: bool = False) -> list[Completion]: ...

    def close(self) -> None: ...


@dataclass
class ScoreRequest:
    """Prompt + partial solution through the step to score; the value is read at its last token."""

    prompt_ids: list[int] | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt_ids is None) == (self.text is None):
            raise ValueError("ScoreRequest needs exactly one of prompt_ids / text")
        if self.prompt_ids is not None and len(self.prompt_ids) == 0:
            raise ValueError("ScoreRequest.prompt_ids is empty")


@runtime_checkable
class Scorer(Protocol):
    """Values in (-1, 1) (tanh applied), one per request, in request order."""

    def score(self, requests: Sequence[ScoreRequest]) -> list[float]: ...

    def close(self) -> None: ...


def dedup_completions(completions: list[Completion]) -> list[Completion]:
    """Drop completions whose text repeats an earlier one (rStar-Math de-duplicates the n
    children of an expansion the same way); the first occurrence is kept, order preserved."""
    seen: set[str] = set()
    out = []
    for c in completions:
        if c.text not in seen:
            seen.add(c.text)
            out.append(c)
    return out


def prompt_token_ids(request: GenerationRequest | ScoreRequest, tokenizer: Any) -> list[int]:
    """The request's prompt as ids (text is tokenised without BOS/special additions, so ids and
    text prompts of the same string agree)."""
    ids = request.prompt_ids
    if ids is None:
        text = request.prompt if isinstance(request, GenerationRequest) else request.text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def truncate_left(ids: list[int], budget: int, what: str = "prompt") -> list[int]:
    """Keep the last ``budget`` tokens. The tail holds the latest step, which is the part the
    next step (or the value) depends on, so the head is what goes; a warning says so."""
    if budget < 1:
        raise ValueError(f"no room left for the {what}: budget {budget}")
    if len(ids) <= budget:
        return ids
    logger.warning(
        "%s of %d tokens exceeds the context budget of %d; dropping its first %d tokens",
        what,
        len(ids),
        budget,
        len(ids) - budget,
    )
    return ids[len(ids) - budget :]


def strip_eos_text(text: str, token_ids: list[int], tokenizer: Any) -> str:
    """Completions ended by EOS carry the EOS id but not its text. vLLM (and its server) with
    ``skip_special_tokens=False`` put the EOS text into the output; this removes it."""
    if token_ids and tokenizer is not None:
        eos_text = tokenizer.convert_ids_to_tokens(token_ids[-1])
        if isinstance(eos_text, str) and eos_text and text.endswith(eos_text):
            return text[: -len(eos_text)]
    return text


def find_stop(text: str, stops: Sequence[str]) -> tuple[str, int] | None:
    """The stop string that ends earliest in ``text`` and the index just past it, or None."""
    best: tuple[str, int] | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i + len(s) < best[1]):
            best = (s, i + len(s))
    return best
