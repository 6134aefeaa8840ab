"""The judges under a real Prefect engine and server (prefect_test_harness): the judge stage of the evaluation
flow (a tiny reward model trained here, and an LLM judge against a real `transformers serve` of stories260k),
the judge-run flow on an existing run directory, the global concurrency limit the judge's calls share, and the
report's judge sections. The judge's verdicts are meaningless (stories260k tells stories); the mechanics are real.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, JudgeSpec, ModelSpec, ScoringSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.report.judge import position_sentence, trust_sentence, write_judge_report
from tests.builders import make_adapter

LIMIT = "dpo-eval-judge-test"
JUDGED_PAIRS = 4  # 4 pairs x 2 comparisons x 2 orders = 16 judgments
RUN_FILES = ("pairs.parquet", "answers.parquet", "features.parquet", "stats.parquet", "summary.json", "config.json",
             "report_sections.json", "report.html")


# ---------------------------------------------------------------- the trust sentence, on planted figures

@pytest.mark.parametrize("rate, low, high, n, said", [
    (0.5, 0.3, 0.7, 20, "does not agree with the data set's labels better than chance"),
    (0.55, 0.45, 0.65, 40, "its win rate says little"),
    (0.2, 0.05, 0.4, 20, "against the data set's labels"),
    (0.62, 0.55, 0.7, 200, "better than chance, but weakly"),
    (0.85, 0.78, 0.9, 200, "its win rate is informative"),
    (0.9, float("nan"), float("nan"), 50, "its win rate is informative"),  # no CI: the rate alone
    (1.0, 1.0, 1.0, 2, "too few to say"),  # a bootstrap CI over 2 pairs is a point, not evidence
    (None, None, None, 0, "was not checked against the data set's labels"),
])
def test_trust_sentence_says_how_far_to_trust_the_win_rate(rate, low, high, n, said):
    assert said in trust_sentence("This judge", rate, low, high, n)


def planted_run(folder: Path) -> Path:
    """A run directory of 24 pairs judged by a planted judge: tuned wins 18 and loses 6 (both orders agree),
    chosen is preferred on every other pair only (agreement 0.5: no better than chance); one tuned answer
    holds markup."""
    from dpo_eval.judges.statistics import judge_summary

    folder.mkdir()
    ids = [f"p{i:02d}" for i in range(24)]
    splits = ["train"] * 12 + ["valid"] * 12
    pl.DataFrame({"pair_id": ids, "split": splits, "system": [""] * 24, "prompt": [f"Question {i}?" for i in range(24)],
                  "chosen": [f"good {i}" for i in range(24)], "rejected": [f"bad {i}" for i in range(24)]}
                 ).write_parquet(folder / "pairs.parquet")
    tuned = ["<script>alert('x')</script> & more"] + [f"tuned {i}" for i in range(1, 24)]
    pl.DataFrame({"pair_id": ids * 2, "model": ["tuned"] * 24 + ["base"] * 24,
                  "answer": tuned + [f"base {i}" for i in range(24)]}).write_parquet(folder / "answers.parquet")
    rows = []
    for i, (pair, split) in enumerate(zip(ids, splits)):
        for comparison, (a, b), first_wins in (("tuned_vs_base", ("tuned", "base"), i < 18),
                                               ("chosen_vs_rejected", ("chosen", "rejected"), i % 2 == 0)):
            for order, shown in (("ab", a), ("ba", b)):
                winner = a if first_wins else b
                rows.append({"pair_id": pair, "split": split, "comparison": comparison, "judge": "planted",
                             "order": order, "shown_first": shown, "verdict": "first" if shown == winner else "second",
                             "winner": winner, "raw": f"[[{'A' if shown == winner else 'B'}]]"})
    table = pl.DataFrame(rows)
    table.write_parquet(folder / "judgments.parquet")
    block = {"id": "planted", "kind": "openai", "model": "planted", "template_sha": "0" * 64, "calls": 96,
             "cached": 0, "tokens": {"prompt": 0, "completion": 0}, "truncated": 0, "complete": True, "pending": 0,
             **judge_summary(table, n_boot=200)}
    (folder / "summary.json").write_text(json.dumps({"judge": block}))
    return folder


def test_judge_report_on_a_planted_judge_says_its_win_rate_means_little_and_escapes_the_answers(tmp_path):
    run = planted_run(tmp_path / "run")
    summary = write_judge_report(run)
    headline = summary["judge_headline"]
    assert len(headline) == 1 and "on train tuned beats base in 1.00" in headline[0]
    assert "on valid tuned beats base in 0.50" in headline[0]  # 6 wins, 6 losses
    assert "does not agree with the data set's labels better than chance" in headline[0]
    assert "agreement with the labels 0.50" in headline[0] and "over 24 pairs" in headline[0]  # both splits pooled
    sections = {s["id"]: s for s in json.loads((run / "report_sections.json").read_text())}
    table = sections["judge"]["rows"]
    assert [r[:3] for r in table] == [["train", "tuned vs base: win rate", 12],
                                      ["train", "chosen vs rejected: agreement", 12],
                                      ["valid", "tuned vs base: win rate", 12],
                                      ["valid", "chosen vs rejected: agreement", 12],
                                      ["all", "chosen vs rejected: agreement", 24]]
    assert any("no clear position bias" in p for p in sections["judge"]["paragraphs"])
    examples = sections["judge_examples"]["rows"]
    assert [(r[0], r[8]) for r in examples] == [("tuned_vs_base", "tuned"), ("tuned_vs_base", "base"),
                                                ("chosen_vs_rejected", "rejected")]
    assert examples[0][4] == "tuned: <script>alert('x')</script> & more" and examples[0][5] == "base: base 0"
    page = (run / "report.html").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(" in page  # escaped by the template
    assert "LLM judge: judged examples" in page


def test_position_sentence_names_a_judge_that_always_answers_a():
    always_a = pl.DataFrame({"verdict": ["first"] * 20})
    assert "position bias toward the answer shown first" in position_sentence(always_a)
    assert "no clear position bias" in position_sentence(pl.DataFrame({"verdict": ["first", "second"] * 10}))


# ---------------------------------------------------------------- fixtures: models, a limit, storage

@pytest.fixture(scope="module", autouse=True)
def one_thread_and_own_cache(tmp_path_factory):
    """One torch thread (a shared 2-core machine) and the module's own dpo-eval cache folder."""
    import torch

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DPO_EVAL_CACHE", str(tmp_path_factory.mktemp("dpo-eval-cache")))
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def storage(harness, tmp_path_factory):
    """Prefect result storage of this module."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    folder = tmp_path_factory.mktemp("flow-judge")
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: str(folder / "results")}):
        yield folder


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, stories260k, orca_jsonl) -> Path:
    """A tiny reward model: trl RewardTrainer, stories260k backbone, orca train pairs, a few steps."""
    from dpo_eval.training.reward import train_reward_model

    out = tmp_path_factory.mktemp("reward-model")
    train_reward_model(stories260k, orca_jsonl, out, steps=8, batch_size=8, learning_rate=1e-3, max_length=64)
    return out


def judge_spec(server: dict, cache: Path, **changes) -> JudgeSpec:
    values = {"model": server["model"], "base_url": server["url"], "context_chars": 700, "max_tokens": 4,
              "concurrency": 4, "limit": JUDGED_PAIRS, "cache_dir": cache, **changes}
    return JudgeSpec(**values)


def limit_state(name: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name)


@pytest.fixture(scope="module")
def shared_limit(harness) -> str:
    """A global concurrency limit of 2 slots that the judge's API calls share."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=LIMIT, limit=2))
    return LIMIT


