"""metrics.jsonl: one JSON object per line, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


class MetricsLog:
    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None,
                 sink: Callable[[dict], None] | None = None):
        """A new log, or (resume_step given) the existing one cut after the records of that step, so a
        resumed run continues it without duplicated or missing steps. `sink` also receives every record."""
        self.path = path
        self.enabled = enabled
        self.sink = sink
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                if json.loads(line).get("step", 0) > resume_step:
                    break
                kept.append(line + "\n")
        path.write_text("".join(kept))

    def records(self) -> list[dict]:
        """Everything written so far (rank 0, which writes)."""
        return [json.loads(line) for line in self.path.read_text().splitlines()]

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.sink:
                self.sink(record)


def log_memory(log: MetricsLog, phase: str) -> dict:
    """Every rank's RSS now and its peak during the phase that just ended (a collective), then a new peak."""
    from .distributed import memory_mib_per_rank, reset_peak_memory

    record = {"event": "memory", "phase": phase, **memory_mib_per_rank()}
    log.write(record)
    reset_peak_memory()
    return record
