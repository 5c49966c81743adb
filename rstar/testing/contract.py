"""Checks of the ``Generator`` contract, shared by the tests of every backend (and usable for
fakes written by other modules), so all backends are held to exactly the same rules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rstar.backends.base import Completion, GenerationRequest


def assert_valid_completions(
    completions: Sequence[Completion],
    request: GenerationRequest,
    tokenizer: Any,
    *,
    dedup: bool = False,
) -> None:
    """Raise AssertionError unless ``completions`` answer ``request`` as docs/design.md says:
    n of them (fewer only when de-duplicated), each ended by its first stop string (text ends
    with it, no earlier stop in the text), by EOS, or by the token budget."""
    if dedup:
        texts = [c.text for c in completions]
        assert len(set(texts)) == len(texts), "dedup left duplicate texts"
        assert 1 <= len(completions) <= request.n
    else:
        assert len(completions) == request.n, f"{len(completions)} completions for n={request.n}"
    for c in completions:
        assert c.finish_reason in ("stop", "length", "eos"), c.finish_reason
        assert c.num_tokens == len(c.token_ids) >= 1
        assert c.num_tokens <= request.max_new_tokens
        full = tokenizer.decode(c.token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if c.finish_reason == "stop":
            assert c.stop in request.stop, f"reported stop {c.stop!r} not requested"
            assert c.text.endswith(c.stop), f"text {c.text!r} does not end with its stop {c.stop!r}"
            head = c.text[: -len(c.stop)]
            for s in request.stop:  # the first stop string ends the completion
                assert s not in head, f"stop {s!r} occurs before the end of {c.text!r}"
            assert full.startswith(c.text), "text is not a prefix of the decoded token ids"
        else:
            assert c.stop is None
            for s in request.stop:
                assert s not in c.text, f"stop {s!r} in a completion that ended by {c.finish_reason}"
        if c.finish_reason == "length":
            assert c.text == full
        if c.finish_reason == "eos":
            assert c.token_ids[-1] == tokenizer.eos_token_id
            assert full.startswith(c.text) and tokenizer.eos_token not in c.text
