"""The evaluation's stages as plain functions (no Prefect): shards, features, the run directory.

The Prefect flow (flows/evaluate.py) wires these through thin tasks; each stage here takes and
returns plain data (frames, paths, configs), so it runs and tests without an orchestrator.
"""

from __future__ import annotations

import hashlib
import json
import platform
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import polars as pl

from dpo_eval.config import EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.errors import DpoEvalError

ROLES = ("chosen", "rejected", "base", "tuned")
PACKAGES = ("dpo-eval", "torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "spacy",
            "textdescriptives", "scipy", "polars", "prefect", "numpy")


def shard_pairs(pairs: pl.DataFrame, shard_size: int) -> list[pl.DataFrame]:
    """Consecutive shards of at most `shard_size` pairs (the unit of caching and resumption)."""
    return [pairs.slice(i, shard_size) for i in range(0, pairs.height, shard_size)]


def content_hash(frame: pl.DataFrame, columns: tuple[str, ...] = ("pair_id", "system", "messages")) -> str:
    """sha256 of a shard's content (ids and prompts), independent of run ids."""
    digest = hashlib.sha256()
    for row in frame.select(list(columns)).iter_rows():
        digest.update(json.dumps(row, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def spec_hash(*specs) -> str:
    return hashlib.sha256(json.dumps([s.model_dump(mode="json") for s in specs], sort_keys=True).encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def cached_model(spec: ModelSpec):
    """One load per worker process for all the shards it generates."""
    from dpo_eval.models import load_model

    return load_model(spec)


def generate_shard(spec: ModelSpec, generation: GenerationSpec, shard: pl.DataFrame,
                   model: str) -> tuple[pl.DataFrame, list[str]]:
    """Answers of one model ('base' or 'tuned') to one shard, and the loader's repairs."""
    from dpo_eval.generation import generate_both

    loaded = cached_model(spec)
    return generate_both(loaded, shard, generation, models=(model,)), list(loaded.repairs)


def require_adapter(spec: ModelSpec) -> None:
    if spec.adapter is None:
        raise DpoEvalError("evaluate needs --adapter: without one, tuned and base are the same model")


def texts_of(pairs: pl.DataFrame, answers: pl.DataFrame) -> pl.DataFrame:
    """Long table (pair_id, split, role, text) of the four texts of every pair."""
    parts = [pairs.select("pair_id", "split", pl.lit(role).alias("role"), pl.col(role).alias("text"))
             for role in ("chosen", "rejected")]
    split = pairs.select("pair_id", "split")
    for role in ("base", "tuned"):
        part = answers.filter(pl.col("model") == role).select("pair_id", pl.col("answer").alias("text"))
        parts.append(split.join(part, on="pair_id", how="inner").select(
            "pair_id", "split", pl.lit(role).alias("role"), "text"))
    return pl.concat(parts)


def features_table(texts: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """features.parquet: (pair_id, split, role) beside each text's feature row."""
    return pl.concat([texts.select("pair_id", "split", "role"), scores], how="horizontal")


def score_frame(texts: pl.DataFrame, spec: ScoringSpec):
    """Scores of the `text` column, with the cache statistics."""
    from dpo_eval.scoring import score_texts_with_stats

    return score_texts_with_stats(texts["text"].to_list(), spec)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


def write_config(config: EvalConfig, out: Path, extra: dict) -> None:
    """config.json: the resolved config, fingerprints, package versions, repairs, the load report."""
    payload = {"config": config.model_dump(mode="json"), "versions": package_versions()} | extra
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(payload, indent=2, default=str))


def apply_training_split(pairs: pl.DataFrame, adapter: str | None) -> tuple[pl.DataFrame, str]:
    """Use the train/valid split the checkpoint was trained with, so evaluation never tests on training pairs."""
    from dpo_eval.training import read_metadata

    meta = read_metadata(adapter) if adapter else {}
    if not meta.get("train_pair_ids"):
        return pairs, "data set"
    train = set(meta["train_pair_ids"])
    return pairs.with_columns(pl.when(pl.col("pair_id").is_in(train)).then(pl.lit("train"))
                              .otherwise(pl.lit("valid")).alias("split")), "checkpoint training metadata"


def reward_beta(config: EvalConfig) -> float:
    from dpo_eval.training import read_metadata

    if config.beta is not None:
        return config.beta
    return float(read_metadata(config.model.adapter).get("beta", 0.1)) if config.model.adapter else 0.1


def compute_rewards(spec: ModelSpec, pairs: pl.DataFrame, beta: float) -> pl.DataFrame:
    from dpo_eval.logprobs import implicit_rewards

    return implicit_rewards(cached_model(spec), pairs, beta=beta)
