"""Batched generation: prompts sorted by length, left-padded, results back in input order.

One answer per distinct prompt (data.pairs.prompt_id: system and turns): the pairs of a prompt (hh-rlhf has 2,
UltraFeedback-style sets 4) share its answer, generated once for the prompt's representative, the pair with the
smallest pair_id, and seeded from that pair_id; the answers table still has one row per pair. A table whose
prompts are all distinct is generated exactly as before this rule (each pair its own representative), so its
cached answers keep their meaning and CODE_VERSION is unchanged; a shard that repeats a prompt is keyed apart
(SHARED_ANSWERS in the generation cache key, tasks/evaluation.py), never served answers cached per pair.
"""

from __future__ import annotations

import hashlib

import polars as pl

from dpo_eval.config import GenerationSpec
from dpo_eval.data.pairs import prompt_representatives, prompt_turns
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.batch_plan import halved, resolve_batch_size
from dpo_eval.generation.decoding import (  # noqa: F401  (per_prompt_sampler, check_batch_budget: importers)
    _eos_ids,
    _finished,
    check_batch_budget,
    per_prompt_sampler,
    sampling_kwargs,
)
from dpo_eval.generation.engines import generate_continuous
from dpo_eval.generation.padding import left_padded
from dpo_eval.generation.prompts import EncodedPrompt, PromptFormatter

CODE_VERSION = "generate-v1"  # bump with a change to the code that computes these values: every value cached before then misses
SHARED_ANSWERS = "one-answer-per-prompt"  # in the cache key of a shard that repeats a prompt (module docstring)
ANSWER_SCHEMA = {"pair_id": pl.String, "model": pl.String, "answer": pl.String, "n_prompt_tokens": pl.Int64,
                 "n_new_tokens": pl.Int64, "finish_reason": pl.String, "truncated": pl.Boolean}


def encode_prompts(formatter: PromptFormatter, pairs: pl.DataFrame, max_prompt_tokens: int) -> list[EncodedPrompt]:
    """Every pair's prompt, rendered and tokenized by `formatter`, cut to `max_prompt_tokens`."""
    if max_prompt_tokens < 2:
        raise DpoEvalError(f"--max-new-tokens leaves {max_prompt_tokens} prompt tokens in the model's "
                           "context; lower it")
    encoded = [formatter.encode(formatter.render(row["system"], prompt_turns(row)), max_prompt_tokens)
               for row in pairs.iter_rows(named=True)]
    formatter.record_counts(max_prompt_tokens)
    return encoded


def generate_answers(model, tokenizer, pairs: pl.DataFrame, spec: GenerationSpec | None = None, *,
                     label: str = "tuned", prompts: list[EncodedPrompt] | None = None,
                     context_length: int | None = None, repairs: list[str] | None = None,
                     on_batch=None, halvings: int = 0) -> pl.DataFrame:
    """Answers of `model` to every prompt of `pairs`, as rows of answers.parquet labelled `label`, one row per
    pair: each distinct prompt is generated once (module docstring) and its answer given to each of its pairs;
    `prompts` (encode_prompts of `pairs`, row by row) is read at the representatives' rows only;
    `on_batch(n)` after each batch of n prompts; the batch size halved `halvings` times (OOM retries)."""
    spec = spec or GenerationSpec()
    rows, of = prompt_representatives(pairs)
    distinct = pairs[rows]
    if prompts is None:
        context = context_length or int(getattr(model.config, "max_position_embeddings", 2048))
        prompts = encode_prompts(PromptFormatter(tokenizer, repairs=repairs), distinct, context - spec.max_new_tokens)
    elif len(prompts) != pairs.height:
        raise ValueError(f"generate_answers: {len(prompts)} encoded prompts for {pairs.height} pairs")
    else:
        prompts = [prompts[i] for i in rows]
    outputs = _generate(model, tokenizer, [p.ids for p in prompts], spec,
                        [prompt_seed(spec.seed, pid) for pid in distinct["pair_id"].to_list()], on_batch, halvings)
    return pl.DataFrame({
        "pair_id": pairs["pair_id"].to_list(), "model": [label] * pairs.height,
        "answer": [outputs[k][0] for k in of], "n_prompt_tokens": [len(prompts[k].ids) for k in of],
        "n_new_tokens": [outputs[k][1] for k in of], "finish_reason": [outputs[k][2] for k in of],
        "truncated": [prompts[k].truncated for k in of],
    }, schema=ANSWER_SCHEMA)


