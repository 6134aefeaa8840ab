"""What the report page shows, as plain data for the template: the verdict's claims (each with the anchor of
the section that backs it), the statistics table's rows with their sort keys, the normalised-delta chart's
geometry (drawn as inline SVG) and images as data: URIs, so report.html is one file that opens offline."""

from __future__ import annotations

import base64
import math
import mimetypes
from pathlib import Path

import polars as pl

from dpo_eval.jsonsafe import finite
from dpo_eval.report.plots import ordered_features, splits_of

TABLE_COLUMNS = ["feature", "family", "split", "comparison", "n", "norm_mean_delta", "ci_low", "ci_high", "p_value",
                 "q_value", "effect_size", "sign_agreement", "length_adjusted_norm_delta", "reason"]
TEXT_COLUMNS = {"feature", "family", "split", "comparison", "reason"}
COMPARISONS = (("chosen_vs_rejected", "chosen - rejected", "#4c72b0"), ("tuned_vs_base", "tuned - base", "#dd8452"))
HELD_OUT = "valid"


def _f(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if finite(x) else "n/a"


def _p(x) -> str:
    return f"{x:.3g}" if finite(x) else "n/a"


def data_uri(run_dir: Path | None, src: str) -> str | None:
    """`src` (a path relative to the run directory) as a data: URI; None when there is no such file. An
    address that is already a data: URI is kept; any other address (http, file) is never followed."""
    if src.startswith("data:"):
        return src
    if run_dir is None or "://" in src:
        return None
    path = Path(run_dir) / src
    if not path.is_file():
        return None
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def verdict_cards(summary: dict, stats: pl.DataFrame) -> list[dict]:
    """The numbers a reader looks for first, each {label, value, note, href}; only numbers summary.json holds."""
    alpha = summary.get("alpha", 0.05)
    labels = (summary.get("labels") or {}).get("source", "data set")
    n_features = summary.get("n_features", 0)
    moved = (summary.get("significant") or {}).get("tuned_vs_base") or {}
    toward = summary.get("significant_toward_chosen") or {}
    cards = []
    for split in splits_of(stats):
        note = f"q < {alpha:g}, {(summary.get('n_pairs') or {}).get(split, 'n/a')} pairs"
        if labels != "none" and split in toward:
            note = f"{toward[split]} of them toward chosen; " + note
        cards.append({"label": f"features moved ({split})", "value": f"{moved.get(split, 0)} of {n_features}",
                      "note": note, "href": "#moved"})
    if labels != "none":
        for split, value in (summary.get("sign_agreement") or {}).items():
            cards.append({"label": f"sign agreement ({split})", "value": _f(value),
                          "note": f"p = {_p((summary.get('sign_agreement_p') or {}).get(split))}; chance is 0.5",
                          "href": "#plot-sign_agreement"})
    rewards = {s: v for s, v in (summary.get("implicit_reward") or {}).items() if isinstance(v, dict)}
    for split in [HELD_OUT] if HELD_OUT in rewards else list(rewards):
        block = rewards[split]
        cards.append({"label": f"implicit-reward accuracy ({split}{', held out' * (split == HELD_OUT)})",
                      "value": _f(block.get("accuracy")),
                      "note": f"{block.get('n', 'n/a')} pairs; mean margin {_f(block.get('margin_mean'), 3)}",
                      "href": "#implicit_rewards"})
    for split, block in ((summary.get("judge") or {}).get("splits") or {}).items():
        tb, cr = block.get("tuned_vs_base") or {}, block.get("chosen_vs_rejected") or {}
        if not tb:
            continue
        calibration = (f"calibration on the labels {_f(cr.get('agreement'))} [{_f(cr.get('ci_low'))}, "
                       f"{_f(cr.get('ci_high'))}] over {cr.get('n')} pairs" if cr.get("n")
                       else "calibration on the labels not measured: read with care")
        cards.append({"label": f"LLM judge win rate, tuned vs base ({split})", "value": _f(tb.get("win_rate")),
                      "note": f"CI [{_f(tb.get('ci_low'))}, {_f(tb.get('ci_high'))}], {tb.get('n')} pairs; "
                              + calibration, "href": "#judge"})
    return cards


def verdict_lines(summary: dict, sentences: list[str]) -> list[dict]:
    """The headline sentences, then the judges', the implicit rewards' and forgetting's, each {text, href}."""
    labels = (summary.get("labels") or {}).get("source", "data set")
    anchors = ["#moved", "#stats-table"] if labels == "none" else ["#moved", "#plot-sign_agreement", "#stats-table"]
    lines = [{"text": s, "href": anchors[min(i, len(anchors) - 1)]} for i, s in enumerate(sentences)]
    rewards = {s: v for s, v in (summary.get("implicit_reward") or {}).items() if isinstance(v, dict)}
    if rewards:
        said = "; ".join(f"{_f(v.get('accuracy'))} on {s} ({v.get('n', 'n/a')} pairs"
                         + (", the held-out split" if s == HELD_OUT else "") + ")" for s, v in rewards.items())
        lines.append({"text": "DPO implicit-reward accuracy (share of pairs where the tuned model prefers chosen "
                              f"over rejected more than its base does): {said}.", "href": "#implicit_rewards"})
    judges = list(summary.get("judge_headline") or [])
    hrefs = ["#reward_model"] * bool(summary.get("reward_model")) + ["#judge"] * bool(summary.get("judge"))
    for i, text in enumerate(judges):
        lines.append({"text": text, "href": hrefs[i] if i < len(hrefs) else "#judge"})
    forgetting = (summary.get("forgetting") or {}).get("headline")
    if forgetting:
        lines.append({"text": forgetting, "href": "#forgetting"})
    return lines


def _cell(column: str, value) -> dict:
    if column in TEXT_COLUMNS:
        text = "" if value is None else str(value)
        return {"text": text, "sort": text}
    if not finite(value):
        return {"text": "", "sort": ""}
    text = str(value) if isinstance(value, int) else f"{value:.3g}"
    return {"text": text, "sort": repr(float(value))}


def stats_table(stats: pl.DataFrame, alpha: float) -> dict:
    """Every feature x split x comparison row with the text shown and the key it sorts by (numbers: the full
    float; NaN: empty, sorted last), its family and whether q < alpha."""
    columns = [c for c in TABLE_COLUMNS if c in stats.columns]
    rows = []
    for r in stats.select(columns).to_dicts():
        q = r.get("q_value")
        rows.append({"family": r.get("family") or "other", "significant": finite(q) and q < alpha,
                     "cells": [_cell(c, r[c]) for c in columns]})
    families = sorted({r["family"] for r in rows})
    numeric = [c not in TEXT_COLUMNS for c in columns]
    return {"columns": columns, "numeric": numeric, "rows": rows, "families": families}


def _nice(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is >= x."""
    power = 10 ** math.floor(math.log10(x))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= x)


def axis_limit(deltas: list[float]) -> float:
    """Half-width of the x axis: wide enough for 90% of the deltas with room to spare, so one extreme
    feature does not squash the rest against zero (the few beyond are drawn at the edge, marked)."""
    sizes = sorted(abs(v) for v in deltas if finite(v))
    if not sizes:
        return 1.0
    robust = sizes[min(len(sizes) - 1, int(0.9 * len(sizes)))] * 1.5
    return _nice(max(0.1, min(robust, sizes[-1] * 1.05)))


def delta_chart(stats: pl.DataFrame, alpha: float, row_height: int = 14, panel: int = 330, label: int = 250,
                gap: int = 50) -> dict | None:
    """Geometry of the normalised-delta chart: one panel per split, one row per feature grouped by family,
    a dot per comparison (filled where q < alpha) with its CI as a line; a delta beyond the axis is a
    triangle at the edge. None when no delta is finite."""
    features, splits = ordered_features(stats), splits_of(stats)
    keep = stats.filter(pl.col("norm_mean_delta").is_not_nan() & pl.col("norm_mean_delta").is_not_null())
    if keep.height == 0:
        return None
    limit = axis_limit(keep["norm_mean_delta"].to_list())
    family_of = dict(zip(stats["feature"], stats["family"])) if "family" in stats.columns else {}
    cells = {(r["feature"], r["split"], r["comparison"]): r for r in stats.iter_rows(named=True)}
    top = 34
    rows, y, last = [], top, None
    for feature in features:
        family = family_of.get(feature) or "other"
        if family != last:
            rows.append({"kind": "family", "y": y + row_height - 3, "text": family})
            y += row_height
            last = family
        marks = []
        for k, split in enumerate(splits):
            x0 = label + k * (panel + gap)
            for j, (comparison, name, color) in enumerate(COMPARISONS):
                r = cells.get((feature, split, comparison))
                if r is None or not finite(r["norm_mean_delta"]):
                    continue

                def x(v, x0=x0):
                    return round(x0 + (max(-limit, min(limit, v)) + limit) / (2 * limit) * panel, 1)

                low, high = r.get("ci_low"), r.get("ci_high")
                q = r.get("q_value")
                delta = r["norm_mean_delta"]
                marks.append({"cx": x(delta), "cy": y + 4 + 5 * j, "color": color,
                              "beyond": 0 if abs(delta) <= limit else (1 if delta > 0 else -1),
                              "x1": x(low) if finite(low) else None, "x2": x(high) if finite(high) else None,
                              "filled": finite(q) and q < alpha,
                              "title": f"{feature}, {split}, {name}: {r['norm_mean_delta']:.3g} S"
                                       + (f" [{low:.3g}, {high:.3g}]" if finite(low) and finite(high) else "")
                                       + f", q = {_p(q)}"})
        rows.append({"kind": "feature", "y": y + row_height - 3, "text": feature, "marks": marks,
                     "band": y})
        y += row_height
    panels = [{"split": s, "x0": label + k * (panel + gap), "zero": label + k * (panel + gap) + panel / 2,
               "ticks": [{"x": round(label + k * (panel + gap) + (t + limit) / (2 * limit) * panel, 1),
                          "text": f"{t:g}"} for t in (-limit, -limit / 2, 0, limit / 2, limit)]}
              for k, s in enumerate(splits)]
    return {"width": label + len(splits) * (panel + gap), "label": label, "height": y + 30, "top": top, "bottom": y, "panel": panel,
            "rows": rows, "panels": panels, "limit": limit, "row_height": row_height,
            "legend": [{"name": n, "color": c} for _, n, c in COMPARISONS]}


QUESTION_TITLES = {"alignment": "Did the alignment take?", "better": "Is the tuned model better than its base?",
                   "forgetting": "Did it forget?", "gaming": "Could the gain be gaming?"}
FIXED_IDS = {"moved", "statistics", "examples", "verdict"}
# good news in green, bad news in red, whatever the word: a 'yes' to 'did it forget?' is bad news
TONES = {("alignment", "yes"): "good", ("alignment", "no"): "bad", ("better", "yes"): "good", ("better", "no"): "bad",
         ("forgetting", "yes"): "bad", ("forgetting", "no"): "good", ("gaming", "yes"): "bad", ("gaming", "no"): "good"}


def answer_rows(summary: dict | None, section_ids: set[str]) -> list[dict]:
    """summary.json's four answers for the page's top, each {key, title, answer, because, rule, href}; href is the
    first of the answer's evidence sections present on the page (None where none is)."""
    block = (summary or {}).get("verdict") or {}
    present = FIXED_IDS | set(section_ids)
    rows = []
    for key, title in QUESTION_TITLES.items():
        a = block.get(key)
        if not isinstance(a, dict):
            continue
        href = next((f"#{e}" for e in a.get("evidence", []) if e in present), None)
        answer = a.get("answer", "unknown")
        rows.append({"key": key, "title": title, "answer": answer, "because": a.get("because", ""),
                     "rule": a.get("rule", ""), "href": href, "tone": TONES.get((key, answer), "open")})
    return rows


LABEL_ROWS = {"base": 11, "tuned": 23, "rejected": 50, "chosen": 50}  # base and tuned above the line, each its row
GAP_COLORS = {"rejected": "#c44e52", "chosen": "#4c72b0", "base": "#777777", "tuned": "#dd8452"}


def gap_figures(summary: dict | None, width: int = 640, margin: int = 40) -> list[dict]:
    """One line per judge with rejected at 0, chosen at 1, base and tuned where they sit (the axis widened to hold
    them), the closed share's CI as a bar from base's position; a judge whose gap is undefined gets its sentence."""
    figures = []
    for judge, g in ((summary or {}).get("gap") or {}).items():
        if not isinstance(g, dict):
            continue
        figure = {"judge": judge, "sentence": g.get("sentence", ""), "closed": None, "marks": []}
        if finite(g.get("closed")) and finite(g.get("base")) and finite(g.get("tuned")):
            positions = {"rejected": 0.0, "chosen": 1.0, "base": g["base"], "tuned": g["tuned"]}
            ci = g.get("ci") or [None, None]
            ends = [g["base"] + c for c in ci if finite(c)]  # the CI bar stays on the canvas
            low, high = min(0.0, *positions.values(), *ends), max(1.0, *positions.values(), *ends)
            span = (high - low) or 1.0

            def x(v: float, low: float = low, span: float = span) -> float:
                return round(margin + (v - low) / span * (width - 2 * margin), 1)

            figure |= {"base": g["base"], "tuned": g["tuned"], "closed": g["closed"], "width": width,
                       "x0": x(low), "x1": x(high),
                       "marks": [{"role": role, "position": v, "x": x(v), "label": f"{v:.2f}", "color": GAP_COLORS[role],
                                  "ty": LABEL_ROWS[role]} for role, v in positions.items()]}
            if finite(ci[0]) and finite(ci[1]):
                figure["ci"] = [x(g["base"] + ci[0]), x(g["base"] + ci[1])]
                figure["ci_text"] = f"closed {g['closed']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] from base's position"
        figures.append(figure)
    return figures
