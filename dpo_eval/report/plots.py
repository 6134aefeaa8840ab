"""The report's figures: what each bar, line and colour shows is decided by the statistics (alpha,
significance in both comparisons, the length-sign share), and each figure says so in its caption."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from dpo_eval.scoring.features import FAMILIES, FEATURE_FAMILY

SPLITS = ("train", "valid")
COLORS = {"chosen_vs_rejected": "#4c72b0", "tuned_vs_base": "#dd8452"}
DEFAULT_ALPHA = 0.05  # only for a summary written before alpha was recorded
EXTRAPOLATION_SHARE = 0.9  # length deltas this one-sided leave "equal length" outside the data
Q_FAMILY = "features of one comparison and split"


@dataclass
class Plot:
    """One figure of the report: its file (relative to the run directory) and what it shows."""

    title: str
    src: str
    caption: str
    lines: dict[str, list[float]] = field(default_factory=dict)  # split: x of the significance lines drawn
    data: dict = field(default_factory=dict)


def alpha_of(summary: dict) -> float:
    alpha = summary.get("alpha")
    return float(alpha) if isinstance(alpha, (int, float)) and 0 < alpha < 1 else DEFAULT_ALPHA


def ordered_features(stats: pl.DataFrame) -> list[str]:
    present = list(dict.fromkeys(stats["feature"].to_list()))
    known = [f for names in FAMILIES.values() for f in names if f in present]
    return known + [f for f in present if f not in known]


def splits_of(stats: pl.DataFrame) -> list[str]:
    present = set(stats["split"].to_list())
    return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def paired(stats: pl.DataFrame, alpha: float) -> pl.DataFrame:
    """One row per feature x split with both comparisons side by side and what may be said of it:
    `direction` is "toward chosen" / "away from chosen" only where chosen-vs-rejected is itself
    significant (q < alpha) on that split; tuned-vs-base significance is `tb_significant`."""
    keep = ["feature", "split", "n", "norm_mean_delta", "q_value"]
    tb = stats.filter(pl.col("comparison") == "tuned_vs_base").select(keep + ["sign_agreement"]).rename(
        {"n": "tb_n", "norm_mean_delta": "tb_delta", "q_value": "tb_q"})
    cr = stats.filter(pl.col("comparison") == "chosen_vs_rejected").select(keep).rename(
        {"n": "cr_n", "norm_mean_delta": "cr_delta", "q_value": "cr_q"})
    both = tb.join(cr, on=["feature", "split"], how="left").with_columns(
        pl.col("tb_q", "cr_q").cast(pl.Float64).fill_null(float("nan")))
    # NaN q (no test) is never significant: polars orders NaN above every number
    tb_sig, cr_sig = pl.col("tb_q") < alpha, pl.col("cr_q") < alpha
    return both.with_columns(
        tb_sig.alias("tb_significant"), cr_sig.alias("cr_significant"),
        pl.when(cr_sig & (pl.col("sign_agreement") == 1)).then(pl.lit("toward chosen"))
        .when(cr_sig & (pl.col("sign_agreement") == -1)).then(pl.lit("away from chosen"))
        .otherwise(pl.lit("no direction: chosen vs rejected not significant")).alias("direction"))


def write_plots(stats: pl.DataFrame, summary: dict, folder: Path) -> list[Plot]:
    """The five figures as PNG files under `folder` (the run's plots/)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    alpha = alpha_of(summary)
    features, splits = ordered_features(stats), splits_of(stats)
    line = -math.log10(alpha)
    logs = stats.with_columns((-pl.col("p_value").log10()).alias("neg_log10_p"),
                              (-pl.col("q_value").log10()).alias("neg_log10_q"))
    tuned = stats.filter(pl.col("comparison") == "tuned_vs_base")
    n_tests = {s: stats.filter((pl.col("split") == s) & (pl.col("comparison") == "tuned_vs_base")).height
               for s in splits}

    def series(frame, column):
        return [(c.replace("_", " "), color, frame.filter(pl.col("comparison") == c), column)
                for c, color in COLORS.items()]

    source = summary.get("scale_source")
    scale_note = ("S_j is the train split's std of chosen - rejected" if not isinstance(source, str)
                  or source.startswith("train") else f"S_j: {source}")
    specs = [
        ("Normalised mean deltas per feature (features grouped by family)", "norm_mean_delta.png",
         "mean delta / S_j", series(stats, "norm_mean_delta"), None, {},
         f"Bars: mean delta of each comparison divided by S_j; {scale_note}."),
        ("-log10 p (Wilcoxon signed-rank)", "neg_log10_p.png", "-log10 p", series(logs, "neg_log10_p"), line, {},
         f"Red dashed line: p = alpha = {alpha:g} (uncorrected; the q-values below correct for the number of "
         "features)."),
        ("-log10 q (Benjamini-Hochberg)", "neg_log10_q.png", "-log10 q", series(logs, "neg_log10_q"), line, {},
         f"Each q is Benjamini-Hochberg over the {Q_FAMILY} ("
         + ", ".join(f"{n} on {s}" for s, n in n_tests.items()) + f"). Red dashed line: q = alpha = {alpha:g}."),
    ]
    plots = []
    for title, file, xlabel, bars, at, titles, caption in specs:
        drawn = _bar_figure(plt, bars, features, splits, title, xlabel, folder / file, at, titles)
        plots.append(Plot(title, f"plots/{file}", caption, drawn))
    plots.append(_sign_plot(plt, stats, features, splits, alpha, folder))
    plots.append(_length_plot(plt, tuned, features, splits, summary, folder))
    return plots


def extrapolated(summary: dict) -> dict[str, float]:
    """Splits whose tuned - base length deltas nearly all have one sign: {split: share of the majority sign}."""
    shares = summary.get("length_sign_share") or {}
    return {s: v for s, v in shares.items() if isinstance(v, (int, float)) and v >= EXTRAPOLATION_SHARE}


def _length_plot(plt, tuned, features, splits, summary, folder) -> Plot:
    shares = summary.get("length_sign_share") or {}
    one_sided = {s: v for s, v in extrapolated(summary).items() if s in splits}
    titles = {s: f"{s}: extrapolated ({share:.0%} of length deltas one sign)" for s, share in one_sided.items()}
    title = "Length-controlled tuned-vs-base deltas (intercept of delta ~ n_tokens delta)"
    _bar_figure(plt, [("raw", COLORS["tuned_vs_base"], tuned, "norm_mean_delta"),
                      ("at equal length", "#55a868", tuned, "length_adjusted_norm_delta")],
                features, splits, title, "tuned - base, / S_j", folder / "length_controlled.png", None, titles)
    caption = ("At equal length: the intercept of the regression of each feature's tuned - base delta on the "
               "n_tokens delta, i.e. the delta predicted for a pair whose answers have the same length.")
    if one_sided:
        caption += " " + " ".join(
            f"On {s}, {share:.0%} of the pairs' length deltas have the same sign, so equal length lies outside "
            "the data and the equal-length values there are an extrapolation, not an observation."
            for s, share in one_sided.items())
    elif not shares:
        caption += " (How one-sided the length deltas are was not recorded: read with care.)"
    return Plot("Length-controlled deltas", "plots/length_controlled.png", caption,
                data={"extrapolated": sorted(one_sided)})


def _bar_figure(plt, series: list, features: list[str], splits: list[str], title: str, xlabel: str, path: Path,
                line: float | None = None, titles: dict[str, str] | None = None) -> dict[str, list[float]]:
    """One horizontal bar panel per split, two bars per feature: series = [(label, color, frame, column)].
    Returns, per split, the x of the significance lines as drawn (read back from the axes)."""
    fig, axes = plt.subplots(1, len(splits), figsize=(6 * len(splits), 0.22 * len(features) + 1.5),
                             sharey=True, squeeze=False)
    y = np.arange(len(features))
    drawn = {}
    for ax, split in zip(axes[0], splits):
        for k, (label, color, frame, column) in enumerate(series):
            part = frame.filter(pl.col("split") == split)
            value = dict(zip(part["feature"], part[column]))
            ax.barh(y + (k - 0.5) * 0.4, [value.get(f, np.nan) for f in features], height=0.4, color=color,
                    label=label)
        if line is not None:
            ax.axvline(line, color="red", linestyle="--", linewidth=1, gid="significance")
        ax.axvline(0, color="black", linewidth=0.5)
        drawn[split] = [float(l.get_xdata()[0]) for l in ax.get_lines() if l.get_gid() == "significance"]
        ax.set_title((titles or {}).get(split, split), fontsize=9)
        ax.set_xlabel(xlabel)
    axes[0][0].set_yticks(y, features, fontsize=7)
    axes[0][0].invert_yaxis()
    _family_bands(axes[0], features)
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return drawn


def _family_bands(axes, features: list[str]) -> None:
    """Lines between TextDescriptives families, and each family's name at its first feature."""
    families = [FEATURE_FAMILY.get(f, "other") for f in features]
    for i, family in enumerate(families):
        if i == 0 or family != families[i - 1]:
            for ax in axes:
                ax.axhline(i - 0.5, color="grey", linewidth=0.6)
            axes[-1].annotate(family, xy=(1.01, i - 0.3), xycoords=("axes fraction", "data"),
                              fontsize=7, color="grey", va="top")


def _sign_plot(plt, stats, features, splits, alpha, folder) -> Plot:
    """Colour only where both comparisons are significant: elsewhere the sign of a mean is noise."""
    view = paired(stats, alpha)
    cell = {(r["feature"], r["split"]): r for r in view.iter_rows(named=True)}
    raw = np.array([[cell.get((f, s), {}).get("sign_agreement", np.nan) for s in splits] for f in features],
                   dtype=float)
    both = np.array([[bool(cell.get((f, s), {}).get("tb_significant")) and bool(cell.get((f, s), {})
                      .get("cr_significant")) for s in splits] for f in features], dtype=bool)
    shown = np.where(both, raw, np.nan)
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#e6e6e6")
    fig, ax = plt.subplots(figsize=(3 + 1.2 * len(splits), 0.22 * len(features) + 1.8))
    ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=-1, vmax=1, aspect="auto")
    for i in range(len(features)):
        for k in range(len(splits)):
            if np.isfinite(raw[i, k]) and raw[i, k] != 0:
                ax.text(k, i, "+" if raw[i, k] > 0 else "-", ha="center", va="center", fontsize=8,
                        color="black" if both[i, k] else "grey")
    ax.set_xticks(range(len(splits)), splits)
    ax.set_yticks(range(len(features)), features, fontsize=7)
    ax.set_title(f"Sign agreement\ncoloured where both comparisons have q < {alpha:g}", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "sign_agreement.png", dpi=80)
    plt.close(fig)
    caption = (f"Green (+1): tuned moves like chosen, and both tuned-vs-base and chosen-vs-rejected are significant "
               f"on that split (q < {alpha:g}); red (-1): significant in both, opposite directions. Grey: not "
               "significant in both comparisons; the small sign is the raw agreement of the two mean deltas, "
               "which alone says nothing.")
    return Plot("Sign agreement per feature and split", "plots/sign_agreement.png", caption,
                data={"features": features, "splits": splits, "shown": shown.tolist()})
