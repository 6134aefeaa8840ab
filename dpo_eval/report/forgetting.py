"""The forgetting check in the report: per-task deltas (tuned - base accuracy) with their paired CIs.

`forgetting_section(result, run_dir)` draws plots/forgetting_deltas.png and returns the report Section (a
table per task and metric, what each number is, and a headline); `forgetting_markdown(result)` is the same
table for a Prefect artifact; `write_forgetting_report(run_dir, result)` adds the section to the run's
report through report.add_section (replacing an earlier forgetting section), so it sits beside the rest
of an evaluation's report or makes a page of its own in a folder of its own.
"""

from __future__ import annotations

import math
from pathlib import Path

from dpo_eval.report.page import Section, add_section

SECTION_ID = "forgetting"
PLOT = "plots/forgetting_deltas.png"
ALPHA = 0.05
COLUMNS = ["task", "metric", "n", "base", "tuned", "delta", "ci_low", "ci_high", "base only", "tuned only",
           "McNemar p", "q"]


def _rows(result: dict) -> list[list]:
    """One row per task and metric, the task's primary metric first and named so; q is q_primary on a primary row
    (BH across the tasks' primary metrics) and q_value on a secondary one (BH across the tasks reporting it)."""
    rows = []
    for task, metrics in sorted((result.get("tasks") or {}).items()):
        for metric, s in sorted(metrics.items(), key=lambda item: (not item[1].get("primary", True), item[0])):
            primary = s.get("primary", True)  # a result written before primaries: every metric as before
            name = f"{metric} (primary)" if primary and "primary" in s else metric if primary else f"{metric} (secondary)"
            q = s.get("q_primary", s.get("q_value")) if primary else s.get("q_value")
            rows.append([task, name, s["n"], s["base"], s["tuned"], s["delta"], s["ci_low"], s["ci_high"],
                         s["base_only"], s["tuned_only"], s["p_value"], q, primary])
    return rows


def _significant(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value < ALPHA


def headline(result: dict) -> str:
    """One sentence: on how many tasks the tuned model is significantly worse / better (q < ALPHA), each task judged
    on its primary metric alone (one look per task)."""
    rows = [r for r in _rows(result) if r[12]]
    if not rows:
        return "No benchmark task ran to the end: nothing to compare."
    worse = sorted({f"{r[0]} on {r[1].removesuffix(' (primary)')}" for r in rows if _significant(r[11]) and r[5] < 0})
    better = sorted({f"{r[0]} on {r[1].removesuffix(' (primary)')}" for r in rows if _significant(r[11]) and r[5] > 0})
    tasks = len({r[0] for r in rows})
    said = f"Over {tasks} benchmark task(s), the tuned model is significantly worse than its base (q < {ALPHA}) on "
    said += f"{len(worse)} ({', '.join(worse)})" if worse else "none"
    said += f" and better on {len(better)} ({', '.join(better)})." if better else " and better on none."
    return said


def delta_plot(result: dict, run_dir: Path) -> Path:
    """Horizontal CI bars of delta per task and metric, a line at 0; red where q < ALPHA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(result)
    path = Path(run_dir) / PLOT
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 0.35 * max(1, len(rows)) + 1.2))
    for y, row in enumerate(rows):
        delta, low, high, q = row[5], row[6], row[7], row[11]
        color = "#c44e52" if _significant(q) else "#4c72b0"
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            ax.plot([low, high], [y, y], color=color, linewidth=2)
        ax.plot([delta], [y], "o", color=color)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [f"{r[0]} ({r[1]})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(-1, 1)
    ax.set_xlabel("tuned - base accuracy, with its paired 95% CI (red: BH q < 0.05)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def forgetting_section(result: dict, run_dir: Path) -> Section:
    """The report section (and its plot, written under run_dir)."""
    delta_plot(result, run_dir)
    paragraphs = [
        headline(result),
        "Every task runs through lm-evaluation-harness on the base (adapter disabled) and on the tuned model "
        "from one load. Per question both answers are kept, so the comparison is paired: delta = tuned - base "
        f"accuracy; CI: {result.get('ci_method')}; base only / tuned only: questions only that model got right; "
        f"p: {result.get('p_method')}; q: on a task's primary metric, Benjamini-Hochberg across the tasks' primary "
        f"metrics (the verdict reads only these); on a secondary metric, {result.get('q_family')}. "
        f"{result.get('primary_rule', '')}",
    ]
    for line in (result.get("failed") or {}).values():
        paragraphs.append("Not run: " + line)
    return Section(SECTION_ID, "Did it forget? Benchmark accuracy, tuned vs base", paragraphs, COLUMNS,
                   [r[:len(COLUMNS)] for r in _rows(result)], [{"src": PLOT, "alt": "tuned - base accuracy per benchmark task, with CIs"}])


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.3g}"
    return "" if value is None else str(value)


def forgetting_markdown(result: dict) -> str:
    """The headline and the table as markdown (a Prefect artifact)."""
    lines = ["# dpo-eval: did it forget?", "", headline(result), "", "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(v) for v in row[:len(COLUMNS)]) + " |" for row in _rows(result)]
    lines += [f"\nNot run: {line}" for line in (result.get("failed") or {}).values()]
    return "\n".join(lines)


def write_forgetting_report(run_dir: Path, result: dict) -> Path:
    """Add (or replace) the forgetting section of run_dir's report; returns report.html."""
    return add_section(Path(run_dir), forgetting_section(result, run_dir))
