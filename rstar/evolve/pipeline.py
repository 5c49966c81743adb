"""Self-evolution: rounds of search -> SFT rows + PPM pairs -> policy -> PPM -> evaluation.

``Evolution(config).run()`` is what ``rstar evolve`` does; each piece is also a method so a
training script can drive rounds itself (``setup()``, ``run_round(k)``, ``report()``).

Directory layout under ``output_dir``::

    setup/       problems (train.jsonl, eval-<set>.jsonl); nano: base/, seed_sft.jsonl, seed_policy/
    round0/      evaluation of the bootstrap policy (eval/)
    round{k}/    trees.jsonl, sft.jsonl, pairs.jsonl, policy/, ppm/, eval/, report.{md,json}
    */stages/    one JSON record per finished stage (what makes a rerun skip it)
    report.md, report.json, accuracy.png

Rounds follow the paper: round 1 searches with the bootstrap model and terminal annotation;
round k > 1 searches with the policy of round k-1 (and, when ``ppm_guided``, its PPM); each
round's policy is fine-tuned from the base model on the round's top-2 trajectories per problem,
and its PPM is initialised from that policy and trained on the round's pairs."""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

from rstar.config import to_dict
from rstar.data import Problem
from rstar.evolve.config import EvolveConfig
from rstar.evolve.problems import difficulty, load_source, read_problems, write_problems
from rstar.evolve.stages import StageRecord, read_record, run_stage, write_json_atomic

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- backends
def make_generator(kind: str, model: str, options: dict[str, Any] | None = None) -> Any:
    """A policy ``Generator`` on the chosen backend (``rstar.distributed.job``)."""
    from rstar.distributed.job import make_generator as make

    return make(kind, model, **dict(options or {}))


def make_scorer(kind: str, path: str, options: dict[str, Any] | None = None) -> Any:
    """A PPM ``Scorer`` (``rstar.ppm.load_scorer``: value head checked, tanh scale applied)."""
    from rstar.distributed.job import make_scorer as make

    return make(kind, path, **dict(options or {}))


