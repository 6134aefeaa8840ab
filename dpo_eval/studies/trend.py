"""Evaluation curves across checkpoints (sign agreement, significant features, implicit-reward accuracy, the four
answers, a calibrated judge's win rate, the gap closed, forgetting) and the checkpoint to ship, by a stated rule."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import polars as pl

from dpo_eval.errors import DpoEvalError
from dpo_eval.jsonsafe import jsonable


def checkpoint_step(adapter: str | Path) -> int | None:
    """The training step of a checkpoint: its metadata, else the N of a `checkpoint-N` folder."""
    from dpo_eval.checkpoint_meta import read_metadata

    step = read_metadata(adapter).get("step")
    if step is not None:
        return int(step)
    match = re.search(r"checkpoint-(\d+)$", str(adapter).rstrip("/"))
    return int(match.group(1)) if match else None


SCHEMA = {"run": pl.String, "adapter": pl.String, "step": pl.Int64, "sign_agreement": pl.Float64,
          "sign_agreement_p": pl.Float64, "significant": pl.Int64, "significant_toward_chosen": pl.Int64,
          "reward_accuracy": pl.Float64, "alignment": pl.String, "better": pl.String, "forgetting": pl.String,
          "gaming": pl.String, "win_judge": pl.String, "win_rate": pl.Float64, "win_low": pl.Float64,
          "win_high": pl.Float64, "gap_closed": pl.Float64, "gap_low": pl.Float64, "gap_high": pl.Float64,
          "largest_drop": pl.Float64}


def _answers(run: Path, summary: dict) -> tuple[dict, dict]:
    """The run's verdict and gap: as summary.json holds them, computed now for a run written before them."""
    if isinstance(summary.get("verdict"), dict):
        return summary["verdict"], summary.get("gap") or {}
    from dpo_eval.studies.verdict import verdict

    return verdict(run)


def _win(verdict: dict) -> dict:
    """The win rate of the first calibrated judge behind the `better` answer (the reward model before the LLM judge)."""
    for judge in (verdict.get("better") or {}).get("judges") or []:
        if judge.get("calibrated"):
            low, high = judge["ci"]
            return {"win_judge": judge["judge"], "win_rate": judge["win_rate"], "win_low": low, "win_high": high}
    return {}


def _largest_drop(summary: dict) -> float | None:
    """The largest drop (base - tuned, > 0 for a loss) on any benchmark task's primary metric; None unchecked."""
    tasks = (summary.get("forgetting") or {}).get("tasks") or {}
    drops = [-s["delta"] for metrics in tasks.values() for s in metrics.values()
             if s.get("primary", True) and s.get("delta") is not None and math.isfinite(s["delta"])]
    return max(drops) if drops else None


def collect(run_dirs: list[Path], split: str = "valid") -> pl.DataFrame:
    """One row per evaluated checkpoint, ordered by step: the feature figures, the four answers, the first
    calibrated judge's win rate with its CI, the gap closed on the reward model's scale, the largest forgetting drop."""
    rows = []
    for run in run_dirs:
        summary_path, config_path = Path(run) / "summary.json", Path(run) / "config.json"
        if not summary_path.is_file() or not config_path.is_file():
            raise DpoEvalError(f"{run}: not a dpo-eval run directory (no summary.json/config.json)")
        summary = json.loads(summary_path.read_text())
        adapter = json.loads(config_path.read_text())["config"]["model"]["adapter"]
        reward = (summary.get("implicit_reward") or {}).get(split) or {}
        verdict, gaps = _answers(Path(run), summary)
        gap = gaps.get("reward model") or {}  # one scale down the column: the reward model's
        gap_ci = gap.get("ci") or [None, None]
        rows.append({"run": str(run), "adapter": adapter, "step": checkpoint_step(adapter),
                     "sign_agreement": (summary.get("sign_agreement") or {}).get(split),
                     "sign_agreement_p": (summary.get("sign_agreement_p") or {}).get(split),
                     "significant": summary["significant"]["tuned_vs_base"].get(split),
                     "significant_toward_chosen": (summary.get("significant_toward_chosen") or {}).get(split),
                     "reward_accuracy": reward.get("accuracy"),
                     **{q: (verdict.get(q) or {}).get("answer") for q in ("alignment", "better", "forgetting", "gaming")},
                     **_win(verdict), "gap_closed": gap.get("closed"), "gap_low": gap_ci[0], "gap_high": gap_ci[1],
                     "largest_drop": _largest_drop(summary)})
    return pl.DataFrame(rows, schema=SCHEMA).sort("step", nulls_last=True)


ELIGIBLE = ("checkpoints whose alignment took (answer yes), that forgot nothing significantly (forgetting not yes), "
            "whose gain is not flagged as gaming (gaming not yes) and that are not shown worse than base (better not no)")
RULES = {
    "earliest-within-ci": (f"among {ELIGIBLE}, the earliest whose win-rate CI overlaps the CI of the one with the "
                           "highest win rate (overlapping intervals: these figures do not tell the two apart)"),
    "best": f"among {ELIGIBLE}, the one with the highest win rate",
}


