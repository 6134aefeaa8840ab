"""The HTML report (one jinja2 template, autoescaped), its headline sentences, and the markdown/table
builders for Prefect artifacts.

A run directory keeps the report's parts as data: stats.parquet, summary.json and
report_sections.json (extra sections such as implicit rewards, diagnostics, the checkpoint trend).
`render_report(run_dir)` renders report.html from them; `add_section(run_dir, section)` adds or
replaces one section by its id and re-renders. Nothing ever edits a finished page.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from dpo_eval.jsonsafe import finite, jsonable
from dpo_eval.report.plots import Q_FAMILY, Plot, alpha_of, extrapolated, paired, splits_of, write_plots

SECTIONS_FILE = "report_sections.json"
POWER_ENOUGH = 0.8  # the usual planning target: below it a real shift of that size is missed too often
STATS_COLUMNS = ["feature", "split", "comparison", "n", "norm_mean_delta", "ci_low", "ci_high", "p_value",
                 "q_value", "effect_size", "sign_agreement", "length_adjusted_norm_delta", "reason"]


@dataclass
class Section:
    """A part of the report kept as data in the run directory; the template renders (and escapes) it.
    `images` are {"src": path relative to the run directory, "alt": text}; a cell equal to pass, warn
    or fail is coloured."""

    id: str
    title: str
    paragraphs: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    rows: list[list] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)


def write_outputs(stats: pl.DataFrame, summary: dict, out: Path, extra_sections: list[Section] | None = None) -> dict:
    """Write stats.parquet, stats.csv, summary.json, report_sections.json (replacing any earlier
    sections: a new evaluation starts a new report), plots/*.png and report.html into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stats.write_parquet(out / "stats.parquet")
    stats.write_csv(out / "stats.csv")
    summary = dict(summary, sentences=sentences(summary, stats))
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2))
    sections = [_as_section(s) for s in extra_sections or []]
    write_sections(out, sections)
    _write_page(out, stats, summary, sections)
    return summary


def render_report(run_dir: Path) -> Path:
    """Re-render run_dir/report.html from stats.parquet, summary.json and report_sections.json (a folder
    without statistics gets a page of its sections alone)."""
    run_dir = Path(run_dir)
    stats_file, summary_file = run_dir / "stats.parquet", run_dir / "summary.json"
    stats = pl.read_parquet(stats_file) if stats_file.is_file() else None
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    return _write_page(run_dir, stats, summary, read_sections(run_dir))


def add_section(run_dir: Path, section: Section) -> Path:
    """Add `section` to the run's report, replacing the one with the same id in place, and re-render."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    sections = read_sections(run_dir)
    ids = [s.id for s in sections]
    if section.id in ids:
        sections[ids.index(section.id)] = section
    else:
        sections.append(section)
    write_sections(run_dir, sections)
    return render_report(run_dir)


def read_sections(run_dir: Path) -> list[Section]:
    path = Path(run_dir) / SECTIONS_FILE
    return [Section(**s) for s in json.loads(path.read_text())] if path.is_file() else []


def write_sections(run_dir: Path, sections: list[Section]) -> None:
    (run_dir / SECTIONS_FILE).write_text(json.dumps([jsonable(asdict(s)) for s in sections], indent=2))


def _as_section(section) -> Section:
    if isinstance(section, Section):
        return section
    if isinstance(section, dict):
        return Section(**section)
    raise TypeError(f"a report section is a dpo_eval.report.page.Section (rendered through the template), not "
                    f"{type(section).__name__}")


def _write_page(run_dir: Path, stats: pl.DataFrame | None, summary: dict | None, sections: list[Section]) -> Path:
    if stats is None or summary is None:  # the four answers still open the page where summary.json has them
        page = render_page(sections, summary=summary, run_dir=run_dir)
    else:
        plots = write_plots(stats, summary, run_dir / "plots")
        page = render_page(sections, stats, summary, plots, run_dir=run_dir)
    path = run_dir / "report.html"
    path.write_text(page)
    return path


def render_page(sections: list[Section], stats: pl.DataFrame | None = None, summary: dict | None = None,
                plots: list[Plot] | None = None, title: str = "dpo-eval report", run_dir: Path | None = None) -> str:
    """The page from page.html.j2 (beside this module): one self-contained file that opens offline (images of run_dir
    inlined as data: URIs, the chart as inline SVG, the table's sorting and filters as inline JavaScript)."""
    import jinja2

    from dpo_eval.report import view as report_view
    from dpo_eval.report.examples import examples

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True)
    figures = [{"id": "plot-" + Path(p.src).stem, "title": p.title, "caption": p.caption,
                "src": report_view.data_uri(run_dir, p.src)} for p in plots or []
               if Path(p.src).name != "norm_mean_delta.png"]  # drawn as the SVG chart instead
    context = {"title": title, "sections": [_cells(s, run_dir) for s in sections], "plots": figures,
               "answers": report_view.answer_rows(summary, {s.id for s in sections}),
               "gaps": report_view.gap_figures(summary)}
    if stats is not None and summary is not None:
        alpha = alpha_of(summary)
        q_note = summary.get("q_family") if isinstance(summary.get("q_family"), str) else \
            f"Benjamini-Hochberg over the {Q_FAMILY}"
        said = sentences(summary, stats)
        source = summary.get("scale_source")
        context |= {"sentences": said, "sign_test": summary.get("sign_agreement_test"),
                    "reference": (summary.get("reference") or {}).get("label") or "base",
                    "cards": report_view.verdict_cards(summary, stats),
                    "verdict": report_view.verdict_lines(summary, said),
                    "alpha": alpha, "q_family": Q_FAMILY, "q_note": q_note, "moved": _moved_table(stats, alpha),
                    "extrapolated": sorted(extrapolated(summary)), "chart": report_view.delta_chart(stats, alpha),
                    "scale_note": ("S_j is the train split's std of chosen - rejected" if not isinstance(source, str)
                                   or source.startswith("train") else f"S_j: {source}"),
                    "stats_table": report_view.stats_table(stats, alpha),
                    "examples": examples(run_dir, stats, alpha) if run_dir is not None else None}
    return env.get_template("page.html.j2").render(context)


def _cells(section: Section, run_dir: Path | None = None) -> dict:
    from dpo_eval.report.view import data_uri

    return {"id": section.id, "title": section.title, "paragraphs": section.paragraphs, "columns": section.columns,
            "rows": [[_cell(v) for v in row] for row in section.rows],
            "images": [{"src": data_uri(run_dir, i.get("src", "")), "alt": i.get("alt", "")} for i in section.images]}


def _moved_table(stats: pl.DataFrame, alpha: float) -> dict:
    view = paired(stats, alpha).filter(pl.col("tb_significant"))
    view = view.sort(pl.col("split"), pl.col("tb_delta").abs(), descending=[False, True], nulls_last=True)
    columns = ["split", "feature", "tuned - base (/S)", "q tuned-vs-base", "chosen - rejected (/S)",
               "q chosen-vs-rejected", "what may be said"]
    keys = ["split", "feature", "tb_delta", "tb_q", "cr_delta", "cr_q", "direction"]
    return {"columns": columns, "rows": [[_cell(r[k]) for k in keys] for r in view.iter_rows(named=True)]}


def toward_chosen(stats: pl.DataFrame, alpha: float) -> dict[str, int]:
    """Per split: features that tuned moved significantly toward chosen, counting only features where
    chosen-vs-rejected is itself significant on that split (q < alpha for both, sign agreement +1)."""
    view = paired(stats, alpha)
    return {s: int(view.filter((pl.col("split") == s) & pl.col("tb_significant")
                               & (pl.col("direction") == "toward chosen")).height) for s in splits_of(stats)}


def sentences(summary: dict, stats: pl.DataFrame | None = None) -> list[str]:
    """Three items a practitioner can quote: what moved on each split (with the valid split's power),
    sign agreement on each split, and where chosen differs from rejected."""
    alpha = alpha_of(summary)
    n_pairs = summary.get("n_pairs", {})
    present = [s for s, n in n_pairs.items() if n]  # analysis lists an empty train split as 0 pairs
    splits = [s for s in ("train", "valid") if s in present] + [s for s in present if s not in ("train", "valid")]
    n_features = summary.get("n_features", 0)
    labels = summary.get("labels") or {"source": "data set"}
    moved, cr = summary["significant"]["tuned_vs_base"], summary["significant"]["chosen_vs_rejected"]
    first = ("Tuned moved " + " and ".join(f"{moved.get(s, 0)} of {n_features}{' features' * (i == 0)} on {s} "
                                           f"({n_pairs[s]} pairs)" for i, s in enumerate(splits))
             + f" significantly against base (Benjamini-Hochberg q < {alpha:g}, each q over the {Q_FAMILY})")
    if labels["source"] == "none":
        return [first + ".",
                "This data set holds questions without chosen or rejected answers and no reference data set was "
                "given, so there is no direction to move toward: no sign agreement, no normalised deltas (deltas "
                "are in each feature's own units), no chosen-vs-rejected statistics. Pass --reference-dataset, "
                "the preference data the checkpoint was trained on, for them."]
    if labels["source"] == "reference":
        splits_cr = f"the reference data set's {labels['reference_split']} split ({labels['reference_pairs']} pairs)"
        if stats is not None:
            toward = toward_chosen(stats, alpha)
            first += ("; of these, " + " and ".join(f"{toward.get(s, 0)} on {s}" for s in splits)
                      + f" moved toward chosen, counting only features where chosen-vs-rejected in {splits_cr} is "
                      "itself significant")
        agreement = [f"{_fmt(summary.get('sign_agreement', {}).get(s))} on {s} (over "
                     f"{summary.get('sign_agreement_features', {}).get(s, 'n/a')} features whose mean deltas are "
                     f"both nonzero, p = {_fmt(summary.get('sign_agreement_p', {}).get(s))})" for s in splits]
        any_split = splits[0] if splits else None
        return [_scale_note(summary) + first + "." + _power_sentence(summary, stats, alpha),
                f"These are questions without labels: the direction is chosen - rejected in {splits_cr}. Sign "
                "agreement between tuned-vs-base on these questions and that direction is " + " and ".join(agreement)
                + "; chance is 0.5 (prompt-level sign-flip permutation test). It counts every feature, significant "
                "or not.",
                f"Chosen differs significantly from rejected on {cr.get(any_split, 0)} features in {splits_cr} "
                f"(q < {alpha:g}); only these features have a direction for tuned to move toward."]
    if stats is not None:
        toward = toward_chosen(stats, alpha)
        first += ("; of these, " + " and ".join(f"{toward.get(s, 0)} on {s}" for s in splits)
                  + " moved toward chosen, counting only features where chosen-vs-rejected is itself significant "
                  "on that split")
    out = [_scale_note(summary) + first + "." + _power_sentence(summary, stats, alpha)]
    agreement = [f"{_fmt(summary.get('sign_agreement', {}).get(s))} on {s} (over "
                 f"{summary.get('sign_agreement_features', {}).get(s, 'n/a')} features whose mean deltas are both "
                 f"nonzero, p = {_fmt(summary.get('sign_agreement_p', {}).get(s))})" for s in splits]
    out.append("Sign agreement between tuned-vs-base and chosen-vs-rejected is " + " and ".join(agreement)
               + "; chance is 0.5 (prompt-level sign-flip permutation test). It counts every feature, significant "
               "or not.")
    out.append("Chosen differs significantly from rejected on "
               + " and ".join(f"{cr.get(s, 0)}{' features' * (i == 0)} on {s}" for i, s in enumerate(splits))
               + f" (q < {alpha:g}); only these features have a direction for tuned to move toward.")
    return out


def _scale_note(summary: dict) -> str:
    split = summary.get("split_source")
    straddle = f"The split is {split}. " if isinstance(split, str) and "both sides" in split else ""
    return straddle + _scale_source_note(summary)


def _scale_source_note(summary: dict) -> str:
    source = summary.get("scale_source")
    if not isinstance(source, str) or source.startswith("train") or source.startswith("none"):
        return ""
    if source.startswith("the reference data set"):
        return f"S_j is the std of chosen - rejected in {source}. "
    if source.startswith("valid"):
        return ("There is no train split (every pair is valid, as when a checkpoint is evaluated on a data set "
                "other than its training set): S_j is the valid split's own std of chosen - rejected, not the train "
                "std, so normalised deltas are not comparable with runs that have a train split. ")
    return f"S_j is not the train std of chosen - rejected: {source}. "


def _power_sentence(summary: dict, stats: pl.DataFrame | None, alpha: float) -> str:
    said = []
    for split, power in (summary.get("power") or {}).items():
        if split == "train" or not isinstance(power, dict) or not finite(power.get("power")):
            continue
        # What the figure is, exactly: one feature's unadjusted test (before BH), from the t-test's power at the
        # Wilcoxon test's efficiency; with BH across the features, and at n <= 12 where the approximation
        # overstates even the unadjusted power, a single shifted feature is found less often.
        unit = power.get("unit", "pairs")  # the tuned-vs-base test counts prompts (one answer per prompt)
        text = (f"{split}: {power.get('n')} {unit}; at this size one feature shifted by {power.get('shift', 0.5):g} S "
                f"reaches p < {alpha:g} in its own test (before the correction across features) about "
                f"{power['power']:.0%} of the time, and less often as significant after it")
        if (power.get("n") or 0) <= 12:
            text += " (at so few pairs this approximation overstates even that)"
        if power["power"] < POWER_ENOUGH:
            text += f", too few pairs to detect reliably on {split} effects of that size seen on train"
            if stats is not None:
                seen = paired(stats, alpha).filter((pl.col("split") == "train") & pl.col("tb_significant"))
                sizes = seen["tb_delta"].abs().to_numpy()
                sizes = sizes[np.isfinite(sizes)]
                if sizes.size:
                    text += f" (the {sizes.size} shifts significant on train have a median size of " \
                            f"{np.median(sizes):.2g} S)"
        said.append(text + ".")
    return "".join(" " + s for s in said)


def summary_markdown(summary: dict) -> str:
    """The summary as markdown (a Prefect markdown artifact)."""
    lines = ["# dpo-eval summary", ""] + answers_markdown(summary)
    lines += [f"- {s}" for s in summary.get("sentences") or sentences(summary)]
    if (summary.get("reference") or {}).get("adapter"):
        lines += ["", f"The 'base' side of every comparison is {summary['reference']['label']}."]
    lines += ["", "| split | pairs | sign agreement | p | significant tuned-vs-base | significant chosen-vs-rejected |",
              "|---|---|---|---|---|---|"]
    for split, n in summary.get("n_pairs", {}).items():
        lines.append(f"| {split} | {n} | {_fmt(summary['sign_agreement'].get(split))} | "
                     f"{_fmt(summary['sign_agreement_p'].get(split))} | "
                     f"{summary['significant']['tuned_vs_base'].get(split)} | "
                     f"{summary['significant']['chosen_vs_rejected'].get(split)} |")
    return "\n".join(lines)


def answers_markdown(summary: dict) -> list[str]:
    """The four answers (summary.json's `verdict`) and the gap line as markdown lines, first in every artifact."""
    from dpo_eval.report.view import QUESTION_TITLES

    block = summary.get("verdict") or {}
    lines = [f"**{title}** {block[key]['answer']}: {block[key]['because']}  " for key, title in QUESTION_TITLES.items()
             if isinstance(block.get(key), dict)]
    if block.get("gap_line"):
        lines.append(f"{block['gap_line']}  ")
    return lines + [""] if lines else []


def stats_table_rows(stats: pl.DataFrame) -> list[dict]:
    """The stats as JSON-safe rows (a Prefect table artifact)."""
    return [jsonable(r) for r in stats.to_dicts()]


def rewards_section(rewards: pl.DataFrame, summary: dict, out: Path, beta: float | None = None,
                    max_length: int | None = None) -> Section:
    """The implicit-reward section: a table per split from `summary` ({split: {accuracy, margin_mean, ...}})
    and the margin histogram, written to out/plots/implicit_rewards.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (Path(out) / "plots").mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for split in sorted(set(rewards["split"].to_list())):
        margin = rewards.filter((pl.col("split") == split) & pl.col("scored"))["margin"].to_numpy()
        if margin.size:
            ax.hist(margin, bins=30, alpha=0.6, label=f"{split} (n={margin.size})")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("implicit reward margin  beta * [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(out) / "plots" / "implicit_rewards.png", dpi=80)
    plt.close(fig)
    beta = summary.get("beta") if beta is None else beta  # the old shape kept beta among the splits
    rows = [[s, v.get("accuracy"), v.get("margin_mean"), v.get("margin_median"), v.get("n"), v.get("ties"),
             v.get("skipped")]
            for s, v in summary.items() if isinstance(v, dict)]
    said = ["Accuracy: the share of pairs whose margin is above 0 (ties count as wrong)."]
    if max_length is not None:
        said.append(f"Each prompt + answer sequence is cut to its first {max_length} tokens, as trl does in "
                    "training; pairs whose prompt alone fills that are skipped.")
    return Section("implicit_rewards", f"DPO implicit rewards (beta = {_fmt(beta)})", said,
                   ["split", "accuracy", "mean margin", "median margin", "n", "ties (counted wrong)", "skipped"], rows,
                   [{"src": "plots/implicit_rewards.png", "alt": "implicit reward margins"}])


def _fmt(x) -> str:
    return f"{x:.3g}" if finite(x) else "n/a"


def _cell(value) -> str:
    if value is None:
        return ""
    return _fmt(value) if isinstance(value, float) else str(value)
