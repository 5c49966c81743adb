"""rstar evolve / rstar eval: configs, resumable stages, scoring of evaluation records, reports,
and (slow) the shortened nano run end to end with a kill and a resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rstar.config import ConfigError
from rstar.evolve.config import EvolveConfig, NanoSetup, RoundSpec, load_evolve_config
from rstar.evolve.evaluate import bon_at, mcts_at, score_records
from rstar.evolve.stages import read_record, record_path, run_stage

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["nano", "nano-ci", "qwen-math-7b"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_evolve_config(name)
    assert cfg.rounds[0].policy == "bootstrap"
    assert all(r.policy == "previous" for r in cfg.rounds[1:])
    assert cfg.eval.n in cfg.eval.budgets


def test_nano_config_is_the_papers_four_rounds() -> None:
    cfg = load_evolve_config("nano")
    assert len(cfg.rounds) == 4
    assert [r.ppm_guided for r in cfg.rounds] == [False, False, True, True]
    # nano continues each round from the previous policy with 8 rollouts (docs/evolve.md says
    # why); the paper's schedule is the qwen-math-7b config
    assert [r.sft_from for r in cfg.rounds] == ["previous"] * 4
    rollouts = [next(int(o.split("=")[1]) for o in r.overrides if o.startswith("rollouts=")) for r in cfg.rounds]
    assert rollouts == [8, 8, 8, 8]
    paper = load_evolve_config("qwen-math-7b")
    assert [r.sft_from for r in paper.rounds] == ["base"] * 4


def test_overrides_reach_into_lists() -> None:
    cfg = load_evolve_config("nano", ["rounds.1.ppm_guided=true", "eval.n=4", "output_dir=/tmp/x"])
    assert cfg.rounds[1].ppm_guided and cfg.eval.n == 4 and cfg.output_dir == "/tmp/x"
    assert cfg.eval.budgets == [1, 2, 4]
    with pytest.raises(ConfigError, match="index"):
        load_evolve_config("nano", ["rounds.9.ppm_guided=true"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rounds": [RoundSpec(policy="previous")]}, "bootstrap"),
        ({"rounds": [RoundSpec(policy="bootstrap", ppm_guided=True)]}, "no PPM"),
        ({"nano": None}, "base_model"),
        ({"eval": {"methods": ["beam"]}}, "unknown"),
        ({"train_per_round": 0}, "train_per_round"),
        ({"train": {"n": 100}, "train_per_round": 30}, "train.n >= 120"),
    ],
)
def test_invalid_configs_are_clear_errors(kwargs: dict, match: str) -> None:
    from rstar.config import from_dict, to_dict

    base = to_dict(EvolveConfig(nano=NanoSetup()))
    base.update({k: (to_dict(v) if not isinstance(v, dict) else {**base.get(k, {}), **v}) for k, v in kwargs.items()})
    with pytest.raises(ConfigError, match=match):
        from_dict(EvolveConfig, base)


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("nano: {}\nroundz: []\n")
    with pytest.raises(ConfigError, match="roundz"):
        load_evolve_config(str(p))


# --------------------------------------------------------------------------- stages
def test_stage_runs_once_and_records(tmp_path: Path) -> None:
    calls = []

    def work() -> dict:
        calls.append(1)
        return {"x": 1}

    rec = run_stage(tmp_path, "search", 1, work)
    assert rec.result == {"x": 1} and not rec.skipped
    again = run_stage(tmp_path, "search", 1, work)
    assert again.skipped and again.result == {"x": 1} and len(calls) == 1
    record_path(tmp_path, "search").write_text("{torn")
    assert read_record(tmp_path, "search") is None  # a torn record means: run again
    run_stage(tmp_path, "search", 1, work)
    assert len(calls) == 2


def test_failed_stage_leaves_no_record(tmp_path: Path) -> None:
    def boom() -> dict:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_stage(tmp_path, "sft", 1, boom)
    assert read_record(tmp_path, "sft") is None


# --------------------------------------------------------------------------- scoring
def _node(i: int, parent: int, rollout: int = 0) -> dict:
    return {"id": i, "parent": parent, "rollout": rollout}


def _bon_record(samples: list[tuple[str, float, bool]]) -> dict:
    """Each sample: root -> code step -> answer step."""
    nodes, answers = [_node(0, -1)], []
    for ans, ppm, ok in samples:
        c = len(nodes)
        nodes.append(_node(c, 0))
        nodes.append(_node(c + 1, c))
        answers.append({"node": c + 1, "answer": ans, "ppm": ppm, "value": ppm, "correct": ok})
    return {"nodes": nodes, "answers": answers, "chosen": {}, "stats": {"tokens": 10}}


def test_best_of_n_prefixes_vote_by_majority_and_ppm() -> None:
    rec = _bon_record([("5", 0.1, False), ("7", 0.9, True), ("5", 0.2, False), ("7", 0.3, True), ("7", 0.0, True)])
    assert bon_at(rec, 1) == {"majority": False, "ppm": False}
    assert bon_at(rec, 2) == {"majority": False, "ppm": True}  # tie 5/7: first seen wins
    assert bon_at(rec, 3)["majority"] is False
    assert bon_at(rec, 5) == {"majority": True, "ppm": True}


def test_sample_order_follows_root_children_not_answer_order() -> None:
    rec = _bon_record([("1", 0.5, True), ("2", 0.6, False)])
    rec["answers"].reverse()
    assert bon_at(rec, 1) == {"majority": True, "ppm": True}


def test_mcts_anytime_uses_rollout_of_creation() -> None:
    nodes = [_node(0, -1), _node(1, 0, 1), _node(2, 1, 1), _node(3, 1, 3)]
    answers = [{"node": 2, "answer": "1", "ppm": 0.2, "correct": False},
               {"node": 3, "answer": "2", "ppm": 0.8, "correct": True}]
    rec = {"nodes": nodes, "answers": answers, "chosen": {"correct": True}, "stats": {"tokens": 5}}
    assert [mcts_at(rec, k) for k in (1, 2, 3, 4)] == [False, False, True, True]
    s = score_records("mcts", [_P("a", 2)], [rec], [1, 2, 4])
    assert s["mcts_ppm"]["accuracy"] == 1.0 and s["mcts_ppm"]["by_budget"] == {"1": 0.0, "2": 0.0, "4": 1.0}
    assert s["mcts_ppm"]["by_difficulty"] == {"2": 1.0}


class _P:
    def __init__(self, pid: str, d: int) -> None:
        self.id, self.meta = pid, {"difficulty": d}


def test_scores_of_bon_without_ppm_have_majority_only() -> None:
    rec = _bon_record([("3", None, True), ("4", None, False), ("3", None, True)])
    for a in rec["answers"]:
        a["ppm"] = None
    s = score_records("bon", [_P("a", 1)], [rec], [1, 3])
    assert "bon_ppm" not in s and s["bon_majority"]["accuracy"] == 1.0 and s["pass_at_n"] == 1.0


# --------------------------------------------------------------------------- reports and CLI
def test_report_tables_and_plot_from_records(tmp_path: Path) -> None:
    from rstar.evolve.pipeline import Evolution
    from rstar.evolve.report import write_run_report
    from rstar.evolve.stages import write_json_atomic

    cfg = load_evolve_config("nano-ci", [f"output_dir={tmp_path}"])
    evo = Evolution(cfg)
    ev = {"nano-eval": {"problems": 12, "greedy": {"accuracy": 0.25},
                        "bon_majority": {"accuracy": 0.5, "by_budget": {"1": 0.25, "2": 0.4, "4": 0.5}},
                        "mcts_ppm": {"accuracy": 0.6, "by_budget": {"1": 0.2, "2": 0.5, "4": 0.6}}}}
    for k in (0, 1):
        write_json_atomic(record_path(evo.round_dir(k), "eval"), {"name": "eval", "round": k, "seconds": 3.0,
                                                                    "result": ev})
    write_json_atomic(record_path(evo.round_dir(1), "search"), {"name": "search", "round": 1, "seconds": 9.0,
        "result": {"problems": 24, "covered": 6, "coverage": 0.25, "nodes": 100, "tokens": 1000}})  # fmt: skip
    rep = write_run_report(evo)
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | 6/24 |" in md and "60.0" in md
    assert [r["round"] for r in rep["rounds"]] == [0, 1]
    assert (tmp_path / "accuracy.png").stat().st_size > 1000
    assert json.loads((tmp_path / "report.json").read_text())["eval_sets"] == ["nano-eval"]


def test_dry_run_prints_config_and_plan(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "rstar.cli", "evolve", "--config", "nano", "--dry-run",
                          f"output_dir={tmp_path}"], capture_output=True, text=True, check=True, cwd=REPO)
    assert "seed_size: 2048" in out.stdout
    plan = [ln for ln in out.stdout.splitlines() if ln.startswith("# round") or ln.startswith("# setup")]
    assert len(plan) == 3 + 1 + 4 * 7 and all(" todo " in ln for ln in plan)
    assert not any(tmp_path.iterdir())  # nothing ran


def test_cli_lists_evolve_and_eval() -> None:
    out = subprocess.run([sys.executable, "-m", "rstar.cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert "evolve" in out.stdout and "eval" in out.stdout
    out = subprocess.run([sys.executable, "-m", "rstar.cli", "eval", "--help"], capture_output=True, text=True,
                         cwd=REPO)
    assert out.returncode == 0 and "--ppm" in out.stdout


# --------------------------------------------------------------------------- the shortened nano run
def _evolve(out: Path, log: Path, **kw) -> subprocess.Popen:
    """``rstar evolve --config nano-ci`` in a subprocess, its output going to ``log`` (a file,
    not a pipe: a pipe nobody reads would block the run once full)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "rstar.cli", "evolve", "--config", "nano-ci",
                                 "--no-progress", f"output_dir={out}"], cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~15 min on an idle 2-core machine; the suite default is 600 s
