"""Did it forget? Benchmark accuracy of the tuned model against its base, paired per question.

EleutherAI's lm-evaluation-harness runs the benchmark tasks (named as lm-eval names them, plus task YAMLs
under `include_path`) on ONE load of the model: dpo-eval's own loader (so 4-bit, tokenizer repairs and the
identity are those of generation), wrapped as `HFLM(pretrained=model, tokenizer=tokenizer)`; the base is
the same object under `disable_adapter()`. `simple_evaluate(log_samples=True)` gives each question's
correctness (`results["samples"][task][i]`: `doc_id` and one value per metric); every metric whose
per-question values are all 0 or 1 (acc, acc_norm, exact_match, ...) is compared, per task:

- base, tuned: accuracies over the n questions both answered; delta = tuned - base.
- CI of delta: Newcombe's hybrid score interval for paired proportions (Newcombe 1998, method 10; Wilson
  intervals of both accuracies combined with their estimated correlation phi, whose numerator AD - BC is
  replaced by AD - BC - n/2 where that is positive, by 0 where 0 <= AD - BC <= n/2). Deterministic,
  no resampling, and keeps its coverage at the small n of a quick check.
- base_only / tuned_only: questions only the base / only the tuned model got right (the discordant pairs).
- p: exact McNemar test, two-sided binomial test of tuned_only among base_only + tuned_only against 1/2
  (p = 1 with no discordant question). lm-eval's own standard errors treat the two runs as independent
  samples and so overstate the uncertainty of the difference.
- q: Benjamini-Hochberg over the tasks that report the metric (acc and acc_norm of one task are two views
  of the same answers, so each metric is its own family).

Per-model results are cached on disk by (model identity key of that side, task name, a hash of the task's
config with its data by content (local data files, globs and folders hashed; a hub data set by its commit),
limit, num_fewshot, lm-eval version): a new adapter reruns the tuned side only. A task that cannot be loaded
or evaluated is reported in one line naming it and the fix; the other tasks still run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import polars as pl
from scipy import stats as sps

from dpo_eval.config import ForgettingSpec, ModelSpec, default_cache_dir
from dpo_eval.errors import DpoEvalError, is_out_of_memory
from dpo_eval.identity import DigestStore, ModelIdentity, folder_files, hub_revision, model_identity
from dpo_eval.jsonsafe import json_key, jsonable
from dpo_eval.locations import is_local_path
from dpo_eval.stats.paired import benjamini_hochberg, wilson

log = logging.getLogger(__name__)
CONFIDENCE = 0.95
CODE_VERSION = "forgetting-v1"  # bump with a change to the code that computes these values: every value cached before then misses
SIDES = ("base", "tuned")
# (side, task) of every lm-eval evaluation this process ran, in order: how a caller (and the tests) see
# that a cached side was not evaluated again.
EVALUATIONS: list[tuple[str, str]] = []


@dataclass
class BenchmarkTask:
    """A loaded lm-eval task, the name it was asked for by, and the hash of its config."""

    name: str
    requested: str
    task: object
    config_hash: str


# ---------------------------------------------------------------- statistics

def newcombe_paired_ci(both: int, tuned_only: int, base_only: int, neither: int,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Newcombe's method-10 interval of p_tuned - p_base from the paired 2x2 table (see the module docstring):
    delta -/+ sqrt(d1^2 - 2 phi d1 d2 + d2^2) with d1, d2 the distances from each accuracy to the opposite
    Wilson limits; clipped to [-1, 1]. NaN with no question."""
    n = both + tuned_only + base_only + neither
    if n == 0:
        return math.nan, math.nan
    p_t, p_b = (both + tuned_only) / n, (both + base_only) / n
    (l_t, u_t), (l_b, u_b) = wilson(both + tuned_only, n, confidence), wilson(both + base_only, n, confidence)
    margins = (both + tuned_only) * (base_only + neither) * (both + base_only) * (tuned_only + neither)
    ad_bc = both * neither - tuned_only * base_only
    numerator = ad_bc - n / 2 if ad_bc > n / 2 else (0.0 if ad_bc >= 0 else ad_bc)
    phi = numerator / math.sqrt(margins) if margins else 0.0
    delta = p_t - p_b
    low = delta - math.sqrt(max(0.0, (p_t - l_t) ** 2 - 2 * phi * (p_t - l_t) * (u_b - p_b) + (u_b - p_b) ** 2))
    high = delta + math.sqrt(max(0.0, (u_t - p_t) ** 2 - 2 * phi * (u_t - p_t) * (p_b - l_b) + (p_b - l_b) ** 2))
    return max(-1.0, low), min(1.0, high)


