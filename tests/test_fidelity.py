"""The fidelity harness on stories260k: the real nf4 path (bitsandbytes 4-bit layers) against the same weights
dequantized, over the dequantized model's own greedy answers; figures checked against a direct torch computation
of each sequence alone (no batching, no padding)."""

from __future__ import annotations

import math

import pytest

from dpo_eval.config import ModelSpec
from dpo_eval.generation.fidelity import compare_teacher_forced

STARTS = ["Once upon a time, there was a little", "The dog ran to the park and", "Lily and Ben",
          "One day, a big red ball"]


@pytest.fixture(scope="module")
def setup(stories260k):
    import torch

    from dpo_eval.generation.models import load_model

    spec = ModelSpec(base=str(stories260k), quantization="4bit", compute_dtype="float32")
    nf4 = load_model(spec, engine="hf")
    fast = load_model(spec, engine="dequantized")
    tok = fast.tokenizer
    prompts = [tok(s)["input_ids"] for s in STARTS]
    answers = []
    with torch.inference_mode():
        for p in prompts:
            out = fast.model.generate(input_ids=torch.tensor([p]), max_new_tokens=24, min_new_tokens=24,
                                      do_sample=False, pad_token_id=tok.pad_token_id)
            answers.append(out[0, len(p):].tolist())
    return nf4.model, fast.model, prompts, answers, tok.pad_token_id


def _direct(model, prompt, answer):
    """log p of each answer token and the argmax at its position, from one unpadded forward pass."""
    import torch

    ids = torch.tensor([prompt + answer])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0].float()
    at = logits[len(prompt) - 1:len(ids[0]) - 1]
    return torch.log_softmax(at, -1).gather(-1, ids[0, len(prompt):, None])[:, 0], at.argmax(-1)


def test_teacher_forced_figures_against_a_direct_computation(setup):
    import torch

    nf4, fast, prompts, answers, pad = setup
    figures = compare_teacher_forced(nf4, fast, prompts, answers, pad, batch_size=3)
    print(figures)
    agree, total, diffs, picked = 0, 0, [], 0
    for p, a in zip(prompts, answers):
        (ref_lp, ref_arg), (fast_lp, fast_arg) = _direct(nf4, p, a), _direct(fast, p, a)
        agree += int((ref_arg == fast_arg).sum())
        picked += int((ref_arg == torch.tensor(a)).sum())
        total += len(a)
        diffs.append((ref_lp - fast_lp).abs())
        assert torch.equal(fast_arg, torch.tensor(a))  # greedy answers: the fast model's own argmaxes
    diffs = torch.cat(diffs)
    assert figures["sequences"] == 4 and figures["positions"] == total == 96
    assert figures["argmax_agreement"] == agree / total
    assert figures["answer_is_reference_argmax"] == picked / total
    assert figures["answer_is_fast_argmax"] == 1.0  # the answers are the fast model's greedy tokens
    assert all(math.isfinite(figures[k]) for k in ("max_abs_logprob_diff", "mean_abs_logprob_diff"))
    assert figures["max_abs_logprob_diff"] == pytest.approx(float(diffs.max()), abs=1e-4)
    assert figures["mean_abs_logprob_diff"] == pytest.approx(float(diffs.mean()), abs=1e-5)
    assert 0 < figures["mean_abs_logprob_diff"] < figures["max_abs_logprob_diff"]  # CPU 4-bit kernel: not equal


def test_a_model_against_itself_and_empty_answers(setup):
    _, fast, prompts, answers, pad = setup
    same = compare_teacher_forced(fast, fast, prompts[:2], [answers[0], []], pad, batch_size=1, fast_batch_size=2)
    assert same["sequences"] == 1 and same["positions"] == 24
    assert same["max_abs_logprob_diff"] == 0.0 and same["argmax_agreement"] == 1.0
    assert same["answer_is_reference_argmax"] == 1.0 and same["answer_is_fast_argmax"] == 1.0
    wrong = compare_teacher_forced(fast, fast, prompts[:1], [[(t + 1) % 512 for t in answers[0]]], pad)
    assert wrong["answer_is_fast_argmax"] == wrong["answer_is_reference_argmax"] == 0.0  # not greedy tokens
    assert compare_teacher_forced(fast, fast, prompts[:1], [[]], pad)["argmax_agreement"] is None
