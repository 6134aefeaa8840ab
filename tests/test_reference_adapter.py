"""Reference adapters: DPO on top of an SFT adapter (trl's two-adapter setup) and an evaluation whose 'base'
side is base + SFT adapter. Real trl (SFTTrainer, DPOTrainer) on stories260k; one SFT adapter and one DPO
checkpoint on it, trained once for the module."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from dpo_eval.config import DatasetSpec, GenerationSpec, ModelSpec
from dpo_eval.data.pairs import read_pairs
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.generate import generate_both
from dpo_eval.generation.logprobs import encode_pair, implicit_rewards, reward_summary
from dpo_eval.generation.models import load_model
from dpo_eval.identity import model_identity
from dpo_eval.preflight import check_model
from dpo_eval.training.dpo import METADATA, TrainSpec, build_trainer, trl_dataset
from tests.builders import make_adapter, tiny_mistral

BETA = 0.2


def train_sft_adapter(base: Path, pairs: pl.DataFrame, folder: Path) -> Path:
    """A LoRA SFT adapter: trl's SFTTrainer, a few steps on prompt -> chosen, saved with save_model."""
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from dpo_eval.generation.models import load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(base=str(base)), [])
    tokenizer.padding_side = "right"
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rendered = trl_dataset(pairs, tokenizer, None, [])
    data = datasets.Dataset.from_dict({"prompt": rendered["prompt"], "completion": rendered["chosen"]})
    args = SFTConfig(output_dir=str(folder / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     max_length=256, use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
                     save_strategy="no", disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                                lora_dropout=0.0))
    trainer.train()
    trainer.save_model(str(folder / "sft"))
    return folder / "sft"


@pytest.fixture(scope="module")
def sft_dpo(stories260k, orca_jsonl, tmp_path_factory):
    """(SFT adapter, trained DPO trainer on it, its last checkpoint, the pairs)."""
    root = tmp_path_factory.mktemp("sft_dpo")
    dataset = DatasetSpec(source=str(orca_jsonl), limit=48)
    pairs, _ = read_pairs(dataset)
    sft = train_sft_adapter(stories260k, pairs.filter(pl.col("split") == "train").head(16), root)
    spec = TrainSpec(base=str(stories260k), dataset=dataset, out=root / "dpo", steps=3, save_every=3, batch_size=4,
                     quantization="none", max_length=512, beta=BETA, learning_rate=5e-3, sft_adapter=str(sft))
    trainer, saved = build_trainer(spec)
    trainer.train()
    return {"sft": sft, "trainer": trainer, "checkpoint": saved[-1], "pairs": pairs}


def test_trl_trains_a_copy_of_the_sft_adapter_against_a_frozen_one(sft_dpo):
    from safetensors.torch import load_file

    model, checkpoint = sft_dpo["trainer"].model, sft_dpo["checkpoint"]
    assert set(model.peft_config) == {"default", "ref"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".ref." in n)
    sft_weights = load_file(sft_dpo["sft"] / "adapter_model.safetensors")
    dpo_weights = load_file(checkpoint / "adapter_model.safetensors")
    assert set(sft_weights) == set(dpo_weights)
    assert any(not np.allclose(sft_weights[k].numpy(), dpo_weights[k].numpy()) for k in sft_weights)  # DPO moved it
    ref = {n: p for n, p in model.named_parameters() if ".ref." in n}
    for key, value in sft_weights.items():  # the reference stayed the SFT adapter
        name = next(n for n in ref if n.replace(".ref.", ".").endswith(key.replace("base_model.model.", "", 1)))
        assert np.array_equal(ref[name].detach().numpy(), value.numpy())
    # a plain one-adapter folder: trl's `ref` copy is not saved beside it; the metadata names the reference
    assert not (checkpoint / "ref").exists() and (checkpoint / "adapter_config.json").is_file()
    meta = json.loads((checkpoint / METADATA).read_text())
    assert meta["reference_adapter"] == str(sft_dpo["sft"].resolve())


