"""Datasets: loading, tokenisation, the held-out split, the calibration subset and per-rank batches."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch

from ..config import LOCAL_DATA_SUFFIXES, ConfigError, TrainConfig, looks_like_local_file
from .losses import IGNORE_INDEX


def load_raw_dataset(config: TrainConfig) -> datasets.Dataset:
    # Every rank loads before the process group exists, so the library's own bars would print N times.
    datasets.disable_progress_bars()
    if looks_like_local_file(config.dataset):
        builder = LOCAL_DATA_SUFFIXES[Path(config.dataset).suffix.lower()]
        try:
            ds = datasets.load_dataset(builder, data_files=config.dataset, split="train", keep_in_memory=True)
        except Exception as err:  # datasets raises many types for a malformed file
            broken = first_broken_json_line(Path(config.dataset)) if builder == "json" else None
            if broken:
                raise ConfigError(f"--dataset {config.dataset}, line {broken[0]}: not JSON ({broken[1]}): fix that "
                                  "line") from None
            raise ConfigError(f"--dataset {config.dataset} could not be read ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}): check the file format") from None
    else:
        try:
            ds = datasets.load_dataset(config.dataset, split="train")
        except Exception as err:
            raise ConfigError(f"--dataset {config.dataset} is neither a local .jsonl/.json/.parquet/.csv file nor a "
                              f"dataset `datasets.load_dataset` can load ({type(err).__name__}): pass a local file") from None
    missing = [name for name in LAYOUT_FIELDS[layout(ds.column_names, config)](config) if name not in ds.column_names]
    if missing:
        raise ConfigError(f"--dataset {config.dataset} has no field {', '.join(missing)} (fields: "
                          f"{', '.join(ds.column_names)}): pass --text_field, --messages_field or "
                          "--prompt_field/--response_field")
    if len(ds) < 2:
        raise ConfigError(f"--dataset {config.dataset} has {len(ds)} examples: at least 2 are needed")
    return ds


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


def prompt_ids(tokenizer, text: str) -> list[int]:
    """How a prompt is framed, in training and at inference: BOS, then the text's own tokens."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    # verbose=False: texts longer than the model's maximum are truncated by the caller, not an error here.
    return bos + tokenizer.encode(text, add_special_tokens=False, verbose=False)


# Stanford Alpaca's prompt, with and without an input.
ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n")
# The fields each layout reads.
LAYOUT_FIELDS = {"messages": lambda c: [c.messages_field], "text": lambda c: [c.text_field],
                 "alpaca": lambda c: ["instruction", "output"],
                 "prompt_response": lambda c: [c.prompt_field, c.response_field]}


def layout(fields, config: TrainConfig) -> str:
    """How an example is read: as chat messages, as plain text, as Alpaca (recognised by its fields when
    there is no prompt field), or as a prompt and a response."""
    if config.messages_field:
        return "messages"
    if config.uses_text_field:
        return "text"
    if config.prompt_field not in fields and {"instruction", "output"} <= set(fields):
        return "alpaca"
    return "prompt_response"


def alpaca_prompt(example: dict) -> str:
    extra = example.get("input") or ""
    return ALPACA_PROMPT.format(context=", paired with an input that provides further context" if extra else "",
                                instruction=example["instruction"],
                                input=f"### Input:\n{extra}\n\n" if extra else "")


