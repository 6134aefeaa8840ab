"""Generation engines on a randomly initialised model of Mistral-7B's shape (GPU): nf4 `hf` vs the new engines.

Builds the model from a MistralConfig (no download, seeded), swaps every linear layer of the decoder for a
bitsandbytes nf4 Linear4bit (double quantization, bf16 compute: what load_in_4bit does) and keeps an
untouched copy of the packed weights. Then, in one call, on the same prompts (512 of mixed length,
64..1024 tokens, seeded; 256 new tokens; greedy; no EOS, so every answer is 256 tokens):

- `hf`: generate() on the nf4 model, prompts sorted by length, left-padded, batch 64 (dpo-eval's loop);
- `dequantized`: the copy dequantized to bf16 (dpo_eval.generation.engines.dequantize_in_place, before any
  forward pass), the same loop at batch 64, and at the batch the planner (dpo_eval.generation.batch_plan) picks;
- `continuous`: the same dequantized weights through transformers' generate_batch (paged attention).

Prints JSON: tokens/s, seconds, peak GPU memory, the share of the memory-bandwidth bound (the bandwidth
assumed is printed; --bandwidth-tbs overrides it), and each engine's token-level agreement with the nf4
path (mean common-prefix share, identical answers). `--quick` runs 128 prompts; `--tiny` runs a toy
shape on the CPU to check the script end to end. With no adapter: the base model's paths.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from functools import partial

import torch

# Peak memory bandwidth by card name (TB/s): H100 SXM 3.35, H200 4.8, A100 80GB 2.0, L40S 0.864.
BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L40S": 0.864}


def build(tiny: bool, device: str):
    from transformers import MistralConfig, MistralForCausalLM

    if tiny:
        config = MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    else:  # Mistral-7B-v0.1 / Instruct shape
        config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                               sliding_window=4096, rope_theta=10000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.generation_config.eos_token_id = None  # random weights: every answer runs to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def quantize_(model, device: str) -> int:
    """Replace the decoder's nn.Linear layers by nf4 Linear4bit (double quant, bf16 compute), in place."""
    import bitsandbytes as bnb

    count = 0
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu" if device == "cpu" else device),
                                                 requires_grad=False, quant_type="nf4", compress_statistics=True)
                    q = q.to(device)
                    setattr(parent, name, q)
                    count += 1
        if device == "cuda":
            torch.cuda.empty_cache()
    return count


def make_prompts(n: int, low: int, high: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_generate(model, prompts, batch: int, new_tokens: int, device: str, **extra) -> list[list[int]]:
    """dpo-eval's loop: prompts sorted by length (longest first), left-padded batches, greedy."""
    from dpo_eval.generation.padding import left_padded

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    out: dict[int, list[int]] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch):
            rows = order[start:start + batch]
            ids, mask = left_padded([prompts[i] for i in rows], 0)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
            for r, i in enumerate(rows):
                out[i] = gen[r, ids.shape[1]:].tolist()
    return [out[i] for i in range(len(prompts))]


def run_continuous(model, prompts, new_tokens: int, device: str) -> list[list[int]]:
    from dpo_eval.generation.engines import generate_continuous

    class NoPad:
        pad_token_id = 0

    return generate_continuous(model, NoPad(), prompts, new_tokens, set())


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    seconds = time.perf_counter() - start
    peak = round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None
    return result, seconds, peak


def agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Mean share of each answer's tokens before its first difference from the reference, identical answers,
    and the share of equal tokens position by position."""
    prefix, equal, total, same = 0.0, 0, 0, 0
    for a, b in zip(reference, other):
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix += k / max(1, len(a))
        equal += sum(x == y for x, y in zip(a, b))
        total += len(a)
        same += a == b
    return {"common_prefix_share": round(prefix / len(reference), 4), "identical_answers": same,
            "answers": len(reference), "positionwise_equal_share": round(equal / max(1, total), 4)}


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bound(tokens_per_step: int, weights: int, kv_read: float, bandwidth: float) -> float:
    """Tokens/s if each decode step only read the weights and the batch's KV cache at `bandwidth` B/s."""
    return tokens_per_step * bandwidth / (weights + kv_read)


