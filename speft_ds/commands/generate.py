"""Answer a prompt with a base model and an adapter (SPEFT or LoRA), unmerged (HF generate, greedy by default).

    speft-generate --model BASE_DIR --adapter OUTPUT_DIR/adapter --prompt "Question: ...\nAnswer:"
"""

from pathlib import Path

from speft_ds.cli import adapter_tool_parser
from speft_ds.config import ConfigError
from speft_ds.models.gguf import resolve_model


def main(argv) -> int:
    parser = adapter_tool_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompt", required=True, help="The prompt, as the training data's prompt field reads.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    args = parser.parse_args(argv)
    model_dir = resolve_model(args.model)
    if not Path(model_dir, "config.json").is_file():
        raise ConfigError(f"--model {args.model} is not a model directory (no config.json) or a .gguf file")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speft_ds import load_adapter
    from speft_ds.data.batches import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=args.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype="auto",
                                                 trust_remote_code=args.trust_remote_code)
    model = load_adapter(model, args.adapter).eval()
    input_ids = torch.tensor([prompt_ids(tokenizer, args.prompt)])  # framed as training frames prompts
    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=args.do_sample,
                                max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True))
    return 0
