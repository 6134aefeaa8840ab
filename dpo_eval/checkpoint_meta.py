"""The training metadata a checkpoint folder holds (`dpo_eval_training.json`, written by dpo_eval.training.dpo):
read by evaluation, the reference, the trend and the watcher without importing the trainer."""

from __future__ import annotations

import json
from pathlib import Path

METADATA = "dpo_eval_training.json"


def read_metadata(adapter: str | Path) -> dict:
    """The training metadata of a checkpoint folder, or {} where there is none."""
    path = Path(adapter) / METADATA
    return json.loads(path.read_text()) if path.is_file() else {}
