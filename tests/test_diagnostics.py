"""Quantization, merge and tokenizer diagnostics on stories260k with an adapter built here."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dpo_eval.config import DatasetSpec, ModelSpec
from dpo_eval.data.pairs import read_pairs
from dpo_eval.errors import DpoEvalError
from dpo_eval.studies.diagnostics import _batch, _load, _logits, compare_logits, diagnose
from tests.builders import make_adapter, tiny_mistral


@pytest.fixture(scope="module")
def pairs(orca_jsonl):
    return read_pairs(DatasetSpec(source=str(orca_jsonl), limit=6))[0]


@pytest.fixture(scope="module")
def adapter(stories260k, tmp_path_factory):
    return make_adapter(stories260k, tmp_path_factory.mktemp("diag") / "adapter", zero=False, seed=5)


def by_name(checks):
    return {c.name: c for c in checks}


def test_quantization_and_merge_checks(stories260k, adapter, pairs, tmp_path):
    (tmp_path / "report.html").write_text("<html><body><h2>Statistics</h2></body></html>")  # a run directory
    checks = by_name(diagnose(ModelSpec(base=str(stories260k), adapter=str(adapter)), pairs, tmp_path))
    quant = checks["quantization: 4-bit nf4 vs full precision"].numbers
    assert quant["kl_mean"] > 0 and quant["top1_agreement"] < 1
    full = checks["merging: merge_and_unload onto a full-precision base"]
    assert full.status == "pass" and full.numbers["max_abs_logit_diff"] <= 1e-4
    four = checks["merging: merge_and_unload onto the 4-bit base"]
    assert four.status == "fail" and four.numbers["max_abs_logit_diff"] > 1e-4
    assert "evaluate the adapter unmerged" in four.explanation
    assert checks["tokenizer: exactly one BOS per prompt"].status == "pass"
    for side in ("tuned", "base"):  # bfloat16 compute: the dequantized engine against the nf4 path
        engine = checks[f"engine: dequantized vs nf4 ({side})"].numbers
        assert engine["finite"] and engine["top1_agreement"] > quant["top1_agreement"]
        assert 0 <= engine["greedy_identical"] <= engine["prompts"] == pairs.height
    assert checks["tokenizer: EOS ends training-style answers"].status == "pass"
    saved = json.loads((tmp_path / "diagnostics.json").read_text())
    assert {c["status"] for c in saved} <= {"pass", "warn", "fail"} and len(saved) == len(checks)
    assert "merge_and_unload onto the 4-bit base" in (tmp_path / "report.html").read_text()


def test_two_full_precision_loads_have_zero_kl(stories260k, pairs):
    spec = ModelSpec(base=str(stories260k), quantization="none", compute_dtype="float32")
    a, b = _load(spec), _load(spec)
    batch = _batch(a.tokenizer, pairs, a.context_length)
    numbers = compare_logits(_logits(a.model, batch), _logits(b.model, batch), batch)
    assert numbers["kl_mean"] == 0 and numbers["top1_agreement"] == 1


def test_template_rejecting_system_role_is_reported(stories260k, pairs, tmp_path):
    from dpo_eval.generation.models import load_model
    from dpo_eval.studies.diagnostics import tokenizer_checks

    mistral = tiny_mistral(tmp_path / "tiny-mistral", stories260k)
    loaded = load_model(ModelSpec(base=str(mistral), quantization="none"))
    checks = by_name(tokenizer_checks(loaded, pairs))
    template = checks["tokenizer: pad token and chat template"]
    assert template.numbers["system_role_accepted"] is False and template.status == "warn"


def test_mismatched_adapter_is_a_clear_error(stories260k, adapter, pairs, tmp_path):
    mistral = tiny_mistral(tmp_path / "tiny-mistral", stories260k)
    with pytest.raises(DpoEvalError, match="does not fit"):
        diagnose(ModelSpec(base=str(mistral), adapter=str(adapter)), pairs)


def test_cli_diagnose(stories260k, adapter, orca_jsonl, tmp_path):
    result = subprocess.run([sys.executable, "-m", "dpo_eval", "diagnose", "--base", str(stories260k),
                             "--adapter", str(adapter), "--dataset", str(orca_jsonl), "--limit", "4",
                             "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "[fail] merging: merge_and_unload onto the 4-bit base" in result.stdout
    assert "engine: dequantized vs nf4 (tuned)" in result.stdout
    assert (tmp_path / "diagnostics.json").is_file()


def test_checks_hold_one_model_at_a_time(stories260k, adapter, pairs, monkeypatch):
    """Each load starts with no earlier model alive, so a 7B base is never held twice in full precision."""
    import gc
    import weakref

    from dpo_eval.studies import diagnostics

    live, alive_at_load = [], []
    real = diagnostics._load

    def tracked(spec, **update):
        gc.collect()
        alive_at_load.append(sum(ref() is not None for ref in live))
        loaded = real(spec, **update)
        model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
        live.append(weakref.ref(model))
        return loaded

    monkeypatch.setattr(diagnostics, "_load", tracked)
    spec = ModelSpec(base=str(stories260k), adapter=str(adapter))
    diagnostics.quantization_checks(spec, pairs)
    diagnostics.merge_checks(spec, pairs.head(2), greedy_tokens=4)
    assert len(alive_at_load) == 7 and alive_at_load == [0] * 7
