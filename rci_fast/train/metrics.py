"""Per-step metrics: one JSON line per step in <out_dir>/metrics.jsonl, and TensorBoard scalars in
<out_dir>/tb when the tensorboard package is installed (rank 0 only). A resumed run's TensorBoard
drops the events an interrupted run logged past the checkpoint (as metrics.jsonl is trimmed)."""
from __future__ import annotations

import json
import numbers
from pathlib import Path


class MetricsLog:
    def __init__(self, out_dir: Path, tensorboard: bool = True, first_step: int = 1):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # optional: JSONL alone is the record
                SummaryWriter = None
            if SummaryWriter is not None:
                # purge_step: readers drop the earlier events of steps >= first_step
                self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tb"), purge_step=first_step)

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, numbers.Real) and not isinstance(value, bool) and key != "step":
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
