"""The judges in the report: the LLM judge's sections and the judges' headline.

`judge_sections` builds, from summary.json's `judge` block and judgments.parquet, the section of win rates
beside the judge's calibration on the data set's own labels (with a sentence saying how far to trust the
win rate), position bias, and a section of judged examples with both answers. `judge_headline` gives the
sentences a practitioner quotes for both judges (the LLM judge and the reward model, whose own section
dpo_eval.judges.reward_model adds). `write_judge_report` puts both into a run directory through
`report.add_section` and summary.json's `judge_headline`.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import polars as pl

from dpo_eval.data.prompt_sets import first_turn
from dpo_eval.jsonsafe import finite, jsonable
from dpo_eval.judges.panel import own_rows
from dpo_eval.judges.statistics import ROLES, combine_orders, judge_summary, sign_test
from dpo_eval.report.categories import judge_categories_section
from dpo_eval.report.page import Section, add_section, read_sections
from dpo_eval.report.reasoning import reasoning_sentences, with_rationales

SECTION_IDS = ("judge", "judge_examples")
EXAMPLE_CHARS = 400  # characters of each text shown in the examples table
OUTCOMES = ("tuned", "base", "tie", "invalid", "failed", "incomplete")  # one example of each, where there is one
STRONG = 0.7  # agreement with the labels from which a judge's win rate is called informative
MIN_PAIRS = 10  # fewer calibration pairs than this say nothing either way (a bootstrap CI of 2 pairs is a point)


def _f(x, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if finite(x) else "n/a"


def _p(x) -> str:
    return f"{x:.2g}" if finite(x) else "n/a"


def trust_sentence(subject: str, rate, low, high, n, unchecked: str = "no chosen-vs-rejected pair judged") -> str:
    """How far to trust `subject`'s win rate, from its agreement with the data set's labels (`rate`, the
    share of pairs where it prefers chosen) and that rate's CI over `n` pairs: unknown (no pair, or fewer
    than MIN_PAIRS), against the labels (CI below 0.5), no better than chance (CI reaching 0.5), better than
    chance but weakly (rate below STRONG), or informative. `unchecked` says why there is no pair."""
    if not n or not finite(rate):
        return (f"{subject} was not checked against the data set's labels ({unchecked}): how far to trust its win "
                "rate is unknown.")
    low, high = (low, high) if finite(low) and finite(high) else (rate, rate)  # no CI: the rate alone
    figure = f"agreement with the labels {_f(rate)} [{_f(low)}, {_f(high)}] over {n} pairs"
    if n < MIN_PAIRS:
        return (f"{subject} was checked against the data set's labels on only {n} pairs ({figure}): too few to "
                "say how far to trust its win rate.")
    if high < 0.5:
        return (f"{subject} prefers the rejected answer more often than the chosen one ({figure}): it judges "
                "against the data set's labels, and its win rate cannot be read as 'tuned is better'.")
    if low <= 0.5:
        return (f"{subject} does not agree with the data set's labels better than chance ({figure}; chance is "
                "0.5): its win rate says little about which answers are better.")
    if rate < STRONG:
        return (f"{subject} agrees with the data set's labels better than chance, but weakly ({figure}): read "
                "its win rate as a rough indication only.")
    return (f"{subject} agrees with the data set's labels on most pairs ({figure}): its win rate is informative, "
            "as far as these labels say what 'better' means.")


def pooled_calibration(block: dict, judgments: pl.DataFrame | None) -> dict | None:
    """The chosen-vs-rejected block over every split together (the judge saw none of them in training, so
    more pairs give a tighter CI); the split's own block where only one split was judged."""
    per_split = [b["chosen_vs_rejected"] for b in (block.get("splits") or {}).values() if "chosen_vs_rejected" in b]
    if len(per_split) <= 1 or judgments is None:
        return per_split[0] if per_split else None
    calibration = judgments.filter(pl.col("comparison") == "chosen_vs_rejected")
    pooled = judge_summary(calibration.with_columns(split=pl.lit("all")))
    return pooled["splits"]["all"]["chosen_vs_rejected"]


