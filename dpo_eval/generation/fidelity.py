"""Fidelity of a fast engine to the nf4 path, by teacher-forced log-probabilities (design.md, issue 25).

Identical greedy answers are the wrong test across kernels: a random-weight model has near-tied logits, and
another reduction order (another batch shape, a compiled kernel) flips an argmax after a few tokens, after
which the answers share nothing. Instead, both models read the same token sequences (the fast engine's own
greedy answers after their prompts) and are compared position by position over the answer tokens:

- `max_abs_logprob_diff`, `mean_abs_logprob_diff`: |log p_ref(y_t | y_<t) - log p_fast(y_t | y_<t)| over answer
  positions t, in nats (log-softmax in float32 of each model's logits);
- `argmax_agreement`: the share of those positions where both models' most likely next token is the same;
- `answer_is_reference_argmax`: the share of answer tokens that the reference model would also have picked
  greedily after the same prefix (for greedy answers of the fast engine: how often its decode agreed with
  the reference given the same history);
- `answer_is_fast_argmax`: the same share for the fast model's own teacher-forced forward pass: below 1 where
  the engine's decode path (a static cache, a compiled graph, another batch shape) picked a token that its
  weights, read plainly, would not have.
"""

from __future__ import annotations

import numpy as np

from dpo_eval.generation.padding import right_padded


def teacher_forced(model, prompts: list[list[int]], answers: list[list[int]], pad: int = 0,
                   batch_size: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per sequence prompt + answer: (log p(answer token t | everything before it), the argmax token at each of
    those positions), float32 and int64 arrays as long as the answer. Right-padded batches of `batch_size`."""
    import torch

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        rows = [(p + a, len(p)) for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
        input_ids, mask, _ = right_padded(rows, pad)
        input_ids, mask = input_ids.to(device), mask.to(device)
        with torch.inference_mode():
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            for row, (ids, n_prompt) in enumerate(rows):
                # logits at position t predict token t + 1: the answer's tokens n_prompt..len-1
                part = logits[row, n_prompt - 1:len(ids) - 1].float()
                logp = torch.log_softmax(part, dim=-1)
                target = input_ids[row, n_prompt:len(ids)]
                out.append((logp.gather(-1, target[:, None])[:, 0].cpu().numpy(),
                            part.argmax(dim=-1).cpu().numpy()))
        del logits
    return out


def compare_teacher_forced(reference, fast, prompts: list[list[int]], answers: list[list[int]], pad: int = 0,
                           batch_size: int = 4, fast_batch_size: int | None = None) -> dict:
    """The module docstring's figures of `fast` against `reference` (both models; the same model with another
    `fast_batch_size` compares batch shapes) over `answers` after `prompts`; sequences with an empty answer are
    left out (`sequences` counts those compared, `positions` their tokens)."""
    keep = [i for i, a in enumerate(answers) if a]
    prompts, answers = [prompts[i] for i in keep], [answers[i] for i in keep]
    ref = teacher_forced(reference, prompts, answers, pad, batch_size)
    got = teacher_forced(fast, prompts, answers, pad, fast_batch_size or batch_size)
    if not answers:
        return {"sequences": 0, "positions": 0, "max_abs_logprob_diff": None, "mean_abs_logprob_diff": None,
                "argmax_agreement": None, "answer_is_reference_argmax": None, "answer_is_fast_argmax": None}
    diff = np.concatenate([np.abs(r[0] - g[0]) for r, g in zip(ref, got)])
    same_argmax = np.concatenate([r[1] == g[1] for r, g in zip(ref, got)])
    picked = np.concatenate([r[1] == np.asarray(a) for r, a in zip(ref, answers)])
    own = np.concatenate([g[1] == np.asarray(a) for g, a in zip(got, answers)])
    return {"sequences": len(answers), "positions": int(diff.size),
            "max_abs_logprob_diff": float(diff.max()), "mean_abs_logprob_diff": float(diff.mean()),
            "argmax_agreement": float(same_argmax.mean()), "answer_is_reference_argmax": float(picked.mean()),
            "answer_is_fast_argmax": float(own.mean())}
