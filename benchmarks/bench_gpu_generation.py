"""GPU generation near the memory-bandwidth bound (issue 25): the nf4 path, the dequantized engine and the static
engine (static KV cache, bucketed widths, compiled forward) at batches 64, 128 and 256, with fidelity figures.

Builds a seeded random model of Mistral-7B's shape in bf16 on the GPU (no download), swaps every decoder linear
layer for a bitsandbytes nf4 Linear4bit (double quantization, bf16 compute: what load_in_4bit does) and
dequantizes an untouched copy before any forward pass (dpo_eval.generation.engines.dequantize_in_place).
Prompts: a seeded pool of 512, lengths uniform in 64..1,024 tokens; a batch of B is the B prompts around the
median of the pool sorted by length (the typical batch of a large length-sorted run). 256 new tokens, greedy,
no EOS (every answer runs to the end).

Per (engine, batch), one timed generate() call of that batch (the static engine: a first call that compiles,
then the timed one): tokens/s (new tokens / wall, prefill included), peak GPU memory, the padding share
(pad tokens / real prompt tokens), and the share of the bandwidth bound: tokens/s if a decode step only read
the weights held in memory (the engine's own: nf4 packed or bf16) and the batch's KV cache at its mean real
length, at --bandwidth-tbs. Fidelity (dpo_eval.generation.fidelity): the fast engine's greedy answers to
--fidelity-seqs prompts, teacher-forced under the nf4 model and the dequantized weights; and the dequantized
engine at batch 128 against itself at 64 (greedy agreement on the shared prompts, teacher-forced log-probs of
the same sequences in a batch and alone). Implicit rewards: the forward passes of sequence_logprobs over
--reward-seqs generated sequences at --reward-batches (sequences/s; a pair is four). --profile: torch.profiler
over a short run of the fastest engine.

Writes the JSON to --out (default benchmarks/results/<--name>.json) after every step, so a run cut by its
deadline keeps what it measured; --deadline-s skips steps that would start too late. --smoke: a tiny
Mistral-shaped model on the CPU, batches 4 and 8, to check the script end to end (JSON to the temp folder):
    PYTHONPATH=. .venv/bin/python benchmarks/bench_gpu_generation.py --smoke [--engines ...,static_eager]
On the device: benchmarks/device_run.sh (one call; its header says how).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Peak memory bandwidth by card name (TB/s, datasheets): H200 4.8, H100 SXM 3.35, A100 80GB 2.0, L40S 0.864.
BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L40S": 0.864}
FAST = ("dequantized", "static", "static_eager")


def build(smoke: bool, device: str):
    from transformers import MistralConfig, MistralForCausalLM

    if smoke:
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
                    q.weight = bnb.nn.Params4bit(child.weight.data.to(device), requires_grad=False,
                                                 quant_type="nf4", compress_statistics=True)
                    setattr(parent, name, q.to(device))
                    count += 1
        if device == "cuda":
            torch.cuda.empty_cache()
    return count


def make_prompts(n: int, low: int, high: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(low, high + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (k,), generator=g).tolist() for k in lengths]


def middle_batch(pool: list[list[int]], batch: int) -> list[list[int]]:
    """The `batch` prompts around the median of `pool` sorted by length, longest first."""
    ordered = sorted(pool, key=len, reverse=True)
    start = max(0, (len(ordered) - batch) // 2)
    return ordered[start:start + batch]


def run_batch(model, prompts, new_tokens: int, device: str, engine: str, compile_cpu: bool = False):
    """Greedy answers (new tokens) of one batch and its padded width: the static engines pad to the bucket."""
    from dpo_eval.generation.padding import left_padded
    from dpo_eval.generation.static_engine import bucketed_width, static_kwargs

    longest = max(len(p) for p in prompts)
    extra, width = {}, longest
    if engine in ("static", "static_eager"):
        width = bucketed_width(longest)
        extra = static_kwargs(False if engine == "static_eager" else (True if compile_cpu else None))
    ids, mask = left_padded(prompts, 0, width)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **extra)
    return [out[r, width:].tolist() for r in range(len(prompts))], width


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str):
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
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
    """Bytes of the parameters held in memory (nf4: the packed weights; their absmax statistics are few)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bandwidth_bound(batch: int, weights: int, kv_bytes: float, bandwidth: float) -> float:
    """Tokens/s if each decode step only read the weights and the batch's KV cache (`kv_bytes`) at `bandwidth` B/s."""
    return batch * bandwidth / (weights + kv_bytes)


def rounded(figures: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in figures.items()}


