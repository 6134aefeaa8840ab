"""Options whose defaults and help come from the pydantic specs (dpo_eval.config): one source of truth.

`spec_option(Spec, field, flag)` gives the spec's default and description; `override_option` gives a
None default (the option overrides --config or the spec) and states the spec's default in the help.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError

from dpo_eval.config import DatasetSpec, ModelSpec
from dpo_eval.errors import DpoEvalError


def field_default(spec: type[BaseModel], name: str) -> Any:
    """The default of `spec.name` (default factories called)."""
    return spec.model_fields[name].get_default(call_default_factory=True)


def field_help(spec: type[BaseModel], name: str) -> str:
    """The field's description, with its choices when it is a Literal."""
    info = spec.model_fields[name]
    text = info.description or ""
    if get_origin(info.annotation) is Literal:
        text += " One of: " + "|".join(str(choice) for choice in get_args(info.annotation)) + "."
    return text


def spec_option(spec: type[BaseModel], name: str, *flags: str, required: bool = False) -> Any:
    """A typer option with the spec field's default and description."""
    return typer.Option(... if required else field_default(spec, name), *flags, help=field_help(spec, name))


def override_option(spec: type[BaseModel], name: str, *flags: str) -> Any:
    """A typer option that is None unless given, so --config (or else the spec) decides."""
    default = field_default(spec, name)
    suffix = f" Default: {default}." if default is not None else ""
    return typer.Option(None, *flags, help=field_help(spec, name) + suffix, show_default=False)


def validation_message(exc: ValidationError, flags: dict[str, str], given: Optional[set[str]] = None,
                       config: Optional[Any] = None) -> str:
    """One line from a pydantic error, each problem named by its option (`flags`: dotted field -> flag)
    when the user gave that option (`given`; None: all), else by its field in the --config file."""
    by_flag, by_field = [], []
    for error in exc.errors():
        dotted = ".".join(str(p) for p in error["loc"])
        flag = flags.get(dotted)
        if error["type"] == "missing" and flag:
            field = max((k for k, f in flags.items() if f == flag), key=len)  # model -> model.base
            by_flag.append(f"{flag} is required" + (f" (or {field} in --config)" if config is not None else ""))
        elif error["type"] == "missing":
            by_field.append(f"{dotted} is required")
        elif flag and (given is None or dotted in given):
            by_flag.append(f"{flag}: {error['msg']}")
        else:
            by_field.append(f"{dotted}: {error['msg']}")
    if by_field and config is not None:
        by_field = [f"--config {config}: " + "; ".join(by_field)]
    return "; ".join(by_flag + by_field)


def build(spec: type[BaseModel], flags: dict[str, str], **values: Any) -> Any:
    """`spec(**values)`; a validation error becomes a DpoEvalError naming the options."""
    try:
        return spec(**values)
    except ValidationError as exc:
        raise DpoEvalError(validation_message(exc, flags)) from exc


DatasetOpt = typer.Option(..., "--dataset", help=field_help(DatasetSpec, "source"))
FormatOpt = spec_option(DatasetSpec, "format", "--format")
ColumnsOpt = typer.Option(None, "--columns", help="Explicit column mapping, e.g. prompt=instruction,chosen=good,"
                          "rejected=bad[,system=sys] (prompt, chosen, rejected required).")
SeedOpt = spec_option(DatasetSpec, "seed", "--seed")
ValidOpt = spec_option(DatasetSpec, "valid_fraction", "--valid-fraction")
LimitOpt = spec_option(DatasetSpec, "limit", "--limit")
CategoryOpt = spec_option(DatasetSpec, "category_field", "--category-field")
BaseOpt = typer.Option(..., "--base", help=field_help(ModelSpec, "base"))
AdapterOpt = spec_option(ModelSpec, "adapter", "--adapter")
ReferenceAdapterOpt = spec_option(ModelSpec, "reference_adapter", "--reference-adapter")
QuantOpt = spec_option(ModelSpec, "quantization", "--quantization")
DtypeOpt = spec_option(ModelSpec, "compute_dtype", "--compute-dtype")
TemplateOpt = spec_option(ModelSpec, "prompt_template", "--prompt-template")


def dataset_spec(dataset: str, fmt: str = field_default(DatasetSpec, "format"), columns: Optional[str] = None,
                 **rest: Any) -> DatasetSpec:
    """A DatasetSpec from CLI options (the rest at the spec's defaults); bad values name the option."""
    from dpo_eval.config import parse_columns

    try:
        mapping = parse_columns(columns)
    except ValueError as exc:
        raise DpoEvalError(str(exc)) from exc
    return build(DatasetSpec, {"source": "--dataset", "format": "--format", "columns": "--columns",
                               "seed": "--seed", "valid_fraction": "--valid-fraction", "limit": "--limit",
                               "category_field": "--category-field"},
                 source=dataset, format=fmt, columns=mapping, **{k: v for k, v in rest.items() if v is not None})


def model_spec(**values: Any) -> ModelSpec:
    """A ModelSpec from CLI options, its prompt template checked; bad values name the option."""
    flags = {name: "--" + name.replace("_", "-") for name in ModelSpec.model_fields}
    spec = build(ModelSpec, flags, **values)
    if spec.prompt_template is not None:
        from dpo_eval.generation.prompts import compile_prompt_template

        compile_prompt_template(spec.prompt_template)
    return spec
