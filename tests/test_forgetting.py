"""The forgetting check: real lm-evaluation-harness on stories260k in 4-bit, over a project-written
multiple-choice task (tests/data/forgetting), paired per question; and its statistics on known cases."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from dpo_eval.config import ModelSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.forgetting import harness as forgetting
from dpo_eval.forgetting.harness import (
    ForgettingSpec,
    correctness,
    load_tasks,
    mcnemar_exact,
    newcombe_paired_ci,
    paired_summary,
    run_forgetting,
    summarize,
)
from tests.builders import make_adapter

TASKS_DIR = Path(__file__).parent / "data" / "forgetting"
MC, STORY = "dpo_eval_tiny_stories_mc", "dpo_eval_tiny_stories_mc_story"
MISSING, UNREACHABLE = "no_such_benchmark_task", "dpo_eval_unreachable_hub"
N_QUESTIONS = 20


@pytest.fixture(scope="module", autouse=True)
def cache_home(tmp_path_factory):
    """dpo-eval's caches (file digests, per-model benchmark results) in a folder of this module's own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPO_EVAL_CACHE", str(tmp_path_factory.mktemp("dpo-eval-cache")))
        yield


@pytest.fixture(scope="module")
def adapters(stories260k, tmp_path_factory):
    folder = tmp_path_factory.mktemp("forgetting-adapters")
    return {"random": make_adapter(stories260k, folder / "random", zero=False, seed=1),
            "random2": make_adapter(stories260k, folder / "random2", zero=False, seed=2),
            "zero": make_adapter(stories260k, folder / "zero", zero=True)}


def model(stories260k, adapter) -> ModelSpec:
    return ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="4bit")


def run(stories260k, adapter, *tasks, limit=None):
    """run_forgetting, and the (side, task) evaluations lm-eval made during it."""
    before = len(forgetting.EVALUATIONS)
    spec = ForgettingSpec(tasks=tasks, include_path=str(TASKS_DIR), limit=limit, batch_size=8)
    pairs, result = run_forgetting(model(stories260k, adapter), spec)
    return pairs, result, forgetting.EVALUATIONS[before:]


@pytest.fixture(scope="module")
def first(stories260k, adapters):
    """The random adapter on both good tasks, a missing task name and a task whose data set is unreachable."""
    return run(stories260k, adapters["random"], MC, STORY, MISSING, UNREACHABLE)


# ---------------------------------------------------------------- real lm-eval runs

def test_random_adapter_run_pairs_every_question(first):
    pairs, result, evaluations = first
    assert sorted(evaluations) == sorted((side, task) for side in ("base", "tuned") for task in (MC, STORY))
    assert pairs.columns == ["task", "metric", "doc_id", "base", "tuned"]
    for task in (MC, STORY):
        for metric in ("acc", "acc_norm"):
            part = pairs.filter((pl.col("task") == task) & (pl.col("metric") == metric))
            assert sorted(part["doc_id"].to_list()) == list(range(N_QUESTIONS))
            assert set(part["base"].to_list()) | set(part["tuned"].to_list()) <= {0, 1}
            s = result["tasks"][task][metric]
            assert s["n"] == N_QUESTIONS
            assert s["base"] == pytest.approx(part["base"].mean()) and s["tuned"] == pytest.approx(part["tuned"].mean())
            assert s["delta"] == pytest.approx(s["tuned"] - s["base"])
            assert s["base_only"] == int(((part["base"] == 1) & (part["tuned"] == 0)).sum())
            assert s["ci_low"] <= s["delta"] <= s["ci_high"]
    changed = sum(s["base_only"] + s["tuned_only"] for m in result["tasks"].values() for s in m.values())
    assert changed > 0, "a random adapter (lora_B ~ N(0, 0.5)) changes some answer of stories260k"
    assert result["cache"] == {"base": {"hits": 0, "misses": 2}, "tuned": {"hits": 0, "misses": 2}}


def test_missing_task_and_unloadable_data_set_fail_clearly_and_the_others_still_run(first):
    _, result, _ = first
    assert set(result["failed"]) == {MISSING, UNREACHABLE}
    missing, unreachable = result["failed"][MISSING], result["failed"][UNREACHABLE]
    assert missing.startswith(f"task {MISSING}: no lm-eval task") and "--include-path" in missing
    assert unreachable.startswith(f"task {UNREACHABLE}: cannot load its data set")
    assert "dpo-eval-tests/never-downloaded" in unreachable
    assert "pre-download" in unreachable and "--include-path" in unreachable
    assert set(result["tasks"]) == {MC, STORY}
    with pytest.raises(DpoEvalError) as error:
        forgetting.raise_failures(result, Path("OUT"))
    lines = str(error.value).splitlines()
    assert "2 benchmark task(s) could not run" in lines[0] and "OUT" in lines[0]
    assert [line.strip() for line in lines[1:]] == [missing, unreachable]


