"""A judged orca run with the local HF judge (issue 12, judge kind 3): stories260k judges its own answers.

1. The first N orca pairs of ../shared/data/orca_dpo_pairs/validation.jsonl (hash split, --valid-fraction).
2. Base and tuned answers from stories260k, the tuned ones with a random non-zero LoRA adapter
   (tests/builders.make_adapter, zero=False), greedy, --max-new-tokens each: pairs.parquet, answers.parquet.
3. `judge_run` with JudgeSpec(kind="hf", model=stories260k): tuned vs base and chosen vs rejected, both orders,
   verdicts from the next-token log-probabilities of A and B; then a second run (all from the cache).

Prints JSON: the judge block's headline per split and pooled over both splits (the same judge_stats on the
judgments with the split set to "all"): calibration (chosen_vs_rejected agreement with its CI, position
consistency, first-position rate) and tuned-vs-base win rate (CI, sign test, LC win rate). stories260k is a
260k-parameter story model: it cannot judge orca answers, so every figure is expected near chance or
driven by position and length alone. No features.parquet is written (no spaCy scoring), so judge_run's own
LC win rate would use answers.parquet's n_new_tokens, which greedy decoding to --max-new-tokens makes all
equal (no length variation: NaN); the figures printed are judge_stats.judge_summary on the same judgments
with the answers' lengths in characters instead (only lc_win_rate differs from summary.json's block).

    .venv/bin/python benchmarks/judge_hf_orca.py --pairs 40 --out /tmp/judge-hf-orca
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpo_eval.config import DatasetSpec, GenerationSpec, JudgeSpec, ModelSpec  # noqa: E402
from dpo_eval.data.pairs import load_pairs  # noqa: E402
from dpo_eval.generation.generate import generate_both  # noqa: E402
from dpo_eval.generation.models import load_model  # noqa: E402
from dpo_eval.judges.pairwise import jsonable, judge_run  # noqa: E402
from dpo_eval.judges.statistics import judge_summary  # noqa: E402
from tests.builders import make_adapter  # noqa: E402

SHARED = ROOT.parent / "shared"


def headline(splits: dict) -> dict:
    keep = {"tuned_vs_base": ("n", "wins", "losses", "ties", "win_rate", "ci_low", "ci_high", "p_value",
                              "lc_win_rate", "lc_reason", "position_consistency", "first_position_rate"),
            "chosen_vs_rejected": ("n", "agreement", "ci_low", "ci_high", "position_consistency",
                                   "first_position_rate")}
    return {split: {c: {k: block[c].get(k) for k in keys} for c, keys in keep.items() if c in block}
            for split, block in splits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--valid-fraction", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", type=Path, default=SHARED / "models/stories260k")
    parser.add_argument("--data", type=Path, default=SHARED / "data/orca_dpo_pairs/validation.jsonl")
    parser.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"])
    parser.add_argument("--out", type=Path, required=True, help="Work folder: adapter/, run/, cache/ (made new).")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=False)
    run = args.out / "run"
    run.mkdir()
    started = time.perf_counter()
    pairs = load_pairs(DatasetSpec(source=str(args.data), limit=args.pairs, valid_fraction=args.valid_fraction))
    adapter = make_adapter(args.model, args.out / "adapter", zero=False, seed=0)
    loaded = load_model(ModelSpec(base=str(args.model), adapter=str(adapter), quantization="none",
                                  compute_dtype="float32"))
    answers = generate_both(loaded, pairs, GenerationSpec(max_new_tokens=args.max_new_tokens, batch_size=8))
    pairs.write_parquet(run / "pairs.parquet")
    answers.write_parquet(run / "answers.parquet")
    generated = time.perf_counter() - started

    spec = JudgeSpec(kind="hf", model=str(args.model), quantization=args.quantization, compute_dtype="float32",
                     cache_dir=args.out / "cache")
    started = time.perf_counter()
    block = judge_run(run, spec)
    judged = time.perf_counter() - started
    again = judge_run(run, spec)

    table = pl.read_parquet(run / "judgments.parquet")
    lengths = answers.join(pairs.select("pair_id", "split"), on="pair_id").select(
        "pair_id", "split", role="model", length=pl.col("answer").str.len_chars().cast(pl.Float64))
    by_split = judge_summary(table, lengths)
    pooled = judge_summary(table.with_columns(split=pl.lit("all")), lengths.with_columns(split=pl.lit("all")))
    print(json.dumps(jsonable({
        "data": str(args.data), "pairs": {s: int((pairs["split"] == s).sum()) for s in ("train", "valid")},
        "judge": block["id"], "rendering": block["hf"]["rendering"], "labels": block["hf"]["labels"],
        "reply_prefix": block["hf"]["reply_prefix"], "tie_rule": block["hf"]["tie_rule"],
        "context_tokens": block["hf"]["context_tokens"], "judgments": table.height, "computed": block["calls"],
        "forward_passes": block["hf"]["forward_passes"], "truncated": block["truncated"], "invalid": block["invalid"],
        "ties": int((table["verdict"] == "tie").sum()), "first_verdicts": float((table["verdict"] == "first").mean()),
        "answers_equal": int((answers.pivot(on="model", index="pair_id", values="answer")
                              .filter(pl.col("tuned") == pl.col("base")).height)),
        "seconds": {"generate": round(generated, 1), "judge": round(judged, 1)},
        "rerun": {"computed": again["calls"], "cached": again["cached"],
                  "forward_passes": again["hf"]["forward_passes"]},
        "lengths": "answer characters (for lc_win_rate)",
        "splits": headline(by_split["splits"]), "pooled": headline(pooled["splits"])["all"],
    }), indent=2))


if __name__ == "__main__":
    main()