def summary_artifact(flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["dpo-eval-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert len(found) == 1 and found[0].type == "markdown"
    return found[0].data


@pytest.fixture(scope="module")
def evaluated(storage, shared_limit, reward_model, scripted_judge, stories260k, orca_jsonl):
    """evaluate_checkpoint with a reward model and an LLM judge on 8 pairs: (run dir, summary, artifact text)."""
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    adapter = make_adapter(stories260k, storage / "adapter", zero=False, seed=1)
    config = EvalConfig(dataset=DatasetSpec(source=str(orca_jsonl), limit=8),
                        model=ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="none",
                                        compute_dtype="float32"),
                        generation=GenerationSpec(max_new_tokens=6, batch_size=8),
                        scoring=ScoringSpec(cache_dir=storage / "scores", n_process=1),
                        analysis=AnalysisSpec(bootstrap=50, permutations=50), out=storage / "run", shard_size=8,
                        rewards=False, reward_model=str(reward_model),
                        judge=judge_spec(scripted_judge, storage / "judge-cache"))
    state = evaluate_checkpoint(config, judge_limit=shared_limit, return_state=True)
    summary = state.result()
    return storage / "run", summary, summary_artifact(state.state_details.flow_run_id)


# ---------------------------------------------------------------- the evaluation flow's judge stage

def test_evaluation_with_a_reward_model_adds_the_feature_its_statistics_and_calibration(evaluated):
    run, summary, artifact = evaluated
    for name in RUN_FILES + ("reward_scores.parquet",):
        assert (run / name).is_file(), name
    features = pl.read_parquet(run / "features.parquet")
    assert "reward_model" in features.columns and features["reward_model"].is_finite().all()
    assert features.height == 32 and set(features["role"]) == {"chosen", "rejected", "base", "tuned"}
    stats = pl.read_parquet(run / "stats.parquet")
    assert set(stats.filter(pl.col("feature") == "reward_model")["comparison"]) == {"chosen_vs_rejected",
                                                                                   "tuned_vs_base"}
    block = summary["reward_model"]
    assert block["scored"] > 0 and "reward_model" in summary["timings"]
    split, figures = next((s, b) for s, b in block["splits"].items() if b["n"])
    assert 0 <= figures["accuracy"] <= 1 and figures["win_n"] == figures["n"]
    assert json.loads((run / "summary.json").read_text()) == summary  # returned = written
    headline = summary["judge_headline"][0]
    assert headline.startswith("Reward model ")
    honest = [s for s, b in block["splits"].items() if b["n"] and not b["in_sample"]]
    if honest:  # a split the reward model was not trained on calibrates it (valid first)
        name = "valid" if "valid" in honest else honest[0]
        assert f"On {name} this reward model" in headline and "accuracy on chosen vs rejected" in headline
    else:  # trained on every scored pair (train-reward on these 8 pairs' train split): no calibration is claimed
        assert "every scored chosen-vs-rejected pair is one it was trained on" in headline
    assert "## Judges" in artifact and "- Reward model " in artifact and "sign agreement" in artifact.lower()
    ids = [s["id"] for s in json.loads((run / "report_sections.json").read_text())]
    assert ids.count("reward_model") == 1 and ids.count("judge") == 1 and ids.count("judge_examples") == 1


def test_evaluation_with_an_llm_judge_writes_judgments_and_the_report_section(evaluated):
    run, summary, artifact = evaluated
    table = pl.read_parquet(run / "judgments.parquet")
    assert table.height == 4 * JUDGED_PAIRS and table["pair_id"].n_unique() == JUDGED_PAIRS
    assert set(table["order"]) == {"ab", "ba"} and set(table["comparison"]) == {"tuned_vs_base",
                                                                               "chosen_vs_rejected"}
    block = summary["judge"]
    assert block["complete"] and block["calls"] + block["cached"] == table.height and block["calls"] > 0
    assert summary["cache"]["judge"] == {"hits": block["cached"], "misses": block["calls"]}
    assert summary["timings"]["judge"] > 0 and "reward_model" in summary  # the reward model's block kept
    headline = summary["judge_headline"][1]
    assert headline.startswith("LLM judge ") and "on train" in headline
    # the scripted judge (the longer answer wins) gives a valid verdict on every pair: a win rate is stated
    assert "tuned beats base" in headline and block["invalid"] == 0
    assert "labels" in headline  # a win rate is never given without the judge's calibration
    assert "- LLM judge " in artifact
    page = (run / "report.html").read_text()
    assert "LLM judge: tuned vs base, and its calibration on the labels" in page and "Reward model" in page
    assert "LLM judge: judged examples" in page and "chosen vs rejected: agreement" in page
    sections = {s["id"]: s for s in json.loads((run / "report_sections.json").read_text())}
    examples = sections["judge_examples"]["rows"]
    assert examples and all(row[4].startswith(("tuned: ", "chosen: ")) for row in examples)
    assert limit_state(LIMIT).active_slots == 0  # the judge's slots were given back


# ---------------------------------------------------------------- the judge-run flow on an existing run

def copy_run(run: Path, folder: Path) -> Path:
    """The run directory as evaluate left it, without the LLM judge's verdicts."""
    shutil.copytree(run, folder)
    (folder / "judgments.parquet").unlink()
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("judge")
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_judge_run_adds_verdicts_stops_at_its_budget_resumes_and_a_rerun_makes_no_call(evaluated, scripted_judge,
                                                                                       tmp_path):
    from dpo_eval.flows.judge import judge_existing_run

    run = copy_run(evaluated[0], tmp_path / "run")
    answers_before = (run / "answers.parquet").read_bytes()
    spec = judge_spec(scripted_judge, tmp_path / "cache", concurrency=2)
    distinct = evaluated[1]["judge"]["calls"]  # the evaluation judged the same messages with an empty cache
    # The budget stops the flow; what was made is kept and reported, marked incomplete.
    state = judge_existing_run(run, judge=spec.model_copy(update={"max_calls": 3}), concurrency_limit=LIMIT,
                               return_state=True)
    assert state.is_failed()
    with pytest.raises(DpoEvalError, match="budget of 3 calls"):
        state.result()
    stopped = json.loads((run / "summary.json").read_text())
    assert stopped["judge"]["calls"] == 3 and not stopped["judge"]["complete"]
    assert "Judging is incomplete" in stopped["judge_headline"][-1]
    assert "Judging is incomplete" in (run / "report.html").read_text()
    assert "Judging is incomplete" in summary_artifact(state.state_details.flow_run_id)
    # A second run continues from the cache and completes.
    state = judge_existing_run(run, judge=spec, concurrency_limit=LIMIT, return_state=True)
    resumed = state.result()
    table = pl.read_parquet(run / "judgments.parquet")
    assert resumed["judge"]["calls"] == distinct - 3 and resumed["judge"]["complete"]
    assert table.height == 4 * JUDGED_PAIRS
    assert (run / "answers.parquet").read_bytes() == answers_before  # nothing generated
    assert resumed["reward_model"] == evaluated[1]["reward_model"]  # the earlier judge's block kept
    assert "Judging is incomplete" not in (run / "report.html").read_text()
    assert "- LLM judge " in summary_artifact(state.state_details.flow_run_id)
    same = ["pair_id", "comparison", "order", "verdict", "winner", "raw", "truncated"]
    clean = pl.read_parquet(evaluated[0] / "judgments.parquet")
    assert table.select(same).sort(same[:3]).equals(clean.select(same).sort(same[:3]))  # as one clean run
    # A rerun makes no call.
    again = judge_existing_run(run, judge=spec, concurrency_limit=LIMIT)
    assert again["judge"]["calls"] == 0 and again["judge"]["cached"] == table.height
    assert pl.read_parquet(run / "judgments.parquet")["cached"].all()
    ids = [s["id"] for s in json.loads((run / "report_sections.json").read_text())]
    assert ids.count("judge") == 1 and ids.count("judge_examples") == 1  # replaced, not added again
    assert limit_state(LIMIT).active_slots == 0


def test_judge_run_needs_a_judge():
    from dpo_eval.flows.judge import judge_existing_run

    with pytest.raises(DpoEvalError, match="give a judge"):
        judge_existing_run.fn(Path("nowhere"))


# ---------------------------------------------------------------- the global concurrency limit

def test_judge_calls_hold_slots_of_the_shared_global_limit(shared_limit):
    from dpo_eval.tasks.judging import api_slots

    spec = JudgeSpec(model="m", base_url="http://127.0.0.1:1/v1", concurrency=4)
    with api_slots(shared_limit, spec) as bounded:
        assert bounded.concurrency == 2  # at most the limit: never more calls in flight than slots held
        assert limit_state(shared_limit).active_slots == 2
    assert limit_state(shared_limit).active_slots == 0
    with api_slots("no-such-limit", spec) as alone:  # no limit: the run's own concurrency, and a warning
        assert alone == spec
    with api_slots(None, spec) as alone:
        assert alone == spec
    local = JudgeSpec(kind="hf", model="m")  # a local judge makes no API call: no slots
    with api_slots(shared_limit, local) as alone:
        assert alone == local and limit_state(shared_limit).active_slots == 0


def test_a_second_run_waits_for_the_slots_the_first_holds(shared_limit):
    from dpo_eval.tasks.judging import api_slots

    spec = JudgeSpec(model="m", base_url="http://127.0.0.1:1/v1", concurrency=2)
    times, holding = {}, threading.Event()

    def first_run():
        with api_slots(shared_limit, spec):
            holding.set()
            time.sleep(1.5)
            times["released"] = time.monotonic()

    thread = threading.Thread(target=first_run)
    thread.start()
    assert holding.wait(60)
    with api_slots(shared_limit, spec.model_copy(update={"concurrency": 1})):
        times["acquired"] = time.monotonic()
    thread.join()
    assert times["acquired"] >= times["released"]


# ---------------------------------------------------------------- the four answers at the end of the flow

def test_the_evaluation_ends_with_the_four_answers_in_summary_report_and_artifact(evaluated):
    run, summary, artifact = evaluated
    verdict = summary["verdict"]
    questions = ("alignment", "better", "forgetting", "gaming")
    assert all(verdict[q]["answer"] in ("yes", "no", "unknown", "not checked") for q in questions)
    assert verdict["alignment"]["answer"] == "unknown"  # rewards=False: no implicit rewards to decide it
    assert verdict["forgetting"]["answer"] == "not checked"
    judged = {j["judge"] for j in verdict["better"]["judges"]}
    assert "LLM judge" in judged  # the scripted judge judged train pairs it never saw in training
    # the artifact opens with the four answers, as summary.json holds them
    body = artifact.split("\n", 2)[2]
    for q, title in zip(questions, ("Did the alignment take?", "Is the tuned model better than its base?",
                                    "Did it forget?", "Could the gain be gaming?")):
        assert f"**{title}** {verdict[q]['answer']}: " in body
    assert body.index("**Did the alignment take?**") < body.index("- ")  # before the feature sentences
    page = (run / "report.html").read_text()
    assert page.index('id="answers"') < page.index('id="verdict"')
    for q in questions:
        assert f'data-question="{q}" data-answer="{verdict[q]["answer"]}"' in page


def test_a_zero_adapter_took_no_alignment_and_closed_no_gap(storage, reward_model, stories260k, hh_rlhf_gz):
    """A LoRA adapter with B = 0 changes nothing: every held-out implicit-reward margin is 0 (alignment: no), the
    reward model scores tuned exactly as base (better: unknown, a win rate of 1/2 from ties), and the gap closed is 0
    exactly where the reward model's scale is defined. hh-rlhf pairs: the reward model was trained on orca, so none
    of these pairs is in its training set."""
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    adapter = make_adapter(stories260k, storage / "zero-adapter", zero=True)
    config = EvalConfig(dataset=DatasetSpec(source=str(hh_rlhf_gz), limit=12, valid_fraction=0.5),
                        model=ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="none",
                                        compute_dtype="float32"),
                        generation=GenerationSpec(max_new_tokens=6, batch_size=12),
                        scoring=ScoringSpec(cache_dir=storage / "scores", n_process=1),
                        analysis=AnalysisSpec(bootstrap=50, permutations=50), out=storage / "zero-run", shard_size=12,
                        rewards=True, reward_model=str(reward_model))
    summary = evaluate_checkpoint(config)
    rewards = pl.read_parquet(storage / "zero-run" / "rewards.parquet")
    held_out = summary["implicit_reward"]["valid"]  # its n leaves out a pair too long to score, if any
    assert held_out["n"] > 0 and held_out["ties"] == held_out["n"] and held_out["accuracy"] == 0.0
    assert summary["verdict"]["alignment"]["answer"] == "no", summary["verdict"]["alignment"]
    assert "adapter changes no log-probability" in summary["verdict"]["alignment"]["because"]
    assert rewards.height >= held_out["n"]
    scores = pl.read_parquet(storage / "zero-run" / "reward_scores.parquet")
    wide = scores.pivot(on="role", index="pair_id", values="reward_model")
    assert (wide["tuned"] == wide["base"]).all()  # the same answers, the same scores
    valid = summary["reward_model"]["splits"]["valid"]
    assert valid["win_ties"] == valid["win_n"] > 0 and valid["win_rate"] == 0.5  # every prompt a tie
    assert summary["verdict"]["better"]["answer"] == "unknown"  # a win rate of exactly 1/2, calibrated or not
    block = summary["gap"]["reward model"]
    assert block.get("closed", 0.0) == 0.0 and (block.get("ci") in (None, [0.0, 0.0]))
    assert "closed" in block or "not separated" in block["undefined"]
