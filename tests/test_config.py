"""The shared config machinery: dataclasses <- YAML <- `key=value` overrides, strictly checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from rstar.config import ConfigError, dump_yaml, from_dict, load_config, merge_overrides, to_dict


@dataclass
class Inner:
    rollouts: int = 8
    c: float = 2.0
    rule: Literal["rstar", "puct"] = "rstar"


@dataclass
class Outer:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    stops: tuple[str, ...] = ("<end_of_step>",)
    seed: int | None = None
    verbose: bool = False


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: boot\ninner:\n  rollouts: 16\n")
    cfg = load_config(Outer, p, ["inner.c=1.5", "verbose=true", "seed=7", "stops=a,b"])
    assert cfg.name == "boot"
    assert cfg.inner.rollouts == 16 and cfg.inner.c == 1.5 and cfg.inner.rule == "rstar"
    assert cfg.verbose is True and cfg.seed == 7 and cfg.stops == ("a", "b")


def test_round_trip_through_yaml(tmp_path):
    cfg = Outer(name="x", inner=Inner(rollouts=3, rule="puct"), seed=None)
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    assert load_config(Outer, p) == cfg
    assert to_dict(cfg)["inner"]["rule"] == "puct"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"nmae": "typo"}, "unknown key"),
        ({"inner": {"rollouts": "many"}}, "inner.rollouts"),
        ({"inner": {"rule": "ucb"}}, "not one of"),
        ({"verbose": "perhaps"}, "boolean"),
        ({"inner": 3}, "mapping"),
    ],
)
def test_bad_configs_raise_clear_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key=value"):
        merge_overrides({}, ["rollouts"])
    with pytest.raises(ConfigError, match="not a section"):
        merge_overrides({"name": "x"}, ["name.sub=1"])


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Outer, tmp_path / "nope.yaml")
