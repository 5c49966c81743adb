"""Scale-out (rstar.distributed): deterministic shards and merge, and the search on a real
local Ray cluster (started here: 2 CPUs) with the tiny local model: two actors equal one
process problem for problem, a killed actor's problems are searched elsewhere, a killed
driver resumes from its output, and a poison problem ends as a failure record.

The Ray tests are marked ``slow`` (starting Ray and model-loading actors takes minutes on a
2-core machine); the shard / merge / import tests run in the default suite."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search_fakes import FakeGrader, FakeSandbox, Problem, ScriptedGenerator, random_policy
from rstar.config import from_dict, to_dict
from rstar.distributed import (
    SearchComponents,
    SearchJob,
    failure_record,
    merge_shards,
    run_local,
    run_search_job,
    select_shard,
    shard_of,
)
from rstar.search.config import SearchConfig, load_search_config

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
N_PROBLEMS = 12


# --------------------------------------------------------------------------- helpers
def tiny_config(**kw) -> SearchConfig:
    """round2 (terminal-graded MCTS), small, lock-step (the deterministic schedule)."""
    d = to_dict(load_search_config("round2"))
    d.update(n=3, rollouts=3, max_depth=4, concurrent_trees=2, pipeline="lockstep", seed=11)
    d["generation"]["max_new_tokens"] = 32
    d["sandbox"] = {"workers": 1, "timeout_s": 10.0}
    d.update(kw)
    return from_dict(SearchConfig, d)


def comparable(rec: dict) -> dict:
    """A record without its wall-clock field (the only one that differs between runs)."""
    rec = json.loads(json.dumps(rec))
    rec["stats"].pop("seconds", None)
    return rec


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def math_problems(data_dir: Path, k: int):
    from rstar.data import load_problems

    return load_problems(data_dir / "math500_test.json", limit=k)


# Factories for jobs that run test doubles instead of models (imported by the actors:
# the Ray fixture puts tests/ on their PYTHONPATH).
def scripted_factory(job: SearchJob) -> SearchComponents:
    return SearchComponents(ScriptedGenerator(latency_s=0.002), None, FakeSandbox(), FakeGrader())


def poison_policy(question, steps, i, req):
    if "POISON-KILL" in question:
        os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-search
    if "POISON-RAISE" in question:
        raise RuntimeError("this problem breaks the generator")
    return random_policy(question, steps, i, req)


def poison_factory(job: SearchJob) -> SearchComponents:
    return SearchComponents(ScriptedGenerator(poison_policy, latency_s=0.002), None, FakeSandbox(), FakeGrader())


def fake_problems(k: int, tag: str = "") -> list[Problem]:
    return [Problem(f"f{i}", f"Fake question {i}?{tag if i == 3 else ''}", str(i % 3)) for i in range(k)]


FAKE_CFG = SearchConfig(mode="mcts", n=3, rollouts=4, max_depth=5, concurrent_trees=4, pipeline="lockstep")


# --------------------------------------------------------------------------- no Ray
def test_import_does_not_import_ray() -> None:
    code = ("import sys, rstar.distributed, rstar.distributed.cli, rstar.search.cli\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_shards_partition_by_stable_hash() -> None:
    ids = [f"math500/{i}" for i in range(500)]
    probs = [Problem(i, "q", "1") for i in ids]
    shards = [select_shard(probs, k, 4) for k in range(4)]
    got = [p.id for s in shards for p in s]
    assert sorted(got) == sorted(ids)  # a partition: every problem in exactly one shard
    assert all(90 < len(s) < 160 for s in shards), [len(s) for s in shards]
    for s in shards:  # list order kept inside a shard
        assert [p.id for p in s] == [i for i in ids if i in {p.id for p in s}]
    # by id, not by position: reversing the list or dropping problems moves nobody
    rev = select_shard(list(reversed(probs)), 2, 4)
    assert {p.id for p in rev} == {p.id for p in shards[2]}
    assert {p.id for p in select_shard(probs[::3], 2, 4)} == {p.id for p in shards[2] if ids.index(p.id) % 3 == 0}
    # pinned values: a change of the hash would silently reshuffle running SLURM arrays
    assert [shard_of(f"math500/{i}", 8) for i in range(8)] == [_expected_shard(f"math500/{i}", 8) for i in range(8)]
    assert shard_of("x", 1) == 0
    with pytest.raises(ValueError):
        select_shard(probs, 4, 4)


def _expected_shard(pid: str, n: int) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(pid.encode(), digest_size=8).digest(), "little") % n


def _rec(pid: str, answer: str = "1") -> dict:
    return {"id": pid, "question": "q", "answer": answer, "nodes": [{"id": 0}], "chosen": {"answer": answer}}


def test_merge_reports_missing_duplicated_torn_and_failed(tmp_path: Path) -> None:
    from rstar.distributed.cli import main_merge

    probs = [Problem(f"p{i}", "q", "1") for i in range(6)]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(_rec(i)) + "\n" for i in ("p0", "p2", "p4")) + '{"id": "p5", "ques')  # torn
    b.write_text("".join(json.dumps(r) + "\n" for r in (
        _rec("p1"), _rec("p2", "other"), failure_record(probs[3], "boom", 2), _rec("zz"))))
    out = tmp_path / "m.jsonl"
    rep = merge_shards([a, b], out, probs)
    assert rep.missing == ["p5"] and rep.duplicated == {"p2": 2} and rep.unexpected == ["zz"]
    assert rep.failed == ["p3"] and rep.torn == [str(a)] and not rep.ok
    merged = read_jsonl(out)
    assert [r["id"] for r in merged] == ["p0", "p1", "p2", "p3", "p4", "zz"]  # problem order, unexpected last
    assert merged[2]["answer"] == "1"  # the first record of a duplicated id is kept
    rep2 = merge_shards([a, b], tmp_path / "m2.jsonl", probs, drop_failed=True)
    assert [r["id"] for r in read_jsonl(tmp_path / "m2.jsonl")] == ["p0", "p1", "p2", "p4", "zz"]
    assert rep2.written == 5
    # the command: exit 1 on missing / duplicated, 0 when allowed or clean
    data = tmp_path / "probs.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n"
                            for p in probs))
    assert main_merge([str(a), str(b), "--data", str(data), "--out", str(tmp_path / "c.jsonl")]) == 1
    assert main_merge([str(a), str(b), "--data", str(data), "--allow-missing", "--allow-duplicates"]) == 0
    assert main_merge([str(b), str(b)]) == 1  # duplicates even without a problem list
    clean = tmp_path / "clean.jsonl"
    merge_shards([out], clean, None)
    assert main_merge([str(clean)]) == 0


def test_merge_command_is_registered() -> None:
    proc = subprocess.run([sys.executable, "-m", "rstar.cli", "merge", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--drop-failed" in proc.stdout


# --------------------------------------------------------------------------- the tiny model
@pytest.fixture(scope="module")
def tiny_job(tiny_model_dir) -> SearchJob:
    return SearchJob(model=str(tiny_model_dir), config=tiny_config(), torch_threads=1)


@pytest.fixture(scope="module")
def tiny_components(tiny_job):
    """The job's generator (1 torch thread, as in the actors) and a 1-worker sandbox, built
    once for the in-process runs of this module."""
    import torch

    from rstar.distributed import build_components
    from rstar.sandbox import Sandbox, SandboxConfig

    threads = torch.get_num_threads()
    comps = build_components(tiny_job)
    comps.sandbox = Sandbox(SandboxConfig(**tiny_job.config.sandbox))
    try:
        yield comps
    finally:
        comps.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def baseline(tiny_job, tiny_components, data_dir, tmp_path_factory):
    """One process, one Searcher, all problems: the reference output."""
    out = tmp_path_factory.mktemp("baseline") / "single.jsonl"
    problems = math_problems(data_dir, N_PROBLEMS)
    results = run_local(tiny_job, problems, out, progress=False, components=tiny_components)
    recs = read_jsonl(out)
    assert sorted(r["id"] for r in recs) == sorted(str(p.id) for p in problems)
    assert [r.id for r in results] == [str(p.id) for p in problems]
    assert sum(len(r["nodes"]) for r in recs) > 3 * N_PROBLEMS  # real trees, not just roots
    return {r["id"]: comparable(r) for r in recs}, problems


def test_shards_merged_equal_single_run(baseline, tiny_job, tiny_components, tiny_model_dir,
                                        tmp_path: Path) -> None:
    import torch

    want, problems = baseline
    n = 3
    pattern = tmp_path / "trees.{shard}-of-{num_shards}.jsonl"
    # shard 0 through the command line (the SLURM-array form), the others through the API
    from rstar.search.cli import main as search_main

    data = tmp_path / "problems.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "question": p.question, "answer": p.answer,
                                        "source": p.source}) + "\n" for p in problems))
    threads = torch.get_num_threads()
    try:
        ov = [f"{k}={v}" for k, v in (("n", 3), ("rollouts", 3), ("max_depth", 4), ("concurrent_trees", 2),
                                       ("pipeline", "lockstep"), ("seed", 11),
                                       ("generation.max_new_tokens", 32), ("sandbox.workers", 1),
                                       ("sandbox.timeout_s", 10.0))]
        assert search_main(["--config", "round2", "--data", str(data), "--model", str(tiny_model_dir),
                            "--out", str(pattern), "--shard-index", "0", "--num-shards", str(n),
                            "--torch-threads", "1", "--no-progress", *ov]) == 0
        for k in range(1, n):
            run_local(tiny_job, select_shard(problems, k, n), str(pattern).format(shard=k, num_shards=n),
                      progress=False, components=tiny_components)
    finally:
        torch.set_num_threads(threads)
    files = [Path(str(pattern).format(shard=k, num_shards=n)) for k in range(n)]
    sizes = [len(read_jsonl(f)) for f in files]
    assert sum(sizes) == N_PROBLEMS and all(s < N_PROBLEMS for s in sizes), sizes
    for k, f in enumerate(files):
        assert {r["id"] for r in read_jsonl(f)} == {p.id for p in select_shard(problems, k, n)}
    merged = tmp_path / "merged.jsonl"
    rep = merge_shards(files, merged, problems)
    assert rep.ok and rep.written == N_PROBLEMS
    got = {r["id"]: comparable(r) for r in read_jsonl(merged)}
    assert list(got) == [p.id for p in problems]  # merged in problem-list order
    for pid in want:
        assert got[pid] == want[pid], pid
    # a missing shard is reported
    rep = merge_shards(files[:2], None, problems)
    assert sorted(rep.missing) == sorted(p.id for p in select_shard(problems, 2, n)) and not rep.ok


def test_local_run_resumes_and_uses_factory(tmp_path: Path) -> None:
    """The in-process path of run_search_job: a factory job, resumed without redoing work."""
    job = SearchJob(model="-", config=FAKE_CFG, factory="test_distributed:scripted_factory")
    probs = fake_problems(10)
    out = tmp_path / "o.jsonl"
    first = run_search_job(job, probs[:4], out, progress=False)
    comps = scripted_factory(job)
    res = run_local(job, probs, out, progress=False, components=comps)
    assert [r.id for r in res] == [p.id for p in probs]
    assert [r.id for r in first] == [r.id for r in res[:4]]
    assert len(comps.generator.requests) > 0
    asked = {re.search(r"Fake question (\d+)", comps.generator.tokenizer.decode(r.prompt_ids)).group(1)
             for r in comps.generator.requests}
    assert asked == {str(i) for i in range(4, 10)}  # the first four came from the file
    ids = [r["id"] for r in read_jsonl(out)]
    assert sorted(ids[:4]) == [p.id for p in probs[:4]] and sorted(ids) == sorted(p.id for p in probs)


def test_searcher_on_record_hands_out_every_record() -> None:
    """The actors stream records through Searcher.on_record: every problem, once, as it
    finishes."""
    from rstar.distributed import build_searcher

    job = SearchJob(model="-", config=FAKE_CFG, factory="test_distributed:scripted_factory")
    got: list[dict] = []
    with build_searcher(job, scripted_factory(job)) as s:
        s.on_record = got.append
        res = s.run(fake_problems(9), None, progress=False)
    assert sorted(r["id"] for r in got) == sorted(p.id for p in fake_problems(9))
    assert {r["id"]: r for r in got} == {r.id: r.record for r in res}


# --------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster for this module; actors find tests/ on their path."""
    import ray  # the distributed extra is part of dev: a missing Ray fails, never skips

    pythonpath = os.pathsep.join([str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, dict]] = []
        self.hooks: list = []

    def __call__(self, kind: str, info: dict) -> None:
        self.items.append((kind, info))
        for h in self.hooks:
            h(kind, info)

    def of(self, kind: str) -> list[dict]:
        return [i for k, i in self.items if k == kind]