def config_changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain (JSON) configs."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += config_changes(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out += config_changes(a, b, f"{prefix}{i}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _split_training_args(script_cls: type, values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split one flat dict into (script arguments, TrainingArguments fields)."""
    from transformers import TrainingArguments

    script_names = {f.name for f in fields(script_cls)}
    targ_names = {f.name for f in fields(TrainingArguments)}
    unknown = sorted(set(values) - script_names - targ_names)
    if unknown:
        from rstar.config import ConfigError

        raise ConfigError(f"unknown training argument(s) {unknown}")
    return ({k: v for k, v in values.items() if k in script_names},
            {k: v for k, v in values.items() if k in targ_names})


_TRAIN_DEFAULTS: dict[str, Any] = {"report_to": "none", "save_strategy": "no", "logging_steps": 25,
                                   "disable_tqdm": False, "tensorboard": False}


class Evolution:
    """One self-evolution run (see the module docstring)."""

    def __init__(self, config: EvolveConfig, *, progress: bool = True) -> None:
        self.cfg = config
        self.out = Path(config.output_dir)
        self.progress = progress
        self.records: dict[tuple[int, str], StageRecord] = {}

    # ------------------------------------------------------------------ paths
    def round_dir(self, k: int) -> Path:
        return self.out / ("setup" if k < 0 else f"round{k}")

    @property
    def base_model(self) -> str:
        return str(self.out / "setup" / "base") if self.cfg.nano is not None else self.cfg.base_model

    @property
    def bootstrap_model(self) -> str:
        return str(self.out / "setup" / "seed_policy") if self.cfg.nano is not None else self.cfg.bootstrap_model

    def policy(self, k: int) -> str:
        return self.bootstrap_model if k == 0 else str(self.round_dir(k) / "policy")

    def control_policy(self, k: int) -> str:
        """The control arm's policy after round ``k`` (``EvolveConfig.control``)."""
        return self.bootstrap_model if k == 0 else str(self.round_dir(k) / "control" / "policy")

    def ppm(self, k: int) -> str | None:
        return None if k == 0 else str(self.round_dir(k) / "ppm")

    def trained_ppm(self, k: int) -> str | None:
        """The PPM to use after round ``k``: round k's, or the newest earlier one when a round
        mined no pairs (a weak policy that solved nothing); None when no round trained one."""
        for j in range(k, 0, -1):
            rec = read_record(self.round_dir(j), "ppm")
            if rec is not None and rec.result.get("trained", True):
                return self.ppm(j)
        return None

    # ------------------------------------------------------------------ plan
    def plan(self) -> list[dict[str, Any]]:
        """The stages in order, with their inputs and whether they are already done."""
        cfg = self.cfg
        steps: list[dict[str, Any]] = []

        def add(k: int, name: str, **info: Any) -> None:
            done = read_record(self.round_dir(k), name) is not None
            steps.append({"round": k, "stage": name, "done": done, **info})

        add(-1, "problems", train=cfg.train.label, eval=[s.label for s in cfg.eval.sets])
        if cfg.nano is not None:
            add(-1, "nano-base", out=self.base_model)
            add(-1, "seed-policy", out=self.bootstrap_model, rows=cfg.nano.seed_size)
        last = len(cfg.rounds)
        if cfg.eval.round0 and cfg.eval.sets:
            add(0, "eval", policy=self.bootstrap_model, methods=cfg.eval.methods_for(0, last))
        for k, spec in enumerate(cfg.rounds, start=1):
            searcher = self.bootstrap_model if spec.policy == "bootstrap" else self.policy(k - 1)
            add(k, "search", preset=spec.search, policy=searcher,
                ppm=self.ppm(k - 1) if spec.ppm_guided else None, overrides=spec.overrides)
            add(k, "mine")
            add(k, "sft", init=self.base_model if spec.sft_from == "base" else self.policy(k - 1))
            add(k, "ppm", init=self.policy(k))
            if cfg.eval.sets and (cfg.eval.every_round or k == last):
                add(k, "eval", methods=cfg.eval.methods_for(k, last), n=cfg.eval.n)
            if cfg.control:
                add(k, "control-sft", init=self.control_policy(k - 1))
                add(k, "control-eval", methods=["greedy"])
        return steps

    # ------------------------------------------------------------------ run
    def run(self, *, rounds: int | None = None) -> dict[str, Any]:
        """Run (or resume) the setup and the first ``rounds`` rounds (all by default); returns
        the run report (also written to ``output_dir/report.{md,json}``)."""
        self._threads()
        self.out.mkdir(parents=True, exist_ok=True)
        self._warn_config_change()
        write_json_atomic(self.out / "config.json", to_dict(self.cfg))
        self.setup()
        if self.cfg.eval.round0 and self.cfg.eval.sets:
            self._stage(0, "eval", lambda: self._eval(0))
        n = len(self.cfg.rounds) if rounds is None else min(rounds, len(self.cfg.rounds))
        for k in range(1, n + 1):
            self.run_round(k)
        return self.report()

    def _warn_config_change(self) -> None:
        """Stages already on disk are kept whatever the config says now: say which settings
        differ from the run that wrote them, so a changed config is never silently ignored."""
        path = self.out / "config.json"
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return
        changed = config_changes(old, to_dict(self.cfg))
        if changed:
            logger.warning("%s was written by a run with different settings (%s); stages it finished are "
                           "kept, not redone: delete their round directories (or use another output_dir) "
                           "to run them with the new settings", path, ", ".join(changed[:12]) +
                           (f", ... ({len(changed)} in all)" if len(changed) > 12 else ""))

    def setup(self) -> None:
        """Materialise the problem sets; nano: build the base model and the seed policy."""
        self._stage(-1, "problems", self._problems)
        if self.cfg.nano is not None:
            self._stage(-1, "nano-base", self._nano_base)
            self._stage(-1, "seed-policy", self._seed_policy)

    def run_round(self, k: int) -> dict[str, Any]:
        """All stages of round ``k`` (1-based), each skipped when already complete."""
        if not 1 <= k <= len(self.cfg.rounds):
            raise ValueError(f"round {k} is not in 1..{len(self.cfg.rounds)}")
        self._threads()
        if read_record(self.round_dir(-1), "problems") is None:
            self.setup()
        for j in range(1, k):  # a round needs the previous one's policy / PPM
            if read_record(self.round_dir(j), "sft") is None or read_record(self.round_dir(j), "ppm") is None:
                raise RuntimeError(f"round {k} needs round {j} to be complete first")
            if self.cfg.control and read_record(self.round_dir(j), "control-sft") is None:
                raise RuntimeError(f"round {k}'s control arm needs round {j}'s (control-sft) first")
        self._stage(k, "search", lambda: self._search(k))
        self._stage(k, "mine", lambda: self._mine(k))
        self._stage(k, "sft", lambda: self._sft(k))
        self._stage(k, "ppm", lambda: self._ppm(k))
        if self.cfg.eval.sets and (self.cfg.eval.every_round or k == len(self.cfg.rounds)):
            self._stage(k, "eval", lambda: self._eval(k))
        if self.cfg.control:
            self._stage(k, "control-sft", lambda: self._control_sft(k))
            self._stage(k, "control-eval", lambda: self._control_eval(k))
        from rstar.evolve.report import write_round_report, write_run_report

        rep = write_round_report(self, k)
        write_run_report(self)
        return rep

    def report(self) -> dict[str, Any]:
        from rstar.evolve.report import write_run_report

        return write_run_report(self)

    # ------------------------------------------------------------------ helpers
    def _threads(self) -> None:
        if self.cfg.threads:
            import torch

            torch.set_num_threads(int(self.cfg.threads))

    def _stage(self, k: int, name: str, fn: Any) -> StageRecord:
        rec = run_stage(self.round_dir(k), name, k, fn)
        self.records[(k, name)] = rec
        return rec

    def train_problems(self, k: int | None = None) -> list[Problem]:
        """All training problems, or those round ``k`` searches (its slice with ``train_per_round``)."""
        problems = read_problems(self.round_dir(-1) / "train.jsonl")
        m = self.cfg.train_per_round
        if k is None or m is None:
            return problems
        part = problems[(k - 1) * m : k * m]
        if len(part) < m:
            raise ValueError(f"round {k}: train_per_round={m} needs {k * m} training problems, "
                             f"the run has {len(problems)}")
        return part

    def eval_problems(self) -> dict[str, list[Problem]]:
        return {s.label: read_problems(self.round_dir(-1) / f"eval-{s.label}.jsonl") for s in self.cfg.eval.sets}

    def _world(self) -> dict[str, Any]:
        return dict(self.cfg.nano.world) if self.cfg.nano is not None else {}

    # ------------------------------------------------------------------ setup stages
    def _problems(self) -> dict[str, Any]:
        d = self.round_dir(-1)
        train = load_source(self.cfg.train, self._world())
        write_problems(train, d / "train.jsonl")
        info: dict[str, Any] = {"train": len(train), "eval": {}}
        train_q = {p.question for p in train}
        for s in self.cfg.eval.sets:
            probs = load_source(s, self._world())
            overlap = sum(p.question in train_q for p in probs)
            if overlap:
                logger.warning("eval set %s: %d questions also in the training problems", s.label, overlap)
            write_problems(probs, d / f"eval-{s.label}.jsonl")
            info["eval"][s.label] = {"problems": len(probs), "overlap_with_train": overlap}
        return info

    def _nano_base(self) -> dict[str, Any]:
        from rstar.evolve.nano import NanoModelConfig, build_base_model
        from rstar.evolve.world import WorldConfig

        nano = self.cfg.nano
        assert nano is not None
        out = Path(self.base_model)
        if out.exists():
            shutil.rmtree(out)
        build_base_model(out, model_config=NanoModelConfig(**nano.model), world_config=WorldConfig(**nano.world))
        return json.loads((out / "rstar_nano.json").read_text())

    def _seed_rows_path(self) -> Path:
        return self.round_dir(-1) / "seed_sft.jsonl"

    def _seed_policy(self) -> dict[str, Any]:
        from rstar.evolve.nano import seed_rows
        from rstar.evolve.world import World, WorldConfig
        from rstar.train.mining import write_jsonl

        nano = self.cfg.nano
        assert nano is not None
        world = World(WorldConfig(**nano.world))
        rows = seed_rows(world, nano.seed_size, difficulties=nano.seed_difficulties, split=nano.seed_split)
        write_jsonl([{"id": f"seed-{i}", "prompt": p, "response": r} for i, (p, r) in enumerate(rows)],
                    self._seed_rows_path())
        return self._train_sft(self.base_model, str(self._seed_rows_path()), self.bootstrap_model,
                               {**self.cfg.sft, **nano.seed_sft})

    # ------------------------------------------------------------------ round stages
    def _search(self, k: int) -> dict[str, Any]:
        from rstar.search.config import load_search_config

        spec = self.cfg.rounds[k - 1]
        policy = self.bootstrap_model if spec.policy == "bootstrap" else self.policy(k - 1)
        ppm = self.trained_ppm(k - 1) if spec.ppm_guided else None
        overrides = [f"seed={self.cfg.seed + k}", *spec.overrides]
        if spec.ppm_guided and ppm is None:
            logger.warning("round %d: no earlier round trained a PPM (no pairs were mined): searching with "
                           "terminal-guided annotation only", k)
            overrides.append("value=terminal")
        search_cfg = load_search_config(spec.search, overrides)
        problems = self.train_problems(k)
        trees = self.round_dir(k) / "trees.jsonl"
        records = self._run_search(policy, ppm, search_cfg, problems, trees)
        return search_summary(problems, records)

    def _run_search(self, policy: str, ppm: str | None, search_cfg: Any, problems: list[Problem],
                    out: Path) -> list[dict[str, Any]]:
        """One code path for local and Ray runs: ``rstar.distributed.run_search_job``."""
        from rstar.distributed import SearchJob, run_search_job

        b = self.cfg.backend
        job = SearchJob(model=policy, config=search_cfg, ppm=ppm, backend=b.kind,
                        backend_kwargs=dict(b.options), scorer_kwargs=dict(b.scorer_options),
                        torch_threads=self.cfg.threads)
        results = run_search_job(job, problems, out, progress=self.progress, **self.cfg.distributed)
        return [r.record for r in results]

    def _mine(self, k: int) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from rstar.train.mining import (PairMiningConfig, PairStats, SFTMiningConfig, mine_pairs, mine_sft,
                                        read_trees, write_jsonl)

        d = self.round_dir(k)
        m = self.cfg.mining
        tok = AutoTokenizer.from_pretrained(self.base_model)
        sft = mine_sft(read_trees(d / "trees.jsonl"), SFTMiningConfig(top_n=m.top_n), tokenizer=tok)
        mined = len(sft)
        problems = len({r["id"] for r in sft})
        sft = sft + self._replayed_seed_rows(k)
        write_jsonl(sft, d / "sft.jsonl")
        st = PairStats()
        pairs = mine_pairs(read_trees(d / "trees.jsonl"),
                           PairMiningConfig(top_k=m.top_k, top_k_single=m.top_k_single, min_margin=m.min_margin,
                                            min_edit_distance=m.min_edit_distance),
                           tokenizer=tok, stats=st)
        write_jsonl(pairs, d / "pairs.jsonl")
        return {"sft_rows": mined, "sft_problems": problems, "sft_rows_total": len(sft), "pairs": len(pairs),
                "pair_trees": st.trees_covered}

    def _sft(self, k: int) -> dict[str, Any]:
        spec = self.cfg.rounds[k - 1]
        init = self.base_model if spec.sft_from == "base" else self.policy(k - 1)
        return self._train_sft(init, str(self.round_dir(k) / "sft.jsonl"), self.policy(k),
                               {**self.cfg.sft, **spec.sft})

    def _ppm_data(self, k: int) -> Path:
        """Round k's pairs, or with ``mining.accumulate_pairs`` those of rounds 1..k together."""
        from rstar.train.mining import read_jsonl, write_jsonl

        data = self.round_dir(k) / "pairs.jsonl"
        if self.cfg.mining.accumulate_pairs and k > 1:
            rows = [r for j in range(1, k + 1) for r in read_jsonl(self.round_dir(j) / "pairs.jsonl")]
            data = self.round_dir(k) / "pairs_accumulated.jsonl"
            write_jsonl(rows, data)
        return data

    def _replayed_seed_rows(self, k: int) -> list[dict[str, Any]]:
        """The seed rows added to round k's SFT data (see ``NanoSetup.seed_replay_rows``)."""
        from rstar.train.mining import read_jsonl

        nano = self.cfg.nano
        if nano is None or not nano.seed_rows_in_rounds:
            return []
        seed = read_jsonl(self._seed_rows_path())
        if nano.seed_replay_rows is not None and nano.seed_replay_rows < len(seed):
            seed = random.Random(self.cfg.seed * 1000 + k).sample(seed, nano.seed_replay_rows)
        return seed

    def _control_sft(self, k: int) -> dict[str, Any]:
        """Round k's fine-tuning schedule on its replayed seed rows alone, from the control
        arm's previous policy (or the base model, as the round's ``sft_from`` says)."""
        from rstar.train.mining import write_jsonl

        spec = self.cfg.rounds[k - 1]
        d = self.round_dir(k) / "control"
        write_jsonl(self._replayed_seed_rows(k), d / "sft.jsonl")
        init = self.base_model if spec.sft_from == "base" else self.control_policy(k - 1)
        return self._train_sft(init, str(d / "sft.jsonl"), self.control_policy(k), {**self.cfg.sft, **spec.sft})

    def _control_eval(self, k: int) -> dict[str, Any]:
        return self._evaluate(self.control_policy(k), None, ["greedy"], self.round_dir(k) / "control" / "eval")

    def _ppm(self, k: int) -> dict[str, Any]:
        from transformers import TrainingArguments

        from rstar.train.mining import read_jsonl
        from rstar.train.ppm import PPMArguments, train_ppm

        d = self.round_dir(k)
        data = self._ppm_data(k)
        if not read_jsonl(data):
            logger.warning("round %d: no PPM pairs were mined (no node has both a correct and a wrong "
                           "descendant): no PPM this round; later rounds use the newest earlier PPM, if any", k)
            return {"trained": False, "reason": "no pairs"}
        script_kw, targ_kw = _split_training_args(PPMArguments, {**_TRAIN_DEFAULTS, **self.cfg.ppm})
        script = PPMArguments(model=self.policy(k), data=str(data), **script_kw)
        targs = TrainingArguments(output_dir=str(d / "ppm"), seed=self.cfg.seed + k, **targ_kw)
        res = train_ppm(script, targs)
        return {"trained": True, "train": _clean(res.train_metrics), "eval": _clean(res.eval_metrics),
                "rows": res.train_rows, "eval_rows": res.eval_rows}

    def _train_sft(self, init: str, data: str, out: str, args: dict[str, Any]) -> dict[str, Any]:
        from transformers import TrainingArguments

        from rstar.train.sft import SFTArguments, train_sft

        script_kw, targ_kw = _split_training_args(SFTArguments, {**_TRAIN_DEFAULTS, **args})
        script = SFTArguments(model=init, data=data, **script_kw)
        targs = TrainingArguments(output_dir=out, seed=self.cfg.seed, **targ_kw)
        res = train_sft(script, targs)
        return {"train": _clean(res.train_metrics), "rows": res.train_rows, "init": init}

    def _eval(self, k: int) -> dict[str, Any]:
        ppm = self.trained_ppm(k)
        methods = [m for m in self.cfg.eval.methods_for(k, len(self.cfg.rounds)) if not (m == "mcts" and ppm is None)]
        return self._evaluate(self.policy(k), ppm, methods, self.round_dir(k) / "eval")

    def _evaluate(self, policy: str, ppm: str | None, methods: list[str], out_dir: Path) -> dict[str, Any]:
        """``methods`` of ``eval`` for ``policy`` (and ``ppm``) on every evaluation set."""
        from rstar.evolve.evaluate import evaluate

        e = self.cfg.eval
        gen = make_generator(self.cfg.backend.kind, policy, self.cfg.backend.options)
        scorer = make_scorer(self.cfg.backend.kind, ppm, self.cfg.backend.scorer_options) if ppm else None
        try:
            return evaluate(gen, scorer, self.eval_problems(), out_dir, methods=methods, n=e.n,
                            budgets=e.budgets, overrides={"greedy": e.greedy, "bon": e.bon, "mcts": e.mcts},
                            seed=self.cfg.seed, progress=self.progress)
        finally:
            gen.close()
            if scorer is not None:
                scorer.close()


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in metrics.items()}


def search_summary(problems: list[Problem], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Coverage of a training search: problems with at least one correct terminal."""
    covered = [any(a.get("correct") for a in r["answers"]) for r in records]
    by_d: dict[str, list[int]] = {}
    for p, ok in zip(problems, covered):
        d = difficulty(p)
        if d is not None:
            c = by_d.setdefault(str(d), [0, 0])
            c[0] += int(ok)
            c[1] += 1
    tokens = sum(r.get("stats", {}).get("tokens", 0) for r in records)
    return {
        "problems": len(records),
        "covered": sum(covered),
        "coverage": round(sum(covered) / max(len(records), 1), 4),
        "chosen_correct": sum(bool((r.get("chosen") or {}).get("correct")) for r in records),
        "coverage_by_difficulty": {d: round(c / n, 4) for d, (c, n) in sorted(by_d.items())},
        "nodes": sum(len(r["nodes"]) for r in records),
        "tokens": tokens,
    }


__all__ = ["Evolution", "make_generator", "make_scorer", "search_summary"]
