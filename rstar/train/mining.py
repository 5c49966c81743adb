"""Training data from search trees: SFT rows for the policy and preference pairs for the PPM.

Reads the search output (one JSON tree per line, docs/design.md "Search output"). Both miners
build text only through ``rstar.search.prompts.build_prompt`` so training sees exactly the
text the search generated after (the official code used ``\\n`` in training and ``\\n\\n`` at
inference, rstar-math.md §9.2 item 8).

SFT (rstar-math.md §6.4): per problem, the root-to-terminal paths whose answer is verified
correct, ranked by (mean step Q, min step Q), top ``n``. Unlike the official code we do not
drop trajectories that contain the word "error" (validity comes from the sandbox).

PPM pairs (§6.3, paper §3.3): at every node with both correct and wrong terminals below it,
the children that lead to a correct answer sorted by Q descending are the chosen candidates,
the children that lead to a wrong (valid, graded) answer sorted by Q ascending the rejected
ones; top 2 of each, or up to 4 of one side when the other has exactly one. A pair is kept
when ``Q_c - Q_r >= min_margin`` (and > 0) and the step texts differ by at least
``min_edit_distance`` characters (Levenshtein). Final-answer steps are children like any
other, so they are paired by the same rule. Ties in Q go to the earlier node (lower id).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rstar.search.prompts import PromptConfig, build_prompt

logger = logging.getLogger(__name__)

Tree = dict[str, Any]


# --------------------------------------------------------------------------- configs


@dataclass
class SFTMiningConfig:
    """How SFT rows are chosen.

    Attributes:
        top_n: correct trajectories kept per problem (paper/official: 2).
        prompt: prompt format of the rows (the fine-tuned policy's ``sft`` format by default,
            whatever prompt generated the trees).
        dedupe: drop trajectories whose response text equals a higher-ranked one.
    """

    top_n: int = 2
    prompt: PromptConfig = field(default_factory=PromptConfig)
    dedupe: bool = True

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {self.top_n}")


@dataclass
class PairMiningConfig:
    """How PPM preference pairs are chosen.

    Attributes:
        top_k: chosen (highest Q) and rejected (lowest Q) candidates per node (paper: 2).
        top_k_single: candidates taken from one side when the other side has exactly one
            (official code: 4).
        min_margin: minimum ``Q_chosen - Q_rejected`` (paper: 0.5); pairs also need a margin > 0.
        min_edit_distance: minimum Levenshtein distance between the two step texts (official: 20).
        prompt: prompt format of the rows.
    """

    top_k: int = 2
    top_k_single: int = 4
    min_margin: float = 0.5
    min_edit_distance: int = 20
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.top_k_single < 1:
            raise ValueError("top_k and top_k_single must be >= 1")
        if self.min_edit_distance < 0:
            raise ValueError("min_edit_distance must be >= 0")


# --------------------------------------------------------------------------- tree helpers


def read_trees(path: str | os.PathLike[str]) -> Iterator[Tree]:
    """Stream trees from a search-output JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                tree = json.loads(line)
            except json.JSONDecodeError as exc:
                # A run killed mid-append leaves a torn last line; everything before it is good.
                logger.warning("%s:%d: skipping a line that is not JSON (%s)", path, lineno, exc)
                continue
            yield tree


def is_tree_file(path: str | os.PathLike[str]) -> bool:
    """True when the first record of a JSONL file is a search tree (has ``nodes``)."""
    for tree in read_trees(path):
        return isinstance(tree, dict) and "nodes" in tree
    return False


