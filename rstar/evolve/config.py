"""Configs of ``rstar evolve`` and ``rstar eval`` (dataclasses that mirror the YAML files).

One ``EvolveConfig`` describes the whole self-evolution: where the training and evaluation
problems come from, the base and bootstrap models (or, for the nano world, how to build them),
the four rounds (search preset, which policy searches, whether the PPM guides it), the SFT and
PPM training arguments and the evaluation. ``configs/evolve/*.yaml`` are the shipped files;
every field can be overridden from the command line (``rounds.0.search.rollouts=4`` style
``key=value`` pairs, see ``rstar.config``)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rstar.config import ConfigError, load_config

_ROUND_PRESETS = ("bootstrap", "round2", "round3", "round4")


@dataclass
class ProblemSource:
    """A problem set: the nano world, a benchmark name (``math500``...), a JSON/JSONL file, a
    saved dataset directory or a hub dataset id.

    Attributes:
        source: ``nano`` or anything ``rstar.data.load_problems`` accepts.
        name: label in reports and file names (default: derived from ``source``).
        split: nano split (``train`` / ``seed`` / ``eval``) or the datasets split.
        n: number of problems (nano: required; others: the first ``n``, all when None).
        difficulties: nano only, operation counts to cycle through.
        column_map: for files / hub datasets, ``{"question": "problem", "answer": "answer"}``.
        answer_from_boxed: the answer column holds a worked solution (NuminaMath's
            ``solution``): the gold answer is its last ``\\boxed{}``; rows without one are dropped.
    """

    source: str = "nano"
    name: str = ""
    split: str = "train"
    n: int | None = None
    difficulties: list[int] | None = None
    column_map: dict[str, str] | None = None
    answer_from_boxed: bool = False

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.source == "nano":
            return f"nano-{self.split}"
        return Path(self.source).stem if ("/" in self.source or "." in self.source) else self.source


@dataclass
class NanoSetup:
    """How the nano world's base model and bootstrap (seed) policy are built, when
    ``EvolveConfig.nano`` is set. See docs/nano-world.md.

    Attributes:
        world: ``rstar.evolve.WorldConfig`` fields.
        model: ``rstar.evolve.nano.NanoModelConfig`` fields.
        seed_size / seed_difficulties / seed_split: the solved examples that stand in for
            the paper's bootstrap model (reference solutions of easy problems).
        seed_sft: ``TrainingArguments`` of the seed policy's fine-tune.
        seed_rows_in_rounds: add the seed rows to every round's SFT data (each round restarts
            from the random base, so it would otherwise forget what the seed taught).
        seed_replay_rows: with ``seed_rows_in_rounds``, add at most this many seed rows (a
            fixed random subset per round; None: all). A round that continues from the
            previous policy needs only a replay sample against forgetting, and a small one
            keeps the round's own mined rows from being diluted.
    """

    world: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    seed_size: int = 2048
    seed_difficulties: list[int] = field(default_factory=lambda: [1, 2])
    seed_split: str = "train"
    seed_sft: dict[str, Any] = field(default_factory=dict)
    seed_rows_in_rounds: bool = True
    seed_replay_rows: int | None = None


@dataclass
class RoundSpec:
    """One round of self-evolution.

    Attributes:
        search: search preset (``bootstrap``, ``round2``, ``round3``, ``round4``) or YAML.
        overrides: ``key=value`` overrides of that search config.
        policy: which model searches: ``bootstrap`` (round 1) or ``previous`` (the policy
            trained in the previous round).
        ppm_guided: the previous round's PPM scores new nodes (rounds 3-4).
        sft_from: the starting point of this round's policy fine-tune: ``base`` (the paper) or
            ``previous`` (continue from the previous round's policy; in round 1, the bootstrap
            model, which only makes sense when it shares the base's architecture, as in the
            nano world).
        sft: this round's overrides of ``EvolveConfig.sft`` (e.g. fewer steps when continuing).
    """

    search: str = "round2"
    overrides: list[str] = field(default_factory=list)
    policy: Literal["bootstrap", "previous"] = "previous"
    ppm_guided: bool = False
    sft_from: Literal["base", "previous"] = "base"
    sft: dict[str, Any] = field(default_factory=dict)


def default_rounds() -> list[RoundSpec]:
    """The paper's four rounds."""
    return [
        RoundSpec(search="bootstrap", policy="bootstrap"),
        RoundSpec(search="round2", policy="previous"),
        RoundSpec(search="round3", policy="previous", ppm_guided=True),
        RoundSpec(search="round4", policy="previous", ppm_guided=True),
    ]


