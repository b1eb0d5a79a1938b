"""bench/gpu/gpu_scale.py's dry run: every job of both parts (SPEFT on an nf4 base end to end and QLoRA; SPEFT's
two delta implementations and LoRA) runs on CPU at tiny shapes and lands in its part's table, so the script
prepared for a GPU still works when a device is lent."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_both_parts_run_every_job(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "bench/gpu/gpu_scale.py", "--dry_run", "--work_dir", str(tmp_path / "work"),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    tables = {part: (out / f"gpu_scale_{part}.md").read_text() for part in ("nf4", "bf16")}
    for part, jobs in (("nf4", ("SPEFT (nf4)", "QLoRA")),
                       ("bf16", ("SPEFT, dense delta", "SPEFT, sparse delta", "LoRA"))):
        rows = {line.split(" | ")[0].lstrip("| "): line for line in tables[part].splitlines() if line.startswith("| ")}
        for job in jobs:
            assert job in rows and "failed" not in rows[job] and "not run" not in rows[job], tables[part]
