"""The static engine (static KV cache, bucketed widths) on stories260k with real nf4 weights dequantized and a real
peft adapter: the same greedy answers as the dynamic-cache dequantized engine; the padding ledger's counts."""

from __future__ import annotations

import dataclasses

import pytest

from dpo_eval.config import DatasetSpec, GenerationSpec, ModelSpec
from dpo_eval.data.pairs import read_pairs
from dpo_eval.generation.padding import left_padded
from dpo_eval.generation.static_engine import PaddingLedger, bucketed_width
from tests.builders import make_adapter


def test_bucketed_width_and_padding_ledger_counts():
    assert [bucketed_width(n, 64) for n in (1, 64, 65, 128, 129)] == [64, 64, 128, 128, 192]
    assert bucketed_width(70, 64, cap=100) == 100 and bucketed_width(120, 64, cap=100) == 120
    ledger = PaddingLedger()
    ledger.add([10, 70, 64], 128)
    ledger.add([5], 64)
    # padding: (118 + 58 + 64) + 59; bucketing: 3 x (128 - 70) + (64 - 5); real: 144 + 5
    assert ledger.summary() == {"padding_tokens": 299, "bucketing_tokens": 233, "real_prompt_tokens": 149,
                                "padding_share": round(299 / 149, 4), "bucketing_share": round(233 / 149, 4),
                                "batches": 2, "widths": [64, 128]}
    ids, mask = left_padded([[7, 8], [9]], 0, 4)
    assert ids.tolist() == [[0, 0, 7, 8], [0, 0, 0, 9]] and mask.tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]


QUESTIONS = ["Once upon a time, there was a little", "The dog ran to the park and", "Lily and Ben",
             "One day, a big red ball " + "rolled down the hill and the children ran after it, " * 4 + "and then",
             "Tom had a toy car", "The sun was hot, so"]


def test_static_cache_gives_the_dynamic_greedy_answers(stories260k, tmp_path):
    """Two batches of 4 and 2 (one prompt over 64 tokens: widths 128 and 64), tuned and base."""
    import json

    from dpo_eval.generation.generate import generate_both
    from dpo_eval.generation.models import load_model

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"system": "", "question": q, "chosen": "Yes.", "rejected": "No."}) + "\n"
                            for q in QUESTIONS))
    pairs = read_pairs(DatasetSpec(source=str(data)))[0]
    adapter = make_adapter(stories260k, tmp_path / "adapter", zero=False, seed=7, b_std=0.05,
                           targets=("q_proj", "v_proj", "down_proj"))
    spec = ModelSpec(base=str(stories260k), adapter=str(adapter), quantization="4bit", compute_dtype="float32")
    import torch

    loaded = load_model(spec, engine="static")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-wide model gains nothing from threads; on a busy 2-core machine they cost 3x
    try:
        static = generate_both(loaded, pairs, GenerationSpec(max_new_tokens=24, batch_size=4, engine="static"))
        dynamic = generate_both(dataclasses.replace(loaded, engine="dequantized"), pairs,
                                GenerationSpec(max_new_tokens=24, batch_size=4, engine="dequantized"))
    finally:
        torch.set_num_threads(threads)
    # the static cache was built (transformers records its length on the model it generated with)
    assert getattr(loaded.model.get_base_model(), "_previous_max_cache_length", 0) >= 64 + 24
    assert static["answer"].to_list() == dynamic["answer"].to_list()
    assert static["n_new_tokens"].to_list() == dynamic["n_new_tokens"].to_list()
    assert len(set(static["answer"].to_list())) > 4  # answers differ between prompts and between tuned and base


def test_static_engine_refuses_8bit(stories260k):
    from dpo_eval.errors import DpoEvalError
    from dpo_eval.generation.engines import check_engine

    with pytest.raises(DpoEvalError, match="--engine static does not take --quantization 8bit"):
        check_engine(ModelSpec(base=str(stories260k), quantization="8bit"), "static")
