"""The evaluation's stages as plain functions (no Prefect): shards, features, the run directory.

The Prefect flow (flows/evaluate.py) wires these through thin tasks; each stage here takes and
returns plain data (frames, paths, configs), so it runs and tests without an orchestrator.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import threading
from pathlib import Path

import polars as pl

from dpo_eval.config import AnalysisSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.identity import ModelIdentity, installed_versions, model_identity
from dpo_eval.jsonsafe import json_key

ROLES = ("chosen", "rejected", "base", "tuned")
PACKAGES = ("dpo-eval", "torch", "transformers", "peft", "bitsandbytes", "trl", "datasets", "spacy",
            "textdescriptives", "scipy", "polars", "prefect", "numpy")


def shard_of(pair_id: str, n_shards: int) -> int:
    """The bucket of a pair: its place in sha256 space cut into `n_shards` equal ranges."""
    return int(hashlib.sha256(pair_id.encode()).hexdigest()[:15], 16) * n_shards >> 60


def shard_pairs(pairs: pl.DataFrame, shard_size: int) -> list[pl.DataFrame]:
    """Shards of about `shard_size` pairs (the unit of caching and resumption), bucketed by a hash of pair_id.

    The number of buckets is the power of two nearest above n / shard_size, so adding or removing a
    record changes one shard (its bucket), not every shard after it; only crossing a power of two
    re-buckets. A shard holds between about half and one `shard_size` pairs on average; pairs keep
    their input order inside a shard. Empty buckets are left out.

    The pairs of one prompt (data.pairs.prompt_id) share a shard, the bucket of their representative's
    pair_id (the smallest, data.pairs.prompt_representatives), so the prompt is generated once
    (generation.generate); with distinct prompts every pair is its own representative and the shards are
    the ones bucketing by pair_id alone gives. A pair that becomes its prompt's new representative moves
    the prompt's pairs to its bucket: two shards change.
    """
    from dpo_eval.data.pairs import prompt_representatives

    if pairs.height == 0:
        return []
    n_shards = 1 << max(0, math.ceil(math.log2(max(1.0, pairs.height / shard_size))))
    rows, of = prompt_representatives(pairs)
    ids = pairs["pair_id"].to_list()
    bucket = pl.Series([shard_of(ids[rows[k]], n_shards) for k in of])
    tagged = pairs.with_columns(bucket.alias("__bucket"))
    return [tagged.filter(pl.col("__bucket") == b).drop("__bucket") for b in sorted(set(bucket.to_list()))]


def content_hash(frame: pl.DataFrame, columns: tuple[str, ...] = ("pair_id", "system", "messages")) -> str:
    """sha256 of a shard's content (ids and prompts), independent of run ids."""
    digest = hashlib.sha256()
    for row in frame.select(list(columns)).iter_rows():
        digest.update(json.dumps(row, ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def spec_hash(*specs) -> str:
    return json_key([s.model_dump(mode="json") for s in specs], 16)


_MODEL: dict[str, object] = {}
_MODEL_LOCK = threading.Lock()


def cached_model(spec: ModelSpec, identity: ModelIdentity | None = None, engine: str = "hf", merge: bool = False):
    """One load per worker process for all the shards it generates, keyed on the complete model identity
    (never on the path: a checkpoint rewritten at the same path is a new model) and on the engine (whose
    weights differ: 4-bit layers or dequantized ones). A load for another key releases the one held
    first, so a worker never holds two models."""
    from dpo_eval.generation.models import load_model

    identity = identity or model_identity(spec)
    key = f"{identity.pair_key}:{engine}:{'merged' if merge else 'unmerged'}"
    with _MODEL_LOCK:
        loaded = _MODEL.get(key)
        if loaded is None or loaded.spec != spec:
            release_models()
            loaded = _MODEL[key] = load_model(spec, identity, engine=engine, merge=merge)
        return loaded


def release_models() -> None:
    """Drop the cached model and give its memory back (between stages and after an out-of-memory error)."""
    import gc

    _MODEL.clear()
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def check_identity(spec: ModelSpec, expected: str, model: str) -> ModelIdentity:
    """The identity of `spec` now; an error when its key for `model` is not the one the run started with
    (the files changed during the run, so the cache key would name other weights)."""
    identity = model_identity(spec)
    if identity.key(model) != expected:
        which = "tuned and base" if model == "pair" else model
        raise DpoEvalError(f"the {which} model's files changed since this run identified them (--base {spec.base}, "
                           f"--adapter {spec.adapter}, --reference-adapter {spec.reference_adapter or 'as recorded'}); "
                           "run again once the checkpoint is complete")
    return identity


def generate_shard(spec: ModelSpec, generation: GenerationSpec, shard: pl.DataFrame,
                   model: str, key: str, halvings: int = 0, on_batch=None) -> tuple[pl.DataFrame, list[str]]:
    """Answers of one model ('base' or 'tuned') to one shard, and the loader's repairs; `key` is the
    identity key the cache stores them under, checked against the files before and after; the batch
    size (set or planned) halved `halvings` times, once per retry after an out-of-memory error;
    `on_batch(n)` after each batch (a worker's lease counts it as progress)."""
    from dpo_eval.generation.generate import generate_both

    loaded = cached_model(spec, check_identity(spec, key, model), generation.engine, generation.merge)
    answers = generate_both(loaded, shard, generation, models=(model,), halvings=halvings, on_batch=on_batch)
    check_identity(spec, key, model)
    return answers.with_columns(pl.lit(worker_label()).alias("worker")), list(loaded.repairs)


def worker_label() -> str:
    """`host:pid` of this process: the worker column of answers.parquet (who generated a shard)."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def worker_account(answers: pl.DataFrame, runner: str, extra: dict | None = None) -> dict:
    """summary.json `workers`: the runner, answers per worker (host:pid; None: cached before the column
    existed), and what the runner adds (task workers: the shards submitted again after a lost worker)."""
    counts = answers.group_by("worker").len().sort("worker", nulls_last=True).iter_rows()
    return {"runner": runner, "answers": {str(w) if w is not None else "unknown": n for w, n in counts}} | (extra or {})


def with_worker(answers: pl.DataFrame) -> pl.DataFrame:
    """`answers` with a worker column (null for shards cached before the column existed)."""
    if "worker" in answers.columns:
        return answers
    return answers.with_columns(pl.lit(None, dtype=pl.String).alias("worker"))


REFERENCE_FEATURES = "reference_features.parquet"
REFERENCE_PAIRS = "reference_pairs.parquet"


def check_labels(pairs: pl.DataFrame, reference: pl.DataFrame | None, config: EvalConfig) -> bool:
    """Whether the data set has labels; an error, before any model is loaded, where a reference data set
    comes with a labelled data set or has no labels itself."""
    from dpo_eval.data.pairs import is_labeled

    labeled = is_labeled(pairs)
    if reference is None:
        return labeled
    where = f"--reference-dataset {config.reference_dataset.source}"
    if labeled:
        raise DpoEvalError(f"{where}: a reference data set is for questions without labels, but "
                           f"{config.dataset.source} has chosen and rejected answers (they give the direction and "
                           "the scale themselves); drop --reference-dataset")
    if not is_labeled(reference):
        raise DpoEvalError(f"{where}: has no chosen and rejected answers, so it cannot give a direction; pass the "
                           "preference data the checkpoint was trained on")
    return labeled


def require_adapter(spec: ModelSpec) -> None:
    if spec.adapter is None:
        raise DpoEvalError("evaluate needs --adapter: without one, tuned and base are the same model")


def texts_of(pairs: pl.DataFrame, answers: pl.DataFrame | None = None) -> pl.DataFrame:
    """Long table (pair_id, prompt_id, split, role, text) of the four texts of every pair; chosen and rejected only
    where the pair has them (questions without labels have none), base and tuned only with `answers`. prompt_id
    (data.pairs.prompt_id) is the unit of the tuned-vs-base statistics (stats.analysis)."""
    from dpo_eval.data.pairs import PROMPT_ID, prompt_ids

    keyed = pairs.with_columns(pl.Series(PROMPT_ID, prompt_ids(pairs), dtype=pl.String))
    parts = [keyed.filter(pl.col(role).is_not_null()).select("pair_id", PROMPT_ID, "split", pl.lit(role).alias("role"),
                                                               pl.col(role).alias("text"))
             for role in ("chosen", "rejected")]
    if answers is None:
        return pl.concat(parts)
    split = keyed.select("pair_id", PROMPT_ID, "split")
    for role in ("base", "tuned"):
        part = answers.filter(pl.col("model") == role).select("pair_id", pl.col("answer").alias("text"))
        parts.append(split.join(part, on="pair_id", how="inner").select(
            "pair_id", PROMPT_ID, "split", pl.lit(role).alias("role"), "text"))
    return pl.concat(parts)


def features_table(texts: pl.DataFrame, scores: pl.DataFrame) -> pl.DataFrame:
    """features.parquet: (pair_id, split, role, and prompt_id where `texts` has it) beside each text's feature row."""
    keys = [c for c in ("pair_id", "split", "role", "prompt_id") if c in texts.columns]
    return pl.concat([texts.select(keys), scores], how="horizontal")


def score_frame(texts: pl.DataFrame, spec: ScoringSpec):
    """Scores of the `text` column, with the cache statistics."""
    from dpo_eval.scoring.scorer import score_texts_with_stats

    return score_texts_with_stats(texts["text"].to_list(), spec)


def run_analysis_spec(run_dir: Path) -> AnalysisSpec:
    """The analysis settings a run was made with (its config.json); the defaults where it has none."""
    try:
        return AnalysisSpec(**json.loads((Path(run_dir) / "config.json").read_text())["config"]["analysis"])
    except (OSError, KeyError, TypeError, ValueError):  # json.JSONDecodeError is a ValueError
        return AnalysisSpec()


def package_versions() -> dict[str, str]:
    return {"python": platform.python_version()} | installed_versions(PACKAGES)


def write_config(config: EvalConfig, out: Path, extra: dict) -> None:
    """config.json: the resolved config, fingerprints, package versions, repairs, the load report."""
    payload = {"config": config.model_dump(mode="json"), "versions": package_versions()} | extra
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(payload, indent=2, default=str))


def apply_training_split(pairs: pl.DataFrame, adapter: str | None) -> tuple[pl.DataFrame, str]:
    """Use the train/valid split the checkpoint was trained with, so evaluation never tests on training pairs."""
    from dpo_eval.checkpoint_meta import read_metadata

    meta = read_metadata(adapter) if adapter else {}
    if not meta.get("train_pair_ids"):
        return pairs, "data set"
    train = set(meta["train_pair_ids"])
    split = pairs.with_columns(pl.when(pl.col("pair_id").is_in(train)).then(pl.lit("train"))
                               .otherwise(pl.lit("valid")).alias("split"))
    if not (split["split"] == "train").any():
        return split, ("checkpoint training metadata: none of these pairs was trained on (another data set?), so "
                       "every pair is valid and the scale S_j is the valid split's own std")
    straddling = (split.group_by("system", "messages").agg(pl.col("split").n_unique().alias("sides"))
                  .filter(pl.col("sides") > 1).height)
    if straddling:  # a checkpoint trained before the split was by prompt: used as recorded, and said
        return split, (f"checkpoint training metadata, as recorded; {straddling} prompt(s) have pairs on both sides "
                       "(the checkpoint's training split was made by pair, or a training mix drew some of a prompt's "
                       "pairs), so their valid pairs share a prompt the model was trained on and are not fully held "
                       "out")
    return split, "checkpoint training metadata"


def reward_beta(config: EvalConfig) -> float:
    from dpo_eval.checkpoint_meta import read_metadata

    if config.beta is not None:
        return config.beta
    return float(read_metadata(config.model.adapter).get("beta", 0.1)) if config.model.adapter else 0.1


def reward_max_length(config: EvalConfig) -> int | None:
    """The max_length DPO training cut sequences to (trl's truncation), from the checkpoint's metadata;
    None (the model's context) for a checkpoint trained elsewhere."""
    from dpo_eval.checkpoint_meta import read_metadata

    meta = read_metadata(config.model.adapter) if config.model.adapter else {}
    return int(meta["max_length"]) if meta.get("max_length") else None


def compute_rewards(spec: ModelSpec, pairs: pl.DataFrame, beta: float, max_length: int | None,
                    key: str) -> pl.DataFrame:
    from dpo_eval.generation.logprobs import implicit_rewards

    loaded = cached_model(spec, check_identity(spec, key, "pair"))
    return implicit_rewards(loaded, pairs, beta=beta, max_length=max_length)
