"""Generation throughput of the backends on the tiny local model, and what vLLM's prefix cache
buys when many requests share a long prefix (the shape of tree-search expansions).

Standalone (vLLM must start under ``__main__``):
    python bench/bench_backends.py                       # HF + vLLM, batch sizes 1, 16, 256
    python bench/bench_backends.py --backends hf --batch-sizes 1,16 --json out.json
pytest-benchmark (HF in-process; the vLLM part runs this script in a subprocess):
    pytest bench/bench_backends.py --benchmark-only [-m vllm]

Workload: prompts x n=8 samples, temperature 0.7, 32 new tokens, no stop strings (every
sequence generates the same number of tokens, so tokens/s compare across backends)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench_backends")

N_SAMPLES = 8
NEW_TOKENS = 32
CPU_VLLM = {
    "gpu_memory_utilization": 0.1,
    "kv_cache_memory_bytes": 512 * 2**20,
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 1024,
}


def tiny_model() -> Path:
    from rstar.testing import build_tiny_model

    cache = Path(os.environ.get("RSTAR_TEST_CACHE", REPO / ".cache" / "tests"))
    return build_tiny_model(cache / "tiny-qwen2")


def prompts(tokenizer: Any, count: int) -> list[list[int]]:
    from rstar.testing.corpus import SFT_PROMPT, benchmark_questions, generated_solutions

    qs = benchmark_questions(limit=count) or []
    sols = generated_solutions(count, seed=123)
    out = []
    for k in range(count):
        q = qs[k][:300] if k < len(qs) else sols[k].split("\n")[1]
        out.append(tokenizer.encode(SFT_PROMPT.format(question=q) + "<code>\n", add_special_tokens=False))
    return out


def requests(tokenizer: Any, batch: int) -> list[Any]:
    from rstar.backends import GenerationRequest

    return [
        GenerationRequest(prompt_ids=p, n=N_SAMPLES, temperature=0.7, max_new_tokens=NEW_TOKENS, seed=k)
        for k, p in enumerate(prompts(tokenizer, batch))
    ]


def run_generate(gen: Any, reqs: list[Any]) -> dict[str, float]:
    t = time.perf_counter()
    out = gen.generate(reqs)
    dt = time.perf_counter() - t
    toks = sum(c.num_tokens for cs in out for c in cs)
    return {"seconds": dt, "tokens": toks, "tokens_per_s": toks / dt}


def bench_hf(model: Path, batch_sizes: list[int]) -> list[dict[str, Any]]:
    from rstar.backends import HFGenerator

    gen = HFGenerator(str(model))
    gen.generate(requests(gen.tokenizer, 2))  # warm-up
    rows = []
    for b in batch_sizes:
        r = run_generate(gen, requests(gen.tokenizer, b))
        rows.append({"backend": "hf", "prompts": b, "n": N_SAMPLES, **r})
        logger.info("hf  %4d x %d: %.0f tok/s", b, N_SAMPLES, r["tokens_per_s"])
    gen.close()
    return rows


def bench_vllm(model: Path, batch_sizes: list[int], engine: dict[str, Any]) -> list[dict[str, Any]]:
    from rstar.backends import VLLMGenerator

    gen = VLLMGenerator(str(model), **engine)
    gen.generate(requests(gen.tokenizer, 2))
    rows = []
    for b in batch_sizes:
        r = run_generate(gen, requests(gen.tokenizer, b))
        rows.append({"backend": "vllm", "prompts": b, "n": N_SAMPLES, **r})
        logger.info("vllm %4d x %d: %.0f tok/s", b, N_SAMPLES, r["tokens_per_s"])
    gen.close()
    return rows


def bench_prefix_cache(model: Path, engine: dict[str, Any], n_requests: int = 64, prefix_len: int = 768) -> dict:
    """64 requests = one long shared prefix + a short distinct suffix each, after the prefix
    was seen once (as a parent's prompt is, before its children are expanded)."""
    from rstar.backends import GenerationRequest, VLLMGenerator
    from rstar.testing.corpus import generated_solutions

    out: dict[str, Any] = {"requests": n_requests, "prefix_tokens": prefix_len}
    for caching in (True, False):
        gen = VLLMGenerator(str(model), **{**engine, "enable_prefix_caching": caching})
        tok = gen.tokenizer
        text = " ".join(generated_solutions(40, seed=9))
        prefix = tok.encode(text, add_special_tokens=False)[:prefix_len]
        suffixes = [tok.encode(f"\n# Step {k}: ", add_special_tokens=False) for k in range(n_requests)]
        warm = [GenerationRequest(prompt_ids=prefix, temperature=0.0, max_new_tokens=1)]
        reqs = [GenerationRequest(prompt_ids=prefix + s, temperature=0.0, max_new_tokens=16) for s in suffixes]
        gen.generate(warm)
        t = time.perf_counter()
        res = gen.generate(reqs)
        dt = time.perf_counter() - t
        toks = sum(c.num_tokens for cs in res for c in cs)
        key = "on" if caching else "off"
        out[f"seconds_{key}"] = dt
        out[f"tokens_per_s_{key}"] = toks / dt
        out[f"texts_{key}"] = [cs[0].text for cs in res]
        gen.close()
        logger.info("prefix caching %s: %.2f s", key, dt)
    out["speedup"] = out["seconds_off"] / out["seconds_on"]
    out["same_outputs"] = out.pop("texts_on") == out.pop("texts_off")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--batch-sizes", default="1,16,256")
    ap.add_argument("--no-prefix", action="store_true", help="skip the prefix-caching comparison")
    ap.add_argument("--gpu", action="store_true", help="use vLLM's GPU defaults instead of the CPU settings")
    ap.add_argument("--hf-threads", type=int, default=None, help="torch threads for the HF runs (CPU)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = tiny_model()
    sizes = [int(x) for x in a.batch_sizes.split(",")]
    backends = a.backends.split(",")
    engine = {} if a.gpu else CPU_VLLM
    result: dict[str, Any] = {"model": str(model), "rows": []}
    if "hf" in backends:
        import torch

        threads = torch.get_num_threads()
        if a.hf_threads:
            torch.set_num_threads(a.hf_threads)
        result["hf_threads"] = torch.get_num_threads()
        result["rows"] += bench_hf(model, sizes)
        torch.set_num_threads(threads)
    if "vllm" in backends:
        result["rows"] += bench_vllm(model, sizes, engine)
        if not a.no_prefix:
            result["prefix_cache"] = bench_prefix_cache(model, engine)
    print("| backend | prompts x n | tokens | seconds | tokens/s |")
    print("|---|---|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['backend']} | {r['prompts']} x {r['n']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} |")
    if "prefix_cache" in result:
        p = result["prefix_cache"]
        print(f"prefix caching, {p['requests']} requests sharing {p['prefix_tokens']} tokens: "
              f"on {p['seconds_on']:.2f} s, off {p['seconds_off']:.2f} s, speedup {p['speedup']:.2f}x, "
              f"same outputs: {p['same_outputs']}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


# ------------------------------------------------------------------ pytest-benchmark
try:
    import pytest
except ImportError:  # standalone use without pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="module")
    def hf_gen():  # type: ignore[no-untyped-def]
        from rstar.backends import HFGenerator

        g = HFGenerator(str(tiny_model()))
        g.generate(requests(g.tokenizer, 2))
        yield g
        g.close()

    @pytest.mark.parametrize("batch", [1, 16, 256])
    def test_hf_generate(benchmark, hf_gen, batch: int) -> None:  # type: ignore[no-untyped-def]
        reqs = requests(hf_gen.tokenizer, batch)
        res = benchmark.pedantic(run_generate, args=(hf_gen, reqs), rounds=1, iterations=1)
        benchmark.extra_info.update(res)
        assert 0 < res["tokens"] <= batch * N_SAMPLES * NEW_TOKENS

    @pytest.mark.vllm
    def test_vllm_and_prefix_cache(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
        pytest.importorskip("vllm")
        out = tmp_path / "vllm.json"

        def run() -> None:
            subprocess.run([sys.executable, __file__, "--backends", "vllm", "--json", str(out)], check=True, timeout=1800)

        benchmark.pedantic(run, rounds=1, iterations=1)
        res = json.loads(out.read_text())
        benchmark.extra_info.update({f"vllm_{r['prompts']}x{r['n']}_tok_s": r["tokens_per_s"] for r in res["rows"]})
        benchmark.extra_info["prefix_cache_speedup"] = res["prefix_cache"]["speedup"]
        assert res["prefix_cache"]["same_outputs"]


if __name__ == "__main__":
    main()
