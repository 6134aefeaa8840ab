"""Generation throughput: one prompt at a time vs the batched, length-sorted path; and the memory of
one load serving base and tuned vs two separate loads. Prints JSON."""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"


def throughput(args) -> dict:
    import polars as pl

    from dpo_eval.config import GenerationSpec, ModelSpec
    from dpo_eval.data.pairs import load_pairs
    from dpo_eval.generation.generate import generate_answers
    from dpo_eval.generation.models import load_model

    pairs = load_pairs(args.data).filter(pl.col("split") == "valid").head(args.prompts)
    if pairs.height < args.prompts:
        pairs = load_pairs(args.data).head(args.prompts)
    loaded = load_model(ModelSpec(base=args.base, quantization=args.quantization, compute_dtype="float32"))
    spec = GenerationSpec(max_new_tokens=args.new_tokens, batch_size=1)
    start = time.perf_counter()
    single = generate_answers(loaded.model, loaded.tokenizer, pairs, spec, context_length=loaded.context_length)
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = generate_answers(loaded.model, loaded.tokenizer, pairs, spec.model_copy(update={"batch_size": args.batch_size}),
                               context_length=loaded.context_length)
    batched_s = time.perf_counter() - start
    prefill_s = _prefill_seconds(loaded, pairs, args)
    return {"prompts": pairs.height, "new_tokens": args.new_tokens, "batch_size": args.batch_size,
            "quantization": args.quantization,
            "sequential_tokens_per_s": round(single["n_new_tokens"].sum() / single_s, 1),
            "batched_tokens_per_s": round(batched["n_new_tokens"].sum() / batched_s, 1),
            "ratio": round((batched["n_new_tokens"].sum() / batched_s) / (single["n_new_tokens"].sum() / single_s), 2),
            "identical_fraction": float((single["answer"] == batched["answer"]).mean()),
            "sequential_s": round(single_s, 2), "batched_s": round(batched_s, 2),
            "prefill_only_s": round(prefill_s, 2),
            "ratio_upper_bound": round(single_s / prefill_s, 2)}


def _prefill_seconds(loaded, pairs, args) -> float:
    """Time of the prompt forward passes alone (batched): work that batching cannot remove."""
    import torch

    from dpo_eval.generation.generate import encode_prompts
    from dpo_eval.generation.padding import left_padded
    from dpo_eval.generation.prompts import PromptFormatter

    prompts = encode_prompts(PromptFormatter(loaded.tokenizer), pairs, loaded.context_length - args.new_tokens)
    prompts = sorted((p.ids for p in prompts), key=len, reverse=True)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), args.batch_size):
            ids, mask = left_padded(prompts[i:i + args.batch_size], loaded.tokenizer.pad_token_id)
            loaded.model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - start


def memory_child(mode: str, base: str, adapter: str) -> None:
    """Run in a subprocess: load as `mode` says, generate a little with both models, print peak RSS."""
    import polars as pl
    import torch

    from dpo_eval.config import GenerationSpec, ModelSpec
    from dpo_eval.generation.generate import generate_answers, generate_both
    from dpo_eval.generation.models import load_model

    pairs = pl.DataFrame({"pair_id": ["a"], "split": ["train"], "system": [""], "prompt": ["Once upon a time"],
                          "chosen": ["c"], "rejected": ["r"], "messages": [None]}, schema_overrides={"messages": pl.String})
    spec = ModelSpec(base=base, adapter=adapter, quantization="4bit")
    gen = GenerationSpec(max_new_tokens=8)
    if mode == "one":
        models = [load_model(spec)]
        generate_both(models[0], pairs, gen)
    else:
        models = [load_model(spec), load_model(spec.model_copy(update={"adapter": None}))]
        generate_answers(models[0].model, models[0].tokenizer, pairs, gen)
        generate_answers(models[1].model, models[1].tokenizer, pairs, gen)
    model_bytes = sum(p.numel() * p.element_size() for m in models for p in m.model.parameters())
    print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "model_mb": model_bytes / 2**20, "torch": torch.__version__}))


def memory(args) -> dict:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.builders import make_adapter

    with tempfile.TemporaryDirectory() as tmp:
        adapter = str(make_adapter(Path(args.base), Path(tmp) / "adapter", zero=False))
        out = {}
        for mode in ("one", "two"):
            result = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--base", args.base,
                                     "--adapter", adapter], capture_output=True, text=True, check=True)
            out[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    return {"one_load_peak_mb": round(out["one"]["peak_rss_mb"], 1), "two_loads_peak_mb": round(out["two"]["peak_rss_mb"], 1),
            "one_load_model_mb": round(out["one"]["model_mb"], 3), "two_loads_model_mb": round(out["two"]["model_mb"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default=str(SHARED / "models/stories260k"))
    parser.add_argument("--data", default=str(SHARED / "data/orca_dpo_pairs/validation.jsonl"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--memory-child", default=None)
    parser.add_argument("--adapter", default=None)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.base, args.adapter)
        return
    print(json.dumps(throughput(args) | memory(args), indent=2))


if __name__ == "__main__":
    main()