def mcnemar_exact(base_only: int, tuned_only: int) -> float:
    """Exact McNemar p: two-sided binomtest(tuned_only, base_only + tuned_only, 1/2); 1 without discordant pairs."""
    if base_only + tuned_only == 0:
        return 1.0
    return float(sps.binomtest(int(tuned_only), int(base_only + tuned_only), 0.5).pvalue)


def paired_summary(base: np.ndarray, tuned: np.ndarray, confidence: float = CONFIDENCE) -> dict:
    """n, base, tuned, delta, ci_low, ci_high, base_only, tuned_only, p_value of paired 0/1 correctness."""
    base, tuned = np.asarray(base, dtype=bool), np.asarray(tuned, dtype=bool)
    both, neither = int((base & tuned).sum()), int((~base & ~tuned).sum())
    base_only, tuned_only = int((base & ~tuned).sum()), int((~base & tuned).sum())
    n = base.size
    low, high = newcombe_paired_ci(both, tuned_only, base_only, neither, confidence)
    acc_b, acc_t = (float(base.mean()), float(tuned.mean())) if n else (math.nan, math.nan)
    return {"n": n, "base": acc_b, "tuned": acc_t, "delta": (tuned_only - base_only) / n if n else math.nan,
            "ci_low": low, "ci_high": high, "base_only": base_only, "tuned_only": tuned_only,
            "p_value": mcnemar_exact(base_only, tuned_only)}


def primary_metric(task: "BenchmarkTask") -> str | None:
    """The metric a task declares first in its YAML's metric_list, or None where it declares none. (For ARC and
    HellaSwag that is acc, where some leaderboards report acc_norm: acc_norm is then shown as secondary.)"""
    listed = getattr(getattr(task.task, "config", None), "metric_list", None) or []
    names = [m.get("metric") for m in listed if isinstance(m, dict) and isinstance(m.get("metric"), str)]
    return names[0] if names else None


def choose_primary(metrics: list[str], declared: str | None) -> str:
    """The task's primary metric among those it reported per question: the declared one, else acc, else the first
    by name. One metric per task decides the forgetting verdict; the others are shown as secondary."""
    if declared in metrics:
        return declared
    filtered = [m for m in metrics if declared and m.startswith(declared + ",")]  # `exact_match,strict-match`
    if filtered:
        return filtered[0]  # metrics come in the order lm-eval reported them: its first filter
    return "acc" if "acc" in metrics else sorted(metrics)[0]


def summarize(pairs: pl.DataFrame, declared: dict[str, str | None] | None = None) -> dict[str, dict[str, dict]]:
    """{task: {metric: paired_summary + q_value + primary (+ q_primary)}} of per-question rows (task, metric, doc_id,
    base, tuned). q_value: BH across the tasks reporting that metric; q_primary, on each task's primary metric only
    (choose_primary, from `declared` {task: metric}): BH across the tasks' primary metrics, one look per task."""
    rows = []
    for (task, metric), part in pairs.sort("task", "metric", "doc_id").group_by(["task", "metric"], maintain_order=True):
        rows.append((task, metric, paired_summary(part["base"].to_numpy(), part["tuned"].to_numpy())))
    for metric in {m for _, m, _ in rows}:
        family = [s for _, m, s in rows if m == metric]
        for s, q in zip(family, benjamini_hochberg(np.array([s["p_value"] for s in family]))):
            s["q_value"] = float(q)
    out: dict[str, dict[str, dict]] = {}
    for task, metric, s in rows:
        out.setdefault(task, {})[metric] = s
    primaries = []
    for task, metrics in out.items():
        primary = choose_primary(list(metrics), (declared or {}).get(task))
        for metric, s in metrics.items():
            s["primary"] = metric == primary
        primaries.append(metrics[primary])
    for s, q in zip(primaries, benjamini_hochberg(np.array([s["p_value"] for s in primaries]))):
        s["q_primary"] = float(q)
    return out


# ---------------------------------------------------------------- tasks

