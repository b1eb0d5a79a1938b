"""Models and datasets by hub name (`org/name`): fetched into Hugging Face's own cache (HF_HOME / HF_HUB_CACHE,
as every HF tool does) and read from there. The hub (HF_ENDPOINT) is asked once per name and process, with
HUB_TIMEOUT_S, before anything is downloaded; where it cannot be reached, a cached name is read from the cache
(as HF's loaders fall back to it; HF_HUB_OFFLINE=1 skips the question) and any other is one line, never a
silent hang. Models come as safetensors only."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..config import ConfigError

HUB_TIMEOUT_S = 8.0  # with the interpreter's start, an answer within 15 s
# what a model directory needs: configs, safetensors weights, tokenizer files
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken")


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_snapshot_if_cached(name: str, kind: str = "model", allow: tuple[str, ...] | None = MODEL_FILES) -> str | None:
    """The cached snapshot of hub repository `name` where it holds what a run reads (a model's config and every
    safetensors file its index names; any file of a dataset's), or None. Nothing is downloaded."""
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(name, repo_type=kind, allow_patterns=allow and list(allow),
                                          local_files_only=True))
    except Exception:  # not cached
        return None
    # an interrupted download, or another tool's partial fetch (a tokenizer alone), leaves a snapshot behind
    usable = (_whole_model(snapshot) if kind == "model"
              else any(f.is_file() and not f.name.startswith(".") for f in snapshot.rglob("*")))
    return str(snapshot) if usable else None


def _whole_model(snapshot: Path) -> bool:
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return False
        return (snapshot / "config.json").is_file() and all((snapshot / shard).is_file() for shard in shards)
    return (snapshot / "config.json").is_file() and any(snapshot.glob("*.safetensors"))


@functools.cache  # asked once per process: the early fetch and the load that follows share the answer
def hub_snapshot(name: str, kind: str, flag: str, allow: tuple[str, ...] | None = None) -> Path:
    """The local snapshot of hub repository `name` (`kind`: model or dataset), as HF's own loaders get it:
    brought up to date from the hub (files already cached are not downloaded again), or, where the hub cannot
    be reached or HF_HUB_OFFLINE is set, the cached copy."""
    from huggingface_hub import snapshot_download

    cached = hub_snapshot_if_cached(name, kind, allow)
    if _offline():
        if cached is None:
            raise ConfigError(f"{flag} {name} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download "
                              "it where the hub is reachable, or pass a local path")
        return Path(cached)
    unreachable = _unreachable(name, kind, flag)
    if unreachable:
        if cached is not None:
            return Path(cached)
        raise ConfigError(unreachable)
    try:
        return Path(snapshot_download(name, repo_type=kind, allow_patterns=allow and list(allow),
                                      etag_timeout=HUB_TIMEOUT_S))
    except Exception as err:
        raise ConfigError(f"{flag} {name}: downloading it from {endpoint()} failed ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None


def _unreachable(name: str, kind: str, flag: str) -> str | None:
    """Why the hub cannot be asked for `name` (None: it answered); a name the hub does not have is refused."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        HfApi(endpoint=endpoint()).repo_info(name, repo_type=kind, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        raise ConfigError(f"{flag} {name}: no local path of that name, and no such {kind} on {endpoint()} (or it "
                          "needs a token: huggingface-cli login)") from None
    except Exception as err:  # refused, timed out, DNS: the network is not there
        return (f"{flag} {name}: no local path of that name, and the hub at {endpoint()} cannot be reached within "
                f"{HUB_TIMEOUT_S:.0f} s ({type(err).__name__}): check the path, the network or HF_ENDPOINT, or set "
                "HF_HUB_OFFLINE=1 to use the cache only")
    return None


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