class _Tree:
    """Index over one tree record: children lists, paths, and outcome counts per subtree."""

    def __init__(self, record: Tree) -> None:
        self.record = record
        nodes = record.get("nodes") or []
        self.nodes: dict[int, dict[str, Any]] = {}
        self.order: list[int] = []
        self.children: dict[int, list[int]] = {}
        for n in nodes:
            nid = int(n["id"])
            self.nodes[nid] = n
            self.order.append(nid)
            self.children.setdefault(nid, [])
            parent = int(n.get("parent", -1))
            if parent >= 0:
                if parent not in self.nodes:
                    raise ValueError(
                        f"tree {record.get('id')!r}: node {nid} appears before its parent {parent}"
                    )
                self.children[parent].append(nid)
        # Outcome counts per subtree, children before parents (parents precede children).
        self.n_correct: dict[int, int] = {}
        self.n_wrong: dict[int, int] = {}
        for nid in reversed(self.order):
            outcome = self.outcome(nid)
            c = 1 if outcome is True else 0
            w = 1 if outcome is False else 0
            for ch in self.children[nid]:
                c += self.n_correct[ch]
                w += self.n_wrong[ch]
            self.n_correct[nid] = c
            self.n_wrong[nid] = w

    def outcome(self, nid: int) -> bool | None:
        """True/False for a valid, graded terminal; None otherwise (inner nodes, invalid
        terminals such as code errors or depth overruns, ungraded answers)."""
        n = self.nodes[nid]
        if not n.get("terminal") or not n.get("valid", True):
            return None
        c = n.get("correct")
        return c if isinstance(c, bool) else None

    def path(self, nid: int) -> list[int]:
        """Node ids from the first step below the root down to ``nid`` (root excluded)."""
        out: list[int] = []
        cur = nid
        while cur >= 0:
            n = self.nodes[cur]
            parent = int(n.get("parent", -1))
            if parent < 0:
                break  # the root holds the question, not a step
            out.append(cur)
            cur = parent
        out.reverse()
        return out

    def q(self, nid: int) -> float:
        v = self.nodes[nid].get("q")
        return float(v) if v is not None else 0.0

    def text(self, nid: int) -> str:
        return str(self.nodes[nid].get("text") or "")


# --------------------------------------------------------------------------- SFT rows


def _sft_rows_for_tree(tree: _Tree, cfg: SFTMiningConfig, tokenizer: Any) -> list[dict[str, Any]]:
    record = tree.record
    candidates = []
    for nid in tree.order:
        if tree.outcome(nid) is not True:
            continue
        path = tree.path(nid)
        if not path:
            continue
        qs = [tree.q(p) for p in path]
        candidates.append((statistics.fmean(qs), min(qs), nid, path))
    # Highest mean Q, then highest min Q; ties go to the earlier terminal (lower id).
    candidates.sort(key=lambda c: (-c[0], -c[1], c[2]))
    head = build_prompt(record["question"], "", cfg.prompt, tokenizer=tokenizer)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for mean_q, min_q, nid, path in candidates:
        steps = [tree.text(p) for p in path]
        response = "".join(steps)
        if cfg.dedupe and response in seen:
            continue
        seen.add(response)
        rows.append(
            {
                "id": str(record.get("id", "")),
                "question": record["question"],
                "answer": record.get("answer"),
                "prompt": head,
                "response": response,
                "steps": steps,
                "node": nid,
                "mean_q": mean_q,
                "min_q": min_q,
                "rank": len(rows),
            }
        )
        if len(rows) >= cfg.top_n:
            break
    return rows


def mine_sft(
    trees: Iterable[Tree], config: SFTMiningConfig | None = None, *, tokenizer: Any = None
) -> list[dict[str, Any]]:
    """SFT rows ``{prompt, response, steps, ...}`` from search trees (see module docstring).

    ``prompt + response`` is the exact inference text; ``steps`` lets the tokenizer encode the
    response step by step, as the search does."""
    cfg = config or SFTMiningConfig()
    rows: list[dict[str, Any]] = []
    n_trees = n_covered = 0
    for record in trees:
        n_trees += 1
        got = _sft_rows_for_tree(_Tree(record), cfg, tokenizer)
        n_covered += bool(got)
        rows.extend(got)
    logger.info(
        "SFT mining: %d trees, %d with a correct trajectory (%.1f%%), %d rows",
        n_trees, n_covered, 100.0 * n_covered / max(n_trees, 1), len(rows),
    )
    return rows


# --------------------------------------------------------------------------- PPM pairs


def edit_distance(a: str, b: str, limit: int | None = None) -> int:
    """Levenshtein distance of ``a`` and ``b``; with ``limit``, any value >= limit may be
    returned as ``limit`` (a banded computation, O(len * limit), for threshold tests)."""
    if a == b:
        return 0
    if len(a) < len(b):
        a, b = b, a
    if limit is not None and len(a) - len(b) >= limit:
        return limit
    if not b:
        return len(a) if limit is None else min(len(a), limit)
    big = len(a) + len(b) + 1
    band = len(a) if limit is None else limit
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        lo = max(1, i - band)
        hi = min(len(b), i + band)
        cur = [big] * (len(b) + 1)
        cur[0] = i if lo == 1 else big
        ai = a[i - 1]
        best = cur[0]
        for j in range(lo, hi + 1):
            cost = 0 if ai == b[j - 1] else 1
            v = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + cost)
            cur[j] = v
            if v < best:
                best = v
        if limit is not None and best >= limit:
            return limit
        prev = cur
    d = prev[len(b)]
    return d if limit is None else min(d, limit)


