"""DPO training, checkpoint events, the watcher, the zero-adapter null and the demo, with real Prefect."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import polars as pl
import pytest

from dpo_eval import stages
from dpo_eval.config import AnalysisSpec, DatasetSpec, EvalConfig, GenerationSpec, ModelSpec, ScoringSpec
from dpo_eval.data.demo import demo_records, write_demo_dataset
from dpo_eval.training.dpo import METADATA, TrainSpec
from tests.builders import make_adapter


@pytest.fixture(scope="module")
def trained(harness, stories260k, tmp_path_factory):
    """Two checkpoints of a short QLoRA DPO run on 60 demo pairs, trained through the train-dpo flow."""
    from dpo_eval.flows.train import train_dpo_flow

    root = tmp_path_factory.mktemp("train")
    data = write_demo_dataset(root / "pairs.jsonl", n=60)
    spec = TrainSpec(base=str(stories260k), dataset=DatasetSpec(source=str(data)), out=root / "ckpt", steps=4,
                     save_every=2, batch_size=4, max_length=128)
    return {"spec": spec, "data": data, "folders": [Path(p) for p in train_dpo_flow(spec)], "root": root}


def eval_config(data, stories, adapter, out, cache, limit=None) -> EvalConfig:
    return EvalConfig(dataset=DatasetSpec(source=str(data), limit=limit),
                      model=ModelSpec(base=str(stories), adapter=str(adapter)),
                      generation=GenerationSpec(max_new_tokens=24, batch_size=32),
                      scoring=ScoringSpec(cache_dir=cache), analysis=AnalysisSpec(bootstrap=200), out=out)


def test_demo_data_differs_where_textdescriptives_sees_it():
    records = demo_records(50)
    assert len({r["prompt"] + r["chosen"] for r in records}) == 50
    for r in records:
        assert r["chosen"].count(".") >= 5 and r["rejected"].count(".") == 1 and " and then " in r["rejected"]


def test_training_writes_checkpoints_with_metadata_and_emits_events(trained):
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter

    folders = trained["folders"]
    assert [f.name for f in folders] == ["checkpoint-2", "checkpoint-4"]
    for folder, step in zip(folders, (2, 4)):
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        meta = json.loads((folder / METADATA).read_text())
        assert meta["step"] == step and meta["beta"] == 0.1 and meta["loss_type"] == "sigmoid"
        assert meta["learning_rate"] == trained["spec"].learning_rate
        assert meta["base_fingerprint"] and meta["data_fingerprint"]
        assert meta["max_length"] == 128 and meta["truncation_mode"] == "keep_start"
        config = eval_config(trained["data"], trained["spec"].base, folder, folder / "run", folder / "scores")
        assert stages.reward_max_length(config) == 128  # implicit rewards cut sequences as training did
        assert len(meta["train_pair_ids"]) + len(meta["valid_pair_ids"]) == 60
        assert not set(meta["train_pair_ids"]) & set(meta["valid_pair_ids"])
    seen: set[str] = set()
    deadline = time.time() + 180  # a loaded machine delivers events late
    with get_client(sync_client=True) as client:
        while seen != {str(f.resolve()) for f in folders} and time.time() < deadline:
            page = client.read_events(EventFilter(event=EventNameFilter(name=["dpo_eval.checkpoint.saved"])),
                                      limit=50)  # the client default (100) is over the server cap
            seen = {e.payload["folder"] for e in page.events}
            time.sleep(1)
    assert seen == {str(f.resolve()) for f in folders}


def test_watcher_evaluates_each_checkpoint_once(trained, stories260k, tmp_path):
    from dpo_eval.flows.watch import watch_checkpoints

    config = eval_config(trained["data"], stories260k, trained["folders"][0], tmp_path / "unused", tmp_path / "s")
    started = watch_checkpoints(str(trained["spec"].out), config, out_root=str(tmp_path / "evals"))
    assert [Path(s).name for s in started] == ["checkpoint-2", "checkpoint-4"]
    entries = json.loads((tmp_path / "evals" / "evaluated.json").read_text())["checkpoints"].values()
    runs = {Path(e["checkpoint"]).name: Path(e["run"]) for e in entries}  # <name>-<hash> run folders
    for name in ("checkpoint-2", "checkpoint-4"):
        saved = json.loads((runs[name] / "config.json").read_text())
        assert saved["split_source"] == "checkpoint training metadata"
        assert saved["config"]["model"]["adapter"].endswith(name)
    assert watch_checkpoints(str(trained["spec"].out), config, out_root=str(tmp_path / "evals")) == []
    trend = pl.read_csv(tmp_path / "evals" / "trend.csv")
    assert trend["step"].to_list() == [2, 4] and (tmp_path / "evals" / "trend.png").is_file()
    import subprocess
    import sys

    cli = subprocess.run([sys.executable, "-m", "dpo_eval", "trend", str(runs["checkpoint-4"]),
                          str(runs["checkpoint-2"]), "--out", str(tmp_path / "cli-trend")],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert pl.read_csv(tmp_path / "cli-trend" / "trend.csv")["step"].to_list() == [2, 4]
    meta = json.loads((trained["folders"][0] / METADATA).read_text())
    pairs = pl.read_parquet(runs["checkpoint-2"] / "pairs.parquet")
    assert set(pairs.filter(pl.col("split") == "valid")["pair_id"]) == set(meta["valid_pair_ids"])


def test_zero_adapter_shows_no_systematic_effect(harness, stories260k, tmp_path):
    from dpo_eval.flows.evaluate import evaluate_checkpoint

    data = write_demo_dataset(tmp_path / "pairs.jsonl", n=80)
    adapter = make_adapter(stories260k, tmp_path / "zero", zero=True, targets=("q_proj", "v_proj", "up_proj"))
    summary = evaluate_checkpoint(eval_config(data, stories260k, adapter, tmp_path / "run", tmp_path / "s"))
    answers = pl.read_parquet(tmp_path / "run" / "answers.parquet")
    base = answers.filter(pl.col("model") == "base").sort("pair_id")["answer"]
    tuned = answers.filter(pl.col("model") == "tuned").sort("pair_id")["answer"]
    assert base.equals(tuned)
    assert all(n == 0 for n in summary["significant"]["tuned_vs_base"].values())
    assert all(r["accuracy"] == 0 and r["margin_mean"] == 0 for k, r in summary["implicit_reward"].items()
               if k != "beta")


def test_real_orca_data_end_to_end(harness, stories260k, orca_jsonl, tmp_path):
    """Train stories260k (4-bit) with DPO on the orca train split, evaluate the checkpoint, write a report."""
    from dpo_eval.flows.evaluate import evaluate_checkpoint
    from dpo_eval.flows.train import train_dpo_flow

    spec = TrainSpec(base=str(stories260k), dataset=DatasetSpec(source=str(orca_jsonl)), out=tmp_path / "ckpt",
                     steps=12, save_every=12, batch_size=4, max_length=512)
    folders = train_dpo_flow(spec)
    config = eval_config(orca_jsonl, stories260k, folders[-1], tmp_path / "run", tmp_path / "s")
    summary = evaluate_checkpoint(config.model_copy(update={"generation": GenerationSpec(max_new_tokens=16,
                                                                                         batch_size=16)}))
    assert (tmp_path / "run" / "report.html").is_file()
    assert summary["n_pairs"]["train"] + summary["n_pairs"]["valid"] == 284
    reward = summary["implicit_reward"]["valid"]
    assert reward["n"] + reward["skipped"] == summary["n_pairs"]["valid"]
    print("REAL-DATA", json.dumps({"implicit_reward_valid": reward, "sign_agreement": summary["sign_agreement"],
                                   "sign_agreement_p": summary["sign_agreement_p"],
                                   "significant": summary["significant"], "timings": summary["timings"]}))


VERDICT = re.compile(
    r"^  reward model on (?P<run>\S+) \(accuracy on (?P<n>\d+) valid pairs it was not trained on: "
    r"(?P<accuracy>[\d.]+) \[(?P<ci_low>[\d.]+), (?P<ci_high>[\d.]+)\]\): tuned answers win (?P<win_rate>[\d.]+) "
    r"\[(?P<win_ci_low>[\d.]+), (?P<win_ci_high>[\d.]+)\] of (?P<win_n>\d+) valid pairs against base "
    r"\(won (?P<wins>\d+), lost (?P<losses>\d+), tied (?P<win_ties>\d+)\), sign test p = (?P<p_value>[\d.e+-]+|n/a): "
    r"(?P<meaning>it prefers the tuned answers|it prefers the base answers|"
    r"no significant difference between tuned and base \((?:p >= [\d.]+|every pair tied)\))"
    r"(?P<caveat>\. .*cannot be trusted)?\.$")


def test_demo_runs_end_to_end_small(harness, stories260k, tmp_path, capsys):
    from dpo_eval.flows.demo import demo

    summary = demo(out=str(tmp_path / "demo"), base=str(stories260k), pairs=80, steps=4, save_every=2,
                   scoring_cache=str(tmp_path / "s"), reward_steps=6, reward_max_length=128)
    printed = capsys.readouterr().out
    for text in ("[1/6] base model", "[3/6] QLoRA DPO training", "[6/6] reward model", "dpo-eval demo summary",
                 "sign agreement (valid)", "implicit-reward accuracy on held-out pairs", "report:"):
        assert text in printed, text
    report = (tmp_path / "demo" / "report.html").read_text()
    assert "data:image/png;base64," in report and (tmp_path / "demo" / "plots" / "trend.png").is_file()
    assert "Reward model" in report  # the section reward_judge_run adds
    assert summary["n_pairs"]["valid"] > 0

    # the summary ends with the last checkpoint's four answers and the checkpoint to ship, as the files hold them
    lines = printed.rstrip("\n").splitlines()
    answers = json.loads((tmp_path / "demo" / "summary.json").read_text())["verdict"]
    trend = json.loads((tmp_path / "demo" / "evals" / "trend.json").read_text())
    assert lines[-1] == f"Across the {len(trend['checkpoints'])} checkpoints: Checkpoint to ship: " + (
        f"none: {trend['recommended']['because']} (rule: {trend['recommended']['rule']})." if
        trend["recommended"]["checkpoint"] is None else
        f"{trend['recommended']['checkpoint']} (step {trend['recommended']['step']}): "
        f"{trend['recommended']['because']} (rule: {trend['recommended']['rule']}).")
    at = lines.index("The answers for the last checkpoint (checkpoint-4):")
    for line, (question, title) in zip(lines[at + 1:at + 5], [("alignment", "Did the alignment take?"),
                                                              ("better", "Is the tuned model better than its base?"),
                                                              ("forgetting", "Did it forget?"),
                                                              ("gaming", "Could the gain be gaming?")]):
        assert line == f"  {title} {answers[question]['answer']}: {answers[question]['because']}"
    assert [c["step"] for c in trend["checkpoints"]] == [2, 4]
    # before them, the reward model's verdict, whose numbers are those of the run it names
    verdict = VERDICT.match(lines[at - 2])
    assert verdict, lines[at - 2]
    written = json.loads((Path(verdict["run"]) / "summary.json").read_text())
    assert Path(verdict["run"]) == tmp_path / "demo" and written["reward_model"] == summary["reward_model"]
    block = written["reward_model"]["splits"]["valid"]
    for key in ("accuracy", "ci_low", "ci_high", "win_rate", "win_ci_low", "win_ci_high"):
        assert verdict[key] == f"{block[key]:.2f}", key
    for key in ("n", "win_n", "wins", "losses", "win_ties"):
        assert int(verdict[key]) == block[key], key
    p = block["p_value"]  # None (NaN) where every pair is a tie
    assert verdict["p_value"] == ("n/a" if p is None or p != p else f"{p:.2g}")
    assert block["n"] == summary["n_pairs"]["valid"] and 0 < block["win_n"] <= block["n"]
    significant = p is not None and p < summary["alpha"]
    assert verdict["meaning"].startswith("no significant") != significant
    assert (verdict["caveat"] is not None) == (not block["ci_low"] > 0.5)  # CI reaching 0.5 or below it
