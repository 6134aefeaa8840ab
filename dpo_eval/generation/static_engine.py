"""The `static` engine: the dequantized weights of the `dequantized` engine, decoded with a static KV cache.

transformers' static cache (`cache_implementation="static"`) allocates the KV cache of a batch once, at
`width + max_new_tokens` positions, so a decode step has the same tensor shapes every step; on CUDA,
generate() then compiles the forward pass (transformers' default CompileConfig: inductor, mode
"reduce-overhead", i.e. CUDA graphs), so a step replays a few captured kernels instead of launching
thousands from Python. On the CPU nothing is compiled; the static cache alone runs (the tests' path).

Prompt lengths are bucketed: each batch is left-padded to its longest prompt rounded up to a multiple of
`bucket` (64), so batches of nearby widths share one cache shape and one compiled graph; transformers also
keeps a static cache at least as long as the previous one (`_previous_max_cache_length`), and batches run
longest first, so the decode shape seldom changes within a run. Bucketing costs at most `bucket - 1`
padding tokens per prompt; `PaddingLedger` counts the padding (all of it, and the part bucketing added)
against the real prompt tokens, and the run logs it.

Padding never reaches the answer: it is masked out of attention and the position ids are counted from the
attention mask, so on the CPU the static path gives the dynamic path's greedy answers (tests/test_static_engine.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from dpo_eval.generation.batch_plan import halved, resolve_batch_size
from dpo_eval.generation.padding import left_padded

BUCKET = 64
log = logging.getLogger(__name__)


def bucketed_width(longest: int, bucket: int = BUCKET, cap: int | None = None) -> int:
    """`longest` rounded up to a multiple of `bucket`, never above `cap` (the room the context leaves) nor
    below `longest`."""
    width = -(-longest // bucket) * bucket
    return max(longest, min(width, cap)) if cap is not None else width


@dataclass
class PaddingLedger:
    """Prompt tokens computed for nothing: `padding` pad tokens in all, `bucketing` of them added by rounding
    widths up to the bucket, against `real` prompt tokens; `widths` the distinct padded widths (each a static
    cache length, so a decode-graph shape, unless an earlier, longer cache is kept)."""

    padding: int = 0
    bucketing: int = 0
    real: int = 0
    batches: int = 0
    widths: set[int] = field(default_factory=set)

    def add(self, lengths: list[int], width: int) -> None:
        self.real += sum(lengths)
        self.padding += sum(width - n for n in lengths)
        self.bucketing += len(lengths) * (width - max(lengths))
        self.batches += 1
        self.widths.add(width)

    def summary(self) -> dict:
        """padding / real (`padding_share`), bucketing / real (`bucketing_share`), the counts and widths."""
        real = max(1, self.real)
        return {"padding_tokens": self.padding, "bucketing_tokens": self.bucketing, "real_prompt_tokens": self.real,
                "padding_share": round(self.padding / real, 4), "bucketing_share": round(self.bucketing / real, 4),
                "batches": self.batches, "widths": sorted(self.widths)}


def static_kwargs(compile: bool | None = None) -> dict:
    """generate() arguments of the static path: the static cache; `compile` None leaves compilation to
    transformers (on CUDA: compiled), False turns it off, True compiles on any device (transformers' default
    CompileConfig; on the CPU only to check the compiled path end to end)."""
    kwargs: dict = {"cache_implementation": "static"}
    if compile is False:
        kwargs["disable_compile"] = True
    elif compile is True:
        from transformers import CompileConfig

        config = CompileConfig()
        config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
        kwargs["compile_config"] = config
    return kwargs


def generate_static(model, tokenizer, prompts: list[list[int]], spec, seeds: list[int], on_batch=None,
                    halvings: int = 0, *, bucket: int = BUCKET, compile: bool | None = None,
                    ledger: PaddingLedger | None = None, context_length: int | None = None):
    """(answer, n_new_tokens, finish_reason) per prompt, in input order: dpo-eval's batched loop (prompts sorted
    longest first, `seeds[i]` seeding prompt i's sampling, `on_batch(n)` after each batch, the batch halved
    `halvings` times) with bucketed widths and a static KV cache; padding counted in `ledger`."""
    import torch

    from dpo_eval.generation.decoding import _eos_ids, _finished, check_batch_budget, sampling_kwargs

    eos = _eos_ids(model, tokenizer)
    ledger = ledger if ledger is not None else PaddingLedger()
    context = context_length or int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
    cap = None if context is None else context - spec.max_new_tokens
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    device = next(model.parameters()).device
    # the planner sized for the widest bucketed prompt, or the longer cache transformers keeps from an earlier
    # call: the static cache holds every row at that length
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    kept = int(getattr(inner, "_previous_max_cache_length", 0) or 0) - spec.max_new_tokens
    widest = [[0] * max(kept, bucketed_width(max(len(p) for p in prompts), bucket, cap))] if prompts else []
    batch_size = halved(resolve_batch_size(model, widest, spec.batch_size, spec.max_new_tokens), halvings)
    results: dict[int, tuple[str, int, str]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        lengths = [len(prompts[i]) for i in batch]
        width = bucketed_width(max(lengths), bucket, cap)
        ids, mask = left_padded([prompts[i] for i in batch], tokenizer.pad_token_id, width)
        check_batch_budget(len(batch), width, spec)
        ledger.add(lengths, width)
        sampling = sampling_kwargs(spec, [seeds[i] for i in batch], device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=spec.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=sorted(eos) or None, **sampling, **static_kwargs(compile))
        for row, i in enumerate(batch):
            results[i] = _finished(tokenizer, out[row, width:].tolist(), eos)
        if on_batch is not None:
            on_batch(len(batch))
    log.info("static engine padding: %s", ledger.summary())
    return [results[i] for i in range(len(prompts))]
