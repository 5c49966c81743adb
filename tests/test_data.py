"""Problem loaders, benchmark names and validation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rstar.data import (
    BENCHMARKS,
    DataError,
    Problem,
    load_problems,
    load_with_report,
    resolve_benchmark,
)

EXPECTED_ROWS = {
    "math500": 500, "gsm8k": 1319, "aime2024": 30, "amc23": 40, "olympiadbench": 675,
    "collegemath": 2818, "gaokao2023en": 385, "omni-math": 4428, "math": 5000,
}


def _write_json(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_benchmark_names_resolve_and_load(data_dir, name):
    path = resolve_benchmark(name, data_dir)
    assert path.parent == data_dir and path.is_file()
    ps = load_problems(name, data_dir=data_dir)
    assert len(ps) == EXPECTED_ROWS[name]
    assert len({p.id for p in ps}) == len(ps)
    assert all(isinstance(p.answer, str) and p.question.strip() for p in ps)
    assert ps[0].source == name


def test_resolution_order_env_and_errors(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RSTAR_DATA_DIR", str(data_dir))
    assert resolve_benchmark("MATH500") == data_dir / "math500_test.json"
    assert resolve_benchmark("omni") == data_dir / "omni_test.json"  # alias
    with pytest.raises(KeyError, match="unknown benchmark"):
        resolve_benchmark("nope")
    with pytest.raises(FileNotFoundError, match="RSTAR_DATA_DIR"):
        resolve_benchmark("math500", tmp_path)
    (tmp_path / "aime2024_test.json").write_text(json.dumps([{"question": "q?", "answer": "1"}]))
    assert load_problems("aime2024", data_dir=tmp_path)[0].answer == "1"  # a user-given folder wins


def test_math_list_answers_are_alternatives(data_dir):
    ps = {p.id: p for p in load_problems("math", data_dir=data_dir)}
    assert ps["334"].answers == ["3", "-3"]
    assert ps["2717"].answers == ["(10,0)", "(0,0)"]
    assert ps["2913"].answers[0] == "\\left(\\tfrac32, -\\tfrac52\\right)"  # TAB damage repaired
    assert ps["2937"].meta["answer_alternatives"] == ["(3, -5)", "(0, 0)"]


def test_conflicting_duplicates_reported_not_merged(data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="rstar.data.problem"):
        ps, report = load_with_report("collegemath", data_dir=data_dir)
    assert len(ps) == 2818  # nothing merged
    assert len(report.conflicting) == 24
    d = report.conflicting[0]
    assert len(d.ids) >= 2 and len(set(d.answers)) >= 2
    assert "different answers" in caplog.text
    assert "24 with different answers" in report.summary()


def test_empty_answers_policy(data_dir):
    ps, rep = load_with_report("gaokao2023en", data_dir=data_dir)
    assert len(ps) == 385 and rep.empty_answers == ["167", "192"]
    ps = load_problems("gaokao2023en", data_dir=data_dir, empty_answers="drop")
    assert len(ps) == 383
    with pytest.raises(DataError, match="empty answer"):
        load_problems("gaokao2023en", data_dir=data_dir, empty_answers="error")


def test_escape_damage_repaired_in_omni(data_dir):
    ps, rep = load_with_report("omni-math", data_dir=data_dir)
    assert rep.repaired
    assert not any("\x0c" in p.question or "\x0c" in p.answer for p in ps)


def test_json_jsonl_limit_and_column_map(tmp_path):
    rows = [{"uid": f"p{i}", "problem": f"What is {i}+1?", "sol": i + 1, "level": 3} for i in range(5)]
    j = _write_json(tmp_path / "x.json", rows)
    jl = tmp_path / "x.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cmap = {"id": "uid", "question": "problem", "answer": "sol"}
    for src in (j, jl, str(jl)):
        ps = load_problems(src, column_map=cmap, limit=3)
        assert [p.id for p in ps] == ["p0", "p1", "p2"]
        assert ps[1] == Problem("p1", "What is 1+1?", "2", "x", {"level": 3})


def test_ids_default_to_index_then_position(tmp_path):
    ps = load_problems(_write_json(tmp_path / "a.json", [{"index": 7, "question": "q", "answer": "1"}]))
    assert ps[0].id == "7"
    ps = load_problems(_write_json(tmp_path / "b.json", [{"question": "q", "answer": "1"}] * 2))
    assert [p.id for p in ps] == ["0", "1"]  # same question twice: kept as two problems


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"question": "q"}], r"missing field\(s\) \['answer'\]"),
        ([{"answer": "1"}], r"missing field\(s\) \['question'\]"),
        ([{"question": "  ", "answer": "1"}], "empty question"),
        ([{"question": 3, "answer": "1"}], "question has type int"),
        ([{"question": "q", "answer": {"a": 1}}], "answer has type dict"),
        ([{"question": "q", "answer": None}], "missing answer"),
        ([{"question": "q", "answer": True}], "boolean"),
        ([{"index": 1, "question": "a", "answer": "1"}, {"index": 1, "question": "b", "answer": "2"}],
         "duplicated id"),
        ([], "no problems"),
        (["just a string"], "expected an object"),
    ],
)
def test_validation_errors_are_clear(tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        load_problems(_write_json(tmp_path / "bad.json", rows))


def test_non_string_answers_are_normalised(tmp_path):
    ps, rep = load_with_report(_write_json(tmp_path / "n.json", [
        {"question": "a", "answer": 3}, {"question": "b", "answer": 2.5}, {"question": "c", "answer": 4.0},
        {"question": "d", "answer": ["1", 2]},
    ]))
    assert [p.answer for p in ps] == ["3", "2.5", "4", "['1', '2']"]
    assert rep.coerced_answers == ["0", "1", "2"] and rep.list_answers == ["3"]
    assert ps[3].answers == ["1", "2"]


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_problems(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_problems(tmp_path / "x.json")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type"):
        load_problems(tmp_path / "x.txt")
    with pytest.raises(DataError, match="column_map keys"):
        load_problems(_write_json(tmp_path / "y.json", [{"question": "q", "answer": "1"}]), column_map={"q": "x"})


def test_hf_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"problem": ["1+1?", "2+2?", "3+3?"], "solution": ["2", "4", "6"], "id": ["a", "b", "c"]}
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                               "test": datasets.Dataset.from_dict(rows).select([0, 2])})
    dd.save_to_disk(str(tmp_path / "dd"))
    cmap = {"question": "problem", "answer": "solution"}
    ps = load_problems(tmp_path / "dd", column_map=cmap)  # several splits: "test" by default
    assert [(p.id, p.answer) for p in ps] == [("a", "2"), ("c", "6")]
    ps = load_problems(tmp_path / "dd", column_map=cmap, split="train", limit=2)
    assert [p.question for p in ps] == ["1+1?", "2+2?"]
    with pytest.raises(DataError, match="no split"):
        load_problems(tmp_path / "dd", column_map=cmap, split="validation")
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    assert len(load_problems(tmp_path / "single", column_map=cmap)) == 3


def test_hf_datasets_file_builder(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "p.csv").write_text("question,answer\nWhat is 2?,2\nWhat is 3?,3\n")
    ps = load_problems(tmp_path / "p.csv")
    assert [p.answer for p in ps] == ["2", "3"]