def main() -> None:
    from dpo_eval.generation.batch_plan import kv_bytes_per_token, model_shape, plan_batch_size, sequence_bytes
    from dpo_eval.generation.engines import dequantize_in_place

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="toy shape on the CPU: checks the script")
    parser.add_argument("--quick", action="store_true", help="128 prompts instead of 512")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=1024)
    parser.add_argument("--bandwidth-tbs", type=float, default=None, help="memory bandwidth assumed (TB/s)")
    parser.add_argument("--skip", default="", help="comma-separated engines to leave out")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="skip the engines that would start after this many seconds (partial results survive)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    n = args.prompts or (128 if args.quick else 512)
    if args.tiny:
        n, args.new_tokens, args.min_prompt, args.max_prompt = args.prompts or 16, 16, 8, 64
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    bandwidth_tbs = args.bandwidth_tbs or next((v for k, v in BANDWIDTH_TBS.items() if k in name), 3.35)
    bandwidth = bandwidth_tbs * 1e12
    skip = set(filter(None, args.skip.split(",")))
    result = {"device": name, "torch": torch.__version__, "prompts": n, "new_tokens": args.new_tokens,
              "prompt_tokens": [args.min_prompt, args.max_prompt], "batch": args.batch,
              "bandwidth_tbs_assumed": bandwidth_tbs,
              "bound_note": "tokens/s if a decode step only read the weights in memory and the batch's KV cache at the "
                            "assumed bandwidth (batch = the engine's batch; continuous: against batch --batch)"}
    start = began = time.perf_counter()
    model = build(args.tiny, device)
    result["quantized_layers"] = quantize_(model, device)
    fresh = copy.deepcopy(model)  # packed weights never run: dequantized before any forward pass
    result["build_s"] = round(time.perf_counter() - start, 1)
    prompts = make_prompts(n, args.min_prompt, args.max_prompt, model.config.vocab_size)
    shape = model_shape(model.config, 2)
    mean_len = sum(len(p) for p in prompts) / n + args.new_tokens / 2
    kv_step = lambda batch: batch * mean_len * kv_bytes_per_token(shape)  # noqa: E731
    total_new = n * args.new_tokens
    engines = {}

    def record(label, tokens, seconds, peak, batch, weights):
        row = {"tokens_per_s": round(total_new / seconds, 1), "seconds": round(seconds, 1), "peak_gpu_mb": peak,
               "batch": batch, "weights_gb": round(weights / 1e9, 2)}
        row["bandwidth_bound_tokens_per_s"] = round(bound(batch, weights, kv_step(batch), bandwidth), 1)
        row["share_of_bound"] = round(row["tokens_per_s"] / row["bandwidth_bound_tokens_per_s"], 3)
        if "hf" in engines and label != "hf":
            row["agreement_with_nf4"] = agreement(reference, tokens)
            row["speed_vs_nf4"] = round(row["tokens_per_s"] / engines["hf"]["tokens_per_s"], 2)
        engines[label] = row
        print(json.dumps({label: row}), flush=True)  # partial results survive a time limit

    nf4_weights = weight_bytes(model)
    reference, seconds, peak = timed(partial(run_generate, model, prompts, args.batch, args.new_tokens, device), device)
    record("hf", reference, seconds, peak, args.batch, nf4_weights)
    del model
    start = time.perf_counter()
    result["dequantized_layers"] = dequantize_in_place(fresh, "bfloat16")
    _sync(device)
    result["dequantize_s"] = round(time.perf_counter() - start, 2)
    bf16_weights = weight_bytes(fresh)
    if device == "cuda":
        torch.cuda.empty_cache()
    def attempt(label, run, batch):
        if args.deadline_s and time.perf_counter() - began > args.deadline_s:
            engines[label] = {"skipped": f"past --deadline-s {args.deadline_s}"}
            print(json.dumps({label: engines[label]}), flush=True)
            return
        try:
            tokens, seconds, peak = timed(run, device)
            record(label, tokens, seconds, peak, batch, bf16_weights)
        except Exception as exc:  # noqa: BLE001 - an engine that fails (out of memory, say) is a result too
            engines[label] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
            print(json.dumps({label: engines[label]}), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()

    if "dequantized" not in skip:
        attempt("dequantized", lambda: run_generate(fresh, prompts, args.batch, args.new_tokens, device), args.batch)
    if "planned" not in skip and device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        planned = result["planned_batch"] = plan_batch_size(free, sequence_bytes(shape, args.max_prompt,
                                                                                 args.new_tokens))
        attempt("dequantized_planned", lambda: run_generate(fresh, prompts, planned, args.new_tokens, device), planned)
    if "continuous" not in skip:
        attempt("continuous", lambda: run_continuous(fresh, prompts, args.new_tokens, device), args.batch)
    if "static" not in skip and device == "cuda" and not (args.deadline_s and time.perf_counter() - began > args.deadline_s):
        # Static KV cache + torch.compile (transformers compiles the forward for a static cache): on one batch of the
        # longest prompts, against the eager dequantized loop on the same batch. First call = compile + run.
        subset = sorted(prompts, key=len, reverse=True)[:args.batch]
        static = partial(run_generate, fresh, subset, args.batch, args.new_tokens, device, cache_implementation="static")
        eager = partial(run_generate, fresh, subset, args.batch, args.new_tokens, device)
        try:
            _, first, _ = timed(static, device)
            tokens, warm, peak = timed(static, device)
            base_tokens, eager_s, _ = timed(eager, device)
            n_sub = len(subset) * args.new_tokens
            engines["static_compiled_one_batch"] = {
                "prompts": len(subset), "first_call_s": round(first, 1), "warm_s": round(warm, 1),
                "tokens_per_s": round(n_sub / warm, 1), "eager_tokens_per_s": round(n_sub / eager_s, 1),
                "speed_vs_eager_dequantized": round(eager_s / warm, 2), "peak_gpu_mb": peak,
                "agreement_with_eager": agreement(base_tokens, tokens)}
        except Exception as exc:  # noqa: BLE001
            engines["static_compiled_one_batch"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        print(json.dumps({"static_compiled_one_batch": engines["static_compiled_one_batch"]}), flush=True)
    result["engines"] = engines
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
