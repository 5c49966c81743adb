"""SFT-row and PPM-pair mining on hand-built trees with known answers (pure Python)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from rstar.search.prompts import PromptConfig, build_prompt
from rstar.train.mining import (
    PairMiningConfig,
    PairStats,
    SFTMiningConfig,
    edit_distance,
    is_tree_file,
    load_rows_dataset,
    mine_files,
    mine_pairs,
    mine_sft,
    pair_weight,
    read_jsonl,
)

Q = "What is 6 times 7?"


def step(tag: str) -> str:
    """A distinct step text (pairwise edit distances well above 20)."""
    rng = random.Random(tag)
    words = " ".join("".join(rng.choice("abcdefghij") for _ in range(5)) for _ in range(6))
    return f"\n# {tag}: {words}\nv_{tag} = compute('{tag}')\n<end_of_step>"


def make_tree(spec: list[tuple], tree_id: str = "p0", question: str = Q) -> dict:
    """spec rows: (id, parent, q, kind) with kind 'inner', 'ok' (correct terminal), 'bad' (wrong
    valid terminal), 'invalid' (invalid terminal), 'ungraded' (terminal, correct None)."""
    nodes = [{"id": 0, "parent": -1, "depth": 0, "text": "", "visits": 10, "q": 0.0, "value": None,
              "terminal": False, "valid": True, "answer": None, "correct": None, "exec_ok": None}]
    depth = {0: 0}
    for nid, parent, q, kind in spec:
        depth[nid] = depth[parent] + 1
        term = kind != "inner"
        nodes.append({
            "id": nid, "parent": parent, "depth": depth[nid], "text": step(f"s{nid}"), "visits": 1, "q": q,
            "value": None, "terminal": term, "valid": kind != "invalid",
            "answer": "42" if kind == "ok" else ("41" if kind == "bad" else None),
            "correct": True if kind == "ok" else (False if kind == "bad" else None), "exec_ok": True,
        })
    return {"id": tree_id, "question": question, "answer": "42", "mode": "mcts", "nodes": nodes}


def pairs_of(rows: list[dict]) -> list[tuple[int, int]]:
    return [(r["chosen_node"], r["rejected_node"]) for r in rows]


# --------------------------------------------------------------------------- pairs


def test_top_two_each_side_ranked_by_q() -> None:
    # root children: 1,2,3 lead to correct answers, 4,5,6 to wrong ones (terminal below each)
    t = make_tree([
        (1, 0, 0.8, "inner"), (2, 0, 0.6, "inner"), (3, 0, 0.9, "inner"),
        (4, 0, -0.5, "inner"), (5, 0, -0.9, "inner"), (6, 0, -0.2, "inner"),
        (7, 1, 1.0, "ok"), (8, 2, 1.0, "ok"), (9, 3, 1.0, "ok"),
        (10, 4, -1.0, "bad"), (11, 5, -1.0, "bad"), (12, 6, -1.0, "bad"),
    ])
    rows = mine_pairs([t])
    # chosen: Q descending -> 3 (0.9), 1 (0.8); rejected: Q ascending -> 5 (-0.9), 4 (-0.5)
    assert pairs_of(rows) == [(3, 5), (3, 4), (1, 5), (1, 4)]
    for r in rows:
        assert (r["pos_count"], r["neg_count"]) == (2, 2)
        assert r["margin"] == pytest.approx(r["q_chosen"] - r["q_rejected"])
        assert r["prompt"] == build_prompt(Q) and r["prefix"] == []
        assert r["chosen"] == t["nodes"][r["chosen_node"]]["text"]
        assert r["rejected"] == t["nodes"][r["rejected_node"]]["text"]
    assert pair_weight(2, 2) == 0.25


def test_one_chosen_only_takes_four_rejected() -> None:
    t = make_tree([(1, 0, 0.7, "ok")] + [(i, 0, -1.0 + 0.1 * i, "bad") for i in range(2, 8)])
    rows = mine_pairs([t])
    assert pairs_of(rows) == [(1, 2), (1, 3), (1, 4), (1, 5)]  # lowest four Q among 2..7
    assert all((r["pos_count"], r["neg_count"]) == (1, 4) for r in rows)
    assert pair_weight(1, 4) == 0.25


def test_one_rejected_only_takes_four_chosen() -> None:
    t = make_tree([(1, 0, -0.7, "bad")] + [(i, 0, 1.0 - 0.1 * i, "ok") for i in range(2, 8)])
    rows = mine_pairs([t])
    assert pairs_of(rows) == [(2, 1), (3, 1), (4, 1), (5, 1)]
    assert all((r["pos_count"], r["neg_count"]) == (4, 1) for r in rows)


def test_no_pairs_without_both_outcomes() -> None:
    only_good = make_tree([(1, 0, 0.9, "ok"), (2, 0, 0.1, "ok")])
    st = PairStats()
    assert mine_pairs([only_good], stats=st) == []
    assert st.trees == 1 and st.trees_covered == 0 and st.nodes_with_both == 0


def test_ties_go_to_the_earlier_node() -> None:
    t = make_tree([(1, 0, 0.5, "ok"), (2, 0, 0.5, "ok"), (3, 0, 0.5, "ok"),
                   (4, 0, -0.5, "bad"), (5, 0, -0.5, "bad"), (6, 0, -0.5, "bad")])
    assert pairs_of(mine_pairs([t])) == [(1, 4), (1, 5), (2, 4), (2, 5)]


def test_margin_threshold_is_configurable() -> None:
    t = make_tree([(1, 0, 0.3, "ok"), (2, 0, -0.1, "bad")])  # margin 0.4
    st = PairStats()
    assert mine_pairs([t], stats=st) == []
    assert st.candidate_pairs == 1 and st.dropped_margin == 1
    rows = mine_pairs([t], PairMiningConfig(min_margin=0.4))
    assert len(rows) == 1 and rows[0]["margin"] == pytest.approx(0.4)
    # a negative margin never makes a pair, whatever the threshold
    t2 = make_tree([(1, 0, -0.3, "ok"), (2, 0, 0.2, "bad")])
    assert mine_pairs([t2], PairMiningConfig(min_margin=-5.0)) == []


def test_edit_distance_threshold() -> None:
    t = make_tree([(1, 0, 0.9, "ok"), (2, 0, -0.9, "bad")])
    t["nodes"][1]["text"] = "\nx = compute_total(3)\n<end_of_step>"
    t["nodes"][2]["text"] = "\nx = compute_total(4)\n<end_of_step>"  # distance 1
    st = PairStats()
    assert mine_pairs([t], stats=st) == []
    assert st.dropped_edit_distance == 1
    rows = mine_pairs([t], PairMiningConfig(min_edit_distance=1))
    assert len(rows) == 1
    # identical texts are never a pair, even with the threshold off
    t["nodes"][2]["text"] = t["nodes"][1]["text"]
    assert mine_pairs([t], PairMiningConfig(min_edit_distance=0)) == []


def test_terminal_answer_steps_are_paired_and_prefix_is_the_path() -> None:
    # root -> 1 -> 2 -> {3 correct answer, 4 wrong answer, 5 invalid, 6 ungraded}
    t = make_tree([(1, 0, 0.2, "inner"), (2, 1, 0.1, "inner"), (3, 2, 1.0, "ok"), (4, 2, -1.0, "bad"),
                   (5, 2, -1.0, "invalid"), (6, 2, -1.0, "ungraded")])
    rows = mine_pairs([t])
    # nodes 0 and 1 have a single child (which is on both sides): no pair there
    assert pairs_of(rows) == [(3, 4)]
    r = rows[0]
    assert r["chosen_terminal"] and r["rejected_terminal"]
    assert r["node"] == 2 and r["depth"] == 2
    assert r["prefix"] == [t["nodes"][1]["text"], t["nodes"][2]["text"]]
    assert r["prompt"] == build_prompt(Q, r["prefix"]) == r["prompt_head"] + "".join(r["prefix"])
    assert (r["pos_count"], r["neg_count"]) == (1, 1)


def test_invalid_and_ungraded_terminals_are_not_wrong_answers() -> None:
    t = make_tree([(1, 0, 0.9, "ok"), (2, 0, -0.9, "invalid"), (3, 0, -0.8, "ungraded")])
    assert mine_pairs([t]) == []


def test_child_with_both_outcomes_is_not_paired_with_itself() -> None:
    # 1 leads to both outcomes (Q 0.5); 2 correct (0.9); 3 wrong (-0.8)
    t = make_tree([(1, 0, 0.5, "inner"), (2, 0, 0.9, "ok"), (3, 0, -0.8, "bad"),
                   (4, 1, 1.0, "ok"), (5, 1, -1.0, "bad")])
    rows = mine_pairs([t], PairMiningConfig(min_margin=0.0, min_edit_distance=0))
    assert (1, 1) not in pairs_of(rows)
    assert set(pairs_of(rows)) == {(2, 3), (2, 1), (1, 3), (4, 5)}


def test_prompt_format_follows_config() -> None:
    t = make_tree([(1, 0, 0.9, "ok"), (2, 0, -0.9, "bad")])
    cfg = PairMiningConfig(prompt=PromptConfig(format="bootstrap"))
    rows = mine_pairs([t], cfg)
    assert rows[0]["prompt"] == build_prompt(Q, "", PromptConfig(format="bootstrap"))


def test_stats_and_histogram() -> None:
    trees = [
        make_tree([(1, 0, 0.9, "ok"), (2, 0, -0.9, "bad")], "a"),  # margin 1.8
        make_tree([(1, 0, 0.4, "ok"), (2, 0, -0.3, "bad")], "b"),  # margin 0.7
        make_tree([(1, 0, 0.9, "ok"), (2, 0, 0.8, "ok")], "c"),  # nothing
    ]
    st = PairStats()
    rows = mine_pairs(trees, stats=st)
    assert len(rows) == 2 and st.pairs == 2 and st.trees == 3 and st.trees_covered == 2
    hist = dict(st.margin_histogram())
    assert hist["[0.50,0.75)"] == 1 and hist["[1.75,2.00]"] == 1 and sum(hist.values()) == 2
    d = st.to_dict()
    assert d["pairs_per_covered_tree"]["mean"] == 1.0
    assert "margin histogram" in st.to_text()


def test_node_before_parent_is_rejected() -> None:
    t = make_tree([(1, 0, 0.9, "ok")])
    t["nodes"][1]["parent"] = 5
    with pytest.raises(ValueError, match="before its parent"):
        mine_pairs([t])


# --------------------------------------------------------------------------- edit distance


def _lev(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def test_edit_distance_matches_reference_and_band() -> None:
    rng = random.Random(0)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        d = _lev(a, b)
        assert edit_distance(a, b) == d
        for limit in (1, 3, 8, 20):
            assert edit_distance(a, b, limit) == min(d, limit)


# --------------------------------------------------------------------------- SFT


def test_sft_ranking_mean_then_min_q() -> None:
    # four correct trajectories, two steps each, and a wrong one with the highest Q
    t = make_tree([
        (1, 0, 0.6, "inner"), (2, 1, 0.6, "ok"),      # mean .6  min .6
        (3, 0, 0.9, "inner"), (4, 3, 0.3, "ok"),      # mean .6  min .3 (tie on mean, lower min)
        (5, 0, 0.8, "inner"), (6, 5, 0.8, "ok"),      # mean .8  -> first
        (7, 0, 0.1, "inner"), (8, 7, 0.1, "ok"),      # mean .1  -> not kept
        (9, 0, 1.0, "inner"), (10, 9, 1.0, "bad"),    # wrong answer: never a row
        (11, 0, 1.0, "invalid"),
    ])
    rows = mine_sft([t])
    assert [r["node"] for r in rows] == [6, 2]
    assert rows[0]["mean_q"] == pytest.approx(0.8) and rows[1]["min_q"] == pytest.approx(0.6)
    assert rows[0]["prompt"] == build_prompt(Q)
    assert rows[0]["steps"] == [t["nodes"][5]["text"], t["nodes"][6]["text"]]
    assert rows[0]["prompt"] + rows[0]["response"] == build_prompt(Q, rows[0]["steps"])
    rows3 = mine_sft([t], SFTMiningConfig(top_n=3))
    assert [r["node"] for r in rows3] == [6, 2, 4]


def test_sft_dedupes_identical_responses() -> None:
    t = make_tree([(1, 0, 0.9, "ok"), (2, 0, 0.5, "ok"), (3, 0, 0.2, "ok")])
    t["nodes"][2]["text"] = t["nodes"][1]["text"]
    assert [r["node"] for r in mine_sft([t])] == [1, 3]


def test_sft_no_correct_trajectory() -> None:
    assert mine_sft([make_tree([(1, 0, 0.9, "bad")])]) == []


# --------------------------------------------------------------------------- files


def test_files_roundtrip_and_datasets(tmp_path: Path) -> None:
    trees = [
        make_tree([(1, 0, 0.9, "ok"), (2, 0, -0.9, "bad"), (3, 0, 0.5, "ok")], "a"),
        make_tree([(1, 0, 0.4, "ok"), (2, 0, -0.3, "bad")], "b"),
    ]
    tf = tmp_path / "trees.jsonl"
    tf.write_text("".join(json.dumps(t) + "\n" for t in trees) + '{"torn": ')  # torn last line
    assert is_tree_file(tf)
    stats = mine_files(tf, sft_out=tmp_path / "sft.jsonl", pairs_out=tmp_path / "pairs.jsonl")
    assert stats["sft_rows"] == 3 and stats["sft_problems"] == 2 and stats["pairs"]["pairs"] == 3
    assert not is_tree_file(tmp_path / "pairs.jsonl")
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    ds = load_rows_dataset(tmp_path / "pairs.jsonl")
    assert len(ds) == len(pairs) == 3
    assert {"prompt", "chosen", "rejected", "pos_count", "neg_count"} <= set(ds.column_names)
    assert ds[0]["chosen"] == pairs[0]["chosen"]
    sft = load_rows_dataset(tmp_path / "sft.jsonl")
    assert {"prompt", "response"} <= set(sft.column_names)
    assert json.loads((tmp_path / "pairs.jsonl.stats.json").read_text())["pairs"] == 3
