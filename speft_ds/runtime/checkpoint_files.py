"""What a checkpoint directory guarantees on disk: durable, verifiable, published atomically, retained by write
order. Plain files, no collectives (runtime/checkpoint.py decides which rank calls what).

- Durable: every file is fsynced before it is closed, the directory before it is renamed into place, and the
  parent after each rename, so a node crash or power loss cannot leave a published checkpoint whose files
  hold zeros.
- Verified: MANIFEST, written last into the directory, records each file's size, the hash of its header and
  of each tensor (the ranks' writers fill tensors out of file order, so the hashes are per tensor), every
  rank file's slice ranges, the step and a save sequence number. Sizes are checked cheaply; hashes read
  every byte, each rank its share of the files.
- Published: written under `.tmp-step-N`, renamed to `step-N` (an existing `step-N` is renamed aside first
  and removed after; a crash between the two renames is undone by `recover`, which puts the older one
  back), then `latest` replaced; leftovers of a crashed save (`.tmp-*`, `.old-*`) are removed at the next
  save and never resumed from.
- Retained by write order: the N most recently written checkpoints (by sequence number) are kept, never the
  one just written nor the one `latest` names; a file that cannot be removed (busy on NFS) is left with a
  warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

from ..models.published import readable_by_all

MANIFEST = "manifest.json"
LATEST = "latest"
TMP_PREFIX, ASIDE_PREFIX = ".tmp-", ".old-"


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's data and metadata to stable storage (some FUSE and SMB mounts refuse a
    directory's fsync: there the rename's own ordering is all there is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTSUP) or not path.is_dir():
            raise
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _header(fh, size: int) -> tuple[bytes, dict, int]:
    """A safetensors file's header bytes, parsed header, and where its data starts (a ValueError for a
    header that cannot be one: longer than the file, not JSON, or without offsets)."""
    (length,) = struct.unpack("<Q", fh.read(8))
    if 8 + length > size:
        raise ValueError(f"a header of {length} bytes in a file of {size}")
    raw = fh.read(length)
    header = json.loads(raw)
    if not isinstance(header, dict) or not all(isinstance(entry, dict) and "data_offsets" in entry
                                               for key, entry in header.items() if key != "__metadata__"):
        raise ValueError("a header without data offsets")
    return raw, header, 8 + length


def file_record(path: Path, tensor_hashes: dict[str, str] | None = None) -> dict:
    """A safetensors file's size, header hash and per-tensor hashes (read back where not given)."""
    with open(path, "rb") as fh:
        raw, header, start = _header(fh, path.stat().st_size)
        if tensor_hashes is None:
            tensor_hashes = {}
            for key, entry in header.items():
                if key != "__metadata__":
                    begin, end = entry["data_offsets"]
                    fh.seek(start + begin)
                    tensor_hashes[key] = digest(fh.read(end - begin))
    return {"size": path.stat().st_size, "header": digest(raw), "tensors": tensor_hashes}


def write_manifest(directory: Path, step: int, sequence: int, files: dict[str, dict], ranges: dict[str, dict]) -> None:
    write_durably(directory / MANIFEST, json.dumps({"step": step, "sequence": sequence, "files": files,
                                                    "ranges": ranges}).encode())


def read_manifest(directory: Path) -> dict | None:
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def size_problem(directory: Path) -> str | None:
    """Why the checkpoint is not complete by its manifest's sizes (a file missing, shorter or longer), or None."""
    manifest = read_manifest(directory)
    if manifest is None:
        return f"{directory / MANIFEST} is missing or unreadable"
    for name, record in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != record["size"]:
            return f"{path} has {path.stat().st_size} bytes where the manifest says {record['size']}"
    return None


def hash_problem(directory: Path, names: list[str]) -> str | None:
    """Why one of the files `names` does not match its manifest's hashes (reading every byte), or None."""
    manifest = read_manifest(directory)
    for name in names:
        want = manifest["files"][name]
        try:
            got = file_record(directory / name)
        except Exception as err:  # any damage to the header: a problem to report, never a crash on one rank
            return f"{directory / name} cannot be read ({type(err).__name__})"
        if got["header"] != want["header"]:
            return f"{directory / name}'s header does not match its hash"
        bad = next((key for key, value in want["tensors"].items() if got["tensors"].get(key) != value), None)
        if bad is not None:
            return f"{directory / name}'s tensor {bad} does not match its hash"
    return None


def latest_tag(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def by_write_order(root: Path) -> list[str]:
    """The published checkpoints that have a manifest, newest write first."""
    found = []
    for path in root.glob("step-*"):
        manifest = read_manifest(path)
        if manifest is not None:
            found.append((manifest["sequence"], path.name))
    return [tag for _, tag in sorted(found, reverse=True)]


def next_sequence(root: Path) -> int:
    manifests = [read_manifest(root / tag) for tag in by_write_order(root)[:1]]
    return manifests[0]["sequence"] + 1 if manifests else 1


def recover(root: Path) -> None:
    """Undo a publish that stopped between setting an older `step-N` aside and renaming the new one into
    place: the older one goes back."""
    for aside in root.glob(f"{ASIDE_PREFIX}step-*"):
        tag = aside.name.removeprefix(ASIDE_PREFIX)
        if not (root / tag).exists():
            os.replace(aside, root / tag)
            fsync_path(root)


def remove_leftovers(root: Path) -> None:
    """What a save killed midway left, once `recover` has put back what it can: temporary and set-aside
    directories, and `latest`'s temporary file."""
    recover(root)
    for path in root.glob(f"{TMP_PREFIX}*"):
        _remove(path)
    for path in root.glob(f"{ASIDE_PREFIX}*"):
        _remove(path)
    (root / f".{LATEST}.tmp").unlink(missing_ok=True)


def publish(root: Path, tmp_tag: str, tag: str) -> None:
    """Make a complete, fsynced checkpoint visible (and readable by every user): rename it into place (an
    older one of the same tag set aside first, then removed), then point `latest` at it."""
    readable_by_all(root / tmp_tag)
    fsync_path(root / tmp_tag)
    aside = root / f"{ASIDE_PREFIX}{tag}"
    if (root / tag).exists():
        os.replace(root / tag, aside)
    os.replace(root / tmp_tag, root / tag)
    fsync_path(root)
    write_durably(root / f".{LATEST}.tmp", tag.encode())
    os.replace(root / f".{LATEST}.tmp", root / LATEST)
    fsync_path(root)
    if aside.exists():
        _remove(aside)


def retain(root: Path, keep_last: int, just_written: str) -> None:
    """Keep the `keep_last` most recently written checkpoints, always the one just written and the one
    `latest` names."""
    keep = set(by_write_order(root)[:keep_last]) | {just_written, latest_tag(root)}
    for tag in by_write_order(root):
        if tag not in keep:
            _remove(root / tag)


def _remove(path: Path) -> None:
    """Remove a directory tree; what cannot go (NFS keeps a file another process holds open as .nfsXXXX, and
    the delete raises) is left behind with one warning line instead of stopping training."""
    try:
        shutil.rmtree(path)
    except OSError as err:
        shutil.rmtree(path, ignore_errors=True)  # whatever else can go
        print(f"warning: could not remove all of {path} ({type(err).__name__}: {err}); the rest is left in place",
              file=sys.stderr, flush=True)
