"""The pairwise LLM judge on a run directory: judgments.parquet and summary.json's `judge` block.

`judge_run` reads pairs.parquet and answers.parquet (features.parquet for the answers' n_tokens lengths),
judges tuned vs base answers and the data set's chosen vs rejected (the judge's calibration), each pair in
both orders (ab: the comparison's first role shown as A; ba: swapped), and summarises the verdicts with
dpo_eval.judges.statistics. Judgments come from the content cache where it has them; a stop (the --max-calls
budget, a call that fails after its retries) writes what was made and raises DpoEvalError, and a later run
continues from the cache.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import polars as pl

from dpo_eval.config import JudgeSpec
from dpo_eval.data.pairs import prompt_ids, prompt_table
from dpo_eval.data.prompt_sets import TURN, first_turn
from dpo_eval.errors import DpoEvalError
from dpo_eval.jsonsafe import jsonable
from dpo_eval.judges.api import (
    ChatJudge,
    JudgmentCache,
    judge_id,
    judge_identity,
    normalised_url,
    plan_calls,
    request_record,
    run_calls,
)
from dpo_eval.judges.categories import add_categories, turn_blocks
from dpo_eval.judges.dialogue import second_turn_rows
from dpo_eval.judges.panel import merge_judgments, panel_ids, record_judge
from dpo_eval.judges.prompt import render
from dpo_eval.judges.references import pair_references
from dpo_eval.judges.repeats import expand, fold
from dpo_eval.judges.statistics import GAP_COMPARISONS, ROLES, judge_summary
from dpo_eval.judges.style import style_frame
from dpo_eval.judges.templates import judge_template, uses_reference
from dpo_eval.judges.verdicts import add_weighted, read_reply, reader, settings_block

log = logging.getLogger(__name__)
SCHEMA = {"pair_id": pl.String, "split": pl.String, "comparison": pl.String, "judge": pl.String,
          "order": pl.String, "shown_first": pl.String, "verdict": pl.String, "winner": pl.String,
          "p_first": pl.Float64, "raw": pl.String, "truncated": pl.Boolean, "prompt_tokens": pl.Int64,
          "completion_tokens": pl.Int64, "latency_s": pl.Float64, "cached": pl.Boolean,
          "strength": pl.Int64, "rationale": pl.String, "has_reference": pl.Boolean}  # dpo_eval.judges.verdicts


def read_table(run_dir: Path, name: str) -> pl.DataFrame:
    path = run_dir / name
    if not path.is_file():
        raise DpoEvalError(f"{path}: no such file; judge a run directory written by `dpo-eval evaluate`")
    try:
        return pl.read_parquet(path)
    except Exception as exc:  # polars raises several types for unreadable files
        raise DpoEvalError(f"{path}: cannot read as parquet ({exc})") from exc


def select_pairs(pairs: pl.DataFrame, spec: JudgeSpec) -> pl.DataFrame:
    """The pairs of spec.split (all: every split), the first spec.limit of them in table order."""
    chosen = pairs if spec.split == "all" else pairs.filter(pl.col("split") == spec.split)
    return chosen.head(spec.limit) if spec.limit else chosen


def gap_pairs(pairs: pl.DataFrame, spec: JudgeSpec) -> set[str]:
    """The pair_ids whose tuned and base answers are also judged against chosen (spec.gap_sample prompts, one pair
    each, held-out pairs first, then in table order); empty without gap_sample."""
    if not spec.gap_sample:
        return set()
    labelled = pairs.filter(pl.col("chosen").is_not_null() & pl.col("rejected").is_not_null())
    keyed = labelled.with_columns(prompt_id=pl.Series(prompt_ids(labelled), dtype=pl.String),
                                  order=pl.int_range(pl.len()), held=pl.col("split") != "valid")
    once = keyed.sort("held", "order").unique("prompt_id", keep="first", maintain_order=True)
    return set(once.head(spec.gap_sample)["pair_id"].to_list())


def comparisons_of(spec: JudgeSpec) -> tuple[str, ...]:
    """The comparisons judged: the spec's, and the gap's links where gap_sample is set."""
    return tuple(spec.comparisons) + (GAP_COMPARISONS if spec.gap_sample else ())


def comparison_rows(pairs: pl.DataFrame, answers: pl.DataFrame | None, comparisons: tuple[str, ...],
                    sample: set[str] | None = None) -> list[dict]:
    """One row per pair and comparison: pair_id, split, comparison, system, prompt and the two roles' texts.
    chosen_vs_rejected skips pairs without labels; tuned_vs_base needs both answers of a pair; the gap's
    comparisons (tuned and base against chosen) are made for the pairs in `sample` only."""
    texts = pairs.select("pair_id", "split", system=pl.col("system").fill_null(""), prompt="prompt",
                         chosen="chosen", rejected="rejected")
    if any(c != "chosen_vs_rejected" for c in comparisons):
        models = set(answers["model"].unique().to_list())
        if not {"tuned", "base"} <= models:
            raise DpoEvalError(f"answers.parquet holds answers of {sorted(models)}, not of both tuned and base: "
                               "judge chosen_vs_rejected only (--comparisons chosen_vs_rejected)")
        wide = first_turn(answers).filter(pl.col("model").is_in(["tuned", "base"])).pivot(
            on="model", index="pair_id", values="answer", aggregate_function="first")
        texts = texts.join(wide, on="pair_id", how="left")
    rows = []
    for pair in texts.iter_rows(named=True):
        for comparison in comparisons:
            if comparison in GAP_COMPARISONS and pair["pair_id"] not in (sample or set()):
                continue
            first, second = ROLES[comparison]
            if pair.get(first) is None or pair.get(second) is None:
                continue
            rows.append({"pair_id": pair["pair_id"], "split": pair["split"], "comparison": comparison,
                         "system": pair["system"], "prompt": pair["prompt"], "roles": (first, second),
                         "texts": (pair[first], pair[second])})
    return rows


def build_requests(rows: list[dict], spec: JudgeSpec, template, judge: str) -> list[dict]:
    """Per comparison row, its ab and ba judgments: metadata, messages, key and the truncated flag."""
    requests = []
    for row in rows:
        for order, (i, j) in (("ab", (0, 1)), ("ba", (1, 0))):
            rendered = render(template, row["system"], row["prompt"], row["texts"][i], row["texts"][j],
                              context_chars=spec.context_chars, answer_share=spec.answer_share,
                              reference=row.get("reference") or "")
            requests.append(request_record(row, order, i, j, rendered, judge))
    return requests


def judgment_table(requests: list[dict], replies: dict, judge: str, read=read_reply) -> pl.DataFrame:
    """The judgments.parquet rows of the requests that have a reply (contract columns, in request order).
    cached: the reply came from the cache, or from a call made for an earlier row with the same messages
    (e.g. tuned and base answers equal to chosen and rejected), so calls + cached = rows."""
    rows, seen = [], set()
    for req in requests:
        reply = replies.get(req["key"])
        if reply is None:
            continue
        cached = reply.cached or req["key"] in seen
        seen.add(req["key"])
        failed = reply.error
        reading = read(reply.raw)  # verdicts.Reading: verdict, strength, rationale
        verdict = "failed" if failed else reading.verdict
        winner = {"first": req["shown_first"], "second": req["shown_second"]}.get(verdict, verdict)
        rows.append({"pair_id": req["pair_id"], "split": req["split"], "comparison": req["comparison"],
                     "judge": judge, "order": req["order"], "shown_first": req["shown_first"], "verdict": verdict,
                     "winner": winner, "p_first": reply.p_first, "raw": failed or reply.raw,
                     "truncated": req["truncated"],
                     "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
                     "latency_s": reply.latency_s, "cached": cached,
                     "strength": None if failed else reading.strength,
                     "rationale": None if failed else reading.rationale,
                     "has_reference": req.get("has_reference", False)} | ({TURN: req[TURN]} if TURN in req else {}))
    two_turns = any(TURN in req for req in requests)  # a single-turn run's table has no turn column
    return pl.DataFrame(rows, schema=SCHEMA | ({TURN: pl.Int64} if two_turns else {}))


def answer_lengths(run_dir: Path, answers: pl.DataFrame | None, pairs: pl.DataFrame) -> pl.DataFrame | None:
    """`pair_id, split, role, length` of base and tuned answers: features.parquet's n_tokens, else
    answers.parquet's n_new_tokens; None where neither is there."""
    features = run_dir / "features.parquet"
    if features.is_file():
        table = pl.read_parquet(features)
        if "n_tokens" in table.columns:
            return table.filter(pl.col("role").is_in(["base", "tuned"])).select(
                "pair_id", "split", "role", length=pl.col("n_tokens").cast(pl.Float64))
    if answers is not None and "n_new_tokens" in answers.columns:
        return answers.filter(pl.col("model").is_in(["base", "tuned"])).join(
            pairs.select("pair_id", "split"), on="pair_id").select(
            "pair_id", "split", role="model", length=pl.col("n_new_tokens").cast(pl.Float64))
    return None


