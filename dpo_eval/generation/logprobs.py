"""Sequence log-probabilities and DPO implicit rewards, tokenized exactly as trl's DPOTrainer does.

trl 1.x (non-conversational data): the answer gets the EOS text appended unless it ends with it; the
prompt and prompt+answer are tokenized with special tokens (one BOS); the answer's tokens start where
the two token lists diverge (the common prefix of prompt and prompt+chosen, prompt+rejected); the
sequence is then cut to `max_length` keeping its start. log p(answer | prompt) is the sum over the
answer tokens that survive the cut.

Implicit reward of a pair: r = beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))],
pi = adapter on, ref = the 'base' side (adapter off, or the reference adapter on: dpo_eval.reference), one load.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from dpo_eval.data.pairs import prompt_turns
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.padding import right_padded
from dpo_eval.generation.prompts import PromptFormatter, training_prompt

CODE_VERSION = "logprobs-v1"  # bump with a change to the code that computes these values: every value cached before then misses


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_pair(tokenizer, prompt: str, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen answer ids, rejected answer ids) as trl's DPOTrainer builds them."""
    eos = tokenizer.eos_token or ""
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_c = tokenizer(prompt + chosen)["input_ids"]
    full_r = tokenizer(prompt + rejected)["input_ids"]
    cut = min(common_prefix(prompt_ids, full_c), common_prefix(prompt_ids, full_r))
    return prompt_ids[:cut], full_c[cut:], full_r[cut:]


def token_logprobs(logits, input_ids, rows_per_chunk: int = 1):
    """log p(input_ids[:, t+1] | ..t) for every position, [batch, width-1], in float32.

    The full-vocabulary float32 log-softmax is taken `rows_per_chunk` sequences at a time, so a batch
    never holds a float32 copy of all its logits (for a 32k vocabulary, 8 x 2048 tokens would be 2 GB).
    """
    import torch

    out = torch.empty(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], rows_per_chunk):
        part = torch.log_softmax(logits[start:start + rows_per_chunk, :-1].float(), dim=-1)
        out[start:start + rows_per_chunk] = part.gather(-1, input_ids[start:start + rows_per_chunk, 1:, None])[..., 0]
    return out


def sequence_logprobs(model, tokenizer, prompts: list[list[int]], responses: list[list[int]],
                      max_length: int | None = None, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(sum, mean) of log p(response tokens | prompt) per pair, batched; ids as `encode_pair` gives them."""
    import torch

    sums, means = np.zeros(len(prompts)), np.zeros(len(prompts))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(prompts), batch_size):
        rows = []
        for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size]):
            ids = (p + r)[:max_length] if max_length else p + r
            rows.append((ids, len(p)))
        input_ids, mask, answer = right_padded(rows, pad)
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            logp = token_logprobs(logits, input_ids.to(device))
        del logits
        token_mask = answer[:, 1:].to(device)
        total = (logp * token_mask).sum(dim=1).cpu().numpy()
        count = token_mask.sum(dim=1).cpu().numpy()
        sums[start:start + len(rows)] = total
        means[start:start + len(rows)] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return sums, means


def implicit_rewards(loaded, pairs: pl.DataFrame, beta: float = 0.1, max_length: int | None = None,
                     batch_size: int = 8) -> pl.DataFrame:
    """Per pair: log-probs of chosen and rejected under pi (adapter on) and ref (the base side: adapter off, or
    the reference adapter on), and r."""
    if not loaded.has_adapter:
        raise DpoEvalError("implicit rewards need --adapter: pi is the adapter on, the reference the adapter off")
    tokenizer = loaded.tokenizer
    formatter = PromptFormatter(tokenizer, loaded.spec.prompt_template, loaded.repairs)
    encoded = [encode_pair(tokenizer, training_prompt(formatter, row["system"], prompt_turns(row)),
                           row["chosen"], row["rejected"]) for row in pairs.iter_rows(named=True)]
    max_length = max_length or loaded.context_length
    prompts = [e[0] for e in encoded]
    args = (max_length, batch_size)
    pi_c = sequence_logprobs(loaded.model, tokenizer, prompts, [e[1] for e in encoded], *args)[0]
    pi_r = sequence_logprobs(loaded.model, tokenizer, prompts, [e[2] for e in encoded], *args)[0]
    with loaded.base_context():
        ref_c = sequence_logprobs(loaded.model, tokenizer, prompts, [e[1] for e in encoded], *args)[0]
        ref_r = sequence_logprobs(loaded.model, tokenizer, prompts, [e[2] for e in encoded], *args)[0]
    reward_c, reward_r = beta * (pi_c - ref_c), beta * (pi_r - ref_r)
    # trl drops pairs whose prompt alone fills max_length (no answer token survives the cut): so do we
    scored = [len(p) < max_length for p in prompts]
    return pl.DataFrame({"pair_id": pairs["pair_id"], "split": pairs["split"], "scored": scored, "logp_pi_chosen": pi_c,
                         "logp_ref_chosen": ref_c, "logp_pi_rejected": pi_r, "logp_ref_rejected": ref_r,
                         "reward_chosen": reward_c, "reward_rejected": reward_r, "margin": reward_c - reward_r})


def reward_summary(rewards: pl.DataFrame) -> dict:
    """Per split: accuracy (share of margins > 0; ties count as wrong and are counted), mean and median
    margin, over the pairs with at least one answer token inside max_length (the others: `skipped`)."""
    out = {}
    for split in sorted(set(rewards["split"].to_list())):
        part = rewards.filter(pl.col("split") == split)
        margin = part.filter(pl.col("scored"))["margin"].to_numpy()
        out[split] = {"accuracy": float(np.mean(margin > 0)) if margin.size else float("nan"),
                      "margin_mean": float(np.mean(margin)) if margin.size else float("nan"),
                      "margin_median": float(np.median(margin)) if margin.size else float("nan"),
                      "ties": int(np.sum(margin == 0)), "n": int(margin.size),
                      "skipped": int(part.height - margin.size)}
    return out