@dataclass
class PairStats:
    """What pair mining found; ``to_text()`` is what gets logged."""

    trees: int = 0
    trees_covered: int = 0
    nodes_with_both: int = 0
    candidate_pairs: int = 0
    dropped_margin: int = 0
    dropped_edit_distance: int = 0
    pairs: int = 0
    pairs_per_tree: list[int] = field(default_factory=list)  # covered trees only
    margins: list[float] = field(default_factory=list)

    def margin_histogram(self, edges: Sequence[float] = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
                         ) -> list[tuple[str, int]]:
        """Counts of kept margins per bin ``[lo, hi)`` (the last bin is closed)."""
        bins = []
        for i in range(len(edges) - 1):
            lo, hi = edges[i], edges[i + 1]
            last = i == len(edges) - 2
            n = sum(1 for m in self.margins if lo <= m < hi or (last and m == hi))
            bins.append((f"[{lo:.2f},{hi:.2f}{']' if last else ')'}", n))
        return bins

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pairs_per_tree")
        d.pop("margins")
        ppt = self.pairs_per_tree
        d["pairs_per_covered_tree"] = {
            "mean": statistics.fmean(ppt) if ppt else 0.0,
            "median": statistics.median(ppt) if ppt else 0.0,
            "max": max(ppt) if ppt else 0,
        }
        d["margin_histogram"] = dict(self.margin_histogram())
        return d

    def to_text(self) -> str:
        d = self.to_dict()
        ppt = d["pairs_per_covered_tree"]
        lines = [
            f"trees {self.trees}, covered {self.trees_covered} "
            f"({100.0 * self.trees_covered / max(self.trees, 1):.1f}%), "
            f"nodes with correct and wrong descendants {self.nodes_with_both}",
            f"pairs {self.pairs} of {self.candidate_pairs} candidates "
            f"(dropped: margin {self.dropped_margin}, edit distance {self.dropped_edit_distance})",
            f"pairs per covered tree: mean {ppt['mean']:.2f}, median {ppt['median']:.1f}, max {ppt['max']}",
            "margin histogram: " + ", ".join(f"{k} {v}" for k, v in self.margin_histogram()),
        ]
        return "\n".join(lines)


def _select(tree: _Tree, kids: list[int], cfg: PairMiningConfig) -> tuple[list[int], list[int]]:
    """Chosen (correct below, Q desc) and rejected (wrong below, Q asc) candidates of a node."""
    chosen = sorted((k for k in kids if tree.n_correct[k] > 0), key=lambda k: (-tree.q(k), k))
    rejected = sorted((k for k in kids if tree.n_wrong[k] > 0), key=lambda k: (tree.q(k), k))
    if not chosen or not rejected:
        return [], []
    kc = cfg.top_k_single if len(rejected) == 1 else cfg.top_k
    kr = cfg.top_k_single if len(chosen) == 1 else cfg.top_k
    return chosen[:kc], rejected[:kr]


