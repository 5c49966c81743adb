"""The search end to end: presets and CLI, real sandbox/grader/data with the tiny local
model, kill-and-resume in a subprocess, determinism."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import search_fakes  # noqa: F401 - request types while rstar.backends is missing
from rstar.config import load_config
from rstar.search.config import PRESETS, SearchConfig, load_search_config

REPO = Path(__file__).resolve().parents[1]


def test_preset_files_match_presets() -> None:
    for name in PRESETS:
        from_file = load_config(SearchConfig, REPO / "configs" / "search" / f"{name}.yaml")
        assert from_file == load_search_config(name), name
    c = load_search_config("bootstrap", ["n=3", "generation.temperature=0.5"])
    assert (c.n, c.generation.temperature, c.rollouts, c.error_threshold) == (3, 0.5, 8, 2)
    assert load_search_config("round2").rollouts == 16 and load_search_config("round3").value == "ppm_init"
    with pytest.raises(ValueError):
        load_search_config("round2", ["rollouts=0"])


def test_cli_dry_run(capsys) -> None:
    from rstar.search.cli import main

    assert main(["--config", "eval_beam", "--data", "math500", "--model", "m", "--out", "o", "--dry-run",
                 "beam_width=4"]) == 0
    out = capsys.readouterr().out
    assert "mode: beam" in out and "beam_width: 4" in out


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    from search_fakes import ScriptedGenerator, FakeSandbox, FakeGrader, Problem
    from rstar.search.config import SearchConfig
    from rstar.search.driver import Searcher
    probs = [Problem(f"k{{i}}", f"Kill question {{i}}?", str(i % 3)) for i in range(40)]
    cfg = SearchConfig(mode="mcts", n=3, rollouts=4, max_depth=5, concurrent_trees=4, reference_engine=True)
    with Searcher(ScriptedGenerator(latency_s=0.01), None, cfg, sandbox=FakeSandbox(), grader=FakeGrader()) as s:
        s.run(probs, sys.argv[1], progress=False)
    """
)


def test_resume_after_kill(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests")))
    out = tmp_path / "trees.jsonl"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            if out.exists() and out.read_text().count("\n") >= 5:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    n_before = out.read_text().count("\n")
    assert 5 <= n_before < 40, n_before
    subprocess.run([sys.executable, str(script), str(out)], check=True, timeout=240)
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"k{i}" for i in range(40))  # each problem exactly once


# --------------------------------------------------------------------------- real pieces
def _problems(data_dir: Path, k: int):
    from rstar.data import load_problems

    return load_problems(data_dir / "math500_test.json", limit=k)


@pytest.fixture(scope="module")
def real_generator(tiny_model_dir):
    from rstar import backends

    gen = backends.HFGenerator(str(tiny_model_dir))
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def real_sandbox():
    from rstar.sandbox import Sandbox, SandboxConfig

    with Sandbox(SandboxConfig(workers=2, timeout_s=5.0)) as sb:
        yield sb


def _small(cfg: SearchConfig, **kw) -> SearchConfig:
    from rstar.config import from_dict, to_dict

    d = to_dict(cfg)
    d.update(dict(n=2, rollouts=2, max_depth=3, concurrent_trees=4))
    d["generation"]["max_new_tokens"] = 24
    d.update(kw)
    return from_dict(SearchConfig, d)


@pytest.mark.parametrize("preset", ["round2", "eval_greedy", "eval_bon"])
def test_end_to_end_tiny_model(preset, real_generator, real_sandbox, data_dir, tmp_path) -> None:
    from rstar.grading import Grader
    from rstar.search.driver import Searcher

    from test_search_semantics import check_tree

    cfg = _small(load_search_config(preset), **({"vote": "majority"} if preset == "eval_bon" else {}))
    problems = _problems(data_dir, 3)
    out = tmp_path / "t.jsonl"
    with Searcher(real_generator, None, cfg, sandbox=real_sandbox, grader=Grader()) as s:
        results = s.run(problems, out, progress=False)
    assert [r.id for r in results] == [str(p.id) for p in problems]
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3
    for rec in lines:
        check_tree(rec)
        assert len(rec["nodes"]) > 1
        for n in rec["nodes"][1:]:  # garbage steps from a random model are pruned, never crash
            if not n["valid"]:
                assert n["terminal"] and n["reason"] in ("errors", "depth", "truncated", "no_answer")


def test_determinism_lockstep_tiny_model(real_generator, real_sandbox, data_dir) -> None:
    from rstar.grading import Grader
    from rstar.search.driver import Searcher

    cfg = _small(load_search_config("round2"), pipeline="lockstep", seed=7)
    problems = _problems(data_dir, 2)
    runs = []
    for _ in range(2):
        with Searcher(real_generator, None, cfg, sandbox=real_sandbox, grader=Grader()) as s:
            runs.append([[(n["text"], n["visits"], n["q"]) for n in r.record["nodes"]]
                         for r in s.run(problems, progress=False)])
    assert runs[0] == runs[1]


@pytest.mark.vllm
def test_end_to_end_vllm(tiny_model_dir, real_sandbox, data_dir) -> None:
    from rstar import backends

    from rstar.grading import Grader
    from rstar.search.driver import Searcher

    from test_search_semantics import check_tree

    # On CPU gpu_memory_utilization is the share of RAM vLLM reserves: keep it small.
    gen = backends.VLLMGenerator(
        str(tiny_model_dir), gpu_memory_utilization=0.1, enforce_eager=True, max_model_len=1024
    )
    try:
        cfg = _small(load_search_config("round2"))
        with Searcher(gen, None, cfg, sandbox=real_sandbox, grader=Grader()) as s:
            results = s.run(_problems(data_dir, 2), progress=False)
        for r in results:
            check_tree(r.record)
    finally:
        gen.close()
