"""Datasets as users have them: local files (JSON lines, JSON, Parquet, CSV) or dataset names, one or several
mixed by weight, with a held-out set carved from each or given apart (--eval_dataset)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch

from ..config import LOCAL_DATA_SUFFIXES, ConfigError, TrainConfig, looks_like_local_file
from ..models.hub import hub_snapshot
from .batches import LAYOUT_FIELDS, layout, tokenize_dataset, train_eval_split, unasked


def read_source(source: str, config: TrainConfig, flag: str = "--dataset") -> datasets.Dataset:
    """One dataset: a local file (read by `datasets`' builder for its format), a local folder of data files or
    a dataset name, checked for the fields --text_field, --messages_field or --prompt_field/--response_field
    read."""
    # Every rank loads before the process group exists, so the library's own bars would print N times.
    datasets.disable_progress_bars()
    if looks_like_local_file(source):
        builder = LOCAL_DATA_SUFFIXES[Path(source).suffix.lower()]
        try:
            ds = datasets.load_dataset(builder, data_files=source, split="train", keep_in_memory=True)
        except Exception as err:  # datasets raises many types for a malformed file
            broken = first_broken_json_line(Path(source)) if builder == "json" else None
            if broken:
                raise ConfigError(f"{flag} {source}, line {broken[0]}: not JSON ({broken[1]}): fix that line") from None
            raise ConfigError(f"{flag} {source} could not be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}): check the file format") from None
    elif Path(source).is_dir():  # a folder of data files, read as datasets reads one
        try:
            ds = datasets.load_dataset(source, split="train", keep_in_memory=True)
        except Exception as err:
            raise ConfigError(f"{flag} {source}: its files could not be read as a dataset ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    else:
        ds = load_hub_dataset(source, flag)
    missing = [name for name in LAYOUT_FIELDS[layout(ds.column_names, config)](config) if name not in ds.column_names]
    if missing:
        raise ConfigError(f"{flag} {source} has no field {', '.join(missing)} (fields: "
                          f"{', '.join(ds.column_names)}): pass --text_field, --messages_field or "
                          "--prompt_field/--response_field")
    if len(ds) < 2:
        raise ConfigError(f"{flag} {source} has {len(ds)} examples: at least 2 are needed")
    return ds


def load_hub_dataset(name: str, flag: str) -> datasets.Dataset:
    """A hub dataset's training split, from Hugging Face's cache (downloaded there first where the hub is
    reachable); its data files only: no dataset script runs."""
    snapshot = hub_snapshot(name, "dataset", flag)
    try:
        return datasets.load_dataset(str(snapshot), split="train", keep_in_memory=True)
    except Exception as err:
        raise ConfigError(f"{flag} {name} could not be read from its files ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None


def load_raw_dataset(config: TrainConfig) -> datasets.Dataset:
    """Every --dataset, end to end (one pass over each, in order)."""
    parts = [read_source(source, config) for source in config.datasets]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def training_and_eval_sets(config: TrainConfig, tokenizer) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training mixture and the held-out set. Each --dataset is tokenized and split on its own (a
    --val_size carve from each, none with --val_size 0 or where --eval_dataset is the held-out set); an epoch
    is one pass over the mixture, in which dataset i's training split counts weight_i times (whole copies,
    then a seeded sample of the fraction left)."""
    trains, held_out = [], []
    for i, (source, weight) in enumerate(zip(config.datasets, config.weights)):
        tokenized = tokenize_dataset(read_source(source, config), tokenizer, config, source)
        if config.val_size and not config.eval_dataset:
            tokenized, carved = train_eval_split(tokenized, config.val_size, config.seed)
            held_out.append(carved)
        trains.append(_weighted(tokenized, weight, config.seed + i))
    if config.eval_dataset:
        held_out = [tokenize_dataset(read_source(config.eval_dataset, config, "--eval_dataset"), tokenizer, config,
                                     config.eval_dataset)]
    if len(trains) == 1:
        return trains[0], held_out[0] if held_out else None
    train = datasets.concatenate_datasets(trains)
    if len(held_out) > 1:  # each carve asks nothing its own dataset trains on; nor may it ask what another does
        held_out = [unasked(datasets.concatenate_datasets(held_out), train, "carved from each --dataset")]
    return train, held_out[0] if held_out else None


def _weighted(split: datasets.Dataset, weight: float, seed: int) -> datasets.Dataset:
    if weight == 1.0:
        return split
    whole, fraction = divmod(weight, 1.0)
    extra = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:round(fraction * len(split))]
    rows = list(range(len(split))) * int(whole) + sorted(extra.tolist())
    if not rows:
        raise ConfigError(f"--dataset_weights {weight} keeps none of a dataset of {len(split)} training examples: "
                          "raise it")
    return split.select(rows)


def first_broken_json_line(path: Path) -> tuple[int, str] | None:
    """(1-based line, why) of the first line that is not JSON in a JSON-lines file, or of the error in a
    file holding one JSON document (an array); None where the file parses. Called once reading failed, so
    a good file is parsed once, by datasets."""
    text = path.read_text(errors="replace")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return err.lineno, err.msg
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                return number, err.msg
    return None
