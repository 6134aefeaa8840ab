"""Train a DPO (Q)LoRA adapter; announce each checkpoint as a Prefect event."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.events import emit_event

from dpo_eval.training.dpo import TrainSpec, train_dpo

CHECKPOINT_EVENT = "dpo_eval.checkpoint.saved"


def announce(folder: Path) -> None:
    """Emit dpo_eval.checkpoint.saved with the folder, after its training metadata is written: the trigger
    of the `scheduled` deployment starts a watcher tick, which evaluates the checkpoint once."""
    emit_event(event=CHECKPOINT_EVENT, resource={"prefect.resource.id": f"dpo-eval.checkpoint.{folder.resolve()}"},
               payload={"folder": str(folder.resolve())})


@flow(name="train-dpo")
def train_dpo_flow(spec: TrainSpec) -> list[str]:
    """DPO training with trl; returns the checkpoint folders.

    No log_prints: trl's dataset map hashes its functions with dill, which disassembles them to stdout
    inside a capture that Prefect's print patch bypasses, so the run log filled with bytecode."""
    return [str(p) for p in train_dpo(spec, on_checkpoint=announce)]
