"""The offline demo: a project-written preference set, QLoRA DPO training, evaluation of every
checkpoint, the report and a short summary. Runs on 2 CPU cores in a few minutes."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import polars as pl
from prefect import flow

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.demo import write_demo_dataset
from dpo_eval.training import TrainSpec
from flows.evaluate import evaluate_checkpoint
from flows.train import train_dpo_flow
from flows.watch import find_checkpoints, watch_checkpoints


class Progress:
    def __init__(self, total: int):
        self.total, self.start, self.index = total, time.perf_counter(), 0

    def stage(self, text: str) -> None:
        self.index += 1
        print(f"[{self.index}/{self.total}] {text}  (t = {time.perf_counter() - self.start:.0f} s)", flush=True)


def base_sample(base: str) -> str:
    from dpo_eval.config import GenerationSpec as G
    from dpo_eval.generation import generate_answers
    from dpo_eval.models import load_model

    loaded = load_model(ModelSpec(base=base, quantization="none", compute_dtype="float32"))
    pairs = pl.DataFrame({"pair_id": ["s"], "split": ["train"], "system": [""], "prompt": ["Once upon a time"],
                          "chosen": ["c"], "rejected": ["r"], "messages": [None]},
                         schema_overrides={"messages": pl.String})
    return generate_answers(loaded.model, loaded.tokenizer, pairs, G(max_new_tokens=30))["answer"][0]


@flow(name="dpo-eval-demo")
def demo(out: str = "runs/demo", base: str = "../shared/models/stories260k", pairs: int = 400,
         steps: int = 60, save_every: int = 20, learning_rate: float = 2e-4, sft_weight: float = 0.0,
         scoring_cache: str | None = None) -> dict:
    """Train a QLoRA DPO adapter on the demo preferences and show what it changed."""
    root = Path(out)
    progress = Progress(5)
    progress.stage(f"base model {base}: it writes \"{base_sample(base)[:70]}...\"")
    data = write_demo_dataset(root / "data" / "demo_pairs.jsonl", n=pairs)
    progress.stage(f"preference data: {pairs} project-written pairs (short sentences chosen over run-ons) -> {data}")
    dataset = DatasetSpec(source=str(data))
    shutil.rmtree(root / "train", ignore_errors=True)
    train_dpo_flow(TrainSpec(base=base, dataset=dataset, out=root / "train", steps=steps, save_every=save_every,
                             batch_size=8, learning_rate=learning_rate, sft_weight=sft_weight, max_length=256))
    checkpoints = find_checkpoints(root / "train")
    progress.stage(f"QLoRA DPO training: {steps} steps, checkpoints {[c.name for c in checkpoints]}")
    config = EvalConfig(dataset=dataset, model=ModelSpec(base=base, adapter=str(checkpoints[-1])),
                        generation=GenerationSpec(max_new_tokens=64, batch_size=32),
                        scoring=ScoringSpec(cache_dir=Path(scoring_cache) if scoring_cache else None),
                        analysis=AnalysisSpec(bootstrap=1000), out=root, shard_size=200)
    shutil.rmtree(root / "evals", ignore_errors=True)
    watch_checkpoints(str(root / "train"), config, out_root=str(root / "evals"))
    progress.stage(f"evaluated {len(checkpoints)} checkpoints (trend: {root / 'evals' / 'trend.png'})")
    summary = evaluate_checkpoint(config)  # the last checkpoint again, from cache, into runs/demo
    shutil.copy(root / "evals" / "trend.png", root / "plots" / "trend.png")
    _append_trend(root / "report.html")
    progress.stage(f"report: {root / 'report.html'}")
    print(render_summary(root, summary))
    return summary


def _append_trend(report: Path) -> None:
    """The trend across checkpoints becomes (or replaces) a section of the run's report."""
    from dpo_eval.report import Section, add_section

    add_section(report.parent, Section("trend", "Across checkpoints", images=[
        {"src": "plots/trend.png", "alt": "evaluation curves across checkpoints"}]))


def render_summary(root: Path, summary: dict) -> str:
    """The short summary printed at the end of the demo."""
    from dpo_eval.plots import alpha_of, paired
    from dpo_eval.report import toward_chosen

    stats = pl.read_parquet(root / "stats.parquet")
    alpha = alpha_of(summary)
    moved = paired(stats, alpha).filter((pl.col("split") == "valid") & pl.col("tb_significant"))
    shown = moved.filter(pl.col("tb_delta").is_finite()).sort(pl.col("tb_delta").abs(), descending=True)
    lines = ["", "dpo-eval demo summary",
             f"  pairs: {json.dumps(summary['n_pairs'])}",
             f"  features moved significantly on valid (q < {alpha}): {moved.height} of {summary['n_features']}, "
             f"{toward_chosen(stats, alpha).get('valid', 0)} toward chosen (where chosen-vs-rejected is significant)"]
    for row in shown.head(8).iter_rows(named=True):
        lines.append(f"    {row['feature']:<32} {row['tb_delta']:+.2f} S  ({row['direction']})")
    p = summary["sign_agreement_p"].get("valid")
    lines.append(f"  sign agreement (valid): {summary['sign_agreement'].get('valid'):.2f}, p = {p:.2g}"
                 if p is not None else "  sign agreement: n/a")
    reward = (summary.get("implicit_reward") or {}).get("valid")
    if reward:
        lines.append(f"  implicit-reward accuracy on held-out pairs: {reward['accuracy']:.2f} "
                     f"(mean margin {reward['margin_mean']:.2f}, n = {reward['n']})")
    lines.append(f"  report: {root / 'report.html'}")
    return "\n".join(lines)
