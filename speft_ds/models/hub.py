"""Models and datasets by hub name (`org/name`), where a hub is reachable: fetched into Hugging Face's own cache
(HF_HOME / HF_HUB_CACHE, as every HF tool does) and read from there, so a cached name needs no network.
Without network the answer is one line within HUB_TIMEOUT_S, never a silent hang: the hub (HF_ENDPOINT) is
asked once, with that timeout, before anything is downloaded. Models come as safetensors only."""

from __future__ import annotations

import os
from pathlib import Path

from ..config import ConfigError

HUB_TIMEOUT_S = 8.0  # with the interpreter's start, an answer within 15 s
# what a model directory needs: configs, safetensors weights, tokenizer files
MODEL_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_snapshot_if_cached(name: str, kind: str = "model", allow: list[str] | None = MODEL_FILES) -> str | None:
    """The cached snapshot of hub repository `name`, or None (nothing is downloaded)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, repo_type=kind, allow_patterns=allow, local_files_only=True)
    except Exception:  # not cached (or only partly)
        return None


def hub_snapshot(name: str, kind: str, flag: str, allow: list[str] | None = None) -> Path:
    """The local snapshot of hub repository `name` (`kind`: model or dataset): from the cache where it is
    there, else downloaded after one reachability check."""
    from huggingface_hub import snapshot_download

    cached = hub_snapshot_if_cached(name, kind, allow)
    if cached is not None:
        return Path(cached)
    if _offline():
        raise ConfigError(f"{flag} {name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it "
                          "where the hub is reachable, or pass a local path")
    _check_reachable(name, kind, flag)
    try:
        return Path(snapshot_download(name, repo_type=kind, allow_patterns=allow, etag_timeout=HUB_TIMEOUT_S))
    except Exception as err:
        raise ConfigError(f"{flag} {name}: downloading it from {endpoint()} failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None


def _check_reachable(name: str, kind: str, flag: str) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi(endpoint=endpoint()).repo_info(name, repo_type=kind, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ConfigError(f"{flag} {name}: no such {kind} on {endpoint()} (or it needs a token: huggingface-cli "
                          "login)") from None
    except Exception as err:  # refused, timed out, DNS: the network is not there
        raise ConfigError(f"{flag} {name}: the hub at {endpoint()} cannot be reached within {HUB_TIMEOUT_S:.0f} s "
                          f"({type(err).__name__}): check the network or HF_ENDPOINT, set HF_HUB_OFFLINE=1 to use "
                          "the cache only, or pass a local path") from None


def fetch_hub_names(config) -> None:
    """Every hub name the flags give (--model, --dataset, --eval_dataset) into the cache, or one line: run
    before torch and DeepSpeed load, so that a hub without network is answered within seconds."""
    from ..config import looks_like_hub_name

    if looks_like_hub_name(config.model):
        hub_model(config.model)
    named = [("--dataset", name) for name in config.datasets] + [("--eval_dataset", config.eval_dataset)]
    for flag, name in named:
        if name is not None and looks_like_hub_name(name):
            hub_snapshot(name, "dataset", flag)


def hub_model(name: str) -> str:
    """A hub model's local directory, with safetensors weights."""
    directory = hub_snapshot(name, "model", "--model", MODEL_FILES)
    if not any(directory.glob("*.safetensors")):
        raise ConfigError(f"--model {name} has no .safetensors weights on the hub: speft-ds never unpickles "
                          "weights; use a repository that ships safetensors, or convert it locally")
    return str(directory)
