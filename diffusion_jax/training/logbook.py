"""Metrics to workdir/metrics.jsonl and TensorBoard event files (process 0 only)."""
from __future__ import annotations

import json
import pathlib


class MetricWriter:
    def __init__(self, workdir, enabled: bool = True):
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
        except ImportError:  # TensorBoard files are optional; the JSON lines are not
            self.tb = None

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
