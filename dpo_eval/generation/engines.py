"""Generation engines: the weights answers are computed with, and the loop that computes them.

- `hf`: generate() on the model as loaded (bitsandbytes 4-bit layers when quantized).
- `dequantized`: the nf4 weights dequantized once to the compute dtype right after loading. These are
  exactly the effective weights a QLoRA adapter was trained against (bitsandbytes computes a 4-bit layer
  by dequantizing its weight to the compute dtype and multiplying), at 16-bit speed and memory.
- `continuous`: the same dequantized weights through transformers' continuous batching
  (`generate_batch`, paged attention), which works with a peft adapter and under `disable_adapter()`.
- `static`: the same dequantized weights, decoded with a static KV cache and bucketed prompt widths, compiled
  on CUDA (dpo_eval.generation.static_engine).

Dequantization must happen before any forward pass: bitsandbytes 0.50 on an AVX512-BF16 CPU repacks
4-bit weights for its CPU kernel at the first inference call, and dequantizing a repacked weight gives
garbage. The adapter is attached unmerged; with `merge`, it is merged into the dequantized weights for
tuned answers, and base answers get the original weights back by copy (never W + dW - dW, which rounds).
"""

from __future__ import annotations

import warnings

from dpo_eval.config import ModelSpec
from dpo_eval.errors import DpoEvalError

DEQUANTIZING = ("dequantized", "continuous", "static")


def reports_each_batch(engine: str) -> bool:
    """Whether the engine reports progress after each batch (`on_batch`); continuous batching reports once, when
    the whole shard is done, so progress-based checks (a worker's stall limit) cannot apply to it."""
    return engine != "continuous"


def check_engine(spec: ModelSpec, engine: str, merge: bool = False) -> None:
    """Fail, before loading, on an engine that does not fit the model's quantization."""
    if engine == "openai":
        raise DpoEvalError("--engine openai generates through `dpo-eval generate` only (a server you run holds the "
                           "weights, so nothing is loaded here); evaluate takes the in-process engines")
    if engine == "dequantized" and spec.quantization != "4bit":
        raise DpoEvalError(f"--engine dequantized needs --quantization 4bit (got {spec.quantization}): it "
                           "dequantizes nf4 weights; use --engine hf for this load")
    if engine in ("continuous", "static") and spec.quantization == "8bit":
        raise DpoEvalError(f"--engine {engine} does not take --quantization 8bit (LLM.int8 computes outliers "
                           "apart, so no dequantized weight equals it); use 4bit or none, or --engine hf")
    if merge and engine not in DEQUANTIZING:
        raise DpoEvalError("--merge needs --engine dequantized, continuous or static: merging into 4-bit weights "
                           "re-quantizes them")


def dequantize_in_place(model, compute_dtype: str) -> int:
    """Replace every bitsandbytes 4-bit layer of a freshly loaded `model` by a torch Linear holding its
    dequantized weight in `compute_dtype`; returns how many were replaced. Call before any forward pass.

    The weight is `bitsandbytes.functional.dequantize_4bit(...)` cast to the compute dtype: what bitsandbytes'
    own 4-bit matmul multiplies with on a GPU. A model loaded by transformers goes through its
    `dequantize()` (which also drops the quantization config); one quantized in memory (a benchmark's)
    is converted here the same way."""
    import bitsandbytes as bnb
    import torch

    dtype = getattr(torch, compute_dtype)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if layers and getattr(model, "hf_quantizer", None) is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.dequantize(dtype=dtype)
        return len(layers)
    for name, layer in layers:
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        with torch.device("meta"):
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = torch.nn.Parameter(layer.bias.data.to(dtype), requires_grad=False)
        model.set_submodule(name, linear)
    return len(layers)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


class MergeSwitch:
    """Merges the adapter into the (dequantized) base weights for tuned answers and restores the exact
    original weights for base answers. The originals are kept on the CPU (the targeted layers only)."""

    def __init__(self, model):
        self.model = model
        self.originals: dict[str, tuple] | None = None
        self.merged = False

    def merge(self) -> None:
        if self.merged:
            return
        layers = _lora_layers(self.model)
        if self.originals is None:
            self.originals = {}
            for name, layer in layers:
                base = layer.get_base_layer()
                bias = getattr(base, "bias", None)
                self.originals[name] = (base.weight.detach().to("cpu", copy=True),
                                        None if bias is None else bias.detach().to("cpu", copy=True))
        self.model.merge_adapter()
        self.merged = True

    def unmerge(self) -> None:
        import torch

        if not self.merged:
            return
        with torch.no_grad():
            for name, layer in _lora_layers(self.model):
                base = layer.get_base_layer()
                weight, bias = self.originals[name]
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
                layer.merged_adapters.clear()  # peft's own record: the layer now holds the unmerged weight
        self.merged = False


def generate_continuous(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                        eos: set[int]) -> list[list[int]]:
    """Greedy new tokens of every prompt through transformers' continuous batching, in input order."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos) or None,
                              pad_token_id=tokenizer.pad_token_id)
    device = model.get_input_embeddings().weight.device
    with torch.inference_mode():
        results = model.generate_batch(inputs=prompts, generation_config=config, max_new_tokens=max_new_tokens,
                                       continuous_batching_config=_cpu_cache(prompts, max_new_tokens, device),
                                       progress_bar=False, warmup=device.type == "cuda")
    # request ids are req_<n>, numbered in input order from the manager's counter
    ordered = sorted(results.values(), key=lambda r: int(r.request_id.rsplit("_", 1)[1]))
    failed = [r for r in ordered if r.error]
    if failed or len(ordered) != len(prompts):
        raise RuntimeError(f"continuous batching returned {len(ordered)} of {len(prompts)} answers"
                           + (f"; first error: {failed[0].error}" if failed else ""))
    return [list(r.generated_tokens) for r in ordered]


def _cpu_cache(prompts: list[list[int]], max_new_tokens: int, device):
    """On the CPU, a paged cache sized for these prompts: transformers sizes it from free accelerator
    memory otherwise, which on the CPU takes about 30 s per call. On a GPU: None (its own sizing)."""
    if device.type == "cuda":
        return None
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    page = 64
    blocks = sum(-(-(len(p) + max_new_tokens) // page) for p in prompts) + len(prompts)
    return ContinuousBatchingConfig(page_size=page, num_blocks=blocks, use_cuda_graph=False,
                                    max_batch_tokens=max(512, max(len(p) for p in prompts)))
