"""Evaluation curves across checkpoints: sign agreement, significant features, implicit-reward accuracy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl

from dpo_eval.errors import DpoEvalError


def checkpoint_step(adapter: str | Path) -> int | None:
    """The training step of a checkpoint: its metadata, else the N of a `checkpoint-N` folder."""
    from dpo_eval.checkpoint_meta import read_metadata

    step = read_metadata(adapter).get("step")
    if step is not None:
        return int(step)
    match = re.search(r"checkpoint-(\d+)$", str(adapter).rstrip("/"))
    return int(match.group(1)) if match else None


def collect(run_dirs: list[Path], split: str = "valid") -> pl.DataFrame:
    """One row per evaluated checkpoint, ordered by step."""
    rows = []
    for run in run_dirs:
        summary_path, config_path = Path(run) / "summary.json", Path(run) / "config.json"
        if not summary_path.is_file() or not config_path.is_file():
            raise DpoEvalError(f"{run}: not a dpo-eval run directory (no summary.json/config.json)")
        summary = json.loads(summary_path.read_text())
        adapter = json.loads(config_path.read_text())["config"]["model"]["adapter"]
        reward = (summary.get("implicit_reward") or {}).get(split) or {}
        rows.append({"run": str(run), "adapter": adapter, "step": checkpoint_step(adapter),
                     "sign_agreement": (summary.get("sign_agreement") or {}).get(split),
                     "sign_agreement_p": (summary.get("sign_agreement_p") or {}).get(split),
                     "significant": summary["significant"]["tuned_vs_base"].get(split),
                     "significant_toward_chosen": (summary.get("significant_toward_chosen") or {}).get(split),
                     "reward_accuracy": reward.get("accuracy")})
    schema = {"run": pl.String, "adapter": pl.String, "step": pl.Int64, "sign_agreement": pl.Float64,
              "sign_agreement_p": pl.Float64, "significant": pl.Int64, "significant_toward_chosen": pl.Int64,
              "reward_accuracy": pl.Float64}
    return pl.DataFrame(rows, schema=schema).sort("step", nulls_last=True)


def plot_trend(table: pl.DataFrame, path: Path, split: str = "valid") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = table["step"].to_list()
    x = [s if s is not None else i for i, s in enumerate(steps)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, column, title in zip(axes, ("sign_agreement", "significant", "reward_accuracy"),
                                 ("sign agreement", "features moved (q < alpha)", "implicit-reward accuracy")):
        ax.plot(x, table[column].to_list(), marker="o")
        ax.set_title(f"{title} ({split})")
        ax.set_xlabel("training step")
    axes[0].axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes[2].axhline(0.5, color="grey", linestyle="--", linewidth=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_trend(run_dirs: list[Path], out: Path, split: str = "valid") -> pl.DataFrame:
    """trend.csv, trend.json and trend.png in `out`."""
    table = collect(run_dirs, split)
    out.mkdir(parents=True, exist_ok=True)
    table.write_csv(out / "trend.csv")
    (out / "trend.json").write_text(json.dumps(table.to_dicts(), indent=2))
    plot_trend(table, out / "trend.png", split)
    return table
