"""Train a reward model with trl's RewardTrainer on the train split of a preference data set.

The backbone (a causal LM folder or hub id, e.g. stories260k) is loaded as an
AutoModelForSequenceClassification with one output (a new, seeded score head) and a pad token (the
tokenizer's, else its unk token, else EOS). Pairs are rendered and tokenized exactly as
`dpo_eval.judges.reward_model` renders them for scoring (same template, one BOS, cut from the left to
`max_length`), and handed to trl already tokenized (`chosen_ids` / `rejected_ids`), so training sees
what scoring sees and trl's length filter drops nothing. The folder holds the model, its tokenizer and
`dpo_eval_reward_training.json` (settings, data fingerprint, train/valid pair ids, loss, seconds).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
from pydantic import Field

from dpo_eval.config import DatasetSpec, Spec
from dpo_eval.data.pairs import read_pairs
from dpo_eval.errors import DpoEvalError
from dpo_eval.judges.reward_model import TRAINING_METADATA, TRUNCATION, Item, encode
from dpo_eval.progress import quiet_trainer, terminal


class RewardTrainSpec(Spec):
    """A reward-model training run: backbone, data and optimisation settings."""

    base: str = Field(description="Backbone model folder or hub id (a causal LM; a one-output score head is added).")
    dataset: DatasetSpec = Field(description="Preference data; only its train split is trained on.")
    out: Path = Field(description="Folder for the trained reward model.")
    steps: int = Field(40, ge=1, description="Optimiser steps.")
    batch_size: int = Field(8, ge=1, description="Pairs per step.")
    learning_rate: float = Field(1e-3, gt=0, description="Learning rate (all weights are trained).")
    max_length: int | None = Field(None, ge=8, description="Tokens per sequence, cut from the left (keep_end); "
                                   "default: the backbone's context (max_position_embeddings).")
    seed: int = Field(0, description="Seed of the score head's initialisation and the data order.")


def train_reward_model(base: str | Path, pairs_source: str | Path | DatasetSpec, out: str | Path, steps: int = 40,
                       **options) -> dict:
    """Train (see the module docstring); returns the metadata written beside the model."""
    dataset = pairs_source if isinstance(pairs_source, DatasetSpec) else DatasetSpec(source=str(pairs_source))
    return train(RewardTrainSpec(base=str(base), dataset=dataset, out=Path(out), steps=steps, **options))


def train(spec: RewardTrainSpec) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from dpo_eval.training.dpo import data_fingerprint

    started = time.perf_counter()
    pairs, _ = read_pairs(spec.dataset)
    train_pairs = pairs.filter(pl.col("split") == "train")
    if train_pairs.height == 0:
        raise DpoEvalError(f"{spec.dataset.source}: no pairs in the train split to train a reward model on")
    torch.manual_seed(spec.seed)
    repairs: list[str] = []
    tokenizer = AutoTokenizer.from_pretrained(spec.base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token if tokenizer.unk_token is not None else tokenizer.eos_token
        repairs.append(f"tokenizer had no pad token: pad set to {tokenizer.pad_token!r}")
    model = AutoModelForSequenceClassification.from_pretrained(spec.base, num_labels=1, dtype=torch.float32)
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    max_length = spec.max_length or int(getattr(model.config, "max_position_embeddings", 0) or 512)
    chosen, rejected, truncated = [], [], 0
    for row in train_pairs.iter_rows(named=True):
        for role, out in (("chosen", chosen), ("rejected", rejected)):
            ids, cut, _ = encode(tokenizer, Item(row["system"] or "", row["messages"], row[role]), max_length, repairs)
            out.append(ids)
            truncated += cut
    datasets.disable_progress_bars()
    data = datasets.Dataset.from_dict({"chosen_ids": chosen, "rejected_ids": rejected})
    gpu = torch.cuda.is_available()
    args = RewardConfig(
        output_dir=str(spec.out), max_steps=spec.steps, per_device_train_batch_size=spec.batch_size,
        learning_rate=spec.learning_rate, max_length=max_length, save_strategy="no", report_to="none",
        use_cpu=not gpu, bf16=gpu, activation_checkpointing=False, logging_steps=max(1, spec.steps // 4),
        seed=spec.seed, data_seed=spec.seed, disable_tqdm=not terminal(), lr_scheduler_type="constant")
    trainer = quiet_trainer(RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer))
    result = trainer.train()
    trainer.save_model(str(spec.out))
    tokenizer.save_pretrained(str(spec.out))
    metadata = {"base": spec.base, "steps": spec.steps, "batch_size": spec.batch_size,
                "learning_rate": spec.learning_rate, "max_length": max_length, "truncation": TRUNCATION,
                "seed": spec.seed, "dataset": spec.dataset.model_dump(mode="json"),
                "data_fingerprint": data_fingerprint(pairs), "train_pair_ids": train_pairs["pair_id"].to_list(),
                "valid_pair_ids": pairs.filter(pl.col("split") == "valid")["pair_id"].to_list(),
                "truncated_sequences": truncated, "train_loss": float(result.training_loss),
                "log": trainer.state.log_history[-3:], "repairs": repairs,
                "seconds": time.perf_counter() - started}
    (Path(spec.out) / TRAINING_METADATA).write_text(json.dumps(metadata, indent=2))
    return metadata
