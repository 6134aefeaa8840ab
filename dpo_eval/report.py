"""Plots, the HTML report, and the markdown/table builders for Prefect artifacts."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
import polars as pl

from dpo_eval.features import FAMILIES

SPLITS = ("train", "valid")
COLORS = {"chosen_vs_rejected": "#4c72b0", "tuned_vs_base": "#dd8452"}


def write_outputs(stats: pl.DataFrame, summary: dict, out: Path, extra_sections: list[str] | None = None) -> dict:
    """Write stats.parquet, stats.csv, summary.json, plots/*.png and report.html into `out`."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    stats.write_parquet(out / "stats.parquet")
    stats.write_csv(out / "stats.csv")
    summary = dict(summary, sentences=sentences(summary))
    (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2))
    plots = write_plots(stats, out / "plots")
    (out / "report.html").write_text(render_html(stats, summary, plots, extra_sections or []))
    return summary


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def sentences(summary: dict) -> list[str]:
    """Three plain sentences a practitioner can quote (about the valid split where there is one)."""
    alpha = summary.get("alpha", 0.05)
    n_pairs = summary.get("n_pairs", {})
    split = "valid" if n_pairs.get("valid") else next(iter(n_pairs), "valid")
    moved = summary["significant"]["tuned_vs_base"].get(split, 0)
    toward = summary.get("significant_toward_chosen", {}).get(split, 0)
    out = [f"On the {split} split ({n_pairs.get(split, 0)} pairs), tuned moved {moved} of "
           f"{summary.get('n_features', 0)} features significantly against base (q < {alpha:g}), "
           f"{toward} of them in the direction in which chosen differs from rejected."]
    share = summary.get("sign_agreement", {}).get(split)
    p = summary.get("sign_agreement_p", {}).get(split)
    signed = summary.get("sign_agreement_features", {}).get(split)
    out.append(f"Sign agreement between tuned-vs-base and chosen-vs-rejected is {_fmt(share)} on {split} "
               f"(over {signed} features whose mean deltas are both nonzero), p = {_fmt(p)} "
               "(chance is 0.5; pair-level sign-flip permutation test).")
    cr = summary["significant"]["chosen_vs_rejected"]
    out.append(f"Chosen differs significantly from rejected on {cr.get(split, 0)} features on {split} "
               f"({', '.join(f'{cr[s]} on {s}' for s in cr if s != split) or 'no other split'}): "
               "the target the tuning aims at.")
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _ordered_features(stats: pl.DataFrame) -> list[str]:
    present = list(dict.fromkeys(stats["feature"].to_list()))
    known = [f for names in FAMILIES.values() for f in names if f in present]
    return known + [f for f in present if f not in known]


def write_plots(stats: pl.DataFrame, folder: Path) -> dict[str, str]:
    """The four figures as PNG files; returns {title: relative path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    features = _ordered_features(stats)
    splits = [s for s in SPLITS if s in set(stats["split"].to_list())] or sorted(set(stats["split"]))
    plots = {}

    def comparisons(frame: pl.DataFrame, column: str) -> list:
        return [(c.replace("_", " "), color, frame.filter(pl.col("comparison") == c), column)
                for c, color in COLORS.items()]

    significance = -math.log10(0.05)
    with_logp = stats.with_columns(
        (-pl.col("p_value").log10()).alias("neg_log10_p"), (-pl.col("q_value").log10()).alias("neg_log10_q"))
    tuned = stats.filter(pl.col("comparison") == "tuned_vs_base")
    figures = [
        ("Normalised mean deltas per feature (features grouped by family)", "norm_mean_delta.png",
         "mean delta / S_j (train std of chosen - rejected)", comparisons(stats, "norm_mean_delta"), None),
        ("-log10 p (Wilcoxon signed-rank)", "neg_log10_p.png", "-log10 p", comparisons(with_logp, "neg_log10_p"),
         significance),
        ("-log10 q (Benjamini-Hochberg)", "neg_log10_q.png", "-log10 q", comparisons(with_logp, "neg_log10_q"),
         significance),
    ]
    for title, file, xlabel, series, line in figures:
        _bar_figure(plt, series, features, splits, title, xlabel, folder / file, line)
        plots[title] = f"plots/{file}"
    _sign_plot(stats, features, splits, folder, plots, plt)
    length_title = "Length-controlled tuned-vs-base deltas (intercept of delta ~ n_tokens delta)"
    _bar_figure(plt, [("raw", COLORS["tuned_vs_base"], tuned, "norm_mean_delta"),
                      ("at equal length", "#55a868", tuned, "length_adjusted_norm_delta")],
                features, splits, length_title, "tuned - base, / S_j", folder / "length_controlled.png")
    plots["Length-controlled deltas"] = "plots/length_controlled.png"
    return plots


def _bar_figure(plt, series: list, features: list[str], splits: list[str], title: str, xlabel: str, path: Path,
                line: float | None = None) -> None:
    """One horizontal bar panel per split, two bars per feature: series = [(label, color, frame, column)]."""
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 0.22 * len(features) + 1.5),
                             sharey=True, squeeze=False)
    y = np.arange(len(features))
    for ax, split in zip(axes[0], splits):
        for k, (label, color, frame, column) in enumerate(series):
            part = frame.filter(pl.col("split") == split)
            value = dict(zip(part["feature"], part[column]))
            ax.barh(y + (k - 0.5) * 0.4, [value.get(f, np.nan) for f in features], height=0.4, color=color,
                    label=label)
        if line is not None:
            ax.axvline(line, color="red", linestyle="--", linewidth=1)
        ax.axvline(0, color="black", linewidth=0.5)
        ax.set_title(split)
        ax.set_xlabel(xlabel)
    axes[0][0].set_yticks(y, features, fontsize=7)
    axes[0][0].invert_yaxis()
    _family_bands(axes[0], features)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _family_bands(axes, features: list[str]) -> None:
    """Lines between TextDescriptives families, and each family's name at its first feature."""
    from dpo_eval.features import FAMILY_OF

    families = [FAMILY_OF.get(f, "other") for f in features]
    for i, family in enumerate(families):
        if i == 0 or family != families[i - 1]:
            for ax in axes:
                ax.axhline(i - 0.5, color="grey", linewidth=0.6)
            axes[-1].annotate(family, xy=(1.01, i - 0.3), xycoords=("axes fraction", "data"),
                              fontsize=7, color="grey", va="top")


def _sign_plot(stats, features, splits, folder, plots, plt):
    rows = stats.filter(pl.col("comparison") == "tuned_vs_base")
    grid = np.array([[dict(zip(rows.filter(pl.col("split") == s)["feature"],
                               rows.filter(pl.col("split") == s)["sign_agreement"])).get(f, np.nan)
                      for s in splits] for f in features], dtype=float)
    fig, ax = plt.subplots(figsize=(2 + 1.2 * len(splits), 0.22 * len(features) + 1.5))
    ax.imshow(grid, cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(len(splits)), splits)
    ax.set_yticks(range(len(features)), features, fontsize=7)
    ax.set_title("Sign agreement\n(+1 green: tuned moves like chosen)")
    fig.tight_layout()
    fig.savefig(folder / "sign_agreement.png", dpi=80)
    plt.close(fig)
    plots["Sign agreement per feature and split"] = "plots/sign_agreement.png"


def summary_markdown(summary: dict) -> str:
    """The summary as markdown (a Prefect markdown artifact)."""
    lines = ["# dpo-eval summary", ""] + [f"- {s}" for s in summary.get("sentences") or sentences(summary)]
    lines += ["", "| split | pairs | sign agreement | p | significant tuned-vs-base | significant chosen-vs-rejected |",
              "|---|---|---|---|---|---|"]
    for split, n in summary.get("n_pairs", {}).items():
        lines.append(f"| {split} | {n} | {_fmt(summary['sign_agreement'].get(split))} | "
                     f"{_fmt(summary['sign_agreement_p'].get(split))} | "
                     f"{summary['significant']['tuned_vs_base'].get(split)} | "
                     f"{summary['significant']['chosen_vs_rejected'].get(split)} |")
    return "\n".join(lines)


def stats_table_rows(stats: pl.DataFrame) -> list[dict]:
    """The stats as JSON-safe rows (a Prefect table artifact)."""
    return [_jsonable(r) for r in stats.to_dicts()]


def _fmt(x) -> str:
    return f"{x:.3g}" if _finite(x) else "n/a"


def render_html(stats: pl.DataFrame, summary: dict, plots: dict[str, str], extra_sections: list[str]) -> str:
    """A self-contained page (images referenced relative to it) that opens offline."""
    esc = html.escape
    said = "".join(f"<li>{esc(s)}</li>" for s in summary.get("sentences", []))
    figures = "".join(f'<h2>{esc(t)}</h2><img src="{esc(p)}" alt="{esc(t)}" style="max-width:100%">'
                      for t, p in plots.items())
    shown = ["feature", "split", "comparison", "n", "norm_mean_delta", "ci_low", "ci_high", "p_value",
             "q_value", "effect_size", "sign_agreement", "length_adjusted_norm_delta", "reason"]
    head = "".join(f"<th>{esc(c)}</th>" for c in shown)
    body = "".join("<tr>" + "".join(f"<td>{esc(_fmt(r[c]) if isinstance(r[c], float) else str(r[c]))}</td>"
                                    for c in shown) + "</tr>" for r in stats.select(shown).to_dicts())
    extra = "".join(extra_sections)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dpo-eval report</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}}
table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:2px 5px}}</style>
</head><body><h1>dpo-eval report</h1><ul>{said}</ul>
<p>Test of sign agreement: {esc(str(summary.get('sign_agreement_test', '')))}.</p>
{extra}{figures}<h2>Statistics</h2><table><tr>{head}</tr>{body}</table></body></html>
"""


def rewards_section(rewards: pl.DataFrame, summary: dict, out: Path) -> str:
    """An HTML section with the implicit-reward histogram (plots/implicit_rewards.png) and figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "plots").mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for split in sorted(set(rewards["split"].to_list())):
        margin = rewards.filter((pl.col("split") == split) & pl.col("scored"))["margin"].to_numpy()
        if margin.size:
            ax.hist(margin, bins=30, alpha=0.6, label=f"{split} (n={margin.size})")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("implicit reward margin  beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "plots" / "implicit_rewards.png", dpi=80)
    plt.close(fig)
    rows = "".join(f"<tr><td>{html.escape(s)}</td><td>{_fmt(v['accuracy'])}</td><td>{_fmt(v['margin_mean'])}</td>"
                   f"<td>{_fmt(v['margin_median'])}</td><td>{v['n']}</td><td>{v['ties']}</td></tr>"
                   for s, v in summary.items() if isinstance(v, dict))
    return (f"<h2>DPO implicit rewards (beta = {summary.get('beta')})</h2><table><tr><th>split</th><th>accuracy</th>"
            f"<th>mean margin</th><th>median margin</th><th>n</th><th>ties (counted wrong)</th></tr>{rows}</table>"
            '<img src="plots/implicit_rewards.png" alt="implicit reward margins" style="max-width:100%">')
