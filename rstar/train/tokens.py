"""The rStar step tokens in a tokenizer and model (added and embeddings resized when missing).

rStar-Math's SFT and PPM scripts add the step markers as special tokens so each stop string is
one token (rstar-math.md §6.1); a base model such as Qwen2.5-Math lacks them."""

from __future__ import annotations

import logging
from typing import Any

from rstar.search.steps import SPECIAL_TOKENS

logger = logging.getLogger(__name__)

DEFAULT_PAD_TOKEN = "<|pad|>"


def _is_single_token(tokenizer: Any, token: str) -> bool:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == token


def missing_step_tokens(tokenizer: Any, tokens: tuple[str, ...] = SPECIAL_TOKENS) -> list[str]:
    """The step tokens that the tokenizer does not encode as a single token."""
    return [t for t in tokens if not _is_single_token(tokenizer, t)]


def ensure_step_tokens(
    tokenizer: Any, model: Any = None, *, tokens: tuple[str, ...] = SPECIAL_TOKENS, pad: bool = True
) -> list[str]:
    """Add missing step tokens (and a pad token when there is none) to ``tokenizer``, resize the
    model's embeddings when the vocabulary outgrew them, and set ``config.pad_token_id``.

    New rows are mean-initialised (transformers' ``mean_resizing``), as the official SFT script
    does for its pad token. Returns the tokens that were added."""
    missing = missing_step_tokens(tokenizer, tokens)
    added: list[str] = []
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
        added.extend(missing)
    if pad and tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": DEFAULT_PAD_TOKEN})
        added.append(DEFAULT_PAD_TOKEN)
    if model is not None:
        emb = model.get_input_embeddings()
        if len(tokenizer) > emb.weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
            logger.info("resized embeddings to %d rows for %d added tokens", len(tokenizer), len(added))
        if tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
            gen = getattr(model, "generation_config", None)
            if gen is not None and getattr(gen, "pad_token_id", None) is None:
                gen.pad_token_id = tokenizer.pad_token_id
    if added:
        logger.info("added tokens to the tokenizer: %s", added)
    return added
