"""The metrics a run logs: one JSON object per logged step in ``metrics.jsonl``, and TensorBoard or
W&B when asked."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from posttrain.errors import PosttrainError
from posttrain.utils import write_jsonl


class MetricsLogger:
    """Writes one JSON object per logged step to ``metrics.jsonl`` and to TensorBoard (W&B if asked).

    Only the main process writes; other ranks' calls are no-ops.
    """

    def __init__(self, output: Path, is_main: bool, report_to: list[str], run_config: dict, resume_step: int | None):
        """``resume_step``: the step a resumed run continues from (rows logged after it, by the run
        that was interrupted, are dropped so no step appears twice); None starts a fresh file."""
        self.is_main = is_main
        self.path = output / "metrics.jsonl"
        self.tb = self.wandb = None
        if not is_main:
            return
        output.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            write_jsonl(self.path, [r for r in read_metrics(self.path) if r["step"] <= resume_step])
        if "tensorboard" in report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(output / "tensorboard"))
            except ImportError:
                print("note: tensorboard is not installed; logging to metrics.jsonl only")
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise PosttrainError("report_to wandb needs wandb installed: pip install wandb") from None
            self.wandb = wandb.init(config=run_config, dir=str(output), resume="allow")

    def log(self, step: int, metrics: dict) -> None:
        if not self.is_main:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if isinstance(v, (int, float)) and k not in ("step", "time"):
                if self.tb is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    return v


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; damaged lines (not a JSON object with an integer step) are skipped
    with a one-line warning."""
    if not path.is_file():
        return []
    rows, bad = [], 0
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        else:
            bad += 1
    if bad:
        print(f"warning: {path}: skipped {bad} damaged line(s)")
    return rows