def recommend(table: pl.DataFrame, rule: str = "earliest-within-ci") -> dict:
    """{checkpoint, run, step, rule, because} by the stated rule (RULES); checkpoint None with the reason where no
    checkpoint qualifies."""
    if rule not in RULES:
        raise DpoEvalError(f"recommendation rule {rule!r}: use one of {', '.join(RULES)}")
    said = RULES[rule]
    rows = table.to_dicts()
    eligible = [r for r in rows if r["alignment"] == "yes" and r["forgetting"] != "yes" and r.get("gaming") != "yes"
                and r.get("better") != "no"]
    ranked = [r for r in eligible if r["win_rate"] is not None and math.isfinite(r["win_rate"])]
    if not ranked:
        why = ("no checkpoint's alignment took" if not eligible else
               "no checkpoint has a calibrated judge's win rate (run a reward model or an LLM judge)")
        return {"checkpoint": None, "run": None, "step": None, "rule": said, "because": why}
    best = max(ranked, key=lambda r: r["win_rate"])
    if rule == "best":
        chosen = best
        because = f"the highest win rate of {len(ranked)} qualifying checkpoints: {best['win_rate']:.2f}"
    else:
        close = [r for r in ranked if r["win_high"] >= best["win_low"]]
        chosen = min(close, key=lambda r: (r["step"] is None, r["step"] or 0))
        because = (f"win rate {chosen['win_rate']:.2f} [{chosen['win_low']:.2f}, {chosen['win_high']:.2f}] by the "
                   f"{chosen['win_judge']}, whose CI overlaps the best one's ({best['win_rate']:.2f} "
                   f"[{best['win_low']:.2f}, {best['win_high']:.2f}] at step {best['step']}); {len(ranked)} of "
                   f"{len(rows)} checkpoints qualify")
    if all(r["win_low"] <= 0.5 for r in ranked):
        because += "; no qualifying checkpoint is shown better than base (every win-rate CI reaches 0.5)"
    drop = chosen.get("largest_drop")
    because += (f"; its largest benchmark drop {drop:.3f}" if drop is not None else "; forgetting not checked")
    return {"checkpoint": Path(chosen["adapter"]).name, "run": chosen["run"], "step": chosen["step"], "rule": said,
            "because": because}


def plot_trend(table: pl.DataFrame, path: Path, split: str = "valid") -> Path:
    """Four panels by training step: sign agreement, features moved, implicit-reward accuracy, and the win rate's
    gain over 0.5 against the largest forgetting drop (the trade-off a person picks a checkpoint by)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = table["step"].to_list()
    x = [s if s is not None else i for i, s in enumerate(steps)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.5))
    for ax, column, title in zip(axes, ("sign_agreement", "significant", "reward_accuracy"),
                                 ("sign agreement", "features moved (q < alpha)", "implicit-reward accuracy")):
        ax.plot(x, table[column].to_list(), marker="o")
        ax.set_title(f"{title} ({split})")
        ax.set_xlabel("training step")
    axes[0].axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes[2].axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax = axes[3]
    gain = [None if w is None else w - 0.5 for w in table["win_rate"].to_list()]
    drops = table["largest_drop"].to_list()
    for step, g, d in zip(x, gain, drops):
        if g is None:
            continue
        ax.plot([d if d is not None else 0.0], [g], "o", color="#dd8452" if d is not None else "#999999")
        ax.annotate(str(step), (d if d is not None else 0.0, g), fontsize=8, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("largest benchmark drop (grey: not checked)")
    ax.set_ylabel("win rate - 0.5")
    ax.set_title("win-rate gain vs forgetting")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_trend(run_dirs: list[Path], out: Path, split: str = "valid", rule: str = "earliest-within-ci") -> dict:
    """trend.csv (one row per checkpoint), trend.json ({split, checkpoints, recommended}) and trend.png in `out`;
    returns trend.json's object."""
    table = collect(run_dirs, split)
    out.mkdir(parents=True, exist_ok=True)
    table.write_csv(out / "trend.csv")
    trend = {"split": split, "checkpoints": table.to_dicts(), "recommended": recommend(table, rule)}
    (out / "trend.json").write_text(json.dumps(jsonable(trend), indent=2))
    plot_trend(table, out / "trend.png", split)
    return trend


def recommendation_line(trend: dict) -> str:
    """The recommendation as one line for a terminal or an artifact."""
    rec = trend["recommended"]
    if rec["checkpoint"] is None:
        return f"Checkpoint to ship: none: {rec['because']} (rule: {rec['rule']})."
    return f"Checkpoint to ship: {rec['checkpoint']} (step {rec['step']}): {rec['because']} (rule: {rec['rule']})."


LEADERBOARD_COLUMNS = ("checkpoint", "step", "alignment", "better", "forgetting", "gaming", "win rate", "gap closed",
                       "largest drop")


def leaderboard_rows(table: pl.DataFrame) -> list[dict]:
    """One row per checkpoint, newest (highest step) first, for a Prefect table artifact: the four answers, the win
    rate with its CI and judge, the gap closed with its CI, the largest benchmark drop."""
    def interval(value, low, high) -> str:
        if value is None or not math.isfinite(value):
            return "n/a"
        return f"{value:.2f} [{low:.2f}, {high:.2f}]" if low is not None and high is not None else f"{value:.2f}"

    rows = []
    for r in table.sort("step", descending=True, nulls_last=True).iter_rows(named=True):
        rows.append({"checkpoint": Path(r["adapter"]).name, "step": r["step"], "alignment": r["alignment"],
                     "better": r["better"], "forgetting": r["forgetting"], "gaming": r["gaming"],
                     "win rate": interval(r["win_rate"], r["win_low"], r["win_high"])
                     + (f" ({r['win_judge']})" if r["win_judge"] else ""),
                     "gap closed": interval(r["gap_closed"], r["gap_low"], r["gap_high"]),
                     "largest drop": "not checked" if r["largest_drop"] is None else f"{r['largest_drop']:.3f}"})
    return rows
