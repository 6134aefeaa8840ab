"""DPO training of a (Q)LoRA adapter with trl, saving checkpoints the evaluation can read.

Each checkpoint folder holds the adapter and `dpo_eval_training.json`: beta, loss type, step, learning
rate, base and data fingerprints, and the train/valid pair ids (so evaluation never tests on training
pairs); with several data sets (a mix, dpo_eval.data.mixing) also each source's share and its pair ids.
`on_checkpoint(folder)` is called after each save (the Prefect flow emits an event there).

With `sft_adapter`, DPO starts from an SFT adapter the way trl 1.x does it: the adapter is loaded
trainable on the base, and trl's DPOTrainer copies it into a frozen second adapter named `ref` that
serves as the reference (one base, two adapters). trl 0.x's DPOConfig `model_adapter_name` /
`ref_adapter_name` are gone in 1.x (DPOConfig rejects them); the `ref` copy is what replaced them.
The metadata records that reference, so evaluation measures the checkpoint against base + SFT adapter
by default (dpo_eval.reference).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Literal

import polars as pl
from pydantic import Field

from dpo_eval.checkpoint_meta import METADATA
from dpo_eval.config import DatasetSpec, ModelSpec, Spec
from dpo_eval.data.mixing import mix_train, read_sources, source_pair_ids
from dpo_eval.data.pairs import prompt_turns
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.prompts import PromptFormatter, training_prompt
from dpo_eval.progress import quiet_trainer, terminal


class TrainSpec(Spec):
    """A DPO training run: base, data, LoRA and optimisation settings."""

    base: str = Field(description="Base model folder or hub id.")
    dataset: DatasetSpec = Field(description="Preference data; only its train split is trained on.")
    extra_datasets: tuple[DatasetSpec, ...] = Field((), description="Further preference data sets mixed into "
                                                    "training (their train splits); each pair's source is recorded "
                                                    "in the checkpoint's metadata.")
    weights: tuple[float, ...] | None = Field(None, description="Share of each data set in the training mix, "
                                              "`dataset` first (normalised to sum 1): drawn without replacement "
                                              "with `seed`, as many pairs as the scarcest source allows. None: "
                                              "every train pair of every data set.")
    out: Path = Field(description="Folder for checkpoint-N adapter folders.")
    steps: int = Field(40, ge=1, description="Optimiser steps.")
    save_every: int = Field(20, ge=1, description="Save a checkpoint every N steps.")
    beta: float = Field(0.1, gt=0, description="DPO beta.")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="DPO loss.")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an added NLL loss on chosen (trl's 'sft' "
                              "loss; RPO-style), which keeps the tuned model fluent. 0: plain DPO.")
    learning_rate: float = Field(5e-4, gt=0, description="Learning rate of the LoRA weights.")
    batch_size: int = Field(4, ge=1, description="Pairs per step.")
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha.")
    quantization: Literal["none", "4bit"] = Field("4bit", description="4bit: QLoRA on an nf4 base.")
    max_length: int = Field(512, ge=8, description="Tokens of prompt + answer kept (the answer's start).")
    prompt_template: str | None = Field(None, description="Jinja prompt template (as for evaluation).")
    seed: int = Field(0, description="Training seed.")
    sft_adapter: str | None = Field(None, title="SFT adapter", description="A LoRA adapter folder (e.g. from "
                                    "SFT) to start DPO from and to use, frozen, as the reference (trl's two-adapter "
                                    "DPO); its LoRA settings replace lora_r and lora_alpha. None: a new LoRA "
                                    "adapter against the bare base.")


def data_fingerprint(pairs: pl.DataFrame) -> str:
    return hashlib.sha256("\n".join(sorted(pairs["pair_id"].to_list())).encode()).hexdigest()[:16]


def trl_dataset(pairs: pl.DataFrame, tokenizer, prompt_template: str | None, repairs: list[str]):
    """trl's standard format, prompts rendered exactly as generation renders them, with no BOS text
    (trl tokenizes the prompt with special tokens: a rendered BOS would make two)."""
    import datasets

    datasets.disable_progress_bars()
    formatter = PromptFormatter(tokenizer, prompt_template, repairs)
    prompts = [training_prompt(formatter, row["system"], prompt_turns(row)) for row in pairs.iter_rows(named=True)]
    return datasets.Dataset.from_dict({"prompt": prompts, "chosen": pairs["chosen"].to_list(),
                                       "rejected": pairs["rejected"].to_list()})


def train_dpo(spec: TrainSpec, on_checkpoint: Callable[[Path], None] | None = None) -> list[Path]:
    """Train; returns the checkpoint folders in step order."""
    trainer, saved = build_trainer(spec, on_checkpoint)
    trainer.train()
    return saved


def build_trainer(spec: TrainSpec, on_checkpoint: Callable[[Path], None] | None = None):
    """trl's DPOTrainer for `spec`, and the list that fills with checkpoint folders as it saves. A new LoRA
    via peft_config: the reference is the adapter-disabled base; with spec.sft_adapter: the SFT adapter
    trainable (peft's `default`) and trl's frozen copy of it (`ref`) as the reference."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dpo_eval.generation.models import fingerprints, load_base, load_tokenizer

    check_sft_adapter(spec)
    pairs, _ = read_sources((spec.dataset, *spec.extra_datasets))
    train, mix = mix_train(pairs, spec.weights, spec.seed)
    model_spec = ModelSpec(base=spec.base, quantization=spec.quantization,
                           compute_dtype="bfloat16" if torch.cuda.is_available() else "float32")
    repairs: list[str] = []
    tokenizer = load_tokenizer(model_spec, repairs)
    tokenizer.padding_side = "right"  # training pads on the right; generation repairs it to left
    model = load_base(model_spec, repairs)
    metadata = {"beta": spec.beta, "loss_type": spec.loss_type, "sft_weight": spec.sft_weight,
                "learning_rate": spec.learning_rate, "max_length": spec.max_length, "truncation_mode": "keep_start",
                "prompt_template": spec.prompt_template,
                "base": spec.base, "base_fingerprint": fingerprints(model_spec)[0],
                "data_fingerprint": data_fingerprint(pairs), "dataset": spec.dataset.model_dump(mode="json"),
                "datasets": [d.model_dump(mode="json") for d in (spec.dataset, *spec.extra_datasets)],
                "mix": mix, "source_pair_ids": source_pair_ids(pairs, train),
                "train_pair_ids": train["pair_id"].to_list(),
                "valid_pair_ids": pairs.filter(pl.col("split") == "valid")["pair_id"].to_list(),
                "reference_adapter": sft_reference(spec), "repairs": repairs}
    gpu = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(spec.out), max_steps=spec.steps, save_strategy="steps", save_steps=spec.save_every,
        save_only_model=True, per_device_train_batch_size=spec.batch_size, learning_rate=spec.learning_rate,
        beta=spec.beta, loss_type=[spec.loss_type] + (["sft"] if spec.sft_weight else []),
        loss_weights=[1.0, spec.sft_weight] if spec.sft_weight else None,
        max_length=spec.max_length, truncation_mode="keep_start",
        use_cpu=not gpu, bf16=gpu, gradient_checkpointing=gpu, logging_steps=max(1, spec.save_every // 4),
        report_to="none", seed=spec.seed, disable_tqdm=not terminal(), lr_scheduler_type="constant")
    saved: list[Path] = []

    class SaveMetadata(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            # peft saves every adapter but the active one in a subfolder: drop trl's frozen copy of the SFT
            # adapter, so the checkpoint is a plain one-adapter folder (the metadata names the reference)
            shutil.rmtree(folder / TRL_REFERENCE, ignore_errors=True)
            # atomically: a watcher takes a checkpoint as complete once this file exists
            tmp = folder / (METADATA + ".tmp")
            tmp.write_text(json.dumps(metadata | {"step": state.global_step, "log": state.log_history[-3:]}, indent=2))
            os.replace(tmp, folder / METADATA)
            saved.append(folder)
            if on_checkpoint is not None:
                on_checkpoint(folder)

    peft_config = None
    if spec.sft_adapter is None:
        peft_config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, target_modules="all-linear",
                                 task_type="CAUSAL_LM", lora_dropout=0.0)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.sft_adapter, is_trainable=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=trl_dataset(train, tokenizer, spec.prompt_template,
                                                                          repairs),
                         processing_class=tokenizer, peft_config=peft_config, callbacks=[SaveMetadata()])
    if spec.sft_adapter is not None and TRL_REFERENCE not in trainer.model.peft_config:
        raise DpoEvalError(f"--sft-adapter {spec.sft_adapter}: trl did not attach a frozen reference copy of it "
                           "(its adapter would be compared with the bare base); this adapter type is not supported "
                           "for DPO on an SFT adapter")
    return quiet_trainer(trainer), saved


TRL_REFERENCE = "ref"  # the name trl's DPOTrainer gives the frozen copy of a pretrained adapter


def sft_reference(spec: TrainSpec) -> str | None:
    """The SFT adapter as the metadata records it: an absolute path for a local folder (evaluation may run
    from another folder), the hub id otherwise."""
    if spec.sft_adapter is None:
        return None
    from dpo_eval.locations import is_local_path

    local = is_local_path(spec.sft_adapter)
    return str(Path(spec.sft_adapter).expanduser().resolve()) if local else spec.sft_adapter


def check_sft_adapter(spec: TrainSpec) -> None:
    """--sft-adapter exists, is a peft adapter and fits --base (before any model is loaded)."""
    from dpo_eval.preflight import check_adapter_folder

    check_adapter_folder(spec.sft_adapter, "--sft-adapter", ModelSpec(base=spec.base))
