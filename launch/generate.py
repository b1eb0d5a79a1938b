"""Answer a prompt with a base model and an adapter (SPEFT or LoRA), unmerged (HF generate, greedy by default).

    python launch/generate.py --model BASE_DIR --adapter OUTPUT_DIR/adapter --prompt "Question: ...\nAnswer:"
"""

import os
import sys

# launch/inspect.py shares its name with the standard library's `inspect` (which torch imports): keep this
# folder off the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from speft_ds.cli import adapter_tool_parser, run_main  # noqa: E402
from speft_ds.config import ConfigError  # noqa: E402
from speft_ds.gguf_models import resolve_model  # noqa: E402


def main(argv) -> int:
    parser = adapter_tool_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompt", required=True, help="The prompt, as the training data's prompt field reads.")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="Sample instead of greedy decoding.")
    args = parser.parse_args(argv)
    model_dir = resolve_model(args.model)
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ConfigError(f"--model {args.model} is not a model directory (no config.json) or a .gguf file")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speft_ds import load_adapter
    from speft_ds.data import prompt_ids

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


if __name__ == "__main__":
    sys.exit(run_main(main))
