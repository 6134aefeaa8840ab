"""`dpo-eval judge`: a pairwise LLM judge (over an OpenAI-compatible API, or a local HF model) or a reward
model on an existing run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dpo_eval.cli.options import build, field_help, spec_option
from dpo_eval.config import JudgeSpec
from dpo_eval.errors import DpoEvalError

FLAGS = {"kind": "--judge", "model": "--judge-model", "base_url": "--base-url", "api_key_env": "--api-key-env",
         "comparisons": "--comparisons", "split": "--split", "limit": "--limit", "max_calls": "--max-calls",
         "concurrency": "--concurrency", "template": "--template", "max_tokens": "--max-tokens",
         "context_chars": "--context-chars", "answer_share": "--answer-share", "logprobs": "--logprobs",
         "quantization": "--quantization", "compute_dtype": "--compute-dtype", "batch_size": "--batch-size",
         "context_tokens": "--context-tokens", "tie_margin": "--tie-margin", "revision": "--judge-revision",
         "max_invalid_share": "--max-invalid-share", "price_in": "--price-in", "price_out": "--price-out",
         "gap_sample": "--gap-sample", "judge_style": "--judge-style", "verdict_levels": "--verdict-levels",
         "references": "--references", "repeats": "--repeats", "temperature": "--temperature"}


def _option(name: str):
    return spec_option(JudgeSpec, name, FLAGS[name])


def judge(
    run_dir: Path = typer.Argument(..., help="A run directory with pairs.parquet and answers.parquet."),
    kind: str = _option("kind"),
    model: Optional[str] = typer.Option(None, FLAGS["model"], help=field_help(JudgeSpec, "model")),
    reward_model: Optional[str] = typer.Option(
        None, "--reward-model", help="A reward model (one-output AutoModelForSequenceClassification), folder or "
        "hub id: scores all four roles into features.parquet as the feature reward_model and re-runs the "
        "statistics; its calibration goes to summary.json's reward_model block."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass of a reward model or of "
                                   "the hf judge."),
    base_url: Optional[str] = _option("base_url"),
    revision: Optional[str] = _option("revision"),
    max_invalid_share: float = _option("max_invalid_share"),
    api_key_env: str = _option("api_key_env"),
    comparisons: str = typer.Option(",".join(JudgeSpec.model_fields["comparisons"].default), FLAGS["comparisons"],
                                    help="Comma-separated: " + field_help(JudgeSpec, "comparisons")),
    split: str = _option("split"),
    limit: Optional[int] = _option("limit"),
    max_calls: Optional[int] = _option("max_calls"),
    concurrency: int = _option("concurrency"),
    template: Optional[Path] = _option("template"),
    max_tokens: Optional[int] = _option("max_tokens"),
    judge_style: str = _option("judge_style"),
    verdict_levels: int = _option("verdict_levels"),
    references: Optional[Path] = _option("references"),
    context_chars: int = _option("context_chars"),
    answer_share: float = _option("answer_share"),
    logprobs: bool = typer.Option(True, "--logprobs/--no-logprobs", help=field_help(JudgeSpec, "logprobs")),
    quantization: str = _option("quantization"),
    compute_dtype: str = _option("compute_dtype"),
    context_tokens: Optional[int] = _option("context_tokens"),
    tie_margin: float = _option("tie_margin"),
    gap_sample: Optional[int] = _option("gap_sample"),
    price_in: Optional[float] = _option("price_in"),
    price_out: Optional[float] = _option("price_out"),
    repeats: int = _option("repeats"),
    temperature: float = _option("temperature"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the judgments, the calls still to make (the cache "
                                 "and --max-calls counted) and their expected tokens and cost (--price-in, "
                                 "--price-out), then stop: no call, nothing written."),
) -> None:
    """Judge tuned vs base answers (and chosen vs rejected, the judge's calibration) in both orders; write
    judgments.parquet and summary.json's judge block; print that block. --judge openai calls an
    OpenAI-compatible API (--base-url); --judge hf loads --judge-model here (--quantization, --compute-dtype)
    and reads each verdict from the next-token log-probabilities of the labels A and B (or the template's
    judge_labels). With --reward-model:
    score all four roles with a reward model as one more feature, and its calibration."""
    from dpo_eval.judges.pairwise import jsonable, judge_run
    from dpo_eval.report.judge import write_judge_report

    if not run_dir.is_dir():
        raise DpoEvalError(f"RUN_DIR {run_dir}: no such directory")
    if reward_model is not None:
        if dry_run:
            raise DpoEvalError("--dry-run estimates an LLM judge's calls: give --judge-model, not --reward-model")
        if model is not None:
            raise DpoEvalError("give --judge-model (an LLM judge) or --reward-model, not both")
        from dpo_eval.cli.reward import judge_reward

        judge_reward(run_dir, reward_model, split=split, limit=limit, batch_size=batch_size)
        write_judge_report(run_dir)
        _print_answers(_answers(run_dir))
        return
    if model is None:
        raise DpoEvalError("--judge-model is required (or --reward-model)")
    chosen = tuple(c.strip() for c in comparisons.split(",") if c.strip())
    known = JudgeSpec.model_fields["comparisons"].default
    if not chosen or set(chosen) - set(known):
        raise DpoEvalError(f"--comparisons {comparisons}: give one or both of {','.join(known)}")
    local = {"quantization": quantization, "compute_dtype": compute_dtype, "batch_size": batch_size,
             "context_tokens": context_tokens, "tie_margin": tie_margin}
    if kind != "hf":  # an hf-only option given with --judge openai: JudgeSpec's error names it
        local = {name: value for name, value in local.items()
                 if name != "batch_size" and value != JudgeSpec.model_fields[name].default}
    spec = build(JudgeSpec, FLAGS, kind=kind, model=model, base_url=base_url, revision=revision,
                 max_invalid_share=max_invalid_share, api_key_env=api_key_env,
                 comparisons=chosen, split=split, limit=limit, max_calls=max_calls, concurrency=concurrency,
                 template=template, max_tokens=max_tokens, context_chars=context_chars, answer_share=answer_share,
                 logprobs=logprobs, price_in=price_in, price_out=price_out, gap_sample=gap_sample,
                 judge_style=judge_style, verdict_levels=verdict_levels, references=references, repeats=repeats,
                 temperature=temperature, **local)
    if dry_run:
        from dpo_eval.judges.pairwise import dry_run as estimate

        plan = estimate(run_dir, spec)
        print(json.dumps(plan, indent=2))
        money = "" if plan["cost"] is None else f", about {plan['cost']:.4f} at the given prices"
        print(f"dry run: {plan['calls']} calls to make ({plan['cached']} of {plan['distinct']} distinct judgments "
              f"cached, {plan['over_budget']} over --max-calls"
              + (f"; {plan['judgments']} judgments asked {plan['repeats']} times each" if plan["repeats"] > 1 else "")
              + ")"
              + (f", about {plan['prompt_tokens']} prompt and at most {plan['completion_tokens']} completion "
                 f"tokens{money}" if plan["prompt_tokens"] is not None else "") + "; nothing was called or written")
        return
    try:
        block = judge_run(run_dir, spec)
    finally:  # a budget stop keeps what was judged: the report and the four answers say so too
        if (run_dir / "judgments.parquet").is_file():  # a run refused before any judgment writes nothing
            write_judge_report(run_dir)
            summary = _answers(run_dir)
    shown = {k: v for k, v in block.items() if k not in ("ci_method", "lc_method")}
    print(json.dumps(jsonable(shown), indent=2))
    _print_answers(summary)


def _answers(run_dir: Path) -> dict:
    """The run's summary with its four answers recomputed from the judges' verdicts (written to it)."""
    from dpo_eval.studies.verdict import write_verdict

    return write_verdict(run_dir)


def _print_answers(summary: dict) -> None:
    """The four answers, last on the terminal."""
    from dpo_eval.studies.verdict import verdict_lines

    print("\n".join(verdict_lines(summary)))
