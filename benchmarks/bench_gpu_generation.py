"""4-bit nf4 generation throughput on a randomly initialised model of Mistral-7B's shape (GPU).

Builds the model from a MistralConfig (no download), swaps every linear layer of the decoder for a
bitsandbytes nf4 Linear4bit (double quantization, bf16 compute: what load_in_4bit does), then times
greedy generation of a fixed number of new tokens at several batch sizes. Also times the same model
unquantized (bf16) at the smallest and largest batch for the 4-bit vs 16-bit ratio. Prints JSON.
`--tiny` runs a toy shape on the CPU to check the script.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(tiny: bool, device: str):
    from transformers import MistralConfig, MistralForCausalLM

    if tiny:
        config = MistralConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    else:  # Mistral-7B-v0.1 / Instruct shape
        config = MistralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                               sliding_window=4096, rope_theta=10000.0)
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(config).to(torch.bfloat16)
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


def time_generation(model, batch: int, prompt_len: int, new_tokens: int, device: str, repeats: int = 2) -> dict:
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, prompt_len), device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                  eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids[:, :8], max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        seconds = float("inf")
        for _ in range(repeats):  # the best of `repeats`: first calls of a shape pay one-off set-up
            start = time.perf_counter()
            out = model.generate(ids, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = min(seconds, time.perf_counter() - start)
    generated = (out.shape[1] - prompt_len) * batch
    return {"batch": batch, "new_tokens": new_tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(generated / seconds, 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    batches = [int(b) for b in args.batches.split(",")]
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    model = build(args.tiny, device)
    bf16 = [time_generation(model, b, args.prompt_len, args.new_tokens, device) for b in (batches[0], batches[-1])]
    result["bf16"] = bf16
    start = time.perf_counter()
    result["quantized_layers"] = quantize_(model, device)
    result["quantize_s"] = round(time.perf_counter() - start, 1)
    if device == "cuda":
        torch.cuda.empty_cache()
        result["model_gpu_mb_4bit"] = round(torch.cuda.memory_allocated() / 2**20)
    result["nf4"] = [time_generation(model, b, args.prompt_len, args.new_tokens, device) for b in batches]
    for row in result["nf4"]:
        match = next((r for r in bf16 if r["batch"] == row["batch"]), None)
        if match:
            row["speed_vs_bf16"] = round(row["tokens_per_s"] / match["tokens_per_s"], 3)
    print(json.dumps(result, indent=2), flush=True)


if __name__ == "__main__":
    main()