def test_base_side_answers_are_the_sft_adapters_answers(sft_dpo, stories260k):
    base, checkpoint, sft = str(stories260k), str(sft_dpo["checkpoint"]), str(sft_dpo["sft"])
    prompts = sft_dpo["pairs"].head(4)
    gen = GenerationSpec(max_new_tokens=16, batch_size=4)
    # float32: 4-bit generation is slow on the CPU, and switching adapters is the same peft code either way
    loading = {"quantization": "none", "compute_dtype": "float32"}
    both = load_model(ModelSpec(base=base, adapter=checkpoint, **loading))  # the reference from the metadata
    assert both.reference == str(sft_dpo["sft"].resolve()) and set(both.model.peft_config) == {"default", "reference"}
    answers = generate_both(both, prompts, gen)
    plain_sft = generate_both(load_model(ModelSpec(base=base, adapter=sft, **loading)), prompts, gen,
                              models=("tuned",))
    bare = load_model(ModelSpec(base=base, adapter=checkpoint, reference_adapter="none", **loading))
    bare_answers = generate_both(bare, prompts, gen)

    def texts(frame, model):
        return frame.filter(pl.col("model") == model).sort("pair_id")["answer"].to_list()

    assert texts(answers, "base") == texts(plain_sft, "tuned")
    assert texts(answers, "tuned") == texts(bare_answers, "tuned")  # switching back restores the DPO adapter
    assert texts(answers, "base") != texts(bare_answers, "base")  # the SFT adapter changed the base side


def test_rewards_equal_trl_evaluation_with_the_sft_reference(sft_dpo, stories260k):
    trainer, pairs = sft_dpo["trainer"], sft_dpo["pairs"]
    tokenizer = trainer.processing_class
    # short prompts only, so trl keeps every pair; one batch, so trl's mean over batches is the plain mean
    lengths = [len(encode_pair(tokenizer, p, c, r)[0]) for p, c, r in
               zip(trl_dataset(pairs, tokenizer, None, [])["prompt"], pairs["chosen"], pairs["rejected"])]
    evalp = pairs.filter(pl.Series([n < 300 for n in lengths])).head(8)
    trainer.args.per_device_eval_batch_size = evalp.height
    metrics = trainer.evaluate(trl_dataset(evalp, tokenizer, None, []))
    loaded = load_model(ModelSpec(base=str(stories260k), adapter=str(sft_dpo["checkpoint"]), quantization="none",
                                  compute_dtype="float32"))
    assert loaded.reference is not None
    rewards = implicit_rewards(loaded, evalp.with_columns(pl.lit("x").alias("split")), beta=BETA, max_length=512)
    ours = reward_summary(rewards)["x"]
    assert ours["n"] == evalp.height and ours["skipped"] == 0
    assert ours["accuracy"] == pytest.approx(metrics["eval_rewards/accuracies"], abs=1e-6)
    assert ours["margin_mean"] == pytest.approx(metrics["eval_rewards/margins"], rel=1e-3, abs=1e-4)
    assert np.mean(rewards["reward_chosen"].to_numpy()) == pytest.approx(metrics["eval_rewards/chosen"], rel=1e-3,
                                                                         abs=1e-4)
    # against the bare base they differ: the reference matters
    bare = load_model(ModelSpec(base=str(stories260k), adapter=str(sft_dpo["checkpoint"]), quantization="none",
                                compute_dtype="float32", reference_adapter="none"))
    bare_margin = implicit_rewards(bare, evalp, beta=BETA, max_length=512)["margin"].to_numpy()
    assert not np.allclose(bare_margin, rewards["margin"].to_numpy())


def test_reference_files_key_the_base_side(sft_dpo, stories260k, tmp_path):
    base, checkpoint = str(stories260k), str(sft_dpo["checkpoint"])
    recorded = model_identity(ModelSpec(base=base, adapter=checkpoint))
    explicit = model_identity(ModelSpec(base=base, adapter=checkpoint, reference_adapter=str(sft_dpo["sft"])))
    bare = model_identity(ModelSpec(base=base, adapter=checkpoint, reference_adapter="none"))
    assert recorded.base_key == explicit.base_key and recorded.reference["files"]
    assert bare.reference is None and bare.base_key != recorded.base_key
    # tuned answers do not depend on the reference (they are reused); what needs both sides does
    assert bare.tuned_key == recorded.tuned_key and bare.pair_key == bare.tuned_key != recorded.pair_key
    assert bare.base_key == model_identity(ModelSpec(base=base)).base_key  # bare-base keys are unchanged
    copy = shutil.copytree(sft_dpo["sft"], tmp_path / "copy")  # identified by content, not path
    assert model_identity(ModelSpec(base=base, adapter=checkpoint, reference_adapter=str(copy))).base_key == \
        recorded.base_key


