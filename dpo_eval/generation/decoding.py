"""What the in-process engines (generate._generate, static_engine.generate_static) share per batch: the sampling
arguments with a seeded generator per prompt, the batch-token budget, the EOS ids and reading a prompt's new tokens."""

from __future__ import annotations

from dpo_eval.config import GenerationSpec


def per_prompt_sampler(seeds: list[int], device):
    """A logits processor that draws each row's next token from that row's own seeded generator.

    It runs after generate()'s temperature / top-k / top-p warpers and leaves only the drawn token
    possible, so generate()'s own (batch-wide) draw can only pick it.
    """
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class PerPromptSampler(LogitsProcessor):
        def __init__(self):
            self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

        def __call__(self, input_ids, scores):
            probs = torch.softmax(scores.float(), dim=-1)
            drawn = torch.stack([torch.multinomial(probs[row], 1, generator=g)
                                 for row, g in enumerate(self.generators)])
            return torch.full_like(scores, float("-inf")).scatter(1, drawn, 0.0)

    return LogitsProcessorList([PerPromptSampler()])


def check_batch_budget(n_prompts: int, width: int, spec: GenerationSpec) -> None:
    """Raise torch's out-of-memory error, before generating, for a batch over `spec.max_batch_tokens`."""
    import torch

    tokens = n_prompts * (width + spec.max_new_tokens)
    if spec.max_batch_tokens is not None and tokens > spec.max_batch_tokens:
        raise torch.OutOfMemoryError(f"out of memory: a batch of {n_prompts} prompts x {width + spec.max_new_tokens} "
                                     f"tokens = {tokens} exceeds max_batch_tokens={spec.max_batch_tokens}")


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def _finished(tokenizer, new: list[int], eos: set[int]) -> tuple[str, int, str]:
    """(answer, n_new_tokens, finish_reason) of one prompt's new tokens, cut at the first EOS."""
    stop = next((k for k, t in enumerate(new) if t in eos), None)
    tokens = new if stop is None else new[:stop]
    return (tokenizer.decode(tokens, skip_special_tokens=True), len(tokens) + (0 if stop is None else 1),
            "length" if stop is None else "eos")


def sampling_kwargs(spec: GenerationSpec, seeds: list[int], device) -> dict:
    """generate()'s sampling arguments for one batch: greedy, or sampling with each prompt's own seeded draw."""
    if not spec.do_sample:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": spec.temperature, "top_p": spec.top_p,
            "logits_processor": per_prompt_sampler(seeds, device)}
