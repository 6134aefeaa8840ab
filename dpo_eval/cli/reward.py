"""Reward-model commands: `train-reward`, and the reward-model path of `judge` (`judge_reward`).

`judge_reward` is the body of `dpo-eval judge RUN_DIR --reward-model PATH_OR_HUB_ID`; the shared `judge`
command calls it when --reward-model is given (see its docstring for the options it takes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dpo_eval.cli.options import BaseOpt, DatasetOpt, LimitOpt, build, dataset_spec, spec_option
from dpo_eval.errors import DpoEvalError
from dpo_eval.training.reward import RewardTrainSpec

TRAIN_FLAGS = {"base": "--base", "dataset": "--dataset", "out": "--out", "steps": "--steps",
               "batch_size": "--batch-size", "learning_rate": "--lr", "max_length": "--max-length", "seed": "--seed"}


def judge_reward(run_dir: Path, reward_model: str, split: str = "all", limit: Optional[int] = None,
                 batch_size: int = 8, revision: Optional[str] = None) -> dict:
    """Score RUN_DIR's chosen, rejected, base and tuned answers with a reward model; add them to its
    features and statistics and print the calibration and verdict per split. Returns the summary block."""
    from dpo_eval.studies.reward_scores import reward_judge_run

    if not Path(run_dir).is_dir():
        raise DpoEvalError(f"{run_dir}: no such run directory")
    if batch_size < 1:
        raise DpoEvalError(f"--batch-size {batch_size}: give a positive number")
    block = reward_judge_run(run_dir, reward_model, revision=revision, split=split, limit=limit,
                             batch_size=batch_size)
    print(f"reward model {block['model']} (id {block['id']}): scored {block['scored']}, from cache "
          f"{block['cached']}, cut to {block['max_length']} tokens: {block['truncated']}")
    for name, b in block["splits"].items():
        print(f"{name}: calibration: accuracy on chosen vs rejected {b['accuracy']:.3f} "
              f"[{b['ci_low']:.3f}, {b['ci_high']:.3f}] (n = {b['n']}, ties {b['ties']}); "
              f"tuned vs base: win rate {b['win_rate']:.3f} [{b['win_ci_low']:.3f}, {b['win_ci_high']:.3f}], "
              f"{b['wins']} wins / {b['losses']} losses / {b['win_ties']} ties, sign test p = {b['p_value']:.3g}")
    print(f"report: {Path(run_dir) / 'report.html'}")
    return block


def train_reward(
    base: str = BaseOpt,
    dataset: str = DatasetOpt,
    out: Path = typer.Option(..., "--out", help=RewardTrainSpec.model_fields["out"].description),
    steps: int = spec_option(RewardTrainSpec, "steps", "--steps"),
    batch_size: int = spec_option(RewardTrainSpec, "batch_size", "--batch-size"),
    lr: float = spec_option(RewardTrainSpec, "learning_rate", "--lr"),
    max_length: Optional[int] = spec_option(RewardTrainSpec, "max_length", "--max-length"),
    seed: int = spec_option(RewardTrainSpec, "seed", "--seed"),
    limit: Optional[int] = LimitOpt,
) -> None:
    """Train a reward model (trl RewardTrainer, one-output score head) on the train split of a data set."""
    from dpo_eval.config import ModelSpec
    from dpo_eval.preflight import check_dataset, check_model
    from dpo_eval.training.reward import train

    data = dataset_spec(dataset, limit=limit)
    spec = build(RewardTrainSpec, TRAIN_FLAGS, base=base, dataset=data, out=out, steps=steps, batch_size=batch_size,
                 learning_rate=lr, max_length=max_length, seed=seed)
    check_model(ModelSpec(base=base))
    check_dataset(data)
    metadata = train(spec)
    keys = ("base", "steps", "max_length", "train_loss", "truncated_sequences", "seconds")
    print(json.dumps({k: metadata[k] for k in keys}, indent=2))
    print(f"reward model: {out}")