def position_sentence(judgments: pl.DataFrame) -> str:
    """Position bias in words: the verdicts that named the answer shown first vs second, with a sign test."""
    first, second = (int((judgments["verdict"] == v).sum()) for v in ("first", "second"))
    if first + second == 0:
        return "No verdict named either answer, so position bias cannot be seen."
    p = sign_test(first, second)
    said = (f"Position: of its {first + second} verdicts naming an answer, {first} chose the answer shown first and "
            f"{second} the one shown second (two-sided sign test p = {_p(p)})")
    if finite(p) and p < 0.05:
        side = "first" if first > second else "second"
        return said + f": a position bias toward the answer shown {side}; judging both orders is what cancels it."
    return said + ": no clear position bias."


NO_LABELS = "these questions have no chosen or rejected answers to check it on"


def _llm_headline(block: dict, judgments: pl.DataFrame | None, labeled: bool = True) -> str:
    said = []
    for split, blocks in (block.get("splits") or {}).items():
        tb = blocks.get("tuned_vs_base")
        if tb and tb["n"]:
            lc = (f"length-controlled {_f(tb['lc_win_rate'])}, an extrapolation: the answers' lengths do not reach "
                  "equal length" if tb.get("lc_extrapolated") else f"length-controlled {_f(tb['lc_win_rate'])}")
            said.append(f"on {split} tuned beats base in {_f(tb['win_rate'])} [{_f(tb['ci_low'])}, "
                        f"{_f(tb['ci_high'])}] of {tb['n']} prompts (one pair per prompt; ties half; sign test "
                        f"p = {_p(tb['p_value'])}; {lc})")
        elif tb:
            said.append(f"on {split} no tuned-vs-base pair has a valid verdict ({tb['invalid']} with an invalid "
                        f"one, {tb.get('failed', 0)} refused by the server, {tb['incomplete']} not judged in both "
                        "orders)")
    text = f"LLM judge {block.get('model')}: " + ("; ".join(said) if said else "no tuned-vs-base pair judged") + ". "
    cal = pooled_calibration(block, judgments)
    unchecked = (NO_LABELS if cal is None and not labeled else "no chosen-vs-rejected pair judged" if cal is None else
                 f"none of its {cal['invalid'] + cal.get('failed', 0) + cal['incomplete']} chosen-vs-rejected pairs has "
                 "a valid verdict")
    cal = cal or {}
    text += trust_sentence("This judge", cal.get("agreement"), cal.get("ci_low"), cal.get("ci_high"), cal.get("n", 0),
                           unchecked)
    if block.get("pending"):
        text += f" Judging is incomplete: {block.get('pending')} judgments are still to make (run again to continue)."
    for problem in block.get("problems") or ():
        text += f" Not complete: {problem}."
    return text


def _reward_headline(block: dict) -> str:
    splits = block.get("splits") or {}
    said = [f"on {s} tuned beats base in {_f(b['win_rate'])} [{_f(b['win_ci_low'])}, {_f(b['win_ci_high'])}] of "
            f"{b['win_n']} pairs (ties half; sign test p = {_p(b['p_value'])})" for s, b in splits.items() if b.get("win_n")]
    # The valid split is the reward model's honest calibration: one trained here saw the train split. A split it
    # was trained on (in_sample) is never read as its calibration.
    honest = {s: b for s, b in splits.items() if b.get("n") and not b.get("in_sample")}
    name = "valid" if "valid" in honest else next(iter(honest), None)
    cal = splits.get(name) or {}
    subject = f"On {name} this reward model" if name else "This reward model"
    reference = block.get("reference_splits") or {}
    if not name and reference:  # questions without labels: its calibration is on the reference data set's labels
        name = "valid" if (reference.get("valid") or {}).get("n") else next(
            (s for s, b in reference.items() if b.get("n")), None)
        cal, subject = reference.get(name) or {}, f"On the reference data set's {name} split this reward model"
    in_sample_only = not name and any(b.get("n") for b in splits.values())
    unchecked = ("every scored chosen-vs-rejected pair is one it was trained on" if in_sample_only else
                 "no chosen-vs-rejected pair scored; questions without labels have none")
    trust = trust_sentence(subject, cal.get("accuracy"), cal.get("ci_low"), cal.get("ci_high"), cal.get("n", 0),
                           unchecked)
    trust = trust.replace("agreement with the labels", "accuracy on chosen vs rejected")
    return f"Reward model {block.get('model')}: " + ("; ".join(said) or "no tuned-vs-base pair scored") + ". " + trust


