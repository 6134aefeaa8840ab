"""The reference of a comparison (its 'base' side): the bare base, or the base plus a reference adapter.

DPO trained on top of an SFT adapter (`dpo-eval train --sft-adapter`) learnt against base + SFT adapter,
so that is the fair 'base' for its answers and its implicit rewards. The evaluation loads the base once
with both adapters attached by name (the tuned one as peft's `default`, the reference as `reference`)
and switches between them with `set_adapter`, as trl's two-adapter DPO does with its `ref` adapter.

Which reference a spec means is decided here, for every caller (identity, loading, checks, report):
`ModelSpec.reference_adapter` when given ('none': the bare base), else the reference recorded in the
tuned adapter's training metadata, else the bare base.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from dpo_eval.config import ModelSpec

NO_REFERENCE = "none"
REFERENCE_NAME = "reference"  # the peft adapter name of the reference in an evaluation load
OPTION = "--reference-adapter"


def recorded_reference(adapter: str | None) -> str | None:
    """The reference adapter the checkpoint's training metadata records (the SFT adapter DPO started from)."""
    from dpo_eval.checkpoint_meta import read_metadata

    if adapter is None:
        return None
    try:
        meta = read_metadata(adapter)
    except (OSError, ValueError):  # an unreadable metadata file records nothing (json.JSONDecodeError: ValueError)
        return None
    return (meta.get("reference_adapter") or None) if isinstance(meta, dict) else None


def reference_adapter(spec: ModelSpec) -> str | None:
    """The adapter that makes the 'base' side of `spec`, or None for the bare base (see the module docstring)."""
    if spec.reference_adapter is not None:
        return None if spec.reference_adapter.strip().lower() == NO_REFERENCE else spec.reference_adapter
    return recorded_reference(spec.adapter)


def reference_option(spec: ModelSpec) -> str:
    """How to name the reference in an error: the option, or the metadata file that recorded it."""
    if spec.reference_adapter is not None or spec.adapter is None:
        return OPTION
    from dpo_eval.checkpoint_meta import METADATA

    return f"{OPTION} (recorded in {Path(spec.adapter) / METADATA}; override with {OPTION} PATH or none)"


def reference_label(spec: ModelSpec) -> str:
    """What the 'base' side is, in words: 'base' or 'base + SFT adapter X'."""
    adapter = reference_adapter(spec)
    if adapter is None:
        return "base"
    if spec.reference_adapter is None:
        return f"base + SFT adapter {adapter} (the reference DPO trained against, from the checkpoint's metadata)"
    return f"base + reference adapter {adapter}"


@contextmanager
def use_adapter(model, name: str):
    """Make adapter `name` the active one of a peft model for the block, then restore the previous one
    (frozen: inference_mode keeps peft from marking it trainable)."""
    previous = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(previous, inference_mode=True)
