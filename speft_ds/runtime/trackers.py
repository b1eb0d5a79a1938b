"""--report_to: the metrics.jsonl records, also sent to TensorBoard and/or Weights & Biases (rank 0 only), with
the tags HF Trainer users know (train/loss, train/learning_rate, eval/loss)."""

from __future__ import annotations

import os
from pathlib import Path

# A training record's keys -> HF Trainer's tags.
STEP_TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "step_time_s": "train/step_time_s"}


def scalars(record: dict) -> dict[str, float]:
    """A metrics record as tagged scalars: training records by HF Trainer's names, events under their own
    name (per-rank lists by their largest value, memory records by phase)."""
    if "event" not in record:
        return {STEP_TAGS[key]: float(value) for key, value in record.items() if key in STEP_TAGS}
    event = record["event"]
    if event == "eval":
        return {"eval/loss": float(record["eval_loss"])}
    if event == "task_eval":
        return {f"eval/{record['task']}_accuracy": float(record["accuracy"])}
    if event == "retention":
        return {f"eval/retention_{key}": float(record[key]) for key in ("loss", "kl") if record[key] is not None}
    prefix = f"memory/{record['phase']}" if event == "memory" else event
    values = {}
    for key, value in record.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            values[f"{prefix}/{key}"] = float(value)
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            values[f"{prefix}/{key.removesuffix('_per_rank')}_max"] = float(max(value))
    return values


class Trackers:
    """Open on rank 0 only; `log` takes every metrics record, `close` flushes."""

    def __init__(self, names: list[str], output_dir: Path, config: dict):
        self.step = 0
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if "wandb" in names:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "speft-ds"), config=config,
                                    dir=str(output_dir))
            # Events logged between steps (evaluation, memory) keep the training step as their x axis.
            self.wandb.define_metric("train/global_step")
            self.wandb.define_metric("*", step_metric="train/global_step", step_sync=True)

    def log(self, record: dict) -> None:
        self.step = record.get("step", self.step)
        values = scalars(record)
        if not values:
            return
        if self.tensorboard:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, self.step)
        if self.wandb:
            self.wandb.log({**values, "train/global_step": self.step})

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