def test_zero_adapter_changes_no_answer(stories260k, adapters, first):
    pairs, result, evaluations = run(stories260k, adapters["zero"], MC, STORY)
    assert evaluations == [("tuned", MC), ("tuned", STORY)]  # the base side is the first run's, cached
    assert pairs.height == 2 * 2 * N_QUESTIONS
    assert (pairs["base"] == pairs["tuned"]).all()
    for metrics in result["tasks"].values():
        for s in metrics.values():
            assert s["delta"] == 0.0 and s["base"] == s["tuned"]
            assert s["base_only"] == s["tuned_only"] == 0
            assert s["p_value"] == 1.0 and s["q_value"] == 1.0
            assert s["ci_low"] <= 0.0 <= s["ci_high"]


def test_a_new_adapter_reruns_only_the_tuned_side(stories260k, adapters, first):
    first_pairs, first_result, _ = first
    pairs, result, evaluations = run(stories260k, adapters["random2"], MC, STORY)
    assert evaluations == [("tuned", MC), ("tuned", STORY)]
    assert result["cache"] == {"base": {"hits": 2, "misses": 0}, "tuned": {"hits": 0, "misses": 2}}
    key = ["task", "metric", "doc_id"]
    assert pairs.select(*key, "base").sort(key).equals(first_pairs.select(*key, "base").sort(key))
    # the same adapter again: nothing is evaluated, and the numbers are the first run's
    again_pairs, again, evaluations = run(stories260k, adapters["random"], MC, STORY)
    assert evaluations == []
    assert again["tasks"] == first_result["tasks"]
    assert again_pairs.sort(key).equals(first_pairs.sort(key))


def test_task_config_hash_follows_the_data_file_content_not_its_path(first, tmp_path):
    _, result, _ = first
    copy = shutil.copytree(TASKS_DIR, tmp_path / "tasks")
    tasks, failed = load_tasks(ForgettingSpec(tasks=(MC,), include_path=str(copy)))
    assert failed == {} and tasks[0].config_hash == result["task_configs"][MC]
    data = copy / "tiny_mc.jsonl"
    data.write_text(data.read_text().replace("swing", "slide"))
    tasks, failed = load_tasks(ForgettingSpec(tasks=(MC,), include_path=str(copy)))
    assert failed == {} and tasks[0].config_hash != result["task_configs"][MC]


# How a task YAML names its data: a glob beside it, an absolute glob, a folder (data_dir); and the split it loads.
DATA_FORMS = {"dpo_eval_data_glob": ("data_files:\n    test: parts/*.jsonl", "test"),
              "dpo_eval_data_absolute_glob": ("data_files:\n    test: {folder}/parts/*.jsonl", "test"),
              "dpo_eval_data_folder": ("data_dir: parts", "train")}


def _data_tasks(folder: Path) -> ForgettingSpec:
    """The DATA_FORMS tasks over tiny_mc.jsonl split into parts/a.jsonl and parts/b.jsonl."""
    lines = (TASKS_DIR / "tiny_mc.jsonl").read_text().splitlines(keepends=True)
    (folder / "parts").mkdir(parents=True)
    (folder / "parts" / "a.jsonl").write_text("".join(lines[:10]))
    (folder / "parts" / "b.jsonl").write_text("".join(lines[10:]))
    for name, (kwargs, split) in DATA_FORMS.items():
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  {kwargs.format(folder=folder)}\n"
            f"test_split: {split}\noutput_type: multiple_choice\ndoc_to_text: \"{{{{question}}}}\"\n"
            "doc_to_choice: choices\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    return ForgettingSpec(tasks=tuple(DATA_FORMS), include_path=str(folder))


def _data_keys(spec: ForgettingSpec) -> dict[str, str]:
    tasks, failed = load_tasks(spec)
    assert failed == {}
    return {task.name: forgetting.cache_key("model-key", task, spec) for task in tasks}


