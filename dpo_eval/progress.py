"""Progress of the long stages (generation, scoring, training) that people wait on.

`StageProgress` counts units done of a total and shows them twice: as a terminal bar on stderr (tqdm),
only when stderr is a terminal, so logs and pipes stay clean; and through an optional listener, which the
orchestration layer points at a Prefect progress artifact (flows/progress.py). DPO_EVAL_PROGRESS=1 or 0
forces the bar on or off.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

Listener = Callable[[int, int], None]  # (done, total)


def terminal() -> bool:
    """Whether to draw terminal bars: DPO_EVAL_PROGRESS (1/0) when set, else whether stderr is a terminal."""
    forced = os.environ.get("DPO_EVAL_PROGRESS", "").strip().lower()
    if forced in ("1", "on", "true", "yes"):
        return True
    if forced in ("0", "off", "false", "no"):
        return False
    return sys.stderr.isatty()


class StageProgress:
    """`done` of `total` units of one stage; a bar on a terminal, and `listener(done, total)` on each step."""

    def __init__(self, stage: str, total: int, unit: str, listener: Listener | None = None,
                 bar: bool | None = None):
        self.stage, self.total, self.unit, self.done = stage, int(total), unit, 0
        self._listener = listener
        self._bar = None
        if (terminal() if bar is None else bar) and self.total > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=stage, unit=f" {unit}", file=sys.stderr, dynamic_ncols=True)

    @property
    def has_bar(self) -> bool:
        return self._bar is not None

    def advance(self, n: int = 1) -> None:
        n = max(0, min(int(n), self.total - self.done))
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        if self._listener is not None:
            self._listener(self.done, self.total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "StageProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_trainer(trainer):
    """Without a terminal bar a transformers Trainer prints every log dict to stdout (its PrinterCallback);
    drop it there: the logs stay in trainer.state.log_history and each checkpoint's trainer_state.json."""
    from transformers.trainer_callback import PrinterCallback

    if not terminal():
        trainer.remove_callback(PrinterCallback)
    return trainer