def _map_files(files, fn):
    if isinstance(files, str):
        return fn(files)
    if isinstance(files, list):
        return [_map_files(f, fn) for f in files]
    if isinstance(files, dict):
        return {k: _map_files(v, fn) for k, v in files.items()}
    return files


def _resolved_config(manager, name: str) -> dict | None:
    """The config of the YAML task `name` with relative data_files (files or globs) and data_dir that exist beside
    the YAML made absolute (lm-eval alone resolves them against the working directory); None when nothing needs
    resolving."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.kind.name != "TASK" or entry.yaml_path is None:
        return None
    config = load_yaml(entry.yaml_path, resolve_func=True)
    kwargs = config.get("dataset_kwargs") or {}
    folder = Path(entry.yaml_path).resolve().parent

    def absolute(path: str) -> str:
        beside = folder / path
        found = beside.exists() or glob.has_magic(path) and glob.glob(str(beside), recursive=True)
        return str(beside) if not Path(path).is_absolute() and found else path

    resolved = {key: _map_files(kwargs[key], absolute) for key in ("data_files", "data_dir") if key in kwargs}
    return None if resolved == {k: kwargs[k] for k in resolved} else config | {"dataset_kwargs": kwargs | resolved}


def data_content(path: str, store: DigestStore):
    """A local data file, folder or glob by content, never by path: 'sha256:<hex>' of a file, {"folder": {path:
    sha256}} of a folder's files, {"glob": [sha256, ...]} of the files a glob matches in the order datasets reads
    them (relative to the working directory, as datasets resolves it); `path` itself where nothing local matches."""
    from datasets.data_files import resolve_pattern

    local = Path(path).expanduser()
    if local.is_file():
        return "sha256:" + store.digest(local)
    if local.is_dir():
        return {"folder": folder_files(local, store)}
    if glob.has_magic(path) and "://" not in path:
        try:
            return {"glob": [store.digest(Path(f)) for f in resolve_pattern(path, base_path=os.getcwd())]}
        except FileNotFoundError:
            pass
    return path


def data_source(dataset_path: str | None, revision: str | None, store: DigestStore):
    """The task's dataset_path: a local folder by content; a hub data set as {"hub", "revision", "commit"} (the
    commit the revision resolves to, online or from the hub cache, or "unpinned"); a datasets builder (json,
    csv, ...) as it is."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    if not isinstance(dataset_path, str) or dataset_path in _PACKAGED_DATASETS_MODULES:
        return dataset_path
    if is_local_path(dataset_path):
        return data_content(dataset_path, store)
    return {"hub": dataset_path, "revision": revision, "commit": hub_revision(dataset_path, revision, "dataset")}


def config_hash(task, store: DigestStore) -> str:
    """sha256 of the task's config (lm-eval's dump_config: functions as source) with its data by content, never by
    name or path: local data files, globs, data_dir and dataset_path folders hashed, a hub data set's commit."""
    config = task.dump_config()
    (config.get("metadata") or {}).pop("config_source", None)
    kwargs = config.get("dataset_kwargs") or {}
    for key in ("data_files", "data_dir"):
        if key in kwargs:
            kwargs[key] = _map_files(kwargs[key], lambda p: data_content(p, store))
    if "dataset_path" in config:
        config["dataset_path"] = data_source(config["dataset_path"], kwargs.get("revision"), store)
    text = re.sub(r" at 0x[0-9a-f]+", "", json.dumps(config, sort_keys=True, default=str))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def load_tasks(spec: ForgettingSpec, store: DigestStore | None = None) -> tuple[list[BenchmarkTask], dict[str, str]]:
    """The leaf tasks of every requested name, and {name: one line saying why it cannot load and the fix}."""
    from lm_eval.tasks import TaskManager

    include = None
    if spec.include_path is not None:
        include = Path(spec.include_path).expanduser().resolve()
        if not include.is_dir():
            raise DpoEvalError(f"--include-path {spec.include_path}: no such folder of lm-eval task YAMLs")
    manager = TaskManager(include_path=str(include) if include else None)
    store = store or DigestStore()
    tasks, failed = [], {}
    for name in dict.fromkeys(spec.tasks):
        try:
            config = _resolved_config(manager, name)
            loaded = manager.load([config if config is not None else name])["tasks"]
            tasks += [BenchmarkTask(leaf, name, task, config_hash(task, store)) for leaf, task in loaded.items()]
        except KeyError:
            failed[name] = _unknown_task(name, manager, include)
        except Exception as exc:  # noqa: BLE001 - any data set error of any task: one line, the others run
            failed[name] = (f"task {name}: cannot load its data set ({type(exc).__name__}: {str(exc)[:200]}); "
                            "pre-download it where there is network (it is read from the Hugging Face cache "
                            "after that), or give --include-path with a task YAML over local files")
    return tasks, failed