def test_data_given_as_a_glob_or_folder_is_keyed_by_content(tmp_path):
    """A data file rewritten with the same name, size and mtime changes the key of a task reading it through a
    glob or a folder; the same content in another folder (another run) gives the same key."""
    import os

    spec = _data_tasks(tmp_path / "one")
    first = _data_keys(spec)
    assert set(first) == set(DATA_FORMS)
    assert _data_keys(_data_tasks(tmp_path / "two")) == first  # another run, elsewhere, the same content
    part = tmp_path / "one" / "parts" / "b.jsonl"
    original, stat = part.read_bytes(), part.stat()
    changed = original.replace(b'"answer": 3', b'"answer": 0', 1)
    assert changed != original and len(changed) == len(original)
    part.write_bytes(changed)
    os.utime(part, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = _data_keys(spec)
    assert {name for name in DATA_FORMS if after[name] == first[name]} == set()


def test_a_hub_data_set_is_keyed_by_its_commit_or_marked_unpinned(tmp_path, monkeypatch):
    """Offline, a hub data set's commit comes from the hub cache (datasets--org--name, refs/main); a data set
    the cache does not hold is 'unpinned'; a datasets builder name (json) stays as it is."""
    import huggingface_hub.constants as constants

    from dpo_eval.forgetting.harness import data_source
    from dpo_eval.identity import DigestStore

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "datasets--org--bench"
    commits = ["a" * 40, "b" * 40]
    for commit in commits:
        (repo / "snapshots" / commit).mkdir(parents=True)
        shutil.copyfile(TASKS_DIR / "tiny_mc.jsonl", repo / "snapshots" / commit / "test.jsonl")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commits[0])
    store = DigestStore(tmp_path / "digests")
    assert data_source("org/bench", None, store) == {"hub": "org/bench", "revision": None, "commit": commits[0]}
    (repo / "refs" / "main").write_text(commits[1])
    assert data_source("org/bench", None, store)["commit"] == commits[1]
    assert data_source("org/absent", "main", store) == {"hub": "org/absent", "revision": "main", "commit": "unpinned"}
    assert data_source("json", None, store) == "json"
    assert data_source(str(repo / "snapshots" / commits[0]), None, store) == data_source(
        str(repo / "snapshots" / commits[1]), None, store)  # a local folder by its files' content


