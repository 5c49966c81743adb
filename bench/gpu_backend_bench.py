"""HFGenerator / HFScorer throughput on a randomly initialised model of Qwen2.5-0.5B's shape:
one prepared run for a lent CUDA machine (torch + transformers only, no hub, no vLLM).

    python bench/gpu_backend_bench.py                 # on a GPU: full shape, bf16
    python bench/gpu_backend_bench.py --tiny          # smoke test on CPU (tiny shape)

Prints a table and writes JSON to --json (default: $OUT/gpu_backend_bench.json when $OUT is
set). Prompts are random token ids of a fixed length; no stop strings, so every sequence
generates exactly --new-tokens tokens unless it samples EOS."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

logger = logging.getLogger("gpu_backend_bench")

# Qwen2.5-0.5B (config.json of Qwen/Qwen2.5-0.5B)
QWEN25_05B = {
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
TINY = {**QWEN25_05B, "vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 2048}


def synthetic_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer that can decode every id of the random model (id k <-> "tk ")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1}
    vocab.update({f"t{k}": k for k in range(2, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def build_model(shape: dict[str, Any], device: str, dtype: Any, seq_cls: bool = False) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    cfg = Qwen2Config(**{k: v for k, v in shape.items() if k != "rope_theta"}, eos_token_id=0, pad_token_id=1,
                      num_labels=1)
    torch.manual_seed(0)
    cls = Qwen2ForSequenceClassification if seq_cls else Qwen2ForCausalLM
    with torch.device(device):
        model = cls(cfg)
    return model.to(dtype).eval()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shape on CPU (smoke test)")
    ap.add_argument("--batch-sizes", default=None, help="prompts per call, each with --n samples")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--new-tokens", type=int, default=None)
    ap.add_argument("--max-batch-size", type=int, default=None, help="HFGenerator rows per forward")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from rstar.backends import GenerationRequest, HFGenerator, HFScorer, ScoreRequest

    cuda = torch.cuda.is_available() and not a.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if a.tiny else QWEN25_05B
    sizes = [int(x) for x in (a.batch_sizes or ("1,4" if a.tiny else "1,16,64,256")).split(",")]
    prompt_len = a.prompt_len or (32 if a.tiny else 256)
    new_tokens = a.new_tokens or (8 if a.tiny else 128)
    max_rows = a.max_batch_size or (64 if a.tiny else 1024)
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dtype": str(dtype), "shape": "tiny" if a.tiny else "Qwen2.5-0.5B", "n": a.n,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "max_batch_size": max_rows,
        "torch": torch.__version__, "rows": [],
    }
    tok = synthetic_tokenizer(shape["vocab_size"])
    model = build_model(shape, device, dtype)
    info["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
    gen = HFGenerator(model, tok, device=device, dtype=str(dtype).split(".")[-1], max_batch_size=max_rows,
                      max_batch_tokens=max_rows * (prompt_len + new_tokens))
    g = torch.Generator().manual_seed(0)

    def reqs(b: int) -> list[GenerationRequest]:
        ids = torch.randint(2, shape["vocab_size"], (b, prompt_len), generator=g).tolist()
        return [GenerationRequest(prompt_ids=p, n=a.n, temperature=0.7, top_p=0.95, max_new_tokens=new_tokens, seed=k)
                for k, p in enumerate(ids)]

    gen.generate(reqs(1))  # warm-up (kernels, allocator)
    for b in sizes:
        r = reqs(b)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = gen.generate(r)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
        toks = sum(c.num_tokens for cs in out for c in cs)
        row = {"prompts": b, "sequences": b * a.n, "tokens": toks, "seconds": round(dt, 3),
               "tokens_per_s": round(toks / dt, 1)}
        if cuda:
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        info["rows"].append(row)
        logger.info("generate %s", row)
    gen.close()
    del model
    if cuda:
        torch.cuda.empty_cache()

    # scorer: values/s on prompt_len + new_tokens long inputs
    cls = build_model(shape, device, dtype, seq_cls=True)
    scorer = HFScorer(cls, tok, device=device, dtype=str(dtype).split(".")[-1], max_batch_size=min(max_rows, 256),
                      max_batch_tokens=256 * (prompt_len + new_tokens))
    n_score = 32 if a.tiny else 2048
    ids = torch.randint(2, shape["vocab_size"], (n_score, prompt_len + new_tokens), generator=g).tolist()
    sreqs = [ScoreRequest(prompt_ids=x[: len(x) - (k % 64)]) for k, x in enumerate(ids)]
    scorer.score(sreqs[:4])
    t = time.perf_counter()
    vals = scorer.score(sreqs)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    assert all(-1 <= v <= 1 for v in vals)
    info["scorer"] = {"items": n_score, "seconds": round(dt, 3), "items_per_s": round(n_score / dt, 1)}
    logger.info("score %s", info["scorer"])

    print(f"\nHFGenerator on {info['device']} ({info['shape']}, {info['params_m']:.0f}M params, {info['dtype']}), "
          f"prompt {prompt_len} tokens, {new_tokens} new tokens, n={a.n}")
    print("| prompts x n | tokens | seconds | tokens/s |")
    print("|---|---:|---:|---:|")
    for r in info["rows"]:
        print(f"| {r['prompts']} x {a.n} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} |")
    print(f"HFScorer: {info['scorer']['items_per_s']:.0f} values/s")
    path = a.json or (Path(os.environ["OUT"]) / "gpu_backend_bench.json" if os.environ.get("OUT") else None)
    if path:
        path.write_text(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    main()