def judge_headline(summary: dict, judgments: pl.DataFrame | None = None) -> list[str]:
    """One sentence per judge in `summary` (reward model, then LLM judge): its tuned-vs-base win rate per
    split with CI and sign-test p, and how far to trust it from its calibration on the labels."""
    lines = []
    if summary.get("reward_model"):
        lines.append(_reward_headline(summary["reward_model"]))
    if summary.get("judge"):
        lines.append(_llm_headline(summary["judge"], judgments, is_labeled_run(summary)))
    compared = summary.get("compare")
    if lines and isinstance(compared, dict):  # a `dpo-eval compare` folder: say which system is which
        a, b = compared.get("a_system", compared.get("a")), compared.get("b_system", compared.get("b"))
        lines.insert(0, f"In this comparison 'tuned' is B ({b}) and 'base' is A ({a}).")
    return lines


def judge_markdown(summary: dict) -> str:
    """The judges' headline as a markdown block to append to the summary artifact ('' without judges)."""
    lines = summary.get("judge_headline") or []
    return "\n\n## Judges\n\n" + "\n".join(f"- {line}" for line in lines) if lines else ""


def _cost(block: dict) -> str:
    cost = block.get("cost")
    return f" (cost {cost:.4f} at the prices given, per million tokens)" if finite(cost) else ""


STYLE_WORDS = {"length": "the longer answer", "headers": "the answer with more markdown headers",
               "lists": "the answer with more list items", "bold": "the answer with more bold spans"}


def _sc_cell(tb: dict) -> str:
    rate = tb.get("sc_win_rate")
    if not finite(rate):
        return "n/a"
    cell = f"{_f(rate)} [{_f(tb.get('sc_ci_low'))}, {_f(tb.get('sc_ci_high'))}]"
    return cell + " (extrapolated)" if tb.get("sc_extrapolated") else cell


def style_sentences(block: dict) -> list[str]:
    """Per split, the style-controlled rate beside the raw and length-controlled ones, and what the judge's verdicts
    lean toward: each covariate's coefficient in log-odds per sd, largest first."""
    said = []
    for split, blocks in (block.get("splits") or {}).items():
        tb = blocks.get("tuned_vs_base") or {}
        if "sc_win_rate" not in tb:
            continue
        if not finite(tb["sc_win_rate"]):
            said.append(f"Style-controlled win rate on {split}: n/a ({tb.get('sc_reason') or 'no fit'}).")
            continue
        leans = sorted((tb.get("sc_coefficients") or {}).items(), key=lambda kv: -abs(kv[1]))
        lean = "; ".join(f"{'prefers' if c > 0 else 'disfavours'} {STYLE_WORDS.get(k, k)}: {c:+.2f} per sd"
                         for k, c in leans)
        text = (f"Style-controlled win rate on {split}: {_sc_cell(tb)} against raw {_f(tb['win_rate'])} and "
                f"length-controlled {_f(tb.get('lc_win_rate'))} (Arena-Hard-style: length, markdown headers, list "
                f"items and bold spans held equal). The judge {lean or 'has no style covariate to lean on'} "
                "(log-odds of a tuned win per sd of the normalised difference)")
        left = tb.get("sc_left_out") or []
        text += f"; left out for want of variation: {', '.join(left)}." if left else "."
        if tb.get("sc_reason"):
            text += f" Note: {tb['sc_reason']}."
        said.append(text)
    return said