@pytest.mark.slow
def test_ray_two_actors_equal_single_process(ray_cluster, baseline, tiny_job, tmp_path: Path) -> None:
    want, problems = baseline
    ev = Events()
    out = tmp_path / "ray.jsonl"
    results = run_search_job(tiny_job, problems, out, ray_address=True, num_actors=2, batch_size=3,
                             progress=False, on_event=ev, min_ready_actors=2)
    assert len(ev.of("actor_ready")) == 2 and len({i["pid"] for i in ev.of("actor_ready")}) == 2
    assert {i["slot"] for i in ev.of("record")} == {0, 1}  # both actors searched
    recs = read_jsonl(out)
    assert sorted(r["id"] for r in recs) == sorted(want)  # each problem exactly once
    got = {r["id"]: comparable(r) for r in recs}
    for pid in want:
        assert got[pid] == want[pid], pid
    assert [r.id for r in results] == [p.id for p in problems]
    assert all(comparable(r.record) == want[r.id] for r in results)
    assert not ev.of("actor_died") and not ev.of("requeued")


@pytest.mark.slow
def test_ray_actor_killed_mid_run(ray_cluster, baseline, tiny_job, tmp_path: Path) -> None:
    """SIGKILL one actor right after its first problem comes back: the rest of its batch is
    searched by the others (and a replacement), every problem is written exactly once, and
    the re-searched problems equal the single-process run."""
    want, problems = baseline
    ev = Events()
    pids: dict[int, int] = {}
    killed: list[int] = []

    def hook(kind: str, info: dict) -> None:
        if kind == "actor_ready":
            pids[info["slot"]] = info["pid"]
        elif kind == "record" and info["slot"] == 0 and not killed:
            killed.append(pids[0])
            os.kill(pids[0], signal.SIGKILL)

    ev.hooks.append(hook)
    out = tmp_path / "ray.jsonl"
    run_search_job(tiny_job, problems, out, ray_address=True, num_actors=2, batch_size=6, progress=False,
                   on_event=ev, min_ready_actors=2)
    assert killed, "actor 0 never returned a record"
    died = ev.of("actor_died")
    assert [d["slot"] for d in died] == [0] and died[0]["pid"] == killed[0]
    requeued = {i["id"] for i in ev.of("requeued")}
    assert requeued, "the killed actor had no unfinished problem"
    written_by_0 = {i["id"] for i in ev.of("record") if i["slot"] == 0}
    assert written_by_0 and not (written_by_0 & requeued)  # what came back before the kill is kept
    recs = read_jsonl(out)
    assert sorted(r["id"] for r in recs) == sorted(want)  # exactly once
    assert not any(r.get("failed") for r in recs)
    got = {r["id"]: comparable(r) for r in recs}
    for pid in want:
        assert got[pid] == want[pid], pid


