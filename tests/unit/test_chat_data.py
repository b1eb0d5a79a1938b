"""Chat conversations (--messages_field) through the tokenizer's chat template with the loss on assistant turns
only, and Alpaca's layout recognised by its fields: loss masks checked token by token against text laid out
here by hand."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from speft_ds.config import EMBEDDED_MODEL, ConfigError, TrainConfig
from speft_ds.data.batches import tokenize_dataset, tokenize_example
from speft_ds.data.sources import load_raw_dataset

IGNORE = -100
# ChatML, as SmolLM2 and Qwen write it (no default system turn, so the layout below is the whole text).
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATION = [{"role": "system", "content": "You add numbers."},
                {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "2 + 3 = 5."},
                {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "4 + 4 = 8."}]


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    # As in a chat model's tokenizer: the markers are single tokens, so no token straddles two turns.
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def _hand_layout(conversation: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's ChatML text and the character ranges the loss covers (each assistant turn's
    content and the end-of-turn marker after it)."""
    text, spans = "", []
    for m in conversation:
        text += f"<|im_start|>{m['role']}\n"
        trained = f"{m['content']}<|im_end|>\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(trained)))
        text += trained
    return text, spans


def test_the_loss_covers_the_assistant_turns_token_by_token(tokenizer):
    config = TrainConfig(messages_field="messages", seq_len=4096)
    out = tokenize_example({"messages": CONVERSATION}, tokenizer, config)
    text, spans = _hand_layout(CONVERSATION)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert out["input_ids"] == encoded["input_ids"]
    expected = [token if any(a <= first < b for a, b in spans) else IGNORE
                for token, (first, _) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    assert out["labels"] == expected
    # Both assistant turns are trained, and nothing of the system or user turns is.
    trained = "".join(text[first:last] for token, (first, last) in zip(out["labels"], encoded["offset_mapping"])
                      if token != IGNORE)
    assert trained.replace(" ", "") == "2+3=5.<|im_end|>\n4+4=8.<|im_end|>\n"
    assert 0 < sum(t != IGNORE for t in out["labels"]) < len(out["labels"])


def test_a_dataset_of_conversations_needs_a_chat_template_and_well_formed_messages(tmp_path, tokenizer):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(4)))
    config = TrainConfig(model=str(EMBEDDED_MODEL), dataset=str(path), messages_field="messages", seq_len=4096)
    tokenized = tokenize_dataset(load_raw_dataset(config), tokenizer, config)
    assert len(tokenized) == 4 and tokenized[0] == tokenize_example({"messages": CONVERSATION}, tokenizer, config)

    plain = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)  # the tiny model's own tokenizer has no chat template
    with pytest.raises(ConfigError, match="needs a chat template.*pass --chat_template"):
        tokenize_dataset(load_raw_dataset(config), plain, config)
    path.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n" + json.dumps({"messages": CONVERSATION}) + "\n")
    with pytest.raises(ConfigError, match="example 0's messages has a message that is neither {role, content} nor "
                                          "ShareGPT's {from, value}"):
        tokenize_dataset(load_raw_dataset(config), tokenizer, config)
    with pytest.raises(ConfigError, match="pass one"):
        TrainConfig(model=str(EMBEDDED_MODEL), messages_field="messages", text_field="text").check()


@pytest.mark.parametrize("given_input, prompt", [
    ("", "Below is an instruction that describes a task. Write a response that appropriately completes the "
         "request.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n"),
    ("2 and 3", "Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the "
                "numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"),
])
def test_alpaca_fields_are_recognised_and_only_the_output_is_trained(tmp_path, tokenizer, given_input, prompt):
    path = tmp_path / "alpaca.jsonl"
    row = {"instruction": "Add the numbers.", "input": given_input, "output": "5"}
    path.write_text((json.dumps(row) + "\n") * 2)
    config = TrainConfig(model=str(EMBEDDED_MODEL), dataset=str(path), seq_len=4096)
    out = tokenize_dataset(load_raw_dataset(config), tokenizer, config)[0]
    prompt_ids = [tokenizer.bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False)
    response_ids = tokenizer.encode("5", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert out["input_ids"] == prompt_ids + response_ids
    assert out["labels"] == [IGNORE] * len(prompt_ids) + response_ids


SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def test_sharegpt_messages_train_as_their_openai_twins(tokenizer):
    config = TrainConfig(messages_field="conversations", seq_len=4096)
    sharegpt = [{"from": SHAREGPT[m["role"]], "value": m["content"]} for m in CONVERSATION]
    openai = tokenize_example({"conversations": CONVERSATION}, tokenizer, config)
    assert tokenize_example({"conversations": sharegpt}, tokenizer, config) == openai


def test_a_named_template_needs_no_new_tokens_and_one_that_would_is_refused(tmp_path):
    plain = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)  # no chat template, no ChatML markers
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(3)))
    config = TrainConfig(model=str(EMBEDDED_MODEL), dataset=str(path), messages_field="messages", seq_len=4096,
                         chat_template="alpaca")
    out = tokenize_dataset(load_raw_dataset(config), plain, config)[0]
    eos = plain.eos_token
    turns = ["You add numbers.\n\n", "### Instruction:\nWhat is 2 + 3?\n\n", f"### Response:\n2 + 3 = 5.{eos}\n\n",
             "### Instruction:\nAnd 4 + 4?\n\n", f"### Response:\n4 + 4 = 8.{eos}\n\n"]
    text = "".join(turns)
    spans = [(len("".join(turns[:i])) + len("### Response:\n"), len("".join(turns[:i + 1]))) for i in (2, 4)]
    encoded = plain(text, add_special_tokens=False, return_offsets_mapping=True)
    assert out["input_ids"] == encoded["input_ids"]
    assert out["labels"] == [token if any(a <= first < b for a, b in spans) else IGNORE
                             for token, (first, _) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    chatml = TrainConfig(model=str(EMBEDDED_MODEL), dataset=str(path), messages_field="messages", chat_template="chatml")
    with pytest.raises(ConfigError, match=r"--chat_template chatml needs <\|im_start\|>, <\|im_end\|> as tokens"):
        tokenize_dataset(load_raw_dataset(chatml), AutoTokenizer.from_pretrained(EMBEDDED_MODEL), chatml)