def _rows(block: dict, pooled: dict | None) -> list[list]:
    rows = []
    for split, blocks in (block.get("splits") or {}).items():
        tb, cr = blocks.get("tuned_vs_base"), blocks.get("chosen_vs_rejected")
        if tb:
            rows.append([split, "tuned vs base: win rate", tb["n"], tb["win_rate"], tb["ci_low"], tb["ci_high"],
                         f"{tb['wins']} / {tb['losses']} / {tb['ties']}", tb["p_value"], tb["lc_win_rate"],
                         _sc_cell(tb), tb["position_consistency"], tb["first_position_rate"], tb["invalid"]])
        if cr:
            rows.append([split, "chosen vs rejected: agreement", cr["n"], cr["agreement"], cr["ci_low"], cr["ci_high"],
                         "", None, None, None, cr["position_consistency"], cr["first_position_rate"], cr["invalid"]])
    if pooled and len(block.get("splits") or {}) > 1:
        rows.append(["all", "chosen vs rejected: agreement", pooled["n"], pooled["agreement"], pooled["ci_low"],
                     pooled["ci_high"], "", None, None, None, pooled["position_consistency"],
                     pooled["first_position_rate"], pooled["invalid"]])
    return rows


def _cut(text, limit: int = EXAMPLE_CHARS) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else text[:limit].rstrip() + " [...]"


def _example_rows(judgments: pl.DataFrame, texts: pl.DataFrame) -> list[list]:
    """Up to one tuned-vs-base pair of each outcome in OUTCOMES, then one chosen-vs-rejected pair where the
    judge picked rejected (else one where it picked chosen); pairs in judgments order."""
    combined = combine_orders(judgments)
    picked = []
    tb = combined.filter(pl.col("comparison") == "tuned_vs_base")
    for outcome in OUTCOMES:
        picked += tb.filter(pl.col("winner") == outcome).head(1).to_dicts()
    cr = combined.filter(pl.col("comparison") == "chosen_vs_rejected")
    for outcome in ("rejected", "chosen"):
        found = cr.filter(pl.col("winner") == outcome).head(1).to_dicts()
        if found:
            picked += found
            break
    raw = {(r["pair_id"], r["comparison"], r["order"]): r["raw"] for r in
           judgments.select("pair_id", "comparison", "order", "raw").iter_rows(named=True)}
    by_pair = {r["pair_id"]: r for r in texts.iter_rows(named=True)}
    rows = []
    for row in picked:
        first, second = ROLES[row["comparison"]]
        pair = by_pair.get(row["pair_id"], {})
        replies = " | ".join(_cut(raw.get((row["pair_id"], row["comparison"], o)), 120) for o in ("ab", "ba"))
        rows.append([row["comparison"], row["split"], row["pair_id"], _cut(pair.get("prompt")),
                     f"{first}: {_cut(pair.get(first))}", f"{second}: {_cut(pair.get(second))}",
                     row["winner_ab"] or "", row["winner_ba"] or "", row["winner"], replies])
    return rows


def _texts(run_dir: Path) -> pl.DataFrame:
    """pair_id, prompt, chosen, rejected and (where answers.parquet has them) tuned and base."""
    pairs = pl.read_parquet(run_dir / "pairs.parquet").select("pair_id", "prompt", "chosen", "rejected")
    answers_file = run_dir / "answers.parquet"
    if answers_file.is_file():
        answers = first_turn(pl.read_parquet(answers_file)).filter(pl.col("model").is_in(["tuned", "base"]))
        if answers.height:
            wide = answers.pivot(on="model", index="pair_id", values="answer", aggregate_function="first")
            pairs = pairs.join(wide, on="pair_id", how="left")
    return pairs


def is_labeled_run(summary: dict) -> bool:
    """Whether the run's data set had chosen and rejected answers (summary.json's `labels`; older runs did)."""
    return (summary.get("labels") or {}).get("source", "data set") == "data set"


