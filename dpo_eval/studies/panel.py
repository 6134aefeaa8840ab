"""The verdict's reading of a panel of judges (dpo_eval.judges.panel): summary.json's `panel` block and the majority's
answer to 'is the tuned model better?'.

Where a run was judged by several LLM judges (summary.json `judges`), each one answers under its own name, every pair
of judges (the reward model included) gets its Cohen's kappa with a bootstrap CI over prompts, and where two or more
of them are calibrated the per-prompt majority of the calibrated ones answers `better` by the rule a single judge
answers by, and `gaming` reads the majority's win and every pair's agreement (dpo_eval.studies.verdict).
"""

from __future__ import annotations

import math
from pathlib import Path

from dpo_eval.config import VerdictSpec
from dpo_eval.judges.pairwise import answer_lengths
from dpo_eval.judges.panel import CI_METHOD, MAJORITY_RULE, WIN_CI_METHOD, agreement_rows, majority, own_rows, win_block
from dpo_eval.judges.statistics import length_differences, split_lc_win_rate
from dpo_eval.studies.readings import (
    RM,
    _at_level,
    _held_out_split,
    _lc_usable,
    _num,
    _pct,
    _read_json,
    _table,
    judge_outcomes,
    llm_judge_blocks,
    once_per_prompt,
    reward_outcomes,
)


def panel_members(summary: dict, spec: VerdictSpec) -> list[tuple[str, str | None, dict, dict, str]]:
    """(member, judge id, calibration, tuned-vs-base block, split) of each LLM judge in summary.json's `judges`
    (dpo_eval.judges.panel) with a held-out split of both comparisons."""
    members = []
    for name, block in (summary.get("judges") or {}).items():
        found = llm_judge_blocks({"judge": block}, spec) or uncalibrated_block(block, spec)
        if found is not None:
            members.append((name, block.get("id"), *found))
    return members


def uncalibrated_block(block: dict, spec: VerdictSpec) -> tuple[dict, dict, str] | None:
    """(calibration, tuned-vs-base block, split) of a judge that judged tuned vs base but no chosen vs rejected on
    that split (a prompt set without labels): it has no calibration (n 0), so it never votes, but its verdicts
    still enter the panel's agreement."""
    splits = {s: b for s, b in (block.get("splits") or {}).items() if "tuned_vs_base" in b}
    split = _held_out_split(splits) or next(iter(sorted(splits)), None)
    if split is None:
        return None
    w = splits[split]["tuned_vs_base"]
    low, high = _at_level(w["wins"] + w["ties"] / 2, w["n"], spec) if "wins" in w else (math.nan, math.nan)
    calibration = {"agreement": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0, "none": True}
    return calibration, {"split": split, **w, "ci_low": low, "ci_high": high}, split


def panel_block(run_dir: Path, spec: VerdictSpec, rm: tuple | None, judges: list[dict], members: list[tuple],
                split: str | None) -> dict:
    """summary.json's `panel`: the members judged on `split` (the latest LLM judge's, else the first member's) and
    the reward model where it scored that split; each pair's kappa with its bootstrap CI over prompts; the majority
    of the calibrated ones (`calibrated` as their own answers say) with its Wilson CI and length-controlled rate.
    reads_verdict: two or more calibrated judges, so the answers read the majority."""
    split = split or members[0][4]
    calibrated = {j["judge"]: j["calibrated"] for j in judges}
    judgments = _table(run_dir, "judgments.parquet")
    verdicts, info = {}, {}
    scores = _table(run_dir, "reward_scores.parquet")
    if rm is not None and rm[2] == split and scores is not None:
        verdicts[RM] = once_per_prompt(reward_outcomes(scores, split), run_dir)
        info[RM] = {"kind": "reward model", "calibrated": calibrated.get(RM, False)}
    for name, judge_id, _, _, own_split in members:
        if own_split == split and judgments is not None:
            verdicts[name] = once_per_prompt(judge_outcomes(own_rows(judgments, judge_id), split), run_dir)
            info[name] = {"kind": "LLM judge", "id": judge_id, "calibrated": calibrated.get(f"LLM judge {name}", False)}
    summary = _read_json(run_dir / "summary.json")
    for name, block in (summary.get("judges") or {}).items():
        if name in info and block.get("repeatability"):
            info[name]["repeatability"] = block["repeatability"]
    for name in info:
        info[name]["n"] = verdicts[name].height
    level = 1 - spec.alpha
    pairs = agreement_rows(verdicts, level=level, resamples=spec.resamples, seed=spec.seed)
    for pair in pairs:
        pair |= {"calibrated": info[pair["a"]]["calibrated"] and info[pair["b"]]["calibrated"],
                 "bar": spec.kappa_bar, "share_bar": spec.disagreement_bar}
    voters = {name: frame for name, frame in verdicts.items() if info[name]["calibrated"]}
    block = {"split": split, "level": level, "resamples": spec.resamples, "seed": spec.seed, "ci_method": CI_METHOD,
             "judges": info, "pairs": pairs, "reads_verdict": len(voters) >= 2}
    if len(voters) < 2:
        block["majority"] = {"judges": sorted(voters), "n": 0, "reason": f"{len(voters)} calibrated judge(s) on "
                             f"{split}: a majority needs two or more"}
        return block
    outcomes = majority(voters)
    won = win_block(outcomes, level) | {"judges": list(voters), "split": split, "rule": MAJORITY_RULE,
                                        "win_ci_method": WIN_CI_METHOD}
    pairs_table = _table(run_dir, "pairs.parquet")
    lengths = (answer_lengths(run_dir, _table(run_dir, "answers.parquet"), pairs_table)
               if pairs_table is not None else None)
    rate, reason, side = split_lc_win_rate(outcomes, length_differences(lengths) if lengths is not None else None)
    block["majority"] = won | {"lc_win_rate": rate, "lc_reason": reason, **side}
    return block


def majority_answer(block: dict) -> dict:
    """The panel majority's answer to 'is the tuned model better?', by the rule a single judge answers by: yes where
    its win-rate CI and its length-controlled rate lie above 0.5, no where both lie below, unknown otherwise."""
    low, high, n = _num(block.get("ci_low")), _num(block.get("ci_high")), block.get("n")
    out = {"judge": "panel majority", "calibrated": True, "split": block.get("split"), "n": n,
           "win_rate": block.get("win_rate"), "ci": [block.get("ci_low"), block.get("ci_high")],
           **{k: block.get(k) for k in ("wins", "losses", "ties", "lc_win_rate", "lc_reason", "lc_extrapolated",
                                        "length_diff")}}
    said = (f"the majority of the {len(block['judges'])} calibrated judges ({', '.join(block['judges'])}) prefers "
            f"tuned on {_pct(block.get('win_rate'))} [{_pct(low)}, {_pct(high)}] of {n} prompts")
    if not n:
        return out | {"answer": "unknown", "because": said + ": no prompt judged by all of them"}
    above, lc_said = _lc_usable(out)
    said += f", {lc_said}"
    if low > 0.5 and above is True:
        return out | {"answer": "yes", "because": said}
    if high < 0.5 and above is False:
        return out | {"answer": "no", "because": said}
    decided = low > 0.5 or high < 0.5
    return out | {"answer": "unknown", "because": said + (": the raw rate is decided but the length-controlled one "
                                                          "does not back it" if decided else ": the CI includes 0.5")}
