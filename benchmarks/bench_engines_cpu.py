"""Generation engines on the CPU: stories260k loaded in 4-bit nf4, `hf` vs `dequantized` vs `continuous`.

Greedy answers of base and tuned (a random LoRA adapter built here) to the first N orca prompts, through
dpo_eval.generation.generate.generate_both with each engine (each a fresh load); prints JSON with tokens/s, the
ratio to `hf`, and the identical answers out of N. Usage:
    PYTHONPATH=. python benchmarks/bench_engines_cpu.py [--pairs 16] [--tokens 48] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    from dpo_eval.config import DatasetSpec, GenerationSpec, ModelSpec
    from dpo_eval.data.pairs import read_pairs
    from dpo_eval.generation.generate import generate_both
    from dpo_eval.generation.models import load_model
    from tests.builders import make_adapter

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--engines", default="hf,dequantized,continuous")
    args = parser.parse_args()
    shared = ROOT.parent / "shared"
    stories = shared / "models/stories260k"
    pairs = read_pairs(DatasetSpec(source=str(shared / "data/orca_dpo_pairs/validation.jsonl"), limit=args.pairs))[0]
    result = {"pairs": args.pairs, "new_tokens": args.tokens, "compute_dtype": args.dtype,
              "load_average": os.getloadavg(), "cpus": os.cpu_count(), "engines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter(stories, Path(tmp) / "adapter", zero=False, seed=7, b_std=0.05,
                               targets=("q_proj", "v_proj", "down_proj"))
        spec = ModelSpec(base=str(stories), adapter=str(adapter), quantization="4bit", compute_dtype=args.dtype)
        answers = {}
        for engine in args.engines.split(","):
            loaded = load_model(spec, engine=engine)
            gen = GenerationSpec(max_new_tokens=args.tokens, batch_size=8, engine=engine)
            generate_both(loaded, pairs.head(2), gen.model_copy(update={"max_new_tokens": 2}))  # warm-up
            start = time.perf_counter()
            frame = generate_both(loaded, pairs, gen)
            seconds = time.perf_counter() - start
            answers[engine] = frame
            row = {"seconds": round(seconds, 2), "tokens_per_s": round(int(frame["n_new_tokens"].sum()) / seconds, 1)}
            if engine != "hf" and "hf" in answers:
                ref = answers["hf"]
                row["speed_vs_hf"] = round(row["tokens_per_s"] / result["engines"]["hf"]["tokens_per_s"], 2)
                row["identical_to_hf"] = {side: sum(a == b for a, b in zip(
                    ref.filter(ref["model"] == side)["answer"], frame.filter(frame["model"] == side)["answer"]))
                    for side in ("tuned", "base")}
            result["engines"][engine] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