def judge_sections(block: dict, judgments: pl.DataFrame, texts: pl.DataFrame,
                   labeled: bool = True) -> list[Section]:
    """The LLM judge's sections: win rates beside calibration and position bias, and judged examples."""
    pooled = pooled_calibration(block, judgments)
    paragraphs = [
        _llm_headline(block, judgments, labeled),
        f"Judge {block.get('model')} (id {block.get('id')}, template sha256 {str(block.get('template_sha'))[:12]}): "
        f"{block.get('calls')} {'judgments computed' if block.get('kind') == 'hf' else 'API calls'} this run, "
        f"{block.get('cached')} judgments from the cache, tokens "
        f"{(block.get('tokens') or {}).get('prompt')} prompt + {(block.get('tokens') or {}).get('completion')} "
        f"completion{_cost(block)}, {block.get('truncated', 0)} judgments with a text cut to fit the judge's "
        "context.",
        "Every pair is judged in both orders (each answer shown first once); the two verdicts combine into one "
        "(both agree: that winner; they disagree: a tie). Win rate: (wins + ties / 2) / n; agreement: the same "
        "share for chosen over rejected, the judge's calibration on the data set's own labels. "
        f"CI: {block.get('ci_method', 'percentile bootstrap over pairs')}. p: two-sided sign test of wins vs "
        "losses, ties excluded. LC: length-controlled win rate (AlpacaEval 2 style, the prediction at equal "
        "length). Position consistency: share of pairs whose two orders name the same winner; first-position "
        "rate: share of per-order verdicts naming the answer shown first.",
        position_sentence(judgments) if judgments.height else "No judgment was made.",
    ]
    if block.get("invalid"):
        paragraphs.append(f"{block['invalid']} of {judgments.height} per-order verdicts could not be parsed (invalid; "
                          "the raw reply is kept in judgments.parquet): their pairs are outside n, never counted "
                          "as ties.")
    reasons = [f"{s}: {b['tuned_vs_base']['lc_reason']}" for s, b in (block.get("splits") or {}).items()
               if (b.get("tuned_vs_base") or {}).get("lc_reason")]
    if reasons:
        paragraphs.append("Length-controlled win rate: " + "; ".join(reasons) + ".")
    paragraphs += style_sentences(block)
    paragraphs += reasoning_sentences(block, judgments)
    if block.get("repeatability"):
        paragraphs.append(repeatability_sentence(block["repeatability"]))
    main = Section("judge", "LLM judge: tuned vs base, and its calibration on the labels", paragraphs,
                   ["split", "figure", "n", "rate", "ci_low", "ci_high", "wins / losses / ties", "sign-test p",
                    "LC win rate", "SC win rate [CI]", "position consistency", "first-position rate", "invalid"],
                   _rows(block, pooled))
    example_columns, example_rows = with_rationales(
        ["comparison", "split", "pair", "prompt", "first role's answer", "second role's answer", "winner, A first",
         "winner, B first", "combined", "judge's replies (A first | B first)"],
        _example_rows(judgments, texts) if judgments.height else [], judgments)
    examples = Section(
        "judge_examples", "LLM judge: judged examples",
        [f"A few pairs as the judge saw them: one tuned-vs-base pair of each outcome, and a calibration pair "
         f"(the judge's pick against the labels where it made one). Texts are cut at {EXAMPLE_CHARS} characters "
         "here (the judge saw them whole unless the judgments table flags a cut); system prompts are left out. "
         "'A first' is the order with the first role (tuned, chosen) shown as answer A."],
        example_columns, example_rows)
    return [main, examples]