def _turn_summary(part: pl.DataFrame, turn: int, answers: pl.DataFrame, pairs: pl.DataFrame,
                  prompts: pl.DataFrame) -> dict:
    """judge_summary of a later turn's judgments: lengths are its answers' new tokens (features.parquet scores turn
    1); the style control (hundreds of logistic fits) is the headline turn's only, so sc_reason says why it is NaN."""
    own = answers.filter(pl.col(TURN) == turn).drop(TURN)
    lengths = own.filter(pl.col("model").is_in(["base", "tuned"])).join(pairs.select("pair_id", "split"),
                                                                         on="pair_id").select(
        "pair_id", "split", role="model", length=pl.col("n_new_tokens").cast(pl.Float64))
    stats = judge_summary(part, lengths, prompts=prompts)
    for comparisons in stats["splits"].values():
        if "tuned_vs_base" in comparisons:
            comparisons["tuned_vs_base"]["sc_reason"] = "the style control is computed for turn 1 (the headline) only"
    return stats


def update_summary(run_dir: Path, block: dict) -> None:
    """Set summary.json's `judge` and its panel member's entry of `judges` to `block` (dpo_eval.judges.panel), keeping
    every other key (a new file where there is none)."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    summary = record_judge(summary, jsonable(block))
    path.write_text(json.dumps(summary, indent=2, allow_nan=False))


def plan_requests(run_dir: Path, spec: JudgeSpec) -> tuple:
    """(pairs, answers, template, the local judge or None, judge id, requests) of judging `run_dir` with `spec`; the
    same for a run and its dry run. Refuses, before any call, a pair listed twice and a selection with nothing to judge."""
    run_dir = Path(run_dir)
    pairs = select_pairs(read_table(run_dir, "pairs.parquet"), spec)
    repeated = pairs.filter(pl.col("pair_id").is_duplicated())["pair_id"].unique().to_list()
    if repeated:  # refused before any call: two rows of one pair would be judged and paid for twice, then rejected
        raise DpoEvalError(f"{run_dir / 'pairs.parquet'}: pair_id {repeated[0]!r} appears more than once "
                           f"({len(repeated)} repeated pair(s)); keep one row per pair")
    needs_answers = ("tuned_vs_base" in spec.comparisons or bool(spec.gap_sample)
                     or (run_dir / "answers.parquet").is_file())
    answers = read_table(run_dir, "answers.parquet") if needs_answers else None
    references = pair_references(pairs, spec.references, run_dir / "pairs.parquet")
    template = judge_template(spec, bool(references))
    rows = comparison_rows(pairs, answers, comparisons_of(spec), gap_pairs(pairs, spec))
    shown = uses_reference(template)  # a user's template without {{ reference }} shows none: has_reference false
    for row in rows:
        row["reference"] = references.get(row["pair_id"], ("", ""))[0] if shown else ""
    turn2 = second_turn_rows(pairs, answers, comparisons_of(spec), references)  # a two-turn set: its dialogue
    if turn2:  # turn 2's references are in its dialogue prompt (dpo_eval.judges.dialogue), not the reference slot
        rows = [row | {TURN: 1} for row in rows] + [
            row | {"reference": "", "reference_in_prompt": any(references.get(row["pair_id"], ()))} for row in turn2]
    local = None
    if spec.kind == "hf":  # a local HF judge (dpo_eval.judges.local): cut in tokens, verdicts from log-probs
        from dpo_eval.judges.local import HFJudge

        local = HFJudge(spec, template)
        judge = judge_id(local.identity)
        requests = local.build_requests(rows, judge)
    else:
        judge = judge_id(judge_identity(spec, template))
        requests = expand(build_requests(rows, spec, template, judge), spec.repeats)  # K askings of each judgment
    if not requests:
        raise DpoEvalError(f"{run_dir}: nothing to judge for split {spec.split!r} and comparisons "
                           f"{list(spec.comparisons)}")
    return pairs, answers, template, local, judge, requests


CHARS_PER_TOKEN = 4  # the usual rule of thumb for English text where no tokenizer is at hand


def cost(prompt_tokens: float, completion_tokens: float, spec: JudgeSpec) -> float | None:
    """The price of these tokens at spec.price_in / spec.price_out per million; None without prices."""
    if spec.price_in is None and spec.price_out is None:
        return None
    return (prompt_tokens * (spec.price_in or 0.0) + completion_tokens * (spec.price_out or 0.0)) / 1e6


def dry_run(run_dir: Path, spec: JudgeSpec) -> dict:
    """What `judge_run` would do, without a call or a write: judgments in all, how many the cache already holds,
    the calls to make (within --max-calls), and their expected tokens: the prompt's characters / CHARS_PER_TOKEN
    (the API's tokenizer is not at hand) and at most max_tokens per reply, with the cost at spec's prices. A local
    (hf) judge computes on this machine: it has judgments to compute, no tokens to pay for."""
    pairs, answers, template, local, judge, requests = plan_requests(run_dir, spec)
    by_key = {req["key"]: req for req in requests}
    outcome, allowed = plan_calls(list(by_key), JudgmentCache(spec.cache_dir), spec.max_calls)
    chars = sum(len(m.get("content") or "") for key in allowed for m in by_key[key].get("messages") or [])
    prompt_tokens = math.ceil(chars / CHARS_PER_TOKEN)
    completion_tokens = len(allowed) * spec.max_tokens
    return {"judge": judge, "kind": spec.kind, "model": spec.model, "judge_style": spec.judge_style,
            "with_reference": sum(bool(req.get("has_reference")) for req in requests) // spec.repeats,
            "judgments": len(requests) // spec.repeats, "repeats": spec.repeats,
            "distinct": len(by_key), "cached": len(outcome.replies), "calls": len(allowed),
            "over_budget": outcome.pending, "prompt_tokens": prompt_tokens if spec.kind != "hf" else None,
            "completion_tokens": completion_tokens if spec.kind != "hf" else None,
            "token_method": (f"prompt characters / {CHARS_PER_TOKEN}; replies at most max_tokens = {spec.max_tokens}"
                             if spec.kind != "hf" else "a local judge: computed here, nothing to pay per token"),
            "cost": cost(prompt_tokens, completion_tokens, spec) if spec.kind != "hf" else None}


def judge_run(run_dir: Path, spec: JudgeSpec) -> dict:
    """Judge the run in `run_dir` with `spec`: write judgments.parquet, set summary.json's `judge`, return it.

    summary `judge` = {id, kind, model, template_sha, calls (API calls this run; hf: judgments computed by
    forward passes), cached (judgments read from the cache), invalid (per-order verdicts), tokens {prompt,
    completion} (this run's calls), truncated (judgments with a cut text), complete, pending, incomplete,
    ci_method, lc_method, splits} with splits from judge_stats.judge_summary, plus judge_style, verdict_levels,
    max_tokens, references {judgments, pairs, of, source} and with five levels the weighting and each split's
    tuned_vs_base weighted_win_rate (dpo_eval.judges.verdicts); kind hf adds `hf` (rendering,
    labels, tie rule, forward passes, repairs: dpo_eval.judges.local). spec.kind picks the judge: openai (an
    OpenAI-compatible API, dpo_eval.judges.api) or hf (a local model, dpo_eval.judges.local); both share the
    judgment cache. Raises DpoEvalError after writing both when the run stopped early.
    """
    run_dir = Path(run_dir)
    pairs, answers, template, local, judge, requests = plan_requests(run_dir, spec)
    if spec.kind == "hf":
        outcome = local.run(requests, JudgmentCache(spec.cache_dir), judge, max_calls=spec.max_calls)
    else:
        by_key = {req["key"]: req["messages"] for req in requests}
        outcome = run_calls(ChatJudge(spec), by_key, JudgmentCache(spec.cache_dir), judge,
                            max_calls=spec.max_calls, concurrency=spec.concurrency)
    repeatability = None
    if spec.repeats > 1:  # one table per repeat, folded into one row per judgment (dpo_eval.judges.repeats)
        table, repeatability = fold([judgment_table([r for r in requests if r["repeat"] == i], outcome.replies, judge,
                                                    reader(spec)) for i in range(spec.repeats)], spec.temperature)
    else:
        table = judgment_table(requests, outcome.replies, judge, reader(spec))
    summary_file = run_dir / "summary.json"  # the other panel members' rows stay (dpo_eval.judges.panel)
    merge_judgments(run_dir / "judgments.parquet", table, judge,
                    panel_ids(json.loads(summary_file.read_text()) if summary_file.is_file() else {}))
    main, first = first_turn(table), first_turn(answers)  # a two-turn set's headline figures are turn 1's
    lengths = answer_lengths(run_dir, first, pairs)
    styles = style_frame(first, pairs, lengths) if answers is not None else None
    prompts = prompt_table(pairs)
    stats = (judge_summary(main, lengths, styles=styles, prompts=prompts) if main.height
             else {"invalid": 0, "failed": 0, "incomplete": 0, "splits": {}})
    if spec.verdict_levels == 5:
        add_weighted(stats, main, prompts)
    add_categories(stats, main, pairs, prompts)
    if TURN in table.columns:  # turn 1 is the headline's block; each later turn its own
        later = table.filter(pl.col(TURN) != 1)
        stats["turns"] = {"1": {"splits": stats["splits"]}} | turn_blocks(
            later, lambda part, turn: _turn_summary(part, turn, answers, pairs, prompts), pairs, prompts)
    fresh = table.filter(~pl.col("cached"))
    stats.pop("invalid"), stats.pop("failed")
    invalid, failed = int((table["verdict"] == "invalid").sum()), int((table["verdict"] == "failed").sum())
    invalid_share = invalid / table.height if table.height else 0.0
    problems = []
    if invalid_share > spec.max_invalid_share:
        problems.append(f"{invalid} of {table.height} verdicts ({invalid_share:.0%}) could not be read (invalid), "
                        f"more than max_invalid_share {spec.max_invalid_share:.0%}: the judge does not answer in the "
                        "template's form; invalid replies are not cached, so a run with a fixed template or judge "
                        "asks them again")
    if failed:
        first = table.filter(pl.col("verdict") == "failed")["raw"][0]
        problems.append(f"{failed} judgments were refused by the server (e.g. {first}); they are asked again on the "
                        "next run")
    tokens = {"prompt": int(fresh["prompt_tokens"].fill_null(0).sum()),
              "completion": int(fresh["completion_tokens"].fill_null(0).sum())}
    if repeatability is not None:  # counted per call: a judgment's repeats may be partly from the cache
        made = [reply for reply in outcome.replies.values() if not reply.cached]
        tokens = {"prompt": sum(r.prompt_tokens or 0 for r in made), "completion": sum(r.completion_tokens or 0
                                                                                      for r in made)}
    block = {"id": judge, "kind": spec.kind, "model": spec.model, "base_url": normalised_url(spec.base_url) or None,
             "revision": spec.revision, "template_sha": template.sha,
             "calls": outcome.calls, "cached": int(table["cached"].sum()), "invalid": invalid,
             "invalid_share": invalid_share, "failed": failed,
             "tokens": tokens, "cost": cost(tokens["prompt"], tokens["completion"], spec),
             "truncated": int(table["truncated"].sum()),
             "complete": outcome.pending == 0 and not problems, "problems": problems,
             "pending": outcome.pending, **settings_block(spec, table), **stats, **getattr(outcome, "extra", {})}
    if repeatability is not None:
        block["repeatability"] = repeatability
    update_summary(run_dir, block)
    log.info("judge %s: %d of %d judgments made (%d calls, %d cached, %d invalid, %d refused), %d pending", judge,
             table.height, len(requests) // spec.repeats, outcome.calls, block["cached"], invalid, failed, outcome.pending)
    reason = outcome.failure or outcome.stopped
    if reason:
        again = "with a larger --max-calls " if outcome.failure is None else ""
        raise DpoEvalError(f"judging stopped: {reason}. {table.height} of {len(requests) // spec.repeats} judgments are made and "
                           f"kept ({outcome.calls} calls this run), {outcome.pending} left; run `dpo-eval judge` "
                           f"again {again}to continue from the cache")
    return block
