"""Implicit rewards against trl's own numbers, on stories260k with adapters trained or built here."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from dpo_eval.config import DatasetSpec, ModelSpec
from dpo_eval.data.pairs import read_pairs
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.logprobs import encode_pair, implicit_rewards, reward_summary
from dpo_eval.generation.models import load_model
from dpo_eval.training.dpo import TrainSpec, build_trainer, trl_dataset
from tests.builders import make_adapter


def test_zero_adapter_gives_exactly_zero_rewards(stories260k, orca_jsonl, tmp_path):
    adapter = make_adapter(stories260k, tmp_path / "zero", zero=True)
    pairs, _ = read_pairs(DatasetSpec(source=str(orca_jsonl), limit=12))
    loaded = load_model(ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="4bit"))
    rewards = implicit_rewards(loaded, pairs, beta=0.1)
    assert (rewards["margin"] == 0).all() and (rewards["reward_chosen"] == 0).all()
    summary = reward_summary(rewards)
    assert all(s["accuracy"] == 0 and s["ties"] == s["n"] for s in summary.values())  # ties count as wrong


def test_rewards_equal_trl_evaluation(stories260k, orca_jsonl, tmp_path):
    spec = TrainSpec(base=str(stories260k), dataset=DatasetSpec(source=str(orca_jsonl), limit=48),
                     out=tmp_path / "train", steps=6, save_every=6, batch_size=4, quantization="none",
                     max_length=512, beta=0.2)
    trainer, saved = build_trainer(spec)
    trainer.train()
    pairs, _ = read_pairs(spec.dataset)
    tokenizer = trainer.processing_class
    # short prompts only, so trl keeps every pair; one batch, so trl's mean over batches is the plain mean
    lengths = [len(encode_pair(tokenizer, p, c, r)[0]) for p, c, r in
               zip(trl_dataset(pairs, tokenizer, None, [])["prompt"], pairs["chosen"], pairs["rejected"])]
    evalp = pairs.filter(pl.Series([n < 300 for n in lengths])).head(8)
    trainer.args.per_device_eval_batch_size = evalp.height
    metrics = trainer.evaluate(trl_dataset(evalp, tokenizer, None, []))
    loaded = load_model(ModelSpec(base=str(stories260k), adapter=str(saved[-1]), quantization="none",
                                  compute_dtype="float32"))
    rewards = implicit_rewards(loaded, evalp.with_columns(pl.lit("x").alias("split")), beta=0.2, max_length=512)
    ours = reward_summary(rewards)["x"]
    assert ours["n"] == evalp.height and ours["skipped"] == 0
    assert ours["accuracy"] == pytest.approx(metrics["eval_rewards/accuracies"], abs=1e-6)
    assert ours["margin_mean"] == pytest.approx(metrics["eval_rewards/margins"], rel=1e-3, abs=1e-4)
    assert np.mean(rewards["reward_chosen"].to_numpy()) == pytest.approx(metrics["eval_rewards/chosen"], rel=1e-3, abs=1e-4)


def test_implicit_rewards_need_an_adapter(stories260k, orca_jsonl):
    pairs, _ = read_pairs(DatasetSpec(source=str(orca_jsonl), limit=2))
    with pytest.raises(DpoEvalError, match="need --adapter"):
        implicit_rewards(load_model(ModelSpec(base=str(stories260k), quantization="none")), pairs)


def test_sft_weight_adds_trl_sft_loss(stories260k, tmp_path):
    from dpo_eval.data.demo import write_demo_dataset

    data = write_demo_dataset(tmp_path / "pairs.jsonl", n=16)
    spec = TrainSpec(base=str(stories260k), dataset=DatasetSpec(source=str(data)), out=tmp_path / "t", steps=1,
                     save_every=1, batch_size=4, max_length=128, sft_weight=0.5, quantization="none")
    trainer, saved = build_trainer(spec)
    assert trainer.args.loss_type == ["sigmoid", "sft"] and trainer.args.loss_weights == [1.0, 0.5]
    trainer.train()
    import json

    assert json.loads((saved[0] / "dpo_eval_training.json").read_text())["sft_weight"] == 0.5


def test_chunked_token_logprobs_equal_the_whole_batch_log_softmax():
    import torch

    from dpo_eval.generation.logprobs import token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(5, 7, 33, dtype=torch.bfloat16)
    ids = torch.randint(0, 33, (5, 7))
    whole = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    for rows in (1, 2, 5):
        assert torch.equal(token_logprobs(logits, ids, rows_per_chunk=rows), whole)
