"""Chat data: conversations as OpenAI ({role, content}) or ShareGPT ({from, value}) messages, rendered with the
tokenizer's chat template or a named one (--chat_template), the loss on the assistant turns only.

The named templates are plain text around the tokenizer's own tokens: none adds a token to the vocabulary (a
new token's embedding would be untrained). A template whose marker strings the tokenizer does not have as
single tokens is refused.
"""

from __future__ import annotations

from ..config import ConfigError
from .losses import IGNORE_INDEX

# name -> (Jinja chat template, the marker strings it needs as single tokens of the vocabulary)
TEMPLATES = {
    "chatml": ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", ("<|im_start|>", "<|im_end|>")),
    "llama3": ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}",
               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    "alpaca": ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
               "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
               "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}### Response:\n{% endif %}", ()),
    "vicuna": ("{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }} "
               "{% elif m['role'] == 'user' %}USER: {{ m['content'] }} "
               "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
               "{% if add_generation_prompt %}ASSISTANT:{% endif %}", ()),
}
# ShareGPT's speakers as OpenAI's roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


def use_template(tokenizer, name: str | None, model: str) -> None:
    """Give the tokenizer the named template (checked against its vocabulary), or check it has its own."""
    if name is None:
        if not tokenizer.chat_template:
            raise ConfigError(f"--messages_field needs a chat template, and {model}'s tokenizer has none: pass "
                              f"--chat_template ({', '.join(TEMPLATES)})")
        return
    template, markers = TEMPLATES[name]
    missing = [m for m in markers if len(tokenizer.encode(m, add_special_tokens=False)) != 1]
    if missing:
        raise ConfigError(f"--chat_template {name} needs {', '.join(missing)} as tokens, which {model}'s tokenizer "
                          "lacks (adding them would leave their embeddings untrained): pick another template "
                          f"({', '.join(n for n, (_, m) in TEMPLATES.items() if not m)} need none)")
    tokenizer.chat_template = template


def as_messages(conversation, where: str) -> list[dict]:
    """A conversation as {role, content} messages, from OpenAI's or ShareGPT's form."""
    if not isinstance(conversation, list) or not conversation:
        raise ConfigError(f"{where} is not a list of messages")
    messages = []
    for m in conversation:
        if isinstance(m, dict) and {"role", "content"} <= set(m):
            messages.append({"role": m["role"], "content": m["content"]})
        elif isinstance(m, dict) and {"from", "value"} <= set(m) and m["from"] in SHAREGPT_ROLES:
            messages.append({"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]})
        else:
            raise ConfigError(f"{where} has a message that is neither {{role, content}} nor ShareGPT's {{from, value}} "
                              f"(from: {', '.join(SHAREGPT_ROLES)}): {str(m)[:80]}")
    return messages


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