def _unknown_task(name: str, manager, include: Path | None) -> str:
    import difflib

    close = difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.75)
    where = f" nor in --include-path {include}" if include else ""
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return (f"task {name}: no lm-eval task, group or tag of that name{where}{hint} (list them with "
            f"`lm-eval ls tasks`; your own YAMLs go in --include-path DIR)")


# ---------------------------------------------------------------- per-model results

def cache_key(model_key: str, task: BenchmarkTask, spec: ForgettingSpec) -> str:
    payload = [model_key, task.name, task.config_hash, spec.limit, spec.num_fewshot, version("lm_eval"), CODE_VERSION]
    return json_key(payload, 24)  # a list: sorting keys changes nothing, the keys of earlier runs hold


def correctness(samples: list[dict]) -> pl.DataFrame:
    """(metric, doc_id, value) of every metric whose per-question values are all 0 or 1; a filter other than
    lm-eval's 'none' is kept in the name as lm-eval reports it (`exact_match,strict-match`)."""
    rows = []
    for sample in samples:
        for metric in sample.get("metrics", []):
            name = metric if sample.get("filter", "none") == "none" else f"{metric},{sample['filter']}"
            value = sample.get(metric)
            numeric = isinstance(value, (bool, int, float)) and not isinstance(value, complex)
            rows.append((name, int(sample["doc_id"]), float(value) if numeric else math.nan))
    frame = pl.DataFrame(rows, schema={"metric": pl.String, "doc_id": pl.Int64, "value": pl.Float64}, orient="row")
    binary = frame.group_by("metric").agg(pl.col("value").is_in([0.0, 1.0]).all().alias("ok"))
    keep = binary.filter(pl.col("ok"))["metric"]
    return frame.filter(pl.col("metric").is_in(keep.implode())).with_columns(pl.col("value").cast(pl.Int8))


def evaluate_task(lm, task: BenchmarkTask, side: str, spec: ForgettingSpec) -> pl.DataFrame:
    """One lm-eval run of one task on the model as it is now (the caller sets the side). lm-eval's own
    bootstrap of standard errors is off (bootstrap_iters=0): the paired statistics replace it."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    EVALUATIONS.append((side, task.name))
    # The task is loaded already; an empty manager spares simple_evaluate indexing every built-in YAML again.
    results = simple_evaluate(model=lm, tasks=[task.task], num_fewshot=spec.num_fewshot, limit=spec.limit,
                              log_samples=True, bootstrap_iters=0, task_manager=TaskManager(include_defaults=False))
    return correctness(results["samples"][task.name])


# ---------------------------------------------------------------- the run

def run_forgetting(model: ModelSpec, spec: ForgettingSpec, identity: ModelIdentity | None = None, load=None,
                   cache_dir: Path | None = None) -> tuple[pl.DataFrame, dict]:
    """Per-question rows (task, metric, doc_id, base, tuned) and the result: {tasks: {task: {metric: ...}},
    failed: {task: line}, task_configs, cache, timings, methods}. `load(spec, identity)` loads the model
    (default dpo_eval.generation.models.load_model), once, and only when some side of some task is not cached."""
    timings, started = {}, time.perf_counter()
    identity = identity or model_identity(model)
    folder = Path(cache_dir or default_cache_dir()) / "forgetting"
    tasks, failed = load_tasks(spec)
    timings["load_tasks"] = round(time.perf_counter() - started, 3)
    per_side: dict[str, dict[str, pl.DataFrame]] = {side: {} for side in SIDES}
    cache = {side: {"hits": 0, "misses": 0} for side in SIDES}
    loaded = lm = None
    for side in SIDES:
        todo = []
        for task in tasks:
            path = folder / f"{cache_key(identity.key(side), task, spec)}.parquet"
            if path.is_file():  # without an adapter the tuned side is the base side's file
                per_side[side][task.name] = pl.read_parquet(path)
                cache[side]["hits"] += 1
            elif task.name not in failed:
                todo.append((task, path))
        if not todo:
            continue
        if lm is None:
            loaded, lm = _load(model, identity, load, spec, timings)
        begun = time.perf_counter()
        with loaded.base_context() if side == "base" else nullcontext():
            for task, path in todo:
                _evaluate_one(lm, task, side, spec, path, per_side, cache, failed)
        timings[side] = round(time.perf_counter() - begun, 3)
    pairs = _paired(tasks, per_side)
    timings["total"] = round(time.perf_counter() - started, 3)
    result = {"tasks": summarize(pairs, {t.name: primary_metric(t) for t in tasks}), "failed": failed, "task_configs": {t.name: t.config_hash for t in tasks},
              "cache": cache, "timings": timings, "settings": spec.model_dump(mode="json"),
              "lm_eval": version("lm_eval"), "model": {"base_key": identity.base_key, "tuned_key": identity.tuned_key},
              "ci_method": f"Newcombe hybrid score interval for paired proportions (method 10), {CONFIDENCE:.0%}",
              "p_method": "exact McNemar: two-sided binomial test of tuned_only among the discordant questions",
              "q_family": "Benjamini-Hochberg over the tasks reporting the metric",
              "primary_rule": ("one metric per task decides: the first in the task's metric_list, else acc; "
                               "q_primary is Benjamini-Hochberg across the tasks' primary metrics")}
    return pairs, result


def _load(model: ModelSpec, identity: ModelIdentity, load, spec: ForgettingSpec, timings: dict):
    """The loaded model and lm-eval's wrapper of it (HFLM over the model object: lm-eval's own loading
    cannot do 4-bit under transformers 5 and would skip dpo-eval's repairs)."""
    from lm_eval.models.huggingface import HFLM

    if load is None:
        from dpo_eval.generation.models import load_model as load
    started = time.perf_counter()
    loaded = load(model, identity)
    lm = HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=spec.batch_size)
    timings["load_model"] = round(time.perf_counter() - started, 3)
    return loaded, lm


