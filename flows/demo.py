"""The offline demo: a project-written preference set, QLoRA DPO training, evaluation of every
checkpoint, the report, a small reward model trained on the same train pairs that judges tuned vs base,
and a short summary ending on that verdict. Runs on 2 CPU cores in a few minutes."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import polars as pl
from dpo_eval.flows.evaluate import evaluate_checkpoint
from dpo_eval.flows.train import train_dpo_flow
from dpo_eval.flows.watch import find_checkpoints, watch_checkpoints
from prefect import flow

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.data.demo import reward_verdict, write_demo_dataset
from dpo_eval.studies.trend import recommendation_line, write_trend
from dpo_eval.studies.verdict import verdict_lines
from dpo_eval.training.dpo import TrainSpec


class Progress:
    def __init__(self, total: int):
        self.total, self.start, self.index = total, time.perf_counter(), 0

    def stage(self, text: str) -> None:
        self.index += 1
        print(f"[{self.index}/{self.total}] {text}  (t = {time.perf_counter() - self.start:.0f} s)", flush=True)


def base_sample(base: str) -> str:
    from dpo_eval.config import GenerationSpec as G
    from dpo_eval.generation.generate import generate_answers
    from dpo_eval.generation.models import load_model

    loaded = load_model(ModelSpec(base=base, quantization="none", compute_dtype="float32"))
    pairs = pl.DataFrame({"pair_id": ["s"], "split": ["train"], "system": [""], "prompt": ["Once upon a time"],
                          "chosen": ["c"], "rejected": ["r"], "messages": [None]},
                         schema_overrides={"messages": pl.String})
    return generate_answers(loaded.model, loaded.tokenizer, pairs, G(max_new_tokens=30))["answer"][0]


@flow(name="dpo-eval-demo")
def demo(out: str = "runs/demo", base: str = "../shared/models/stories260k", pairs: int = 400,
         steps: int = 60, save_every: int = 20, learning_rate: float = 2e-4, sft_weight: float = 0.0,
         scoring_cache: str | None = None, reward_steps: int = 60, reward_max_length: int = 160,
         threads: int = 1) -> dict:
    """Train a QLoRA DPO adapter on the demo preferences and show what it changed, then let a reward model
    trained on the same train pairs judge the tuned answers against the base answers. `threads`: torch's
    intra-op threads in this process (DPO and reward-model training, generation, implicit rewards)."""
    with torch_threads(threads):
        return _demo(Path(out), base, pairs, steps, save_every, learning_rate, sft_weight, scoring_cache,
                     reward_steps, reward_max_length)


def _demo(root: Path, base: str, pairs: int, steps: int, save_every: int, learning_rate: float,
          sft_weight: float, scoring_cache: str | None, reward_steps: int, reward_max_length: int) -> dict:
    progress = Progress(6)
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
    runs = sorted((run for run in (root / "evals").glob("checkpoint-*") if (run / "features.parquet").is_file()),
                  key=lambda run: int(run.name.split("-")[1]) if run.name.split("-")[1].isdigit() else 0)
    summary = judge_with_reward_model(root, base, dataset, runs, steps=reward_steps, max_length=reward_max_length,
                                      cache_dir=Path(scoring_cache) if scoring_cache else None, progress=progress)
    trend = write_trend(runs, root / "evals", rule=config.verdict.recommend)  # now with the reward model's verdicts
    shutil.copy(root / "evals" / "trend.png", root / "plots" / "trend.png")
    _append_trend(root / "report.html")
    print(render_summary(root, summary, trend))
    return summary


@contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n inside the block (every thread of the process, Prefect's task threads
    included). stories260k is too small for a second thread to pay for its synchronisation, and on a busy
    machine a second spinning OpenMP thread is far worse: measured on 2 shared cores, 20 DPO steps took 9-13 s
    on one thread and 32-43 s on two, 60 reward-model steps 11-20 s on one and 186 s on two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def judge_with_reward_model(root: Path, base: str, dataset: DatasetSpec, checkpoint_runs: list[Path], *,
                            steps: int, max_length: int, cache_dir: Path | None, progress: Progress) -> dict:
    """Train a reward model (trl RewardTrainer, `base` as backbone) on the train pairs of `dataset` into
    root/reward_model, score the four roles of every checkpoint's run and of the final run (root) with it
    (dpo_eval.studies.reward_scores.reward_judge_run: feature reward_model, calibration, report section), and return
    the final run's summary as written."""
    from dpo_eval.studies.reward_scores import reward_judge_run
    from dpo_eval.training.reward import train_reward_model

    folder = root / "reward_model"
    shutil.rmtree(folder, ignore_errors=True)
    trained = train_reward_model(base, dataset, folder, steps=steps, batch_size=8, max_length=max_length)
    trend = {run.name.rsplit("-", 1)[0]: reward_judge_run(run, folder, batch_size=32, cache_dir=cache_dir)
             for run in checkpoint_runs}
    block = reward_judge_run(root, folder, batch_size=32, cache_dir=cache_dir)
    blocks = [*trend.values(), block]
    rates = ", ".join(f"{name} {b['splits']['valid']['win_rate']:.2f}" for name, b in trend.items()
                      if b["splits"].get("valid", {}).get("win_n"))
    progress.stage(f"reward model: {steps} steps on {len(trained['train_pair_ids'])} train pairs "
                   f"({trained['seconds']:.0f} s, loss {trained['train_loss']:.3f}) -> {folder}; "
                   f"{len(blocks)} runs judged ({sum(b['scored'] for b in blocks)} answers scored, "
                   f"{sum(b['cached'] for b in blocks)} read from its cache)"
                   + (f"; tuned-over-base win rate on valid by checkpoint: {rates}" if rates else ""))
    return json.loads((root / "summary.json").read_text())


def _append_trend(report: Path) -> None:
    """The trend across checkpoints becomes (or replaces) a section of the run's report."""
    from dpo_eval.report.page import Section, add_section

    add_section(report.parent, Section("trend", "Across checkpoints", images=[
        {"src": "plots/trend.png", "alt": "evaluation curves across checkpoints"}]))


def render_summary(root: Path, summary: dict, trend: dict | None = None) -> str:
    """The short summary printed at the end of the demo, ending with the last checkpoint's four answers and the
    checkpoint to ship across the checkpoints (`trend`)."""
    from dpo_eval.report.page import toward_chosen
    from dpo_eval.report.plots import alpha_of, paired

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
    if summary.get("reward_model"):
        lines.append(reward_verdict(summary["reward_model"], str(root), "valid", alpha))
    lines += ["", f"The answers for the last checkpoint ({Path(summary_adapter(root)).name}):"]
    lines += [f"  {line}" for line in verdict_lines(summary)]
    if trend is not None:
        lines += ["", f"Across the {len(trend['checkpoints'])} checkpoints: {recommendation_line(trend)}"]
    return "\n".join(lines)


def summary_adapter(root: Path) -> str:
    """The adapter the run in `root` evaluated (its config.json)."""
    return json.loads((root / "config.json").read_text())["config"]["model"]["adapter"]
