"""Runs the vLLM backends on the tiny models and writes what they returned as JSON.

vLLM spawns engine processes, so it must start from a script under ``__main__`` rather than
inside pytest; tests/test_backends_vllm.py runs this once per session and checks the JSON
against the transformers backend. Usage:
    python tests/_vllm_checks.py MODEL_DIR CLASSIFIER_DIR OUT.json [--phases gen,async,score]"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Small and explicit on a shared CPU machine: 128 MiB of KV cache, no compilation.
CPU_ENGINE = {
    "gpu_memory_utilization": 0.1,
    "kv_cache_memory_bytes": 128 * 2**20,
    "enforce_eager": True,
    "dtype": "float32",
    "max_model_len": 512,
}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def requests_for(tokenizer) -> dict:
    """The requests both this script (vLLM) and the test (transformers) run."""
    from rstar.backends import GenerationRequest
    from rstar.testing.corpus import SFT_PROMPT, generated_solutions

    prompts = [
        SFT_PROMPT.format(question="What is 5 plus 7?") + "<code>\n",
        SFT_PROMPT.format(question="Ann has 3 books and buys 4 more. How many books does Ann have now?"),
        "# Step 1: Square 12\nsq = 12 ** 2\n",
    ]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    stops = ("<end_of_step>", "<end_of_code>", "<end_of_answer>")
    long_ids = ids[0] * 40  # far beyond max_model_len: truncated from the left
    return {
        "prompt_ids": ids,
        "greedy": [GenerationRequest(prompt_ids=i, n=1, temperature=0.0, max_new_tokens=48) for i in ids],
        "greedy_stop": [
            GenerationRequest(prompt_ids=i, n=1, temperature=0.0, max_new_tokens=64, stop=stops) for i in ids
        ],
        "sampled": [
            GenerationRequest(prompt_ids=i, n=4, temperature=1.0, top_p=0.95, max_new_tokens=64, stop=stops, seed=7)
            for i in ids
        ],
        "text_stop": [GenerationRequest(prompt=prompts[0], n=3, max_new_tokens=64, stop=("start", " = "), seed=3)],
        "long": [GenerationRequest(prompt_ids=long_ids, n=1, temperature=0.0, max_new_tokens=16, stop=stops)],
        # more prompt tokens than one scheduler step takes, all seeded: on CPU this used to kill
        # the engine (partial prefill of a seeded request); VLLMGenerator turns chunking off
        "big_seeded": [
            GenerationRequest(prompt=s[:600], n=2, max_new_tokens=8, seed=k)
            for k, s in enumerate(generated_solutions(64, seed=77))
        ],
        "eos": [
            GenerationRequest(prompt=s, n=1, temperature=0.0, max_new_tokens=8, stop=stops)
            for s in generated_solutions(2, seed=42)
        ],
    }


def score_texts() -> list[str]:
    from rstar.testing.corpus import generated_solutions

    return [s[: 40 + 37 * k] for k, s in enumerate(generated_solutions(12, seed=11))]


def _dump(comps_per_req) -> list[list[dict]]:
    return [[asdict(c) for c in comps] for comps in comps_per_req]


def phase_gen(model: str, out: dict) -> None:
    from rstar.backends import VLLMGenerator

    t = time.perf_counter()
    gen = VLLMGenerator(model, **CPU_ENGINE)
    reqs = requests_for(gen.tokenizer)
    _ = gen.llm
    out["gen_start_s"] = time.perf_counter() - t
    cap = _Capture()
    logging.getLogger("rstar").addHandler(cap)
    try:
        for name in ("greedy", "greedy_stop", "sampled", "text_stop", "long", "eos"):
            out[f"gen_{name}"] = _dump(gen.generate(reqs[name]))
        out["gen_sampled_again"] = _dump(gen.generate(reqs["sampled"]))
        out["gen_big_seeded"] = _dump(gen.generate(reqs["big_seeded"]))
        out["gen_sampled_dedup"] = _dump(gen.generate(reqs["sampled"], dedup=True))
        out["gen_prompt_ids"] = reqs["prompt_ids"]
    finally:
        logging.getLogger("rstar").removeHandler(cap)
        gen.close()
    out["gen_warnings"] = cap.messages


def phase_async(model: str, out: dict) -> None:
    from rstar.backends import GenerationRequest, VLLMGenerator

    t = time.perf_counter()
    gen = VLLMGenerator(model, **CPU_ENGINE)
    reqs = requests_for(gen.tokenizer)
    _ = gen.llm
    out["async_start_s"] = time.perf_counter() - t

    async def run() -> tuple[list, float, float]:
        many = [
            GenerationRequest(prompt_ids=reqs["prompt_ids"][k % 3], n=2, max_new_tokens=64, stop=("<end_of_step>",), seed=k)
            for k in range(24)
        ]
        t0 = time.perf_counter()
        greedy = await asyncio.gather(*(gen.agenerate(r) for r in reqs["greedy"]))
        res = await asyncio.gather(*(gen.agenerate(r) for r in many))
        concurrent_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for r in many[:6]:  # one at a time, for comparison with the concurrent run
            await gen.agenerate(r)
        serial_s = (time.perf_counter() - t1) * len(many) / 6
        # the same engine serves a blocking generate (another thread) while futures are pending
        futs = [gen.submit(r) for r in many]
        out["async_mixed_generate"] = _dump(await asyncio.to_thread(gen.generate, reqs["sampled"]))
        out["async_mixed_submit"] = _dump(await asyncio.gather(*futs))
        # cancelling a future aborts its request in the engine
        long = [GenerationRequest(prompt_ids=reqs["prompt_ids"][0], n=1, max_new_tokens=400, temperature=1.0, seed=k)
                for k in range(8)]
        futs = [gen.submit(r) for r in long]
        await asyncio.sleep(0.2)
        for f in futs:
            f.cancel()
        engine = gen.llm.llm_engine
        t2 = time.perf_counter()
        while engine.get_num_unfinished_requests() and time.perf_counter() - t2 < 10:
            await asyncio.sleep(0.05)
        out["async_unfinished_after_cancel"] = engine.get_num_unfinished_requests()
        # backlog(): the engine's batch limit is found, and nothing waits when it is idle
        out["async_backlog_limit"] = gen._runner._max_seqs if gen._runner is not None else None
        out["engine_max_num_seqs"] = engine.vllm_config.scheduler_config.max_num_seqs
        out["async_backlog_idle"] = gen.backlog()
        out["async_after_cancel"] = _dump([await gen.agenerate(reqs["greedy"][0])])
        return [greedy, res], concurrent_s, serial_s

    try:
        (greedy, many), conc, serial = asyncio.run(run())
    finally:
        gen.close()
    out["async_greedy"] = _dump(greedy)
    out["async_many"] = _dump(many)
    out["async_concurrent_s"] = conc
    out["async_serial_estimate_s"] = serial


def phase_score(classifier: str, out: dict) -> None:
    from rstar.backends import ScoreRequest, VLLMScorer

    t = time.perf_counter()
    scorer = VLLMScorer(classifier, **CPU_ENGINE)
    out["score_start_s"] = time.perf_counter() - t
    texts = score_texts()
    try:
        out["score_texts"] = texts
        out["score_values"] = scorer.score([ScoreRequest(text=x) for x in texts])
        ids = [scorer.tokenizer.encode(x, add_special_tokens=False) for x in texts]
        out["score_values_ids"] = scorer.score([ScoreRequest(prompt_ids=i) for i in ids])
    finally:
        scorer.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("classifier")
    ap.add_argument("out")
    ap.add_argument("--phases", default="gen,async,score")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out: dict = {"pid": os.getpid()}
    for phase in a.phases.split(","):
        t = time.perf_counter()
        {"gen": lambda: phase_gen(a.model, out), "async": lambda: phase_async(a.model, out),
         "score": lambda: phase_score(a.classifier, out)}[phase]()
        out[f"{phase}_total_s"] = time.perf_counter() - t
        Path(a.out).write_text(json.dumps(out))  # partial results survive a later failure


if __name__ == "__main__":
    main()
