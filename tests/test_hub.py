"""Hub names (`org/name`) for --model and --dataset: without network, one line within 15 s, never a silent
hang. The hub is a fake HF_ENDPOINT on loopback: a port where nothing listens (refused at once), and a
server that accepts connections and never answers (the timeout must fire). The cache is empty and private."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from speft_ds.config import EMBEDDED_MODEL
from speft_ds.runtime.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def silent_server():
    """A loopback server that accepts every connection and never answers; yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    server.close()


@pytest.mark.parametrize("hub", ["refusing", "silent"])
@pytest.mark.parametrize("flag", ["--model", "--dataset"])
def test_a_hub_without_network_is_one_line_within_15_seconds(tmp_path, hub, flag, request):
    port = request.getfixturevalue("silent_server") if hub == "silent" else free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = ["--model", str(EMBEDDED_MODEL), flag, "speft-test/no-such-repo", "--output_dir", str(tmp_path / "out")]
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "DS_ACCELERATOR": "cpu"}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "launch/train.py", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=60)
    took = time.monotonic() - started
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"error: {flag} speft-test/no-such-repo: no local path of that name, and the hub "
                                f"at {endpoint} cannot be reached within 8 s"), errors[0]
    assert took < 15, f"took {took:.1f} s"
    assert not (tmp_path / "out").exists()


def test_offline_mode_names_a_name_that_is_not_cached(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "launch/train.py", "--model", "speft-test/no-such-repo"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --model speft-test/no-such-repo is not in the Hugging Face cache and "
                                   "HF_HUB_OFFLINE is set: download it where the hub is reachable, or pass a local "
                                   "path")


def _cache(tmp_path: Path, files) -> Path:
    """A model in Hugging Face's cache, in its own layout (models--ORG--NAME/refs/main and snapshots/REV)."""
    repo = tmp_path / "hf" / "hub" / "models--speft-test--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snapshot.mkdir(parents=True)
    for file in files:
        (snapshot / file.name).write_bytes(file.read_bytes())
    return snapshot


def _resolve(tmp_path: Path, port: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{port}"}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, "-c", "import sys; from speft_ds.cli import run_main; from speft_ds.models."
                           "gguf import resolve_model; sys.exit(run_main(lambda argv: print(resolve_model("
                           "'speft-test/tiny')), []))"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("hub", ["refusing", "silent"])
def test_a_cached_hub_model_needs_no_network(tmp_path, hub, request):
    """A cached model is read from the cache, within 15 s, while the hub refuses every connection or never
    answers."""
    snapshot = _cache(tmp_path, Path(EMBEDDED_MODEL).iterdir())
    started = time.monotonic()
    proc = _resolve(tmp_path, request.getfixturevalue("silent_server") if hub == "silent" else free_port())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()) == snapshot
    assert time.monotonic() - started < 15


def test_a_partly_cached_hub_model_is_not_taken_for_the_whole(tmp_path):
    """A snapshot holding a config and tokenizer alone (as AutoTokenizer leaves it) is not the model: without the
    hub the answer is that it cannot be fetched, not that the hub has no weights."""
    _cache(tmp_path, [f for f in Path(EMBEDDED_MODEL).iterdir() if f.suffix != ".safetensors"])
    proc = _resolve(tmp_path, free_port())
    assert proc.returncode != 0 and "cannot be reached within 8 s" in proc.stderr, proc.stderr[-2000:]
