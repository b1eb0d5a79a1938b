"""Examples as token ids: tokenisation of each layout, the held-out split, packing, the calibration subset and
per-rank batches (sources.py reads the datasets)."""

from __future__ import annotations

import datasets
import torch

from ..config import ConfigError, TrainConfig
from .chat import as_messages, chat_ids_and_labels, use_template
from .losses import IGNORE_INDEX


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


def tokenize_example(example: dict, tokenizer, config: TrainConfig) -> dict:
    """input_ids and labels; labels are -100 where no loss is taken (prompts, non-assistant turns)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    kind = layout(example.keys(), config)
    if kind == "messages":
        ids, labels = chat_ids_and_labels(tokenizer, as_messages(example[config.messages_field],
                                                                 f"example's {config.messages_field}"))
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


def tokenize_dataset(raw: datasets.Dataset, tokenizer, config: TrainConfig, source: str | None = None
                     ) -> datasets.Dataset:
    """Every example of `raw` (read from `source`, --dataset by default) as input_ids and labels."""
    source = source or config.dataset
    if config.messages_field:
        use_template(tokenizer, config.chat_template, config.model)
        if not tokenizer.is_fast:
            raise ConfigError("--messages_field locates assistant turns by character offsets, which need a fast "
                              "(tokenizers) tokenizer")
        for row, messages in enumerate(raw[config.messages_field]):
            as_messages(messages, f"--dataset {source}: example {row}'s {config.messages_field}")
    tokenized = raw.map(tokenize_example, fn_kwargs={"tokenizer": tokenizer, "config": config},
                        remove_columns=raw.column_names, keep_in_memory=True, load_from_cache_file=False)
    # Caught here, before any weights load: otherwise every method would train on a loss of 0 / 0.
    if not any(label != IGNORE_INDEX for labels in tokenized["labels"] for label in labels):
        raise ConfigError(f"--dataset {source}: no example keeps a loss token within --seq_len "
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
    return split["train"], unasked(split["test"], split["train"], f"--val_size {val_size}")


def unasked(held_out: datasets.Dataset, train: datasets.Dataset, carve: str) -> datasets.Dataset:
    """The held-out examples that ask nothing a training example asks (`carve`: how they were held out)."""
    asked = {question(example) for example in train}
    unseen = [i for i, example in enumerate(held_out) if question(example) not in asked]
    if not unseen:
        raise ConfigError(f"every one of the {len(held_out)} held-out examples ({carve}) repeats a training prompt: "
                          "deduplicate the dataset or raise --val_size")
    return held_out.select(unseen) if len(unseen) < len(held_out) else held_out


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