def write_judge_report(run_dir: Path | str, timings: dict | None = None) -> dict:
    """Add the LLM judge's sections to the run's report (where summary.json has a `judge` block) and write
    summary.json's `judge_headline` (and `timings`, `cache` entries for the judge); returns the summary."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    judgments_file = run_dir / "judgments.parquet"
    block = summary.get("judge")
    judgments = first_turn(pl.read_parquet(judgments_file)) if block and judgments_file.is_file() else None
    judgments = own_rows(judgments, (block or {}).get("id"))  # the other panel members' rows: the panel section
    summary["judge_headline"] = judge_headline(summary, judgments)
    if timings:
        summary["timings"] = dict(summary.get("timings") or {}) | timings
    if block:
        summary["cache"] = dict(summary.get("cache") or {}) | {"judge": {"hits": block.get("cached", 0),
                                                                         "misses": block.get("calls", 0)}}
    summary = jsonable(summary)
    path.write_text(json.dumps(summary, indent=2, allow_nan=False))
    if block and judgments is not None:
        kept = {s.id: jsonable(asdict(s)) for s in read_sections(run_dir)}
        for section in judge_sections(block, judgments, _texts(run_dir), is_labeled_run(summary)):
            if kept.get(section.id) != jsonable(asdict(section)):  # each change re-renders the whole page
                add_section(run_dir, section)
        categories = judge_categories_section(block, run_dir)  # where pairs.parquet has a category
        if categories is not None:
            add_section(run_dir, categories)
    return summary


def repeatability_sentence(block: dict) -> str:
    """The judge's own variance in words: how many judgments changed verdict across its K repeats."""
    share = block.get("share_changed")
    said = (f"Repeatability: each judgment was asked {block['k']} times; the verdict changed across the repeats in "
            f"{block['changed']} of {block['n']} judgments with a readable verdict in every repeat"
            + (f" ({share:.0%})" if finite(share) else ""))
    return said + f"; the verdict kept is the majority (a tie where two verdicts share the most votes); {block['note']}."


def _kappa_cell(row: dict) -> str:
    return f"{_f(row.get('kappa'))} [{_f(row.get('ci_low'))}, {_f(row.get('ci_high'))}]"


def panel_section(panel: dict) -> Section:
    """The panel of judges: each pair's agreement on tuned vs base (Cohen's kappa with its bootstrap CI, n prompts)
    and the majority verdict of the calibrated judges with its win rate."""
    judges = panel.get("judges") or {}
    names = ", ".join(f"{name} ({'calibrated' if j.get('calibrated') else 'not calibrated'})"
                      for name, j in judges.items())
    paragraphs = [f"A panel of {len(judges)} judges judged tuned vs base on {panel.get('split')}: {names}. Each names "
                  "one verdict per prompt (tuned, base or tie; an LLM judge's two orders combined, the reward model's "
                  f"score difference). Agreement of two judges: Cohen's kappa with a {panel.get('level', 0.95):.0%} "
                  f"CI ({panel.get('ci_method')}); 1 is full agreement, 0 agreement by chance."]
    majority = panel.get("majority") or {}
    if majority.get("n"):
        lc = majority.get("lc_win_rate")
        paragraphs.append(
            f"Majority of the {len(majority['judges'])} calibrated judges ({', '.join(majority['judges'])}): tuned beats "
            f"base in {_f(majority['win_rate'])} [{_f(majority['ci_low'])}, {_f(majority['ci_high'])}] of "
            f"{majority['n']} prompts ({majority['wins']} / {majority['losses']} / {majority['ties']} wins / losses / "
            f"ties; {majority.get('win_ci_method')}), length-controlled {_f(lc)}. Rule: {majority.get('rule')}.")
    else:
        paragraphs.append(f"No majority verdict: {majority.get('reason') or 'fewer than two calibrated judges'}.")
    if panel.get("reads_verdict"):
        paragraphs.append("The answers 'is the tuned model better?' and 'could the gain be gaming?' read this majority "
                          "and these agreements.")
    for name, j in judges.items():
        if j.get("repeatability"):
            paragraphs.append(f"{name}: " + repeatability_sentence(j["repeatability"]))
    rows = [[r["a"], r["b"], r["n"], _f(r.get("agree")), _kappa_cell(r)] for r in panel.get("pairs") or []]
    return Section("panel", "Panel of judges: agreement and majority", paragraphs,
                   ["judge", "judge", "n prompts", "agreement", "Cohen's kappa [CI]"], rows)
