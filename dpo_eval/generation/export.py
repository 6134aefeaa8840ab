"""Export the base's nf4 weights dequantized to the compute dtype, as a Hugging Face model folder (issue 25).

An inference server (vLLM, SGLang, TGI, `transformers serve`) loading this folder computes with the weights a
QLoRA adapter was trained against: bitsandbytes computes a 4-bit layer by dequantizing its weight to the compute
dtype, and these are those weights, dequantized once (what the `dequantized` engine holds in memory). The
original model's own bf16 weights are not: nf4 rounded them. The folder holds the model (safetensors, no
quantization config), the base's tokenizer files as published (not dpo-eval's pad and padding-side repairs)
and `dpo_eval_export.json`: where the weights came from (base, resolved revision, the base's identity key),
the quantization they went through and the dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpo_eval.config import ModelSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.generation.models import check_paths, load_base, quantization_config
from dpo_eval.identity import model_identity

EXPORT_RECORD = "dpo_eval_export.json"


def export_dequantized(spec: ModelSpec, out: Path) -> dict:
    """Write `spec.base` loaded in nf4 and dequantized to `spec.compute_dtype` into the new folder `out`;
    returns the record also written there as EXPORT_RECORD."""
    from transformers import AutoTokenizer

    if spec.quantization != "4bit":
        raise DpoEvalError(f"--dequantized exports nf4 weights dequantized; --quantization {spec.quantization} has "
                           "none: use --quantization 4bit (the weights a QLoRA adapter is trained against)")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DpoEvalError(f"--dequantized {out}: exists and is not an empty folder; give a new folder")
    check_paths(spec)
    identity = model_identity(spec)
    pinned = spec.model_copy(update={"revision": identity.commit("base") or spec.revision})
    repairs: list[str] = []
    model = load_base(pinned, repairs, engine="dequantized")
    if getattr(model, "hf_quantizer", None) is not None or getattr(model.config, "quantization_config", None):
        raise RuntimeError("dequantizing left a quantization config on the model; refusing to export it")
    tokenizer = AutoTokenizer.from_pretrained(pinned.base, revision=pinned.revision)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    quant = quantization_config(spec)
    record = {"base": spec.base, "revision": pinned.revision, "base_key": identity.base_key,
              "dtype": spec.compute_dtype,
              "quantization": {"quant_type": quant.bnb_4bit_quant_type, "double_quant": quant.bnb_4bit_use_double_quant,
                               "library": "bitsandbytes"},
              "parameters": sum(p.numel() for p in model.parameters()), "repairs": repairs}
    (out / EXPORT_RECORD).write_text(json.dumps(record, indent=2))
    return record
