"""`dpo-eval export --dequantized` on stories260k: the folder loads with plain transformers (no quantization
config, no dpo-eval code) and its logits equal the in-process dequantized engine's."""

from __future__ import annotations

import json

import pytest

from dpo_eval.config import ModelSpec


def test_exported_folder_loads_plainly_and_matches_the_dequantized_engine(stories260k, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_eval.cli.main import main
    from dpo_eval.generation.export import EXPORT_RECORD
    from dpo_eval.generation.models import load_model

    out = tmp_path / "exported"
    with pytest.raises(SystemExit) as done:
        main(["export", "--base", str(stories260k), "--compute-dtype", "float32", "--dequantized", str(out)])
    assert done.value.code in (0, None)
    printed = json.loads(capsys.readouterr().out)
    assert printed["exported"] == str(out) and printed["quantization"]["quant_type"] == "nf4"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert json.loads((out / EXPORT_RECORD).read_text())["dtype"] == "float32"

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    engine = load_model(ModelSpec(base=str(stories260k), quantization="4bit", compute_dtype="float32"),
                        engine="dequantized").model
    original = AutoModelForCausalLM.from_pretrained(stories260k, dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)("Once upon a time, there was a little dog")["input_ids"]])
    with torch.inference_mode():
        exported, inprocess, full = (m(input_ids=ids).logits for m in (plain, engine, original))
    print(f"exported vs in-process: max |logit diff| {float((exported - inprocess).abs().max()):.3g}; vs the "
          f"unquantized model {float((exported - full).abs().max()):.3g}")
    # the same float32 weights and the same kernels: equal to float rounding (stated tolerance 1e-5)
    assert (exported - inprocess).abs().max() <= 1e-5
    assert (exported - full).abs().max() > 1e-3  # and not the unquantized model's: nf4 rounded the weights


def test_export_refuses_a_folder_in_use(stories260k, tmp_path):
    from dpo_eval.errors import DpoEvalError
    from dpo_eval.generation.export import export_dequantized

    (tmp_path / "x").write_text("keep me")
    with pytest.raises(DpoEvalError, match="not an empty folder"):
        export_dequantized(ModelSpec(base=str(stories260k)), tmp_path)
    with pytest.raises(DpoEvalError, match="--quantization 4bit"):
        export_dequantized(ModelSpec(base=str(stories260k), quantization="none"), tmp_path / "new")
    assert (tmp_path / "x").read_text() == "keep me" and not (tmp_path / "new").exists()
