"""`dpo-eval export`: a model folder an inference server loads (dpo_eval.generation.export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from dpo_eval.cli.options import BaseOpt, DtypeOpt, model_spec, spec_option
from dpo_eval.config import ModelSpec


def export(
    base: str = BaseOpt,
    revision: Optional[str] = spec_option(ModelSpec, "revision", "--revision"),
    compute_dtype: str = DtypeOpt,
    dequantized: Path = typer.Option(..., "--dequantized", help="New folder for the base's nf4 weights dequantized "
                                     "to the compute dtype: what the adapter was trained against, for a server."),
) -> None:
    """Write the base's nf4 weights dequantized as a Hugging Face folder, for vLLM, SGLang, TGI or transformers
    serve to compute with the weights a QLoRA adapter was trained against."""
    from dpo_eval.generation.export import export_dequantized

    spec = model_spec(base=base, revision=revision, quantization="4bit", compute_dtype=compute_dtype)
    record = export_dequantized(spec, dequantized)
    print(json.dumps({"exported": str(dequantized)} | record, indent=2))
