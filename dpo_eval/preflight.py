"""Checks of a user's inputs that cost seconds, run before anything costly starts (a Prefect run, a model load).

Each check raises DpoEvalError with one line naming the file, field or option. Nothing here loads
weights or imports torch: adapter shapes come from the safetensors header, sizes from config.json.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from dpo_eval.config import DatasetSpec, EvalConfig, ModelSpec
from dpo_eval.errors import DpoEvalError
from dpo_eval.locations import is_local_path

# Projections whose input (LoRA A's second axis) or output (LoRA B's first axis) is the hidden size,
# in the architectures peft users tune most (Llama/Mistral/Qwen, Mixtral experts, GPT-2, GPT-NeoX, OPT).
HIDDEN_IN = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3", "c_attn", "c_fc", "fc1",
             "query_key_value", "dense_h_to_4h", "lm_head"}
HIDDEN_OUT = {"o_proj", "down_proj", "w2", "c_proj", "fc2", "dense_4h_to_h", "out_proj"}


def read_json_file(path: Path, what: str) -> Any:
    """The JSON value in `path`; a DpoEvalError naming `what` and the file when it is unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DpoEvalError(f"{what} {path}: malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DpoEvalError(f"{what} {path}: cannot read ({exc})") from exc


def read_config_file(path: Path) -> dict:
    """The mapping of EvalConfig fields in a YAML file given as --config."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DpoEvalError(f"--config {path}: no such file")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DpoEvalError(f"--config {path}: malformed YAML{where}: {problem}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DpoEvalError(f"--config {path}: cannot read ({exc})") from exc
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise DpoEvalError(f"--config {path}: expected a YAML mapping of EvalConfig fields "
                           f"(dataset, model, generation, ...), got a {type(tree).__name__}")
    return tree


def check_model(spec: ModelSpec, require_adapter: bool = False) -> None:
    """Local base, adapter and reference adapter folders exist, adapter_config.json parses, and each adapter
    fits the base."""
    from dpo_eval.reference import reference_adapter, reference_option

    if require_adapter and spec.adapter is None:
        raise DpoEvalError("--adapter is required: without one, tuned and base are the same model "
                           "(give the DPO checkpoint folder or hub id)")
    base = Path(spec.base).expanduser()
    if is_local_path(spec.base) and not base.is_dir():
        raise DpoEvalError(f"--base {spec.base}: no such model folder (give a local folder or a hub id)")
    if spec.prompt_template is not None:
        from dpo_eval.generation.prompts import compile_prompt_template

        compile_prompt_template(spec.prompt_template)
    check_adapter_folder(spec.adapter, "--adapter", spec)
    check_adapter_folder(reference_adapter(spec), reference_option(spec), spec)


def check_adapter_folder(adapter: str | None, option: str, spec: ModelSpec) -> None:
    """A local adapter folder exists, holds a peft adapter config, and its shapes fit spec.base."""
    if adapter is None or not is_local_path(adapter):
        return
    base = Path(spec.base).expanduser()
    folder = Path(adapter).expanduser()
    if not folder.is_dir():
        raise DpoEvalError(f"{option} {adapter}: no such adapter folder")
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise DpoEvalError(f"{option} {adapter}: no adapter_config.json; is this a peft adapter folder?")
    config = read_json_file(config_file, option)
    if not isinstance(config, dict) or "peft_type" not in config:
        raise DpoEvalError(f"{option} {config_file}: not a peft adapter config (a JSON object with peft_type)")
    if base.is_dir() and (base / "config.json").is_file():
        problems = fit_problems(safetensors_shapes(folder / "adapter_model.safetensors", option),
                                read_json_file(base / "config.json", "--base"))
        if problems:
            trained_on = config.get("base_model_name_or_path") or "another base"
            raise DpoEvalError(f"{option} {adapter} (trained on {trained_on}) does not fit --base "
                               f"{spec.base}: " + "; ".join(problems[:3]))


def safetensors_shapes(path: Path, option: str = "--adapter") -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (8-byte little-endian length, then JSON); {} if absent."""
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise DpoEvalError(f"{option} {path}: not a readable safetensors file ({exc})") from exc
    return {name: tuple(meta["shape"]) for name, meta in header.items() if name != "__metadata__"}


def fit_problems(shapes: dict[str, tuple[int, ...]], base_config: dict) -> list[str]:
    """Where adapter tensor shapes contradict the base's hidden size or vocabulary (config.json)."""
    text = base_config.get("text_config") if isinstance(base_config.get("text_config"), dict) else base_config
    hidden = next((text[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(text.get(k), int)), None)
    vocab = text.get("vocab_size") if isinstance(text.get("vocab_size"), int) else None
    problems = []
    for key, shape in shapes.items():
        parts = key.split(".")
        module = _lora_module(parts)
        if ".lora_embedding_A" in key and vocab and len(shape) == 2 and shape[1] != vocab:
            problems.append(f"{key} covers {shape[1]} tokens, the base's vocab_size is {vocab}")
        elif ".lora_A" in key and hidden and module in HIDDEN_IN and shape[-1] != hidden:
            problems.append(f"{key} takes {shape[-1]} inputs, the base's hidden size is {hidden}")
        elif ".lora_B" in key and vocab and module == "lm_head" and shape[0] != vocab:
            problems.append(f"{key} gives {shape[0]} logits, the base's vocab_size is {vocab}")
        elif ".lora_B" in key and hidden and module in HIDDEN_OUT and shape[0] != hidden:
            problems.append(f"{key} gives {shape[0]} outputs, the base's hidden size is {hidden}")
        elif module is None and len(parts) > 1 and parts[-2] in {"embed_tokens", "wte", "lm_head"} and vocab \
                and shape and shape[0] != vocab:
            problems.append(f"{key} has {shape[0]} rows, the base's vocab_size is {vocab}")
    return problems


def _lora_module(parts: list[str]) -> str | None:
    """The name of the module a LoRA tensor belongs to (`...q_proj.lora_A.weight` -> q_proj), or None."""
    index = next((i for i, part in enumerate(parts) if part.startswith("lora_")), 0)
    return parts[index - 1] if index else None


def check_dataset(spec: DatasetSpec):
    """Read the data set as the run will (format, columns, splits): the LoadReport, or a DpoEvalError."""
    from dpo_eval.data.pairs import read_pairs

    return read_pairs(spec)[1]


def check_evaluation(config: EvalConfig) -> None:
    """Everything `evaluate` can check before it starts a Prefect run."""
    from dpo_eval.data.pairs import read_pairs
    from dpo_eval.stages import check_labels

    check_model(config.model, require_adapter=True)
    from dpo_eval.generation.engines import check_engine

    check_engine(config.model, config.generation.engine, config.generation.merge)
    if config.extra_datasets:
        from dpo_eval.data.mixing import read_sources

        pairs = read_sources((config.dataset, *config.extra_datasets))[0]
    else:
        pairs = read_pairs(config.dataset)[0]
    reference = read_pairs(config.reference_dataset)[0] if config.reference_dataset is not None else None
    check_labels(pairs, reference, config)
    check_judges(config)


def check_judges(config: EvalConfig) -> None:
    """The judges a run is configured with, checked before any model loads (not after an hour of generation): an
    API judge's URL and key variable, a local judge's or reward model's folder."""
    judge = config.judge
    if judge is not None and judge.kind == "openai":
        from dpo_eval.judges.api import api_key, normalised_url

        normalised_url(judge.base_url)  # a malformed URL is one error naming it
        api_key(judge)  # the key's variable is set (or the server is local)
    for option, name in (("judge.model (hf judge)", judge.model if judge is not None and judge.kind == "hf" else None),
                         ("reward_model", config.reward_model)):
        if name and is_local_path(name) and not Path(name).expanduser().exists():
            raise DpoEvalError(f"{option} {name}: no such folder; give the model's folder or its hub id")


def check_run_dir(run: Path) -> None:
    """`run` is a finished dpo-eval run directory: summary.json and config.json with the fields trend reads."""
    run = Path(run)
    if not run.is_dir():
        raise DpoEvalError(f"{run}: no such run directory")
    missing = [name for name in ("summary.json", "config.json") if not (run / name).is_file()]
    if missing:
        inside = sorted(p.name for p in run.iterdir() if p.is_dir() and (p / "summary.json").is_file())
        hint = f"; it holds runs {inside[:3]}: pass those folders (e.g. {run}/*)" if inside else ""
        raise DpoEvalError(f"{run}: not a dpo-eval run directory (no {' or '.join(missing)}){hint}")
    summary = read_json_file(run / "summary.json", "run")
    if not isinstance(summary, dict) or not isinstance(summary.get("significant"), dict) \
            or "tuned_vs_base" not in summary["significant"]:
        raise DpoEvalError(f"{run / 'summary.json'}: no significant.tuned_vs_base; not the summary of a "
                           "finished dpo-eval run")
    config = read_json_file(run / "config.json", "run")
    try:
        config["config"]["model"]["adapter"]
    except (KeyError, TypeError):
        raise DpoEvalError(f"{run / 'config.json'}: no config.model.adapter; not the config of a dpo-eval run") from None