@dataclass
class MiningSpec:
    """Tree mining into SFT rows and PPM pairs (``rstar.train.mining``).

    ``accumulate_pairs``: train each round's PPM on the pairs of this and every earlier round
    (the paper trains on the round's own pairs, of which it has millions; a small run has
    tens per round)."""

    top_n: int = 2
    top_k: int = 2
    top_k_single: int = 4
    min_margin: float = 0.5
    min_edit_distance: int = 20
    accumulate_pairs: bool = False


@dataclass
class EvalSpec:
    """Evaluation after each round (and of the bootstrap policy, round 0).

    Every method samples ``n`` solutions per problem, so the comparison is at equal numbers
    of sampled solutions: best-of-N draws ``n`` full solutions (answered by majority vote and
    by the PPM from the same samples), MCTS runs ``n`` rollouts with the PPM (``value=ppm``).

    Attributes:
        sets: evaluation problem sets.
        methods: any of ``greedy``, ``bon`` (majority and PPM vote), ``mcts``.
        n: sampled solutions (best-of-N) / rollouts (MCTS) per problem.
        budgets: numbers of samples / rollouts the accuracy-by-budget plot shows (prefixes of
            the ``n`` samples; see docs/evolve.md).
        greedy / bon / mcts: ``key=value`` overrides of the ``eval_greedy`` / ``eval_bon`` /
            ``eval_mcts`` presets.
        round0: also evaluate the bootstrap policy (greedy only without a PPM).
        every_round: evaluate after every round (else only after the last one).
        interim_methods: the methods run after round 0 and the rounds before the last (None:
            ``methods``); e.g. ``[greedy]`` keeps the per-round greedy curve and runs the
            sampled methods, which cost most of an evaluation, once, on the final policy.
    """

    sets: list[ProblemSource] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["greedy", "bon", "mcts"])
    n: int = 16
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    greedy: list[str] = field(default_factory=list)
    bon: list[str] = field(default_factory=list)
    mcts: list[str] = field(default_factory=list)
    round0: bool = True
    every_round: bool = True
    interim_methods: list[str] | None = None

    def methods_for(self, k: int, last: int) -> list[str]:
        """The methods evaluated after round ``k`` (0: the bootstrap policy, which has no PPM
        for MCTS) of a run with ``last`` rounds."""
        methods = self.methods if k == last or self.interim_methods is None else self.interim_methods
        return [m for m in methods if not (k == 0 and m == "mcts")]