def test_nano_ci_run_end_to_end_with_kill_and_resume(tmp_path: Path) -> None:
    """Two rounds of the real pipeline; killed in round 1's search, restarted, completed; a
    third start skips every stage."""
    out = tmp_path / "run"
    trees = out / "round1" / "trees.jsonl"
    log = tmp_path / "evolve.log"
    proc = _evolve(out, log, start_new_session=True)
    deadline = time.time() + 2400
    while time.time() < deadline and proc.poll() is None:
        if trees.exists() and trees.read_text().count("\n") >= 3:
            break
        time.sleep(0.5)
    assert proc.poll() is None, log.read_text()[-4000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = 0
    for line in trees.read_text().splitlines():
        try:
            json.loads(line)
            done_before += 1
        except json.JSONDecodeError:  # a line torn by the kill is dropped on resume
            break
    assert read_record(out / "round1", "search") is None

    proc = _evolve(out, log)
    proc.wait(timeout=2400)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert f"resuming: {done_before} of 24 problems already done" in text
    ids = [json.loads(ln)["id"] for ln in trees.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 24  # each problem exactly once
    for k in (1, 2):
        for stage in ("search", "mine", "sft", "ppm", "eval"):
            assert read_record(out / f"round{k}", stage) is not None, (k, stage)
        assert (out / f"round{k}" / "policy" / "model.safetensors").exists()
        assert (out / f"round{k}" / "ppm" / "model.safetensors").exists()
    rep = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in rep["rounds"]] == [0, 1, 2]
    ev = rep["rounds"][2]["stages"]["eval"]["nano-eval"]
    assert {"greedy", "bon_majority", "bon_ppm", "mcts_ppm"} <= set(ev)
    r2 = [json.loads(ln) for ln in (out / "round2" / "trees.jsonl").read_text().splitlines()]
    assert any(n["value"] is not None for r in r2 for n in r["nodes"][1:])  # round 2 was PPM-guided
    assert (out / "accuracy.png").stat().st_size > 1000
    assert "| 2 |" in (out / "report.md").read_text()

    t0 = time.time()
    proc = _evolve(out, log)
    proc.wait(timeout=600)
    text = log.read_text()
    assert proc.returncode == 0 and text.count("skipped") >= 12, text[-3000:]
    assert time.time() - t0 < 120


# --------------------------------------------------------------------------- evaluate() with fakes
def test_evaluate_runs_every_method_and_prefixes_equal_smaller_runs(tmp_path: Path) -> None:
    """Through the real search with scripted doubles: every method writes its trees and
    scores; best-of-N at budget k equals a run with n=k (samples are seeded by index); the
    MCTS at its full budget is exactly the run's chosen answer's accuracy."""
    from search_fakes import FakeGrader, FakeSandbox, FakeScorer, Problem, ScriptedGenerator

    from rstar.evolve.evaluate import evaluate

    probs = [Problem(f"p{i}", f"What is {i} mod 3?", str(i % 3)) for i in range(12)]
    common = dict(sandbox=FakeSandbox(), grader=FakeGrader(), progress=False,
                  overrides={"mcts": ["n=3", "max_depth=6"], "bon": ["max_depth=6"], "greedy": []})
    big = evaluate(ScriptedGenerator(), FakeScorer(), {"toy": probs}, tmp_path / "a", n=4, budgets=[1, 2, 4],
                   **common)["toy"]
    assert {"greedy", "bon_majority", "bon_ppm", "mcts_ppm", "pass_at_n"} <= set(big)
    for m in ("greedy", "bon", "mcts"):
        assert len((tmp_path / "a" / "toy" / f"{m}.jsonl").read_text().splitlines()) == 12
    small = evaluate(ScriptedGenerator(), FakeScorer(), {"toy": probs}, tmp_path / "b", n=2, budgets=[2],
                     methods=["bon"], **common)["toy"]
    assert big["bon_majority"]["by_budget"]["2"] == small["bon_majority"]["accuracy"]
    assert big["bon_ppm"]["by_budget"]["2"] == small["bon_ppm"]["accuracy"]
    assert big["mcts_ppm"]["tokens_per_problem"] > 0
    # no PPM: majority only, and no MCTS
    nop = evaluate(ScriptedGenerator(), None, {"toy": probs}, tmp_path / "c", n=2, budgets=[2], **common)["toy"]
    assert "mcts_ppm" not in nop and "bon_ppm" not in nop and "bon_majority" in nop


# --------------------------------------------------------------------------- round data
def test_config_changes_lists_dotted_keys() -> None:
    from rstar.evolve.pipeline import config_changes

    old = {"train": {"n": 320, "difficulties": [2, 3]}, "rounds": [{"sft_from": "base"}, {"x": 1}], "seed": 0}
    new = {"train": {"n": 192, "difficulties": [2, 3]}, "rounds": [{"sft_from": "previous"}, {"x": 1}], "seed": 0,
           "extra": True}
    assert config_changes(old, new) == ["extra", "rounds.0.sft_from", "train.n"]
    assert config_changes(old, old) == []


def test_changed_config_is_reported_not_silently_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from rstar.config import to_dict
    from rstar.evolve.pipeline import Evolution

    cfg = load_evolve_config("nano-ci", [f"output_dir={tmp_path}"])
    (tmp_path / "config.json").write_text(json.dumps(to_dict(load_evolve_config("nano-ci", ["train.n=7"]))))
    with caplog.at_level("WARNING"):
        Evolution(cfg, progress=False)._warn_config_change()
    assert "train.n" in caplog.text and "kept, not redone" in caplog.text


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_train_per_round_gives_each_round_a_fresh_slice(tmp_path: Path) -> None:
    from rstar.data import Problem
    from rstar.evolve.pipeline import Evolution
    from rstar.evolve.problems import write_problems

    cfg = load_evolve_config("nano-ci", [f"output_dir={tmp_path}", "train.n=7", "train_per_round=3"])
    evo = Evolution(cfg, progress=False)
    write_problems([Problem(f"p{i}", f"q{i}", str(i)) for i in range(7)], evo.round_dir(-1) / "train.jsonl")
    assert [p.id for p in evo.train_problems(1)] == ["p0", "p1", "p2"]
    assert [p.id for p in evo.train_problems(2)] == ["p3", "p4", "p5"]
    assert len(evo.train_problems()) == 7
    with pytest.raises(ValueError, match="round 3"):
        evo.train_problems(3)  # only one problem left for it
    cfg.train_per_round = None
    assert len(evo.train_problems(2)) == 7  # every round searches all


def test_seed_replay_and_accumulated_pairs(tmp_path: Path) -> None:
    from rstar.evolve.pipeline import Evolution

    cfg = load_evolve_config("nano-ci", [f"output_dir={tmp_path}", "nano.seed_replay_rows=3",
                                         "mining.accumulate_pairs=true"])
    evo = Evolution(cfg, progress=False)
    _jsonl(evo._seed_rows_path(), [{"id": f"seed-{i}", "prompt": "p", "response": str(i)} for i in range(10)])
    r1, r2 = evo._replayed_seed_rows(1), evo._replayed_seed_rows(2)
    assert len(r1) == len(r2) == 3 and r1 == evo._replayed_seed_rows(1)  # a fixed sample per round
    assert {r["id"] for r in r1} <= {f"seed-{i}" for i in range(10)}
    for k in (1, 2, 3):
        _jsonl(evo.round_dir(k) / "pairs.jsonl", [{"round": k, "i": i} for i in range(k)])
    assert evo._ppm_data(1) == evo.round_dir(1) / "pairs.jsonl"
    rows = [json.loads(ln) for ln in evo._ppm_data(3).read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 2, 3, 3, 3]
    cfg.nano.seed_replay_rows = None
    cfg.mining.accumulate_pairs = False
    assert len(evo._replayed_seed_rows(1)) == 10 and evo._ppm_data(3) == evo.round_dir(3) / "pairs.jsonl"


def test_interim_methods_run_the_sampled_methods_once_at_the_end(tmp_path: Path) -> None:
    from rstar.evolve.pipeline import Evolution

    cfg = load_evolve_config("nano", [f"output_dir={tmp_path}", "eval.interim_methods=[greedy]"])
    assert cfg.eval.methods_for(0, 4) == ["greedy"] and cfg.eval.methods_for(3, 4) == ["greedy"]
    assert cfg.eval.methods_for(4, 4) == ["greedy", "bon", "mcts"]
    evals = {s["round"]: s["methods"] for s in Evolution(cfg).plan() if s["stage"] == "eval"}
    assert evals == {0: ["greedy"], 1: ["greedy"], 2: ["greedy"], 3: ["greedy"], 4: ["greedy", "bon", "mcts"]}
    default = load_evolve_config("nano", [f"output_dir={tmp_path}", "eval.interim_methods=null"])
    assert default.eval.methods_for(0, 4) == ["greedy", "bon"]  # round 0 has no PPM for MCTS
    assert default.eval.methods_for(2, 4) == ["greedy", "bon", "mcts"]
    with pytest.raises(ConfigError, match="unknown"):
        load_evolve_config("nano", ["eval.interim_methods=[beam]"])


def test_control_arm_trains_on_the_replayed_rows_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rstar.evolve.pipeline import Evolution
    from rstar.evolve.report import write_run_report
    from rstar.evolve.stages import write_json_atomic

    with pytest.raises(ConfigError, match="seed_rows_in_rounds"):
        load_evolve_config("nano", ["control=true", "nano.seed_rows_in_rounds=false"])
    cfg = load_evolve_config("nano-ci", [f"output_dir={tmp_path}", "control=true", "nano.seed_replay_rows=3"])
    evo = Evolution(cfg, progress=False)
    plan = [(s["round"], s["stage"]) for s in evo.plan()]
    assert plan[-2:] == [(2, "control-sft"), (2, "control-eval")] and (1, "control-sft") in plan
    _jsonl(evo._seed_rows_path(), [{"id": f"seed-{i}", "prompt": "p", "response": str(i)} for i in range(10)])
    calls = []
    monkeypatch.setattr(evo, "_train_sft", lambda init, data, out, args: calls.append((init, data, out)) or {})
    evo._control_sft(1)
    evo._control_sft(2)
    assert calls[0][0] == evo.bootstrap_model and calls[1][0] == evo.control_policy(1)  # sft_from: previous
    rows = [json.loads(ln) for ln in Path(calls[1][1]).read_text().splitlines()]
    assert rows == evo._replayed_seed_rows(2) and all(r["id"].startswith("seed-") for r in rows)
    assert calls[1][2] == str(tmp_path / "round2" / "control" / "policy")

    def rec(k: int, name: str, result: dict) -> None:
        write_json_atomic(record_path(evo.round_dir(k), name), {"name": name, "round": k, "seconds": 2.0,
                                                                "result": result})

    rec(0, "eval", {"nano-eval": {"greedy": {"accuracy": 0.25}}})
    rec(1, "eval", {"nano-eval": {"greedy": {"accuracy": 0.5}}})
    rec(1, "control-sft", {})
    rec(1, "control-eval", {"nano-eval": {"greedy": {"accuracy": 0.3}}})
    rep = write_run_report(evo)
    md = (tmp_path / "report.md").read_text()
    assert "nano-eval greedy, control" in md
    assert "| 0 (bootstrap) | - | - | - | 25.0 | - | - | - | 25.0 |" in md  # both arms start there
    assert "| 1 | - | - | - | 50.0 | - | - | - | 30.0 |" in md
    assert "| 1 | - | - | - | - | - | 2 | 4 |" in md  # eval 2 s, control 2 + 2 s
    assert rep["rounds"][1]["stages"]["control-eval"]["nano-eval"]["greedy"]["accuracy"] == 0.3


def test_control_arm_of_a_round_needs_the_previous_rounds(tmp_path: Path) -> None:
    from rstar.evolve.pipeline import Evolution
    from rstar.evolve.stages import write_json_atomic

    evo = Evolution(load_evolve_config("nano-ci", [f"output_dir={tmp_path}", "control=true"]), progress=False)
    for name in ("problems", "sft", "ppm"):
        k = -1 if name == "problems" else 1
        write_json_atomic(record_path(evo.round_dir(k), name), {"name": name, "round": k, "seconds": 1.0,
                                                                "result": {}})
    with pytest.raises(RuntimeError, match="control-sft"):
        evo.run_round(2)
