"""The report's sections of two-turn prompt sets and categories: the feature tests per turn and per category, and
the judge's win rate per category (a table and a small-multiples chart, one panel per category)."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from dpo_eval.report.page import Section

CHART = "plots/judge_categories.svg"


def _f(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def _p(x) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


def feature_groups_section(summary: dict, categories: pl.DataFrame | None, alpha: float) -> Section:
    """Features per turn (n, features moved at q < alpha) and per category (prompts, tested, features moved at
    BH-across-categories p < alpha, the three smallest adjusted p's)."""
    paragraphs, rows = [], []
    for turn, splits in (summary.get("turns") or {}).items():
        for split, block in splits.items():
            rows.append([f"turn {turn}", split, "all", block["n"], "yes", block["significant"], ""])
    if summary.get("turns"):
        paragraphs.append("Two turns: each model answered turn 2 after its own turn-1 answer. Tuned vs base is tested "
                          "per turn (turn 1 is the statistics above; turn 2's rows are in stats_turns.parquet); moved: "
                          f"features with q < {alpha:g} across the features of the turn.")
    if categories is not None:
        paragraphs.append("Per category and split: a two-sided Wilcoxon test per feature on the category's prompts, "
                          f"Benjamini-Hochberg across the categories tested (moved: adjusted p < {alpha:g}); a "
                          "category with too few prompts is listed untested. Every row is in stats_categories.parquet.")
        for (turn, split, name), part in categories.group_by("turn", "split", "category", maintain_order=True):
            tested = part.filter(pl.col("p_value").is_not_nan())
            top = tested.sort("p_adjusted").head(3)
            rows.append([f"turn {turn}", split, name, int(part["n"].max() or 0), "yes" if tested.height else "no",
                         int((tested["p_adjusted"] < alpha).sum()),
                         ", ".join(f"{r['feature']} ({_p(r['p_adjusted'])})" for r in top.iter_rows(named=True))
                         or (part["reason"][0] or "")])
    return Section("feature_groups", "Features per turn and per category", paragraphs,
                   ["turn", "split", "category", "n", "tested", "features moved", "smallest adjusted p"], rows)


def category_rows(judge: dict) -> list[list]:
    """One row per turn, split and category of the judge's tuned-vs-base win rate."""
    rows = []
    for turn, block in _turn_blocks(judge):
        for split, comparisons in (block.get("splits") or {}).items():
            for name, c in ((comparisons.get("tuned_vs_base") or {}).get("categories") or {}).items():
                rows.append([turn, split, name, c["n"], f"{c['wins']} / {c['losses']} / {c['ties']}",
                             _f(c["win_rate"]), _f(c["ci_low"]), _f(c["ci_high"]), _p(c["p_value"]),
                             _p(c["p_adjusted"])])
    return rows


def _turn_blocks(judge: dict) -> list[tuple[str, dict]]:
    turns = judge.get("turns")
    return [(f"turn {t}", b) for t, b in turns.items()] if turns else [("all", judge)]


def judge_categories_section(judge: dict, run_dir: Path) -> Section | None:
    """The judge's win rate per category (and per turn of a two-turn set), with the small-multiples chart."""
    rows = category_rows(judge)
    if not rows:
        return None
    images = []
    if category_chart(judge, Path(run_dir) / CHART):
        images.append({"src": CHART, "alt": "the judge's tuned-vs-base win rate per category, one panel per "
                                            "category, each turn a point with its Wilson interval"})
    return Section("judge_categories", "LLM judge: win rate per category",
                   ["Tuned-vs-base win rate per category: (wins + ties / 2) / n over the category's pairs (both "
                    "orders combined), its Wilson interval, p: two-sided binomial test of wins vs losses against 1/2 "
                    "(ties excluded), p adjusted: Benjamini-Hochberg across the categories. A two-turn set gives "
                    "each turn its own rows; turn 2 was judged with the whole dialogue in front of the judge. "
                    "Small categories give wide intervals: read the interval, not the point."],
                   ["turn", "split", "category", "n", "wins / losses / ties", "win rate", "ci_low", "ci_high", "p",
                    "p adjusted"], rows, images)


def category_chart(judge: dict, path: Path) -> bool:
    """plots/judge_categories.svg (matplotlib, as the report's other figures): one small panel per category, the
    win rate of each turn (and split) as a point with its Wilson interval, 0.5 dashed. False with nothing to draw."""
    points: dict[str, list] = {}
    for turn, block in _turn_blocks(judge):
        for split, comparisons in (block.get("splits") or {}).items():
            for name, c in ((comparisons.get("tuned_vs_base") or {}).get("categories") or {}).items():
                if isinstance(c.get("win_rate"), (int, float)) and math.isfinite(c["win_rate"]):
                    points.setdefault(name, []).append((f"{turn} {split}" if split != "valid" else turn,
                                                        c["win_rate"], c["ci_low"], c["ci_high"], c["n"]))
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(points)
    cols = min(4, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.6 * cols, 2.2 * nrows), sharey=True, squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        labels = [p[0] for p in points[name]]
        for x, (_, rate, low, high, _) in enumerate(points[name]):
            ax.errorbar([x], [rate], yerr=[[rate - low], [high - rate]], fmt="o", color="#dd8452", capsize=3)
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name} (n {max(p[4] for p in points[name])})", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("tuned win rate", fontsize=8)
    fig.suptitle("LLM judge: tuned vs base per category (Wilson interval)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg")
    plt.close(fig)
    return True