def test_reference_adapter_errors_name_the_option(sft_dpo, stories260k, tmp_path):
    base, checkpoint = str(stories260k), sft_dpo["checkpoint"]
    with pytest.raises(DpoEvalError, match="--reference-adapter .*missing: no such adapter folder"):
        check_model(ModelSpec(base=base, adapter=str(checkpoint), reference_adapter=str(tmp_path / "missing")))
    mistral = tiny_mistral(tmp_path / "mistral", stories260k)
    foreign = make_adapter(mistral, tmp_path / "foreign", zero=True)
    with pytest.raises(DpoEvalError, match="--reference-adapter .*foreign .*does not fit --base"):
        check_model(ModelSpec(base=base, adapter=str(checkpoint), reference_adapter=str(foreign)))
    with pytest.raises(DpoEvalError, match="--reference-adapter .*foreign .*does not fit --base"):
        load_model(ModelSpec(base=base, adapter=str(checkpoint), reference_adapter=str(foreign), quantization="none"))
    moved = shutil.copytree(checkpoint, tmp_path / "moved")  # metadata names an SFT adapter that is gone
    meta = json.loads((moved / METADATA).read_text()) | {"reference_adapter": str(tmp_path / "gone")}
    (moved / METADATA).write_text(json.dumps(meta))
    with pytest.raises(DpoEvalError, match=f"recorded in {moved / METADATA}.*--reference-adapter PATH or none"):
        check_model(ModelSpec(base=base, adapter=str(moved)))
    check_model(ModelSpec(base=base, adapter=str(moved), reference_adapter="none"))  # the override


def test_cli_reference_and_sft_adapter_mistakes_are_one_line(stories260k, orca_jsonl, tmp_path):
    missing = tmp_path / "nothing"
    runs = {"evaluate": ["evaluate", "--base", stories260k, "--adapter", make_adapter(stories260k, tmp_path / "a"),
                         "--dataset", orca_jsonl, "--reference-adapter", missing, "--out", tmp_path / "run"],
            "train": ["train", "--base", stories260k, "--dataset", orca_jsonl, "--out", tmp_path / "t",
                      "--sft-adapter", missing]}
    for command, args in runs.items():
        result = subprocess.run([sys.executable, "-m", "dpo_eval", *map(str, args)], capture_output=True, text=True)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (command, result.stderr)
        option = "--reference-adapter" if command == "evaluate" else "--sft-adapter"
        assert f"{option} {missing}: no such adapter folder" in result.stderr, (command, result.stderr)


def test_report_and_markdown_say_what_the_base_side_was(tmp_path):
    from dpo_eval.report.page import summary_markdown, write_outputs
    from dpo_eval.stats.analysis import AnalysisSpec, run_analysis
    from tests.test_report import planted_features

    result = run_analysis(planted_features(n_train=40, n_valid=10), AnalysisSpec(bootstrap=0, permutations=50))
    label = "base + SFT adapter /ckpt/sft <b>"
    summary = write_outputs(result.stats, result.summary | {"reference": {"adapter": "/ckpt/sft <b>", "label": label}},
                            tmp_path / "sft")
    page = (tmp_path / "sft" / "report.html").read_text()
    assert "compared with <strong>base + SFT adapter /ckpt/sft &lt;b&gt;</strong>" in page  # escaped
    assert f"The 'base' side of every comparison is {label}." in summary_markdown(summary)
    write_outputs(result.stats, result.summary, tmp_path / "bare")  # a run without a reference: plain base
    assert "compared with <strong>base</strong>" in (tmp_path / "bare" / "report.html").read_text()
    assert "'base' side" not in summary_markdown(result.summary)
