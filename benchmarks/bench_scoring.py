"""Scoring speed: the plain TextDescriptives path vs score_texts, on the 568 orca texts. Prints JSON.

`per_core_ratio`: score_texts in ONE process against the plain path (what the fast path gains per
core); `ratio`: score_texts on every core (`n_process` default) against the plain path.
On a shared machine the neighbours' load drifts during a run, so the two one-process paths take
turns over `--blocks` contiguous blocks of the texts (plain, then fast, block after block) and each
side's time is its pipeline load plus its blocks; `_cpu` figures use this process's CPU time
(time.process_time) instead of wall time. The all-core run is one call from a fresh process: it
loads the pipeline, then forks its worker processes. `max_abs_diff` and `nan_mismatches` compare both fast runs with the
plain path, every feature of every text, and must be 0.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from dpo_eval.config import ScoringSpec
from dpo_eval.scoring import scorer as scoring
from dpo_eval.scoring.scorer import build_pipeline, feature_names, score_texts, score_texts_plain

DEFAULT = Path(__file__).resolve().parents[2] / "shared/data/orca_dpo_pairs/validation.jsonl"


def read_texts(path: str, limit: int | None) -> list[str]:
    """chosen then rejected texts of a preference file (.jsonl or .jsonl.gz with chosen/rejected)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    texts = [r["chosen"] for r in records] + [r["rejected"] for r in records]
    return texts[:limit] if limit else texts


class Clock:
    """Wall and CPU seconds accumulated over several timed calls."""

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __call__(self, function, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = function(*args, **kwargs)
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu
        return result


def compare(fast: pl.DataFrame, plain: pl.DataFrame, names: list[str]) -> tuple[float, int]:
    a, b = fast.select(names).to_numpy(), plain.select(names).to_numpy()
    nan_mismatch = int((np.isnan(a) != np.isnan(b)).sum())
    diff = np.abs(np.nan_to_num(a, nan=0.0) - np.nan_to_num(b, nan=0.0))
    return float(diff.max()), nan_mismatch


def component_seconds(nlp, texts: list[str], mark: bool, batch_size: int = 64) -> dict[str, float]:
    """CPU seconds of each step of `nlp` over `texts`, component by component, then extraction."""
    import warnings

    import textdescriptives as td

    seconds = {}
    clock = time.process_time
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # W007 (coherence without word vectors), as in scoring
        start = clock()
        docs = [nlp.make_doc(t) for t in texts]
        seconds["tokenizer"] = clock() - start
        if mark:
            docs = [scoring._marked(d) for d in docs]
        for name, component in nlp.pipeline:
            start = clock()
            docs = (list(component.pipe(docs, batch_size=batch_size)) if hasattr(component, "pipe")
                    else [component(d) for d in docs])
            seconds[name] = clock() - start
        start = clock()
        for doc in docs:
            td.extract_dict(doc, include_text=False)
        seconds["extract_dict"] = clock() - start
    return seconds


def components(texts: list[str]) -> dict:
    """Per-component CPU seconds of the plain pipeline and of the fast path's (in one process)."""
    plain = component_seconds(build_pipeline("en_core_web_sm"), texts, mark=False)
    fast = component_seconds(scoring._pipeline("en_core_web_sm", scoring.SKIPPED_COMPONENTS, 1_000_000),
                             texts, mark=True)
    rows = {name: {"plain_cpu_s": round(plain[name], 2),
                   "fast_cpu_s": round(fast[name], 2) if name in fast else None} for name in plain}
    total_plain, total_fast = sum(plain.values()), sum(fast.values())
    return {"texts": len(texts), "components": rows, "plain_cpu_s": round(total_plain, 2),
            "fast_cpu_s": round(total_fast, 2), "ratio_cpu": round(total_plain / total_fast, 2),
            "note": "pipeline loads excluded; extract_dict evaluates textdescriptives' lazy getters"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(DEFAULT), help="A .jsonl or .jsonl.gz with chosen/rejected.")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N texts.")
    parser.add_argument("--blocks", type=int, default=8, help="Turns the one-process paths take.")
    parser.add_argument("--components", action="store_true",
                        help="Print CPU seconds per pipeline component (plain vs fast) instead.")
    args = parser.parse_args()
    texts = read_texts(args.data, args.limit)
    if args.components:
        print(json.dumps({"data": Path(args.data).name} | components(texts), indent=2))
        return
    names = list(feature_names())
    cores = os.cpu_count() or 1

    import spacy  # noqa: F401  (imports are the process's, not one path's: done before any timing)
    import textdescriptives  # noqa: F401

    # All cores first, from a process that has loaded no pipeline: the call loads it once and forks
    # its workers from it (as the CLI does); in a threaded flow each worker loads its own.
    all_cores = Clock()
    fast = all_cores(score_texts, texts, ScoringSpec(cache=False))

    plain_clock, one_clock = Clock(), Clock()
    scoring._pipeline.cache_clear()  # the one-process side loads its own pipeline and tables
    scoring._lexeme_prob_table.cache_clear()
    nlp = plain_clock(build_pipeline, "en_core_web_sm")
    one_spec = ScoringSpec(cache=False, n_process=1)
    # the fast path's pipeline, loaded once per process (score_texts would load it on first use)
    one_clock(scoring._pipeline, one_spec.spacy_model, scoring.SKIPPED_COMPONENTS, one_spec.max_length)
    size = -(-len(texts) // max(1, args.blocks))
    plain_parts, one_parts = [], []
    for start in range(0, len(texts), size):
        block = texts[start:start + size]
        plain_parts.append(plain_clock(score_texts_plain, block, nlp=nlp))
        one_parts.append(one_clock(score_texts, block, one_spec))
    plain, one = pl.concat(plain_parts), pl.concat(one_parts)
    diffs = [compare(fast, plain, names), compare(one, plain, names)]

    with tempfile.TemporaryDirectory() as cache_dir:
        spec = ScoringSpec(cache_dir=Path(cache_dir))
        score_texts(texts, spec)
        cached = Clock()
        cached(score_texts, texts, spec)

    n = len(texts)
    print(json.dumps({
        "data": Path(args.data).name,
        "texts": n,
        "cores": cores,
        "plain_texts_per_s": round(n / plain_clock.wall, 2),
        "one_process_texts_per_s": round(n / one_clock.wall, 2),
        "fast_texts_per_s": round(n / all_cores.wall, 2),
        "per_core_ratio": round(plain_clock.wall / one_clock.wall, 2),
        "per_core_ratio_cpu": round(plain_clock.cpu / one_clock.cpu, 2),
        "ratio": round(plain_clock.wall / all_cores.wall, 2),
        "max_abs_diff": max(d for d, _ in diffs),
        "nan_mismatches": sum(m for _, m in diffs),
        "cached_texts_per_s": round(n / cached.wall, 1),
        "plain_s": round(plain_clock.wall, 2), "one_process_s": round(one_clock.wall, 2),
        "fast_s": round(all_cores.wall, 2), "plain_cpu_s": round(plain_clock.cpu, 2),
        "one_process_cpu_s": round(one_clock.cpu, 2), "cached_s": round(cached.wall, 3),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
