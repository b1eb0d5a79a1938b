"""What the package writes for others to read (a converted model, a merged model, an adapter, a checkpoint),
made readable by every user: safetensors writes its files for their owner alone (0600), which a serving
container or a colleague under another user could not open."""

from __future__ import annotations

from pathlib import Path


def readable_by_all(directory: Path) -> None:
    """Every file under `directory` 0644 and every directory 0755 (itself included)."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
