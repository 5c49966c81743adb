"""Token ids for SFT rows and PPM pairs, and the collators that batch them.

Encoding mirrors the search: the prompt header through ``encode_prompt`` (special tokens as the
model expects), then every step through ``encode_continuation``, concatenated. The search keeps
per-node token ids and joins them the same way, so the policy and the PPM are trained on the
ids they will see at inference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rstar.search.prompts import encode_continuation, encode_prompt
from rstar.train.mining import pair_weight

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


def _pieces_ids(tokenizer: Any, head: str, pieces: Sequence[str]) -> list[int]:
    ids = encode_prompt(tokenizer, head)
    for p in pieces:
        if p:
            ids.extend(encode_continuation(tokenizer, p))
    return ids


def encode_sft_row(tokenizer: Any, row: dict[str, Any], max_length: int | None) -> dict[str, list[int]] | None:
    """``input_ids`` = prompt + response + eos, ``labels`` masked on the prompt (loss on the
    response only). Rows longer than ``max_length`` return None: cutting either end would
    lose the question or the answer."""
    prompt_ids = encode_prompt(tokenizer, row["prompt"])
    steps = row.get("steps") or [row["response"]]
    if "steps" in row and "".join(steps) != row["response"]:
        raise ValueError(f"row {row.get('id')!r}: steps do not join to the response")
    resp_ids: list[int] = []
    for s in steps:
        resp_ids.extend(encode_continuation(tokenizer, s))
    if tokenizer.eos_token_id is not None:
        resp_ids.append(tokenizer.eos_token_id)
    ids = prompt_ids + resp_ids
    if max_length is not None and len(ids) > max_length:
        return None
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + resp_ids,
    }


def pair_prompt_ids(tokenizer: Any, row: dict[str, Any]) -> list[int]:
    """Ids of the shared prompt of a pair row (header + prefix steps when the row has them)."""
    if "prompt_head" in row and row.get("prefix") is not None:
        head, prefix = row["prompt_head"], list(row["prefix"])
        if head + "".join(prefix) != row["prompt"]:
            raise ValueError(f"row {row.get('id')!r}: prompt_head + prefix != prompt")
        return _pieces_ids(tokenizer, head, prefix)
    return encode_prompt(tokenizer, row["prompt"])


def _left_truncate(ids: list[int], max_length: int | None) -> tuple[list[int], bool]:
    if max_length is None or len(ids) <= max_length:
        return ids, False
    return ids[-max_length:], True


def encode_pair_row(tokenizer: Any, row: dict[str, Any], max_length: int | None) -> dict[str, Any]:
    """Chosen / rejected ids (prompt + step, cut from the left so the scored last token is
    always the step's) and the pair weight 1/(pos·neg)."""
    p = pair_prompt_ids(tokenizer, row)
    chosen, cut_c = _left_truncate(p + encode_continuation(tokenizer, row["chosen"]), max_length)
    rejected, cut_r = _left_truncate(p + encode_continuation(tokenizer, row["rejected"]), max_length)
    weight = row.get("weight")
    if weight is None:
        weight = pair_weight(int(row.get("pos_count", 1) or 0), int(row.get("neg_count", 1) or 0))
    return {
        "chosen_input_ids": chosen,
        "rejected_input_ids": rejected,
        "weight": float(weight),
        "truncated": bool(cut_c or cut_r),
    }


def _pad(seqs: Sequence[Sequence[int]], value: int, side: str = "right") -> list[list[int]]:
    n = max(len(s) for s in seqs)
    if side == "right":
        return [list(s) + [value] * (n - len(s)) for s in seqs]
    return [[value] * (n - len(s)) + list(s) for s in seqs]


@dataclass
class SFTCollator:
    """Right-pads ``input_ids`` / ``attention_mask`` / ``labels`` of SFT features."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        ids = [f["input_ids"] for f in features]
        n = max(len(s) for s in ids)
        m = self.pad_to_multiple_of
        if m:
            n = ((n + m - 1) // m) * m
        pad_ids = [list(s) + [self.pad_token_id] * (n - len(s)) for s in ids]
        mask = [[1] * len(s) + [0] * (n - len(s)) for s in ids]
        labels = [list(f["labels"]) + [IGNORE_INDEX] * (n - len(f["labels"])) for f in features]
        return {
            "input_ids": torch.tensor(pad_ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
        }


def batch_sequences(seqs: Sequence[Sequence[int]], pad_token_id: int) -> dict[str, Any]:
    """Right-padded ``input_ids`` + ``attention_mask`` tensors; the value of a sequence is read
    at its last real token, which never equals the pad id (checked)."""
    import torch

    for s in seqs:
        if not s:
            raise ValueError("cannot score an empty sequence")
        if s[-1] == pad_token_id:
            raise ValueError(
                "a sequence ends with the pad token; the sequence-classification pooling reads the "
                "value at the last non-pad token, so the pad token must not end an input"
            )
    n = max(len(s) for s in seqs)
    ids = [list(s) + [pad_token_id] * (n - len(s)) for s in seqs]
    mask = [[1] * len(s) + [0] * (n - len(s)) for s in seqs]
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "attention_mask": torch.tensor(mask, dtype=torch.long),
    }


@dataclass
class PairCollator:
    """Stacks the chosen sequences then the rejected ones into one right-padded batch (one
    forward pass scores both sides), plus the per-pair weights."""

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        seqs = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
        batch = batch_sequences(seqs, self.pad_token_id)
        batch["weight"] = torch.tensor([float(f["weight"]) for f in features], dtype=torch.float32)
        return batch