@dataclass
class BackendSpec:
    """Generation and scoring backend (``hf`` or ``vllm``; the PPM scorer falls back to
    transformers when vLLM cannot load it). ``options`` go to ``HFGeneratorConfig`` /
    ``VLLMConfig``; ``scorer_options`` to the PPM scorer."""

    kind: Literal["hf", "vllm"] = "hf"
    options: dict[str, Any] = field(default_factory=dict)
    scorer_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvolveConfig:
    """The whole self-evolution run.

    Attributes:
        output_dir: every round writes under ``output_dir/round{k}``; the run resumes from it.
        base_model: the model every round's policy is fine-tuned from (ignored with ``nano``,
            which builds it).
        bootstrap_model: round 1's search model (a strong coder model in the paper; the
            fine-tuned seed policy in the nano world).
        nano: build the nano world's base model and seed policy (the default main job).
        train: training problems (answers, no solutions).
        train_per_round: search a fresh slice of this many training problems in each round
            (round k: problems (k-1)*m .. k*m-1, so ``train`` must hold rounds x m), as a
            large pool is spread over rounds. None: every round searches all of ``train``.
        rounds: the rounds, in order (``default_rounds()``: the paper's four).
        sft / ppm: ``rstar.train`` script arguments and ``TrainingArguments`` fields, one dict
            each (e.g. ``learning_rate``, ``max_steps``, ``per_device_train_batch_size``).
        threads: torch CPU threads (None: torch's default).
        seed: base seed of every search and training run.
        distributed: ``rstar.distributed`` options of the search stages (``ray_address``,
            ``num_actors``...); empty runs in this process.
        control: also train a control arm in every round: the same fine-tuning schedule on
            the round's extra rows alone (the nano world's replayed seed rows), without the
            rows mined from the search, evaluated greedily. The gap to the policy's greedy
            accuracy is what the search's data added, beyond more fine-tuning.
    """

    output_dir: str = "runs/evolve"
    base_model: str = ""
    bootstrap_model: str = ""
    nano: NanoSetup | None = None
    train: ProblemSource = field(default_factory=ProblemSource)
    train_per_round: int | None = None
    rounds: list[RoundSpec] = field(default_factory=default_rounds)
    backend: BackendSpec = field(default_factory=BackendSpec)
    mining: MiningSpec = field(default_factory=MiningSpec)
    sft: dict[str, Any] = field(default_factory=dict)
    ppm: dict[str, Any] = field(default_factory=dict)
    eval: EvalSpec = field(default_factory=EvalSpec)
    threads: int | None = None
    seed: int = 0
    distributed: dict[str, Any] = field(default_factory=dict)
    control: bool = False

    def __post_init__(self) -> None:
        if not self.rounds:
            raise ConfigError("rounds: at least one round is needed")
        if self.rounds[0].policy != "bootstrap":
            raise ConfigError("rounds.0.policy must be 'bootstrap' (there is no previous policy)")
        for i, r in enumerate(self.rounds):
            if r.ppm_guided and i == 0:
                raise ConfigError("rounds.0.ppm_guided: round 1 has no PPM to guide it")
        if self.nano is None and not self.base_model:
            raise ConfigError("base_model is required (or a nano: section)")
        if self.nano is None and not self.bootstrap_model:
            raise ConfigError("bootstrap_model is required (or a nano: section)")
        if self.control and (self.nano is None or not self.nano.seed_rows_in_rounds):
            raise ConfigError("control: the control arm trains on the replayed seed rows alone "
                              "(nano.seed_rows_in_rounds=true)")
        if self.control and not self.eval.sets:
            raise ConfigError("control: the control arm is evaluated on eval.sets, which is empty")
        if self.train_per_round is not None:
            if self.train_per_round < 1:
                raise ConfigError("train_per_round must be >= 1 (or null: every round searches all problems)")
            if self.train.n is not None and self.train.n < self.train_per_round * len(self.rounds):
                raise ConfigError(f"train_per_round={self.train_per_round} x {len(self.rounds)} rounds needs "
                                  f"train.n >= {self.train_per_round * len(self.rounds)}, got {self.train.n}")
        if self.train.source == "nano" and self.nano is None:
            raise ConfigError("train.source=nano needs a nano: section")
        bad = sorted((set(self.eval.methods) | set(self.eval.interim_methods or ())) - {"greedy", "bon", "mcts"})
        if bad:
            raise ConfigError(f"eval.methods: unknown {bad} (greedy, bon, mcts)")
        if self.eval.n < 1:
            raise ConfigError("eval.n must be >= 1")
        self.eval.budgets = sorted({b for b in self.eval.budgets if 1 <= b <= self.eval.n} | {self.eval.n})


PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "evolve"


def load_evolve_config(config: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> EvolveConfig:
    """A YAML file, or the name of a file in ``configs/evolve/`` (``nano``, ``nano-ci``,
    ``qwen-math-7b``), then the ``key=value`` overrides."""
    path = Path(str(config)) if config is not None else PRESET_DIR / "nano.yaml"
    if not path.is_file() and config is not None and (PRESET_DIR / f"{config}.yaml").is_file():
        path = PRESET_DIR / f"{config}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml")) if PRESET_DIR.is_dir() else []
        raise ConfigError(f"{config!r} is neither a file nor a shipped config ({names})")
    return load_config(EvolveConfig, path, list(overrides))


def search_overrides(spec: RoundSpec) -> list[str]:
    return copy.deepcopy(spec.overrides)
