"""Per-step scalars of a run: `steps.csv` always, TensorBoard event files when asked for.

The trainer hands over numbers it already holds at its sync points (the running loss sums it
reads there anyway), so logging adds no device synchronisation to the steps in between. A run
that dies in its first epoch still leaves a training curve. Under torch.distributed the main
process logs the mean over every agent, as the simulator does: the processes' loss sums travel with
the flags they agree on at the sync point anyway.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from crossgrad.errors import ConfigError
from crossgrad.files import atomic_write_text, open_append

STEPS_CSV = "steps.csv"
STEP_COLUMNS = ("step", "epoch", "lr", "train_loss", "wall_time_s")
TENSORBOARD_DIR = "tensorboard"
#: the metrics.jsonl entries mirrored to TensorBoard at every evaluation
EVAL_SCALARS = ("consensus_acc", "local_acc_mean", "local_acc_min", "consensus_loss", "consensus_distance")


def require_tensorboard() -> type:
    """TensorBoard's SummaryWriter, or a ConfigError saying how to get the optional package."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "output.tensorboard = true needs the tensorboard package: pip install 'crossgrad[tensorboard]' "
            f"(per-step scalars are always written to {STEPS_CSV})"
        ) from None
    return SummaryWriter


class ScalarLog:
    """Appends one row per logged step to `run_dir/steps.csv` and, optionally, to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int):
        self.path = Path(run_dir) / STEPS_CSV
        self._drop_rows_after(resume_step)
        new = not self.path.is_file()
        # open for the whole run (one flushed row per log point); close() ends it
        self.file = open_append(self.path, newline="")
        self.csv = csv.writer(self.file)
        if new:
            self.csv.writerow(STEP_COLUMNS)
        self.tb = require_tensorboard()(log_dir=str(Path(run_dir) / TENSORBOARD_DIR)) if tensorboard else None

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run continues from its checkpoint: rows logged after it are redone, not doubled."""
        if not self.path.is_file():
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
        if len(keep) != len(rows):
            text = io.StringIO(newline="")
            csv.writer(text).writerows(keep)
            atomic_write_text(self.path, text.getvalue())

    def step(self, step: int, epoch: float, lr: float, train_loss: float, wall_time_s: float) -> None:
        self.csv.writerow([step, f"{epoch:.6g}", f"{lr:.6g}", f"{train_loss:.6g}", f"{wall_time_s:.3f}"])
        self.file.flush()
        if self.tb is not None:
            self.tb.add_scalar("train/loss", train_loss, step)
            self.tb.add_scalar("train/lr", lr, step)

    def evaluation(self, rec: dict[str, Any]) -> None:
        if self.tb is None:
            return
        for key in EVAL_SCALARS:
            if rec.get(key) is not None:
                self.tb.add_scalar(f"eval/{key}", rec[key], rec["step"])
        self.tb.flush()

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()