def chat_ids_and_labels(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """A conversation through the tokenizer's chat template, with labels on the assistant turns only (each
    turn's text and the template's end-of-turn tokens after it)."""
    def render(turns: list[dict], **kwargs) -> str:
        return tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)

    text = render(messages)
    spans = []  # character ranges of the assistant turns in the rendered conversation
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            through_turn = render(messages[:i + 1])
            if not text.startswith(through_turn):
                raise ConfigError("the chat template renders earlier turns differently once later ones follow, so "
                                  "the assistant turns cannot be located: use a template without that rewriting")
            spans.append((len(render(messages[:i], add_generation_prompt=True)), len(through_turn)))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    labels = [token if any(start <= first < end for start, end in spans) else IGNORE_INDEX
              for token, (first, _) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return encoded["input_ids"], labels


def tokenize_example(example: dict, tokenizer, config: TrainConfig) -> dict:
    """input_ids and labels; labels are -100 where no loss is taken (prompts, non-assistant turns)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    kind = layout(example.keys(), config)
    if kind == "messages":
        ids, labels = chat_ids_and_labels(tokenizer, example[config.messages_field])
    elif kind == "text":
        ids = prompt_ids(tokenizer, example[config.text_field]) + eos
        labels = list(ids)
    else:
        prompt_text, response_text = ((alpaca_prompt(example), example["output"]) if kind == "alpaca" else
                                      (example[config.prompt_field], example[config.response_field]))
        prompt = prompt_ids(tokenizer, prompt_text)
        response = tokenizer.encode(response_text, add_special_tokens=False, verbose=False) + eos
        ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
    return {"input_ids": ids[: config.seq_len], "labels": labels[: config.seq_len]}


def tokenize_dataset(raw: datasets.Dataset, tokenizer, config: TrainConfig) -> datasets.Dataset:
    if config.messages_field:
        if not tokenizer.chat_template:
            raise ConfigError(f"--messages_field needs a chat template, and {config.model}'s tokenizer has none: "
                              "use a chat model or set chat_template in its tokenizer_config.json")
        if not tokenizer.is_fast:
            raise ConfigError("--messages_field locates assistant turns by character offsets, which need a fast "
                              "(tokenizers) tokenizer")
        for row, messages in enumerate(raw[config.messages_field]):
            if not (isinstance(messages, list) and messages and all(
                    isinstance(m, dict) and {"role", "content"} <= set(m) for m in messages)):
                raise ConfigError(f"--dataset {config.dataset}: example {row}'s {config.messages_field} is not a list "
                                  "of {role, content} messages")
    tokenized = raw.map(tokenize_example, fn_kwargs={"tokenizer": tokenizer, "config": config},
                        remove_columns=raw.column_names, keep_in_memory=True, load_from_cache_file=False)
    # Caught here, before any weights load: otherwise every method would train on a loss of 0 / 0.
    if not any(label != IGNORE_INDEX for labels in tokenized["labels"] for label in labels):
        raise ConfigError(f"--dataset {config.dataset}: no example keeps a loss token within --seq_len "
                          f"{config.seq_len} (every response is cut off or missing): raise --seq_len or shorten the prompts")
    return tokenized


def question(example: dict) -> tuple[int, ...]:
    """What an example asks: its tokens before the first loss token (all of them where every token has a
    loss, as for plain text)."""
    labels = example["labels"]
    first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), 0)
    return tuple(example["input_ids"][:first or len(labels)])


def train_eval_split(tokenized: datasets.Dataset, val_size: float, seed: int):
    """datasets' seeded split, less the held-out examples that ask what a training example asks (a repeated
    prompt, or a repeated text): their loss would measure recall, not generalisation."""
    split = tokenized.train_test_split(test_size=val_size, seed=seed, shuffle=True)
    train, held_out = split["train"], split["test"]
    asked = {question(example) for example in train}
    unseen = [i for i, example in enumerate(held_out) if question(example) not in asked]
    if not unseen:
        raise ConfigError(f"every one of the {len(held_out)} held-out examples (--val_size {val_size}) repeats a "
                          "training prompt: deduplicate the dataset or raise --val_size")
    return train, held_out.select(unseen) if len(unseen) < len(held_out) else held_out


def pack(tokenized: datasets.Dataset, seq_len: int) -> datasets.Dataset:
    """The examples end to end, cut into rows of exactly seq_len tokens (the last partial row dropped).
    Each example's position ids count from 0, which is how transformers (its packed-sequence masks for
    sdpa and eager, flash-attention's variable-length path) keeps attention inside an example; an
    example's first token gets no loss, so nothing is predicted across the boundary."""
    ids, labels, positions = [], [], []
    for example in tokenized:
        ids += example["input_ids"]
        labels += [IGNORE_INDEX] + example["labels"][1:]
        positions += range(len(example["input_ids"]))
    rows = len(ids) // seq_len
    if rows == 0:
        raise ConfigError(f"--packing: the split holds {len(ids)} tokens, fewer than one row of --seq_len {seq_len}")
    cut = lambda values: [values[r * seq_len:(r + 1) * seq_len] for r in range(rows)]  # noqa: E731
    return datasets.Dataset.from_dict({"input_ids": cut(ids), "labels": cut(labels), "position_ids": cut(positions)})


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes from a batch: an attention mask, or position ids for packed rows."""
    return {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding gets attention 0 and label -100. Packed rows, all
    seq_len long, are stacked with their position ids and no attention mask."""
    if "position_ids" in examples[0]:
        return {key: torch.tensor([e[key] for e in examples]) for key in ("input_ids", "labels", "position_ids")}
    length = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.int64)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def rank_batches(dataset: datasets.Dataset, indices: list[int], rank: int, world_size: int,
                 micro_batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches over `indices` (examples rank, rank + world, ...).

    Every rank gets the same number of batches, as ZeRO-3's collectives need; a rank short of examples
    gets a copy of its first batch with no loss tokens, which adds nothing to any sum.
    """
    mine = indices[rank::world_size]
    per_rank = -(-len(indices) // world_size)
    n_batches = -(-per_rank // micro_batch_size)
    batches = [collate([dataset[i] for i in mine[b * micro_batch_size:(b + 1) * micro_batch_size]], pad_id)
               for b in range(-(-len(mine) // micro_batch_size))]
    filler_source = batches[0] if batches else collate([dataset[indices[0]]], pad_id)
    while len(batches) < n_batches:
        batches.append({**filler_source, "labels": torch.full_like(filler_source["labels"], IGNORE_INDEX)})
    return batches


def calibration_indices(n_train: int, n_examples: int, seed: int) -> list[int]:
    """The first n_examples of a seeded permutation of the training split (all of it if smaller)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=generator)[:n_examples].tolist()


def train_micro_batches(n_train: int, epoch: int, seed: int, rank: int, world_size: int,
                        micro_batch_size: int, gradient_accumulation_steps: int = 1) -> list[list[int]]:
    """Training order for one epoch: a seeded permutation cut into optimizer steps of micro_batch_size x
    world_size x gradient_accumulation_steps examples (the last partial step dropped, so no step spans two
    epochs), each step into global micro-batches of micro_batch_size x world_size; rank r takes the r-th
    slice of each. Step s thus trains on examples [s x global batch, (s + 1) x global batch) of the
    permutation, in micro-batches of consecutive examples, whatever the number of ranks: what lets a resume
    on another world size keep the data order."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epoch + 1):  # epoch e uses the (e+1)-th permutation of one seeded stream
        order = torch.randperm(n_train, generator=generator).tolist()
    global_size = micro_batch_size * world_size
    used = n_train - n_train % (global_size * gradient_accumulation_steps)
    return [order[start + rank * micro_batch_size: start + (rank + 1) * micro_batch_size]
            for start in range(0, used, global_size)]