@pytest.mark.slow
def test_ray_driver_killed_and_restarted(ray_cluster, tiny_model_dir, data_dir, tmp_path: Path) -> None:
    """`rstar search --ray ADDRESS` as a subprocess, SIGKILLed after some problems are
    written; the same command again finishes without searching those problems again."""
    n = 30
    out = tmp_path / "trees.jsonl"
    cmd = [sys.executable, "-m", "rstar.cli", "search", "--config", "round2", "--data",
           str(data_dir / "math500_test.json"), "--limit", str(n), "--model", str(tiny_model_dir),
           "--out", str(out), "--ray", ray_cluster, "--num-actors", "2", "--batch-size", "2", "--no-progress",
           "n=3", "rollouts=3", "max_depth=4", "concurrent_trees=2", "pipeline=lockstep", "seed=3",
           "generation.max_new_tokens=32", "sandbox.workers=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log1 = tmp_path / "run1.log"
    with open(log1, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            deadline = time.time() + 400
            while time.time() < deadline and proc.poll() is None:
                if out.exists() and out.read_text().count("\n") >= 4:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, f"the driver ended before it was killed:\n{log1.read_text()[-3000:]}"
            os.killpg(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    before = read_jsonl(out) if out.read_text().endswith("\n") else read_jsonl(out)[:-1]
    n_before = len(before)
    assert 4 <= n_before < n, n_before
    proc2 = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    recs = read_jsonl(out)
    ids = [r["id"] for r in recs]
    assert len(ids) == n and len(set(ids)) == n  # every problem exactly once
    assert recs[:n_before] == before  # what the killed driver wrote is untouched
    m = re.search(r"ray run: (\d+) problems \((\d+) resumed\).*?(\d+) searched", proc2.stderr)
    assert m, proc2.stderr[-3000:]
    assert (int(m.group(1)), int(m.group(2))) == (n, n_before)
    assert int(m.group(3)) == n - n_before  # finished problems were not searched again


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "raise"])
def test_ray_poison_problem_becomes_failure_record(ray_cluster, how: str, tmp_path: Path) -> None:
    """A problem that kills (or breaks) every actor that takes it is tried alone, then written
    as a failure record; its batch-mates are searched normally."""
    tag = {"kill": " POISON-KILL", "raise": " POISON-RAISE"}[how]
    probs = fake_problems(10, tag)
    job = SearchJob(model="-", config=FAKE_CFG, factory="test_distributed:poison_factory")
    ev = Events()
    out = tmp_path / "o.jsonl"
    res = run_search_job(job, probs, out, ray_address=True, num_actors=2, batch_size=4, max_retries=1,
                         progress=False, on_event=ev, keep_records=False)
    recs = {r["id"]: r for r in read_jsonl(out)}
    assert sorted(recs) == sorted(p.id for p in probs)
    bad = recs["f3"]
    assert bad["failed"] is True and bad["attempts"] == 2 and bad["nodes"] == []
    assert ("actor died" if how == "kill" else "breaks the generator") in bad["error"]
    assert [i["id"] for i in ev.of("failed")] == ["f3"]
    assert res[3].answer is None and res[3].record["failed"]
    assert all("nodes" not in r.record and r.record["chosen"] for r in res)  # summaries only
    assert [r.answer for r in res] == [recs[p.id]["chosen"]["answer"] for p in probs]
    deaths = len(ev.of("actor_died"))
    assert deaths == (2 if how == "kill" else 0), deaths
    if how == "raise":
        assert len(ev.of("batch_error")) == 2
    # the others equal a local run of the same problems
    good = [p for p in probs if p.id != "f3"]
    local = run_local(job, good, None, progress=False)
    for r in local:
        assert not recs[r.id].get("failed")
        assert comparable(recs[r.id]) == comparable(r.record), r.id
    # a rerun of the driver leaves the failure record alone (it counts as done)
    ev2 = Events()
    run_search_job(job, probs, out, ray_address=True, num_actors=1, progress=False, on_event=ev2)
    assert not ev2.of("batch") and len(read_jsonl(out)) == len(probs)
