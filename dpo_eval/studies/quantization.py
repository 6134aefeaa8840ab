"""Quantization study: does 8-bit or no quantization change how the tuned model writes, compared with the
main run's setting (usually 4-bit)?

`evaluate --quantization 4bit,8bit,none` evaluates the checkpoint once per setting. The main run (the first
setting) is the run folder itself; every other setting is a complete sub-run in `quantization/<setting>/`
(same pairs, same generation settings, cached under its own model identity, which holds the quantization),
compared with the main run by `dpo_eval.studies.compare` in `quantization/<setting>-vs-<main>/` (B = that setting,
A = the main run: d = B - A beside chosen - rejected). `quantization.json` and a report section sum it up
per setting: greedy answers identical out of N (tuned and base), features moved (q < alpha), and the
implicit rewards of each setting beside the main run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from dpo_eval.config import EvalConfig
from dpo_eval.data.prompt_sets import first_turn
from dpo_eval.jsonsafe import jsonable
from dpo_eval.report.page import Section, add_section

STUDY_FILE = "quantization.json"
FOLDER = "quantization"
GPU_NOTE = ("A tiny model such as stories260k runs every setting on the CPU. On a 7B model the study needs a GPU: "
            "bitsandbytes' 8-bit and 4-bit layers run on the CPU but far too slowly for thousands of answers, "
            "and 'none' holds the whole model in the compute dtype (about 14 GB for 7B parameters in bf16).")
CPU_8BIT_NOTE = ("bitsandbytes 8-bit on the CPU casts each layer's input to float16 (its warning: 'MatMul8bitLt: "
                 "inputs will be cast from torch.float32 to float16 during quantization').")


def setting_config(config: EvalConfig, setting: str) -> EvalConfig:
    """The sub-run of one quantization setting: the same evaluation in quantization/<setting>/, with no study
    of its own and without judges or benchmarks (the study compares the model's writing and rewards)."""
    model = config.model.model_copy(update={"quantization": setting})
    return config.model_copy(update={"model": model, "out": Path(config.out) / FOLDER / setting,
                                     "quantization_study": (), "judge": None, "forgetting": None,
                                     "reward_model": None})


def identical_answers(run_a: Path, run_b: Path) -> dict:
    """{tuned, base: answers word for word the same in both runs, n: pairs both answered} (by pair_id)."""
    a, b = (first_turn(pl.read_parquet(Path(run) / "answers.parquet")) for run in (run_a, run_b))  # turn 1
    joined = a.join(b, on=["pair_id", "model"], suffix="_b")
    same = {model: int((part["answer"] == part["answer_b"]).sum())
            for model, part in ((m, joined.filter(pl.col("model") == m)) for m in ("tuned", "base"))}
    return same | {"n": int(joined.filter(pl.col("model") == "tuned").height)}


def _rewards(run: Path) -> pl.DataFrame | None:
    path = Path(run) / "rewards.parquet"
    return pl.read_parquet(path) if path.is_file() else None


def reward_shift(run_a: Path, run_b: Path) -> dict | None:
    """How B's implicit-reward margins differ from A's on the same pairs: the largest |margin_B - margin_A| and
    the share of pairs whose verdict (margin > 0) is the same; None where a run has no rewards."""
    a, b = _rewards(run_a), _rewards(run_b)
    if a is None or b is None:
        return None
    joined = a.filter(pl.col("scored")).join(b.filter(pl.col("scored")), on="pair_id", suffix="_b")
    if joined.height == 0:
        return {"n": 0, "margin_max_abs_diff": None, "same_verdict": None}
    diff = (joined["margin_b"] - joined["margin"]).abs().to_numpy()
    same = ((joined["margin"] > 0) == (joined["margin_b"] > 0)).to_numpy()
    return {"n": joined.height, "margin_max_abs_diff": float(np.max(diff)), "same_verdict": float(np.mean(same))}


def compare_setting(main_run: Path, run: Path, out: Path) -> dict:
    """One setting against the main run: the paired comparison (dpo_eval.studies.compare, written to `out`), identical
    answers, features moved and the implicit rewards of both."""
    from dpo_eval.studies.compare import compare_runs

    summary = compare_runs(main_run, run, out)
    own = json.loads((Path(run) / "summary.json").read_text())
    return {"run": str(run), "compare": str(out), "identical_answers": identical_answers(main_run, run),
            "features_moved": summary["significant"]["tuned_vs_base"], "n_features": summary["n_features"],
            "alpha": summary["alpha"], "sign_agreement": summary["sign_agreement"],
            "implicit_reward": own.get("implicit_reward"), "reward_shift": reward_shift(main_run, run)}


def write_study(config: EvalConfig) -> dict:
    """Compare every sub-run of config.quantization_study with the main run (config.out): write
    quantization.json and the report's section; returns the study."""
    main_run = Path(config.out)
    reference = config.model.quantization
    main_summary = json.loads((main_run / "summary.json").read_text())
    settings = {setting: compare_setting(main_run, main_run / FOLDER / setting,
                                         main_run / FOLDER / f"{setting}-vs-{reference}")
                for setting in config.quantization_study}
    study = {"reference": reference, "reference_implicit_reward": main_summary.get("implicit_reward"),
             "settings": settings, "note": GPU_NOTE + ("" if "8bit" not in settings else " " + CPU_8BIT_NOTE)}
    (main_run / STUDY_FILE).write_text(json.dumps(jsonable(study), indent=2, allow_nan=False))
    add_section(main_run, study_section(study))
    return study


def study_section(study: dict) -> Section:
    """The report's quantization table: one row per setting and split."""
    reference = study["reference"]
    rows = []
    for split, reward in (study.get("reference_implicit_reward") or {"train": {}, "valid": {}}).items():
        rows.append([f"{reference} (main run)", split, "-", "-", "-", reward.get("accuracy"), reward.get("margin_mean"),
                     "-"])
    for setting, result in study["settings"].items():
        same = result["identical_answers"]
        shift = result["reward_shift"] or {}
        for split, moved in result["features_moved"].items():
            reward = (result["implicit_reward"] or {}).get(split, {})
            rows.append([setting, split, f"{same['tuned']}/{same['n']}", f"{same['base']}/{same['n']}",
                         f"{moved}/{result['n_features']}", reward.get("accuracy"), reward.get("margin_mean"),
                         shift.get("same_verdict")])
    return Section("quantization_study", f"Quantization study (against {reference})", [
        f"The same checkpoint, prompts and generation settings under each quantization, compared with the main "
        f"run ({reference}): identical greedy answers (all pairs), features whose shift (that setting minus "
        f"{reference}, tuned answers) is significant (q < alpha), and the DPO implicit rewards computed in that "
        "setting. 'same reward verdict' is the share of pairs whose margin has the same sign as in the main run. "
        "Each setting's full run and its comparison report are in quantization/.", study["note"]],
        ["setting", "split", "identical tuned answers", "identical base answers", "features moved",
         "implicit reward accuracy", "mean margin", "same reward verdict"], rows)