def test_cli_writes_the_files_and_names_the_task_that_failed(stories260k, adapters, tmp_path, monkeypatch, capsys):
    """Through dpo_eval.cli.main's main, from another working directory (the task's data file still resolves
    against its YAML), with --limit."""
    from dpo_eval.cli.main import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["forgetting", "--base", str(stories260k), "--adapter", str(adapters["random"]), "--tasks",
              f"{MC},{MISSING}", "--include-path", str(TASKS_DIR), "--limit", "10", "--out", str(out)])
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert f"dpo-eval: error: 1 benchmark task(s) could not run (the other tasks' results are in {out})" in captured.err
    assert f"task {MISSING}: no lm-eval task" in captured.err
    printed = json.loads(captured.out)
    written = json.loads((out / "forgetting.json").read_text())
    assert printed == written["tasks"] and set(written["tasks"]) == {MC}
    assert written["tasks"][MC]["acc"]["n"] == 10 and written["settings"]["limit"] == 10
    assert set(written["failed"]) == {MISSING}
    pairs = pl.read_parquet(out / "forgetting.parquet")
    assert pairs.columns == ["task", "metric", "doc_id", "base", "tuned"]
    assert sorted(pairs.filter(pl.col("metric") == "acc")["doc_id"].to_list()) == list(range(10))
    assert (out / "plots" / "forgetting_deltas.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "Did it forget?" in page and MC in page and MISSING in page


def test_forgetting_check_flow(harness, stories260k, adapters, first, tmp_path):
    """The flow under a real Prefect API: the cached sides are reused, the files and the artifact written."""
    from dpo_eval.flows.forgetting import forgetting_check
    from prefect.client.orchestration import get_client

    before = len(forgetting.EVALUATIONS)
    out = tmp_path / "flow"
    result = forgetting_check(model(stories260k, adapters["random"]),
                              ForgettingSpec(tasks=(MC, STORY), include_path=str(TASKS_DIR)), out)
    assert forgetting.EVALUATIONS[before:] == []
    assert result["tasks"] == first[1]["tasks"]
    assert json.loads((out / "forgetting.json").read_text())["tasks"] == forgetting.jsonable(first[1]["tasks"])
    assert "Did it forget?" in (out / "report.html").read_text()
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    assert any(a.key == "dpo-eval-forgetting" and MC in a.data for a in artifact)


def test_evaluate_runs_the_forgetting_stage_into_its_own_report(harness, stories260k, adapters, first, orca_jsonl,
                                                                  tmp_path):
    """EvalConfig.forgetting: the evaluation flow runs the benchmark tasks too (cached sides reused), and the
    summary, the report and the summary artifact carry the result."""
    from dpo_eval.flows.evaluate import evaluate_checkpoint
    from prefect.client.orchestration import get_client

    from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ScoringSpec

    before = len(forgetting.EVALUATIONS)
    out = tmp_path / "run"
    config = EvalConfig(dataset=DatasetSpec(source=str(orca_jsonl), limit=8),
                        model=model(stories260k, adapters["random"]),
                        generation=GenerationSpec(max_new_tokens=8, batch_size=8),
                        scoring=ScoringSpec(cache_dir=tmp_path / "scores", n_process=1),
                        analysis=AnalysisSpec(bootstrap=50, permutations=50), out=out, rewards=False,
                        forgetting=ForgettingSpec(tasks=(MC, STORY), include_path=str(TASKS_DIR)))
    summary = evaluate_checkpoint(config)
    assert forgetting.EVALUATIONS[before:] == []  # both sides of both tasks from the module's first run
    assert summary["forgetting"]["tasks"] == forgetting.jsonable(first[1]["tasks"])
    assert summary["forgetting"]["headline"].startswith("Over 2 benchmark task(s)")
    assert json.loads((out / "forgetting.json").read_text())["tasks"] == forgetting.jsonable(first[1]["tasks"])
    page = (out / "report.html").read_text()
    assert "Did it forget?" in page and "Sign agreement" in page  # one report: the study and the benchmarks
    with get_client(sync_client=True) as client:
        artifacts = client.read_latest_artifacts()
    assert any(a.key == "dpo-eval-summary" and "did it forget?" in a.data for a in artifacts)


# ---------------------------------------------------------------- statistics on known cases

@pytest.mark.parametrize("base_only, tuned_only", [(8, 2), (2, 8), (0, 5), (13, 12), (1, 0), (40, 21)])
def test_mcnemar_p_is_the_exact_binomial_test_of_the_discordant_pairs(base_only, tuned_only):
    expected = sps.binomtest(tuned_only, base_only + tuned_only, 0.5).pvalue
    assert mcnemar_exact(base_only, tuned_only) == pytest.approx(expected, rel=1e-12)
    base = np.array([1] * base_only + [0] * tuned_only + [1] * 7 + [0] * 4)
    tuned = np.array([0] * base_only + [1] * tuned_only + [1] * 7 + [0] * 4)
    s = paired_summary(base, tuned)
    assert (s["base_only"], s["tuned_only"], s["n"]) == (base_only, tuned_only, base.size)
    assert s["p_value"] == pytest.approx(expected, rel=1e-12)
    assert s["delta"] == pytest.approx(tuned.mean() - base.mean())


def test_no_discordant_question_gives_p_one_and_delta_zero():
    same = np.array([1, 1, 0, 1, 0])
    s = paired_summary(same, same)
    assert (s["p_value"], s["delta"], s["base_only"], s["tuned_only"]) == (1.0, 0.0, 0, 0)


def test_newcombe_interval_matches_the_published_example():
    """Fagerland, Lydersen & Laake, Statistical Analysis of Contingency Tables (2017), ch. 8: Cavo et al. (2012),
    table [[59, 6], [16, 80]]: estimate -0.0621, Newcombe square-and-add 95% CI -0.1186 to -0.0046."""
    low, high = newcombe_paired_ci(both=59, tuned_only=6, base_only=16, neither=80)
    assert (round(low, 4), round(high, 4)) == (-0.1186, -0.0046)


@pytest.mark.parametrize("p_base, p_tuned", [(0.65, 0.55), (0.5, 0.5), (0.3, 0.45)])
def test_ci_covers_a_planted_difference(p_base, p_tuned):
    """Questions of varied difficulty, answers of the two models correlated through it: over 400 seeded
    data sets of 120 questions the 95% interval holds the planted difference about 95% of the time."""
    rng = np.random.default_rng(12345)
    covered = 0
    for _ in range(400):
        difficulty = rng.normal(size=120)
        shift_b, shift_t = sps.norm.ppf(p_base), sps.norm.ppf(p_tuned)
        noise = rng.normal(size=(2, 120))
        base = (shift_b * math.sqrt(2) - difficulty + noise[0] > 0).astype(int)
        tuned = (shift_t * math.sqrt(2) - difficulty + noise[1] > 0).astype(int)
        s = paired_summary(base, tuned)
        covered += s["ci_low"] <= p_tuned - p_base <= s["ci_high"]
    assert 0.92 <= covered / 400 <= 0.99


def test_q_values_are_benjamini_hochberg_across_tasks_per_metric():
    rows = []
    counts = {"a": (10, 1), "b": (6, 4), "c": (2, 9)}  # (base_only, tuned_only) per task
    for task, (base_only, tuned_only) in counts.items():
        base = [1] * base_only + [0] * tuned_only + [1, 0]
        tuned = [0] * base_only + [1] * tuned_only + [1, 0]
        for metric in ("acc", "acc_norm"):
            rows += [(task, metric, i, b, t) for i, (b, t) in enumerate(zip(base, tuned))]
    pairs = pl.DataFrame(rows, schema=["task", "metric", "doc_id", "base", "tuned"], orient="row")
    result = summarize(pairs)
    p = np.array([mcnemar_exact(*counts[t]) for t in "abc"])
    expected = sps.false_discovery_control(p, method="bh")
    for metric in ("acc", "acc_norm"):
        assert [result[t][metric]["q_value"] for t in "abc"] == pytest.approx(list(expected))
        assert [result[t][metric]["p_value"] for t in "abc"] == pytest.approx(list(p))


def test_the_verdict_reads_one_primary_metric_per_task():
    from dpo_eval.report.forgetting import headline

    # task a: acc significantly worse (20 of 20 discordant go to base), acc_norm unchanged; task b declares
    # acc_norm, which is unchanged, while its acc is significantly worse: one look per task, so only a is worse.
    rows = []
    for task in ("a", "b"):
        for metric in ("acc", "acc_norm"):
            worse = (task, metric) in (("a", "acc"), ("b", "acc"))
            base = [1] * 20 + [1, 0] * 5
            tuned = ([0] * 20 if worse else [1] * 20) + [1, 0] * 5
            rows += [(task, metric, i, b, t) for i, (b, t) in enumerate(zip(base, tuned))]
    pairs = pl.DataFrame(rows, schema=["task", "metric", "doc_id", "base", "tuned"], orient="row")
    result = summarize(pairs, {"a": None, "b": "acc_norm"})
    assert result["a"]["acc"]["primary"] and not result["a"]["acc_norm"]["primary"]  # none declared: acc
    assert result["b"]["acc_norm"]["primary"] and not result["b"]["acc"]["primary"]  # declared first in its YAML
    p = np.array([mcnemar_exact(20, 0), mcnemar_exact(0, 0)])  # the two primaries: a's acc, b's acc_norm
    q = sps.false_discovery_control(p, method="bh")
    assert [result["a"]["acc"]["q_primary"], result["b"]["acc_norm"]["q_primary"]] == pytest.approx(list(q))
    said = headline({"tasks": result})
    assert "worse than its base (q < 0.05) on 1 (a on acc)" in said and "better on none" in said
    # a declared metric that lm-eval reports per filter: its first filter, in lm-eval's order, not by name
    from dpo_eval.forgetting.harness import choose_primary

    assert choose_primary(["exact_match,strict-match", "exact_match,flexible-extract"], "exact_match") == \
        "exact_match,strict-match"


def test_correctness_keeps_binary_metrics_and_names_filters():
    """Samples shaped as lm-eval 0.4.13 logs them: one per question and filter, each metric's value beside it."""
    samples = [{"doc_id": 0, "filter": "none", "metrics": ["acc", "perplexity"], "acc": 1.0, "perplexity": 3.2},
               {"doc_id": 1, "filter": "none", "metrics": ["acc", "perplexity"], "acc": 0.0, "perplexity": 1.0},
               {"doc_id": 0, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 1.0},
               {"doc_id": 1, "filter": "strict-match", "metrics": ["exact_match"], "exact_match": 0.0}]
    frame = correctness(samples)
    assert sorted(set(frame["metric"].to_list())) == ["acc", "exact_match,strict-match"]
    assert frame.filter(pl.col("metric") == "acc").sort("doc_id")["value"].to_list() == [1, 0]
