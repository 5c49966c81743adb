"""Round and run reports of ``rstar evolve``: Markdown + JSON tables and a PNG plot (accuracy
by round, and by number of samples / rollouts), built only from the stage records on disk, so
a report can be regenerated at any time (``rstar evolve --report-only``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rstar.evolve.stages import read_record, write_json_atomic

if TYPE_CHECKING:
    from rstar.evolve.pipeline import Evolution

logger = logging.getLogger(__name__)

METHODS = ("greedy", "bon_majority", "bon_ppm", "mcts_ppm")
_LABEL = {"greedy": "greedy", "bon_majority": "BoN majority", "bon_ppm": "BoN PPM", "mcts_ppm": "MCTS+PPM"}


def _round_data(evo: Evolution, k: int) -> dict[str, Any]:
    d = evo.round_dir(k)
    out: dict[str, Any] = {"round": k, "stages": {}, "seconds": {}}
    for name in ("search", "mine", "sft", "ppm", "eval", "control-sft", "control-eval"):
        rec = read_record(d, name)
        if rec is not None:
            out["stages"][name] = rec.result
            out["seconds"][name] = round(rec.seconds, 1)
    return out


def round_report(evo: Evolution, k: int) -> dict[str, Any]:
    """Everything measured in round ``k`` (0 = the bootstrap policy's evaluation)."""
    data = _round_data(evo, k)
    if k == 0:
        setup = evo.round_dir(-1)
        for name in ("problems", "nano-base", "seed-policy"):
            rec = read_record(setup, name)
            if rec is not None:
                data["stages"][name] = rec.result
                data["seconds"][name] = round(rec.seconds, 1)
    return data


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{100 * x:.1f}"
    return str(x)


def _eval_cells(ev: dict[str, Any], sets: list[str]) -> list[str]:
    cells = []
    for s in sets:
        r = ev.get(s, {})
        for m in METHODS:
            cells.append(_fmt((r.get(m) or {}).get("accuracy")))
    return cells


def round_markdown(data: dict[str, Any], sets: list[str]) -> str:
    k = data["round"]
    st = data["stages"]
    lines = [f"# Round {k}", ""]
    s = st.get("search")
    if s:
        lines += [f"- Search: {s['covered']}/{s['problems']} training problems solved "
                  f"(coverage {100 * s['coverage']:.1f}%), {s['nodes']} nodes, {s['tokens']} tokens"]
        if s.get("coverage_by_difficulty"):
            lines += ["  - coverage by difficulty: " + ", ".join(
                f"d{d} {100 * v:.0f}%" for d, v in s["coverage_by_difficulty"].items())]
    m = st.get("mine")
    if m:
        lines += [f"- Mined: {m['sft_rows']} SFT rows from {m['sft_problems']} problems "
                  f"({m['sft_rows_total']} with extra rows), {m['pairs']} PPM pairs"]
    for name in ("sft", "ppm"):
        t = st.get(name)
        if t and t.get("trained") is False:
            lines += [f"- {name.upper()}: not trained ({t.get('reason')})"]
        elif t:
            lines += [f"- {name.upper()}: {t.get('rows')} rows, train {t.get('train')}"
                      + (f", eval {t.get('eval')}" if t.get("eval") else "")]
    ev, control = st.get("eval"), st.get("control-eval")
    if ev or control:
        lines += ["", "| set | method | accuracy | by difficulty | tokens/problem |", "|---|---|---|---|---|"]
        for sname in sets:
            rows = [(_LABEL[meth], (ev or {}).get(sname, {}).get(meth)) for meth in METHODS]
            rows.append((f"{_LABEL['greedy']}, control", (control or {}).get(sname, {}).get("greedy")))
            for label, v in rows:
                if not v:
                    continue
                bd = ", ".join(f"d{d} {100 * a:.0f}" for d, a in (v.get("by_difficulty") or {}).items())
                lines.append(f"| {sname} | {label} | {_fmt(v['accuracy'])} | {bd} | "
                             f"{v.get('tokens_per_problem', '-')} |")
    lines += ["", "Seconds per stage: " + ", ".join(f"{n} {s}" for n, s in data["seconds"].items()), ""]
    return "\n".join(lines)


def write_round_report(evo: Evolution, k: int) -> dict[str, Any]:
    data = round_report(evo, k)
    d = evo.round_dir(k)
    write_json_atomic(d / "report.json", data)
    (d / "report.md").write_text(round_markdown(data, [s.label for s in evo.cfg.eval.sets]))
    return data


def run_report(evo: Evolution) -> dict[str, Any]:
    rounds = [round_report(evo, k) for k in range(0, len(evo.cfg.rounds) + 1)]
    rounds = [r for r in rounds if r["stages"]]
    total = sum(sum(r["seconds"].values()) for r in rounds)
    return {"output_dir": str(evo.out), "rounds": rounds, "total_seconds": round(total, 1),
            "eval_sets": [s.label for s in evo.cfg.eval.sets]}


def _control_greedy(r: dict[str, Any], s: str) -> float | None:
    """Greedy accuracy of round r's control arm on set s (round 0: the bootstrap policy, where
    both arms start)."""
    stage = "eval" if r["round"] == 0 else "control-eval"
    return ((r["stages"].get(stage) or {}).get(s, {}).get("greedy") or {}).get("accuracy")


def run_markdown(rep: dict[str, Any]) -> str:
    sets = rep["eval_sets"]
    control = any("control-eval" in r["stages"] for r in rep["rounds"])
    head = ["round", "train coverage", "SFT rows", "pairs"]
    for s in sets:
        head += [f"{s} {_LABEL[m]}" for m in METHODS]
        if control:
            head.append(f"{s} greedy, control")
    lines = ["# rstar evolve report", "", f"Output: `{rep['output_dir']}`; total stage time "
             f"{rep['total_seconds'] / 60:.1f} min.", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in rep["rounds"]:
        st = r["stages"]
        s, m = st.get("search") or {}, st.get("mine") or {}
        cov = f"{s['covered']}/{s['problems']}" if s else "-"
        row = [str(r["round"]) + (" (bootstrap)" if r["round"] == 0 else ""), cov,
               str(m.get("sft_rows", "-")), str(m.get("pairs", "-"))]
        for name in sets:
            row += _eval_cells(st.get("eval") or {}, [name])
            if control:
                row.append(_fmt(_control_greedy(r, name)))
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Accuracy in %; best-of-N and MCTS at equal numbers of sampled solutions / rollouts."]
    if control:
        lines += ["\"Greedy, control\": the same fine-tuning schedule on the replayed seed rows alone, without "
                  "the rows mined from the search (`control: true`)."]
    stages = ["search", "mine", "sft", "ppm", "eval"] + (["control"] if control else [])
    lines += ["", "| round | " + " | ".join(["setup", *stages]) + " |", "|---|" + "---|" * (len(stages) + 1)]
    for r in rep["rounds"]:
        sec = dict(r["seconds"])
        setup = sum(v for k, v in sec.items() if k in ("problems", "nano-base", "seed-policy"))
        if any(k.startswith("control-") for k in sec):
            sec["control"] = sum(v for k, v in sec.items() if k.startswith("control-"))
        cells = [f"{setup:.0f}" if setup else "-"] + [f"{sec[n]:.0f}" if n in sec else "-" for n in stages]
        lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
    lines += ["", "Seconds per stage.", "", "![accuracy](accuracy.png)", ""]
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> Path | None:
    """Accuracy by round (one line per method) and, for the last evaluated round, accuracy by
    number of samples / rollouts."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'rstar[plot]'): no plot")
        return None
    sets = rep["eval_sets"]
    evaluated = [r for r in rep["rounds"] if r["stages"].get("eval")]
    if not sets or not evaluated:
        return None
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 4 * len(sets)), squeeze=False)
    for i, s in enumerate(sets):
        ax = axes[i][0]
        for m in METHODS:
            xs, ys = [], []
            for r in evaluated:
                v = (r["stages"]["eval"].get(s) or {}).get(m)
                if v:
                    xs.append(r["round"])
                    ys.append(100 * v["accuracy"])
            if xs:
                ax.plot(xs, ys, marker="o", label=_LABEL[m])
        ctrl = [(r["round"], _control_greedy(r, s)) for r in rep["rounds"]]
        ctrl = [(k, 100 * v) for k, v in ctrl if v is not None]
        if len(ctrl) > 1:
            ax.plot(*zip(*ctrl), marker="x", linestyle=":", color="gray", label="greedy, control")
        ax.set_xlabel("round (0 = bootstrap)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{s}: accuracy by round")
        ax.set_xticks([r["round"] for r in evaluated])
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend()
        ax = axes[i][1]
        last = evaluated[-1]
        ev = last["stages"]["eval"].get(s) or {}
        for m in ("bon_majority", "bon_ppm", "mcts_ppm"):
            curve = (ev.get(m) or {}).get("by_budget")
            if curve:
                ks = sorted(int(k) for k in curve)
                ax.plot(ks, [100 * curve[str(k)] for k in ks], marker="o", label=_LABEL[m])
        g = (ev.get("greedy") or {}).get("accuracy")
        if g is not None:
            ax.axhline(100 * g, color="gray", linestyle="--", label="greedy")
        ax.set_xscale("log", base=2)
        budgets = sorted({int(k) for m in ("bon_majority", "bon_ppm", "mcts_ppm")
                          for k in ((ev.get(m) or {}).get("by_budget") or {})})
        if budgets:
            ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_ylim(0, 100)
        ax.set_xlabel("sampled solutions / rollouts")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{s}: round {last['round']} by budget")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_run_report(evo: Evolution) -> dict[str, Any]:
    """``report.json``, ``report.md`` and ``accuracy.png`` in the run directory."""
    rep = run_report(evo)
    write_json_atomic(evo.out / "report.json", rep)
    (evo.out / "report.md").write_text(run_markdown(rep))
    plot(rep, evo.out / "accuracy.png")
    return rep