def _pairs_for_tree(tree: _Tree, cfg: PairMiningConfig, stats: PairStats, tokenizer: Any
                    ) -> list[dict[str, Any]]:
    record = tree.record
    head: str | None = None
    rows: list[dict[str, Any]] = []
    for nid in tree.order:
        if tree.n_correct[nid] == 0 or tree.n_wrong[nid] == 0 or not tree.children[nid]:
            continue
        chosen, rejected = _select(tree, tree.children[nid], cfg)
        if not chosen:
            continue
        stats.nodes_with_both += 1
        if head is None:
            head = build_prompt(record["question"], "", cfg.prompt, tokenizer=tokenizer)
        prefix = [tree.text(p) for p in tree.path(nid)]
        prompt = head + "".join(prefix)
        for c in chosen:
            for r in rejected:
                if c == r:
                    continue  # a child with both outcomes below it can sit on both sides
                stats.candidate_pairs += 1
                margin = tree.q(c) - tree.q(r)
                if not (margin > 0 and margin >= cfg.min_margin - 1e-12):
                    stats.dropped_margin += 1
                    continue
                tc, tr = tree.text(c), tree.text(r)
                if tc == tr or edit_distance(tc, tr, cfg.min_edit_distance) < cfg.min_edit_distance:
                    stats.dropped_edit_distance += 1
                    continue
                stats.margins.append(margin)
                rows.append(
                    {
                        "id": str(record.get("id", "")),
                        "question": record["question"],
                        "prompt": prompt,
                        "prompt_head": head,
                        "prefix": prefix,
                        "chosen": tc,
                        "rejected": tr,
                        "pos_count": len(chosen),
                        "neg_count": len(rejected),
                        "node": nid,
                        "depth": int(tree.nodes[nid].get("depth", len(prefix))),
                        "chosen_node": c,
                        "rejected_node": r,
                        "q_chosen": tree.q(c),
                        "q_rejected": tree.q(r),
                        "margin": margin,
                        "chosen_terminal": bool(tree.nodes[c].get("terminal")),
                        "rejected_terminal": bool(tree.nodes[r].get("terminal")),
                    }
                )
    return rows


def mine_pairs(
    trees: Iterable[Tree],
    config: PairMiningConfig | None = None,
    *,
    tokenizer: Any = None,
    stats: PairStats | None = None,
) -> list[dict[str, Any]]:
    """PPM preference rows ``{prompt, chosen, rejected, pos_count, neg_count, ...}`` (see the
    module docstring). Pass ``stats`` to collect counts; a summary is logged either way."""
    cfg = config or PairMiningConfig()
    st = stats if stats is not None else PairStats()
    rows: list[dict[str, Any]] = []
    for record in trees:
        st.trees += 1
        got = _pairs_for_tree(_Tree(record), cfg, st, tokenizer)
        if got:
            st.trees_covered += 1
            st.pairs_per_tree.append(len(got))
        rows.extend(got)
    st.pairs = len(rows)
    logger.info("PPM pair mining:\n%s", st.to_text())
    return rows


def pair_weight(pos_count: int, neg_count: int) -> float:
    """The paper's per-pair loss weight 1/(pos·neg) (official fallback 1/(pos+neg) when a
    count is 0), so every prompt's pairs add up to at most 1."""
    if pos_count > 0 and neg_count > 0:
        return 1.0 / (pos_count * neg_count)
    s = pos_count + neg_count
    return 1.0 / s if s > 0 else 1.0


# --------------------------------------------------------------------------- JSONL I/O


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write rows atomically (temp file + rename), so a killed run never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, p)
    return p


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_rows_dataset(path: str | os.PathLike[str]) -> Any:
    """Rows as a ``datasets.Dataset`` (the JSONL files are plain ``datasets`` json input)."""
    import datasets

    return datasets.load_dataset("json", data_files=str(path), split="train")


def mine_files(
    trees_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    sft_out: str | os.PathLike[str] | None = None,
    pairs_out: str | os.PathLike[str] | None = None,
    sft_config: SFTMiningConfig | None = None,
    pair_config: PairMiningConfig | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """Mine one or more tree files into SFT / pair JSONL files; returns the statistics (also
    written next to the pairs as ``<pairs>.stats.json``)."""
    paths = [trees_path] if isinstance(trees_path, (str, os.PathLike)) else list(trees_path)

    def trees() -> Iterator[Tree]:
        for p in paths:
            yield from read_trees(p)

    out: dict[str, Any] = {}
    if sft_out is not None:
        rows = mine_sft(trees(), sft_config, tokenizer=tokenizer)
        write_jsonl(rows, sft_out)
        out["sft_rows"] = len(rows)
        out["sft_problems"] = len({r["id"] for r in rows})
    if pairs_out is not None:
        st = PairStats()
        rows = mine_pairs(trees(), pair_config, tokenizer=tokenizer, stats=st)
        write_jsonl(rows, pairs_out)
        out["pairs"] = st.to_dict()
        Path(f"{pairs_out}.stats.json").write_text(json.dumps(st.to_dict(), indent=1))
    return out


__all__ = [
    "PairMiningConfig",
    "PairStats",
    "SFTMiningConfig",
    "edit_distance",
    "is_tree_file",
    "load_rows_dataset",
    "mine_files",
    "mine_pairs",
    "mine_sft",
    "pair_weight",
    "read_jsonl",
    "read_trees",
    "write_jsonl",
]
