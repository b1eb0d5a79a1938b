"""The benches' training jobs: each (method, model, world size, density, extra flags) one DeepSpeed job of
bench/common/compare_worker.py, at the settings they share (sequence length, micro-batch, calibration examples,
warm-up and timed steps), with LoRA at the rank whose trainable count is closest to SPEFT's k. Used by
bench/speed/compare.py and bench/gpu/gpu_bench.py; `target_sizes` also by bench/quality/quality.py and
bench/gpu/gpu_scale.py."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from speft_ds.config import TrainConfig
from speft_ds.models.loading import find_targets, load_model_config, skeleton_model
from speft_ds.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN, MICRO_BATCH, CALIBRATION, WARMUP, STEPS = 256, 4, 64, 1, 4


def target_sizes(model_dir: Path) -> tuple[int, int]:
    """(targeted elements, sum of in + out features) over the targeted linears (all decoder linears)."""
    targets = find_targets(skeleton_model(load_model_config(TrainConfig(model=str(model_dir)))), None).values()
    return sum(m.weight.numel() for m in targets), sum(m.in_features + m.out_features for m in targets)


def lora_rank(model_dir: Path, density: float) -> int:
    """The rank >= 1 whose trainable count, r x sum(in + out), is closest to SPEFT's k."""
    targeted, in_plus_out = target_sizes(model_dir)
    return max(1, round(round(density * targeted) / in_plus_out))


class Runs:
    """Each (method, model, world size, density, extra training flags) trained once, in its own DeepSpeed job
    on DeepSpeed's `accelerator` (cpu, cuda)."""

    def __init__(self, dataset: Path, work: Path, accelerator: str = "cpu"):
        self.dataset, self.work, self.accelerator, self.done = dataset, work, accelerator, {}

    def __call__(self, method: str, model_dir: Path, world_size: int, density: float, *flags: str) -> dict:
        key = (method, model_dir, world_size, density, flags)
        if key not in self.done:
            self.done[key] = self._run(method, model_dir, world_size, density, flags)
        return self.done[key]

    def _run(self, method: str, model_dir: Path, world_size: int, density: float, flags: tuple[str, ...]) -> dict:
        tag = f"d{density}-n{world_size}-{model_dir.name}" + "".join(f"-{flag.lstrip('-')}" for flag in flags)
        out, result = self.work / f"{method}-{tag}", self.work / f"{method}-{tag}.json"
        command = ["deepspeed", "--num_gpus", str(world_size), "--master_port", str(free_port()),
                   "bench/common/compare_worker.py", "--method", method, "--lora_r", str(lora_rank(model_dir, density)),
                   "--result", str(result), "--warmup_steps_excluded", str(WARMUP),
                   "--mask", str(self.work / f"speft-{tag}" / "adapter"), "--",
                   "--model", str(model_dir), "--dataset", str(self.dataset), "--text_field", "text",
                   "--seq_len", str(SEQ_LEN), "--micro_batch_size", str(MICRO_BATCH),
                   # the mask's size and calibration: SPEFT's flags (LoRA's size is --lora_r above)
                   *([] if method in ("lora", "roselora") else ["--calibration_examples", str(CALIBRATION),
                                                                "--density", str(density)]),
                   "--max_steps", str(WARMUP + STEPS), "--logging_steps", "1", "--val_size", "0.1",
                   "--learning_rate", "1e-3", "--output_dir", str(out), "--overwrite_output_dir", *flags]
        if method == "paper":  # trains the mask SPEFT selected
            self("speft", model_dir, world_size, density, *flags)
        print(" ".join(command), flush=True)
        subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "DS_ACCELERATOR": self.accelerator})
        return json.loads(result.read_text())