def profile_run(model, prompts, new_tokens: int, device: str, engine: str, rows: int = 25) -> dict:
    """torch.profiler over one generate() of `prompts`: the top operators by self device time (CPU time on the
    CPU) and the share of the wall the device was busy (low: launch- or host-bound; high: kernel-bound)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    run_batch(model, prompts, new_tokens, device, engine)  # warm: compiled graphs for this shape
    sync(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        run_batch(model, prompts, new_tokens, device, engine)
        sync(device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:rows]
    busy = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6 if device == "cuda" else None
    return {"engine": engine, "batch": len(prompts), "new_tokens": new_tokens, "wall_s": round(wall, 3),
            "device_busy_s": None if busy is None else round(busy, 3),
            "device_busy_share": None if busy is None else round(busy / wall, 3),
            "top_ops": [{"name": e.key[:80], "calls": e.count, "self_ms": round(getattr(e, key, 0) / 1e3, 2),
                         "cpu_total_ms": round(e.cpu_time_total / 1e3, 2)} for e in top]}


def reward_forwards(model, prompts, answers, batch: int, device: str) -> tuple[list[float], float]:
    """Sum of log p(answer | prompt) per sequence, right-padded batches of `batch`: the forward pass and float32
    log-softmax of dpo_eval.generation.logprobs.sequence_logprobs (not imported: it needs polars, which the device
    image lacks); an implicit reward is four of these per pair. Returns the sums and the seconds."""
    from dpo_eval.generation.padding import right_padded

    sums: list[float] = []
    sync(device)
    start = time.perf_counter()
    for first in range(0, len(prompts), batch):
        rows = [(p + a, len(p)) for p, a in zip(prompts[first:first + batch], answers[first:first + batch])]
        ids, mask, answer = right_padded(rows, 0)
        ids, mask, answer = ids.to(device), mask.to(device), answer.to(device)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits
            for r in range(len(rows)):  # one row's float32 log-softmax at a time, as token_logprobs does
                logp = torch.log_softmax(logits[r, :-1].float(), -1).gather(-1, ids[r, 1:, None])[:, 0]
                sums.append(float((logp * answer[r, 1:]).sum()))
        del logits
    sync(device)
    return sums, time.perf_counter() - start


def versions(device: str) -> dict:
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except ImportError:
        bnb = None
    return {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (" + platform.machine() + ")",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "bitsandbytes": bnb, "python": platform.python_version()}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny Mistral-shaped model on the CPU (batches 4, 8)")
    parser.add_argument("--engines", default="nf4,dequantized,static",
                        help="comma-separated, of nf4, dequantized, static, static_eager (static cache, not compiled)")
    parser.add_argument("--batches", default=None, help="comma-separated (default 64,128,256; smoke 4,8)")
    parser.add_argument("--nf4-batches", default=None, help="batches of the slow nf4 path (default: the smallest)")
    parser.add_argument("--pool", type=int, default=None, help="prompts in the pool (default 512; smoke 32)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256; smoke 16")
    parser.add_argument("--min-prompt", type=int, default=None, help="default 64; smoke 16")
    parser.add_argument("--max-prompt", type=int, default=None, help="default 1024; smoke 96")
    parser.add_argument("--bandwidth-tbs", type=float, default=None,
                        help="memory bandwidth of the device in TB/s (default: by GPU name, H200 4.8; CPU 0.05)")
    parser.add_argument("--fidelity-seqs", type=int, default=16, help="sequences teacher-forced per fast engine")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no step after this many seconds, nor one expected to end past it")
    parser.add_argument("--reward-seqs", type=int, default=128, help="sequences of the implicit-reward forwards")
    parser.add_argument("--reward-batches", default="8,32", help="batches of the implicit-reward forwards")
    parser.add_argument("--profile", action="store_true", help="torch.profiler summary of the fastest engine")
    parser.add_argument("--profile-tokens", type=int, default=32)
    parser.add_argument("--compile-cpu", action="store_true",
                        help="smoke: compile the static engine's forward on the CPU too (slow; checks that path)")
    parser.add_argument("--name", default=None, help="result name (default gpu_generation_<gpu> or ..._smoke_cpu)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/<name>.json; smoke: the temp folder)")
    return parser.parse_args()


def main() -> None:  # noqa: C901 - one linear script: steps in priority order, each recorded as it ends
    from dpo_eval.generation.batch_plan import kv_bytes_per_token, model_shape
    from dpo_eval.generation.engines import dequantize_in_place
    from dpo_eval.generation.fidelity import compare_teacher_forced

    args = parse_args()
    began = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    smoke = args.smoke or device == "cpu"
    batches = [int(b) for b in (args.batches or ("4,8" if smoke else "64,128,256")).split(",")]
    nf4_batches = [int(b) for b in args.nf4_batches.split(",")] if args.nf4_batches else [min(batches)]
    pool_n = args.pool or (32 if smoke else 512)
    new = args.new_tokens or (16 if smoke else 256)
    low, high = args.min_prompt or (16 if smoke else 64), args.max_prompt or (96 if smoke else 1024)
    engines = [e for e in args.engines.split(",") if e]
    info = versions(device)
    name = args.name or ("gpu_generation_smoke_cpu" if smoke else
                         "gpu_generation_" + info["gpu"].split()[-1].lower().replace("/", "_"))
    # GPU figures are committed under benchmarks/results/; a smoke run's are not figures: the temp folder
    out = args.out or (Path(tempfile.gettempdir()) if smoke else ROOT / "benchmarks" / "results") / f"{name}.json"
    bandwidth_tbs = args.bandwidth_tbs or (0.05 if device == "cpu" else
                                           next((v for k, v in BANDWIDTH_TBS.items() if k in info["gpu"]), 3.35))
    result = {"name": name, **info, "device": device, "pool": pool_n, "prompt_tokens": [low, high],
              "new_tokens": new, "bandwidth_tbs_assumed": bandwidth_tbs,
              "bound_note": "tokens/s if a decode step only read the engine's weights in memory and the batch's KV "
                            "cache at its mean real length, at the assumed bandwidth",
              "workload": "one batch of B prompts around the median of a length-sorted seeded pool; greedy; no EOS",
              "runs": [], "skipped": [], "fidelity_note": "teacher-forced over the fast engine's greedy answers: "
                                                          "reference nf4 model, fast = the dequantized weights"}

    def save():
        result["elapsed_s"] = round(time.perf_counter() - began, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    def room(expected_s: float, label: str) -> bool:
        elapsed = time.perf_counter() - began
        if args.deadline_s is not None and elapsed + expected_s > args.deadline_s:
            result["skipped"].append({"step": label, "at_s": round(elapsed, 1), "expected_s": round(expected_s)})
            print(json.dumps({"skipped": label}), flush=True)
            save()
            return False
        return True

    start = time.perf_counter()
    nf4 = build(smoke, device)
    result["quantized_layers"] = quantize_(nf4, device)
    fast = copy.deepcopy(nf4)  # its packed weights never run: dequantized before any forward pass
    result["dequantized_layers"] = dequantize_in_place(fast, "bfloat16")
    sync(device)
    result["build_s"] = round(time.perf_counter() - start, 1)
    models = {"nf4": nf4, "dequantized": fast, "static": fast, "static_eager": fast}
    weights = {"nf4": weight_bytes(nf4), "bf16": weight_bytes(fast)}
    result["weights_gb"] = {k: round(v / 1e9, 3) for k, v in weights.items()}
    pool = make_prompts(pool_n, low, high, nf4.config.vocab_size)
    kv_token = kv_bytes_per_token(model_shape(nf4.config, 2))
    for model in (nf4, fast):  # CUDA context, cuBLAS handles, the first kernels: not in any timed call
        run_batch(model, pool[:2], 2, device, "dequantized")
    save()

    # priority order: the nf4 reference, each fast engine at the smallest batch, then the larger batches
    # static_eager (the static cache without compilation) only separates the two effects: last
    steps = [("nf4", b) for b in nf4_batches if "nf4" in engines]
    by_priority = sorted(batches, key=lambda b: (b != min(batches), -b))
    steps += [(e, b) for b in by_priority for e in engines if e in ("dequantized", "static")]
    steps += [("static_eager", b) for b in by_priority if "static_eager" in engines]
    answers: dict[tuple[str, int], list[list[int]]] = {}
    speed: dict[str, float] = {}
    first_call: dict[str, float] = {}
    for engine, batch in steps:
        prompts = middle_batch(pool, batch)
        expected = batch * new / speed.get(engine, speed.get("dequantized", 300.0 if not smoke else 50.0))
        if engine in ("static",):
            expected = 2 * expected + first_call.get(engine, 0 if smoke else 150.0)
        if not room(expected, f"{engine} batch {batch}"):
            continue
        model = models[engine]
        row = {"engine": engine, "batch": batch}
        try:
            if engine == "static":  # the first call compiles this shape (CUDA graphs: captured); then timed
                _, first, _ = timed(lambda: run_batch(model, prompts, new, device, engine, args.compile_cpu), device)
                row["first_call_s"] = round(first, 1)
                first_call[engine] = first
            (tokens, width), seconds, peak = timed(
                lambda: run_batch(model, prompts, new, device, engine, args.compile_cpu), device)
        except Exception as exc:  # noqa: BLE001 - an engine that fails (out of memory, say) is a result too
            row["error"] = f"{type(exc).__name__}: {str(exc)[:800]}"
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            if device == "cuda":
                torch.cuda.empty_cache()
            save()
            continue
        answers[engine, batch] = tokens
        lengths = [len(p) for p in prompts]
        real = sum(lengths)
        mean_len = real / batch + new / 2
        held = weights["nf4" if engine == "nf4" else "bf16"]
        row |= {"prompt_tokens_mean": round(real / batch, 1), "padded_width": width,
                "padding_share": round((batch * width - real) / real, 4), "seconds": round(seconds, 2),
                "tokens_per_s": round(batch * new / seconds, 1), "peak_gpu_mb": peak}
        row["bandwidth_bound_tokens_per_s"] = round(bandwidth_bound(batch, held, batch * mean_len * kv_token,
                                                                    bandwidth_tbs * 1e12), 1)
        row["share_of_bound"] = round(row["tokens_per_s"] / row["bandwidth_bound_tokens_per_s"], 4)
        speed[engine] = row["tokens_per_s"]
        if engine != "nf4" and ("nf4", batch) in answers:
            row["greedy_agreement_with_nf4"] = agreement(answers["nf4", batch], tokens)
        if engine != "nf4" and room(10 if not smoke else 1, f"fidelity {engine} batch {batch}"):
            k = min(args.fidelity_seqs, batch)
            row["fidelity_vs_nf4"] = rounded(compare_teacher_forced(nf4, fast, prompts[:k], tokens[:k], 0,
                                                                    batch_size=min(k, 8)))
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        save()

    a, b = sorted(batches)[:2] if len(batches) > 1 else (None, None)
    if ("dequantized", a) in answers and ("dequantized", b) in answers and room(20, "batch shape check"):
        small, large = middle_batch(pool, a), middle_batch(pool, b)
        shared = [i for i, p in enumerate(large) if p in small]
        in_small = [small.index(large[i]) for i in shared]
        k = min(args.fidelity_seqs, len(shared))
        result["dequantized_batch_check"] = {
            "batches": [a, b], "shared_prompts": len(shared),
            "greedy_agreement": agreement([answers["dequantized", a][j] for j in in_small],
                                          [answers["dequantized", b][i] for i in shared]),
            "teacher_forced_alone_vs_in_a_batch": rounded(compare_teacher_forced(
                fast, fast, [large[i] for i in shared[:k]], [answers["dequantized", b][i] for i in shared[:k]], 0,
                batch_size=1, fast_batch_size=k))}
        print(json.dumps({"dequantized_batch_check": result["dequantized_batch_check"]}), flush=True)
        save()

    source = next(((e, b) for e, b in sorted(answers, key=lambda k: -k[1]) if e != "nf4"), None)
    if source and room(40 if not smoke else 2, "implicit rewards"):
        # 4 forward passes per pair (policy and reference on chosen and rejected): here the generated answers of
        # the largest batch stand in for chosen and rejected; policy = reference weights (no adapter), same cost
        prompts, tokens = middle_batch(pool, source[1]), answers[source]
        sequences = min(len(prompts), args.reward_seqs)
        rewards = {"sequences": sequences, "tokens_per_sequence_mean": round(
            sum(len(p) + len(a) for p, a in zip(prompts[:sequences], tokens[:sequences])) / sequences, 1), "by_batch": []}
        for rb in [int(b) for b in args.reward_batches.split(",")]:
            if not room(20 if not smoke else 1, f"implicit rewards batch {rb}"):
                break
            try:
                _, seconds = reward_forwards(fast, prompts[:sequences], tokens[:sequences], rb, device)
                rewards["by_batch"].append({"batch": rb, "seconds": round(seconds, 2),
                                            "sequences_per_s": round(sequences / seconds, 1),
                                            "pairs_per_s": round(sequences / seconds / 4, 1)})
            except Exception as exc:  # noqa: BLE001 - out of memory at a large batch is a result
                rewards["by_batch"].append({"batch": rb, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                if device == "cuda":
                    torch.cuda.empty_cache()
        result["implicit_rewards"] = rewards
        print(json.dumps({"implicit_rewards": rewards}), flush=True)
        save()

    if args.profile:
        done = [r for r in result["runs"] if "tokens_per_s" in r]
        if done and room(60 if not smoke else 5, "profile"):
            best = max(done, key=lambda r: r["tokens_per_s"])
            prompts = middle_batch(pool, best["batch"])
            result["profile"] = profile_run(models[best["engine"]], prompts, args.profile_tokens, device,
                                            best["engine"])
            save()
    done = [r for r in result["runs"] if "tokens_per_s" in r]
    if done:
        best = max(done, key=lambda r: r["tokens_per_s"])
        result["best"] = {k: best[k] for k in ("engine", "batch", "tokens_per_s", "share_of_bound")}
    save()
    print(json.dumps({"written": str(out), "best": result.get("best")}), flush=True)


if __name__ == "__main__":
    main()
