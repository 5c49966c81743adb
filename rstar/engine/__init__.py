"""The forest engine: ``Forest`` (C++, ``rstar._core``) and its configuration.

``rstar.engine.Forest`` *is* ``rstar._core.Forest``; the contract is ``rstar/_core.pyi``.
The names below that come from the extension (``Forest``, ``Selection``, the state
constants and the exception classes) are loaded lazily, on first use, so that
``rstar.engine.reference`` (the pure-Python implementation of the same contract) and
``rstar.engine.errors`` import on a machine where the extension is not built.

``EngineConfig`` is the one place the search drivers read engine options from (YAML / CLI
through ``rstar.config``); ``make_forest`` turns it into a C++ forest or, for tests and
debugging, the reference."""

from __future__ import annotations

import importlib
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # pragma: no cover
    from rstar._core import Forest
    from rstar.engine.reference import ReferenceForest

__all__ = [
    "Forest",
    "Selection",
    "ForestError",
    "ForestStateError",
    "CapacityError",
    "UnknownIdError",
    "NONE",
    "UNEXPANDED",
    "EXPANDING",
    "EXPANDED",
    "TERMINAL",
    "INVALID",
    "VALUE_SCALE",
    "STATE_NAMES",
    "EngineConfig",
    "make_forest",
    "core_available",
]

logger = logging.getLogger(__name__)

_FROM_CORE = set(__all__) - {"STATE_NAMES", "EngineConfig", "make_forest", "core_available"}

STATE_NAMES: dict[int, str] = {
    0: "UNEXPANDED",
    1: "EXPANDING",
    2: "EXPANDED",
    3: "TERMINAL",
    4: "INVALID",
}


def core_available() -> bool:
    """Whether the C++ extension ``rstar._core`` is built and importable."""
    try:
        importlib.import_module("rstar._core")
    except ImportError:
        return False
    return True


def __getattr__(name: str) -> Any:
    if name in _FROM_CORE:
        try:
            core = importlib.import_module("rstar._core")
        except ImportError as exc:
            raise ImportError(
                f"rstar.engine.{name} needs the C++ extension rstar._core, which is not built "
                "(run `pip install -e .`); rstar.engine.reference.ReferenceForest works without it"
            ) from exc
        value = getattr(core, name)
        globals()[name] = value  # cache: later lookups skip __getattr__
        return value
    raise AttributeError(f"module 'rstar.engine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _FROM_CORE)


@dataclass
class EngineConfig:
    """Options of a forest (see ``rstar._core.Forest``).

    Attributes:
        rule: ``"rstar"`` (the official rStar-Math UCT, no prior) or ``"puct"``.
        c: exploration constant (2.0 in every official rStar-Math config).
        fpu_mode: ``"value"`` (unvisited children score ``fpu_value``) or ``"parent"``
            (parent Q minus ``fpu_value``); PUCT only.
        fpu_value: first-play-urgency value or reduction.
        virtual_loss: value penalty per pending visit; 0 (off) keeps Q unbiased, which is
            what the pending-visit scheme is for. Ablations only.
        max_nodes: node arena capacity; ids are 32-bit.
        max_children: the most children one expansion may create.
        num_threads: internal pool size for calls over many trees; 0 = all cores,
            1 = the calling thread only (deterministic).
        seed: seed of the engine's random choices (results are deterministic with
            ``num_threads=1``).
    """

    rule: Literal["rstar", "puct"] = "rstar"
    c: float = 2.0
    fpu_mode: Literal["value", "parent"] = "value"
    fpu_value: float = 0.0
    virtual_loss: float = 0.0
    max_nodes: int = 1 << 26
    max_children: int = 1024
    num_threads: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        # Fail at config time with a clear message rather than deep inside a run.
        if self.rule not in ("rstar", "puct"):
            raise ValueError(f"rule must be 'rstar' or 'puct', got {self.rule!r}")
        if self.fpu_mode not in ("value", "parent"):
            raise ValueError(f"fpu_mode must be 'value' or 'parent', got {self.fpu_mode!r}")
        if not self.c >= 0.0:
            raise ValueError(f"c must be >= 0, got {self.c}")
        if not self.virtual_loss >= 0.0:
            raise ValueError(f"virtual_loss must be >= 0, got {self.virtual_loss}")
        if not 1 <= self.max_nodes < 2**32:
            raise ValueError(f"max_nodes must be in [1, 2**32 - 1], got {self.max_nodes}")
        if not 1 <= self.max_children <= 65535:
            raise ValueError(f"max_children must be in [1, 65535], got {self.max_children}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0, got {self.num_threads}")


def make_forest(cfg: EngineConfig | None = None, *, reference: bool = False) -> Forest | ReferenceForest:
    """A new forest configured by ``cfg``: the C++ engine, or the pure-Python reference when
    ``reference`` is true (same contract, same decisions; slow)."""
    cfg = cfg or EngineConfig()
    kwargs = asdict(cfg)
    max_nodes = kwargs.pop("max_nodes")
    if reference:
        from rstar.engine.reference import ReferenceForest

        return ReferenceForest(max_nodes, **kwargs)
    core = importlib.import_module("rstar._core")
    logger.debug("creating rstar._core.Forest(max_nodes=%d, %s)", max_nodes, kwargs)
    return core.Forest(max_nodes, **kwargs)