def generate_both(loaded, pairs: pl.DataFrame, spec: GenerationSpec | None = None,
                  models: tuple[str, ...] = ("tuned", "base"), on_batch=None, halvings: int = 0) -> pl.DataFrame:
    """Tuned (adapter on) and base (adapter disabled) answers from one load, one row per pair and model, each
    distinct prompt encoded and generated once per model (module docstring); base only without adapter;
    `on_batch(n)` after each batch of n prompts (a progress bar's step)."""
    spec = spec or GenerationSpec()
    if spec.engine != loaded.engine or spec.merge != loaded.merge:
        raise ValueError(f"generation asks for engine {spec.engine} (merge {spec.merge}) but the model was "
                         f"loaded for {loaded.engine} (merge {loaded.merge}): load_model(..., engine, merge)")
    formatter = PromptFormatter(loaded.tokenizer, loaded.spec.prompt_template, loaded.repairs)
    rows, of = prompt_representatives(pairs)
    distinct = pairs[rows]
    prompts = encode_prompts(formatter, distinct, loaded.context_length - spec.max_new_tokens)
    frames = []
    for label in models:
        if label == "tuned" and not loaded.has_adapter:
            continue
        with loaded.base_context() if label == "base" else loaded.tuned_context():
            answers = generate_answers(loaded.model, loaded.tokenizer, distinct, spec, label=label,
                                       prompts=prompts, on_batch=on_batch, halvings=halvings)
        frames.append(answers[of].with_columns(pl.Series("pair_id", pairs["pair_id"].to_list(), dtype=pl.String)))
    return pl.concat(frames) if frames else pl.DataFrame(schema=ANSWER_SCHEMA)


def prompt_seed(seed: int, pair_id: str) -> int:
    """The sampling seed of one prompt: from the run's seed and its representative pair (module docstring),
    never from its batch position, so a retry with another batch size (or another shard layout) samples the
    same answer."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{pair_id}".encode()).digest()[:8], "big") >> 1


def _generate(model, tokenizer, prompts: list[list[int]], spec: GenerationSpec,
              seeds: list[int], on_batch=None, halvings: int = 0) -> list[tuple[str, int, str]]:
    """(answer, n_new_tokens, finish_reason) per prompt, in input order; `seeds[i]` seeds prompt i's sampling;
    `on_batch(n)` after each batch of n prompts (progress); the batch size halved `halvings` times."""
    import torch

    eos = _eos_ids(model, tokenizer)
    if spec.engine == "continuous":
        outputs = generate_continuous(model, tokenizer, prompts, spec.max_new_tokens, eos)
        if on_batch is not None:
            on_batch(len(prompts))
        return [_finished(tokenizer, new, eos) for new in outputs]
    if spec.engine == "static":
        from dpo_eval.generation.static_engine import generate_static

        return generate_static(model, tokenizer, prompts, spec, seeds, on_batch, halvings)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    device = next(model.parameters()).device
    batch_size = halved(resolve_batch_size(model, prompts, spec.batch_size, spec.max_new_tokens), halvings)
    results: dict[int, tuple[str, int, str]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        ids, mask = left_padded([prompts[i] for i in batch], tokenizer.pad_token_id)
        width = ids.shape[1]
        check_batch_budget(len(batch), width, spec)
        sampling = sampling_kwargs(spec, [seeds[i] for i in batch], device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=spec.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=sorted(eos) or None, **sampling)
        for row, i in enumerate(batch):
            results[i] = _finished(tokenizer, out[row, width:].tolist(), eos)
        if on_batch is not None:
            on_batch(len(batch))
    return [results[i] for i in range(len(prompts))]