def _paired(tasks: list[BenchmarkTask], per_side: dict) -> pl.DataFrame:
    """task, metric, doc_id, base, tuned of every question both sides answered."""
    frames = []
    for task in tasks:
        if task.name in per_side["base"] and task.name in per_side["tuned"]:
            joined = per_side["base"][task.name].join(per_side["tuned"][task.name], on=["metric", "doc_id"],
                                                      suffix="_tuned")
            frames.append(joined.select(pl.lit(task.name).alias("task"), "metric", "doc_id",
                                        pl.col("value").alias("base"), pl.col("value_tuned").alias("tuned")))
    schema = {"task": pl.String, "metric": pl.String, "doc_id": pl.Int64, "base": pl.Int8, "tuned": pl.Int8}
    return pl.concat(frames) if frames else pl.DataFrame(schema=schema)


def _evaluate_one(lm, task, side, spec, path, per_side, cache, failed) -> None:
    """Evaluate one task on one side and cache it at once; an error becomes the task's line in `failed`."""
    try:
        frame = evaluate_task(lm, task, side, spec)
    except Exception as exc:  # noqa: BLE001 - one task's error must not lose the others
        if is_out_of_memory(exc):
            raise  # the caller's retry with a smaller batch
        failed[task.name] = (f"task {task.name}: lm-eval failed on the {side} model ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); check the task's YAML (doc_to_text, doc_to_choice, "
                             "doc_to_target) or run it alone with lm-eval")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    frame.write_parquet(temporary)
    temporary.replace(path)
    per_side[side][task.name] = frame
    cache[side]["misses"] += 1


def write_forgetting(out: Path, pairs: pl.DataFrame, result: dict) -> None:
    """forgetting.parquet (task, metric, doc_id, base, tuned) and forgetting.json (the result) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs.write_parquet(out / "forgetting.parquet")
    (out / "forgetting.json").write_text(json.dumps(jsonable(result), indent=2, allow_nan=False))


def raise_failures(result: dict, out: Path | None = None) -> None:
    """A DpoEvalError with one line per task that could not run (after the others' results are written)."""
    failed = result.get("failed") or {}
    if failed:
        where = f" (the other tasks' results are in {out})" if out is not None and result.get("tasks") else ""
        raise DpoEvalError(f"{len(failed)} benchmark task(s) could not run{where}:\n  " + "\n  ".join(failed.values()))
