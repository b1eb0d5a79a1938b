r"""Answer a prompt with a base model and an adapter (SPEFT or LoRA) merged into it in memory (HF generate, greedy by
default; --unmerged keeps the adapter's layers apart, several times slower).

    speft-generate --model BASE_DIR --adapter OUTPUT_DIR/adapter --prompt $'Question: ...\nAnswer:'
    speft-generate --model BASE_DIR --adapter OUTPUT_DIR/adapter --prompt_file prompt.txt

In bash a newline inside "..." stays the two characters \ and n: write the prompt as $'...' or in a file.
"""

from pathlib import Path

from speft_ds.cli import adapter_tool_parser
from speft_ds.config import ConfigError
from speft_ds.models.gguf import resolve_model


def main(argv) -> int:
    parser = adapter_tool_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompt", help="The prompt, as the training data's prompt field reads ($'...' in bash for "
                                         "newlines).")
    parser.add_argument("--prompt_file", help="A file holding the prompt (its text, newlines included, as it is).")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    parser.add_argument("--unmerged", action="store_true", help="Keep the adapter's layers apart instead of merging "
                                                                "it into the weights in memory (slower).")
    args = parser.parse_args(argv)
    prompt = _prompt(args)
    model_dir = resolve_model(args.model)
    if not Path(model_dir, "config.json").is_file():
        raise ConfigError(f"--model {args.model} is not a model directory (no config.json) or a .gguf file")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speft_ds import load_adapter, merge_adapter
    from speft_ds.data.batches import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype="auto",
                                                 trust_remote_code=args.trust_remote_code)
    model = (load_adapter if args.unmerged else merge_adapter)(model, args.adapter).eval()
    input_ids = torch.tensor([prompt_ids(tokenizer, prompt)])  # framed as training frames prompts
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=args.do_sample,
                                max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))
    return 0


def _prompt(args) -> str:
    """--prompt or --prompt_file's text; a literal backslash-n (bash's "...\\n") is named, not sent in silence."""
    if (args.prompt is None) == (args.prompt_file is None):
        raise ConfigError("pass the prompt as --prompt TEXT or --prompt_file FILE (one of them)")
    if args.prompt_file is not None:
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--prompt_file {args.prompt_file} is not a readable UTF-8 file ({err})") from None
    if "\\n" in args.prompt and "\n" not in args.prompt:
        raise ConfigError("--prompt holds a literal \\n, not a newline (bash keeps \\n as two characters inside "
                          "\"...\"): write it as $'...' or pass --prompt_file")
    return args.prompt
