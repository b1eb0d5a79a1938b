"""Fold a sparse-delta adapter into its base model and write a standard HF model directory.

    speft-merge --model BASE_DIR --adapter OUTPUT_DIR/adapter --out MERGED_DIR [--max_shard_size 5GB]

The base is streamed layer by layer from its safetensors shards, so models bigger than memory merge; a
bitsandbytes-quantized base is dequantized and written in bf16.
"""

from pathlib import Path

from speft_ds.cli import adapter_tool_parser
from speft_ds.config import ConfigError
from speft_ds.models.gguf import resolve_model


def _size(text: str) -> int:
    from transformers.utils.hub import convert_file_size_to_int

    try:
        return convert_file_size_to_int(text)
    except ValueError:
        raise ConfigError(f"--max_shard_size {text}: give a size like 5GB or 500MB") from None


def main(argv) -> int:
    parser = adapter_tool_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="New directory for the merged model (must not exist).")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="Largest safetensors shard to write, as in save_pretrained (default 5GB).")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                        help="dtype of the written weights; auto keeps the base's (bf16 for a quantized base).")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out {out} already exists: choose a new directory")
    max_shard_bytes = _size(args.max_shard_size)
    model = resolve_model(args.model)
    if not Path(model, "config.json").is_file():
        raise ConfigError(f"--model {args.model} is not a model directory (no config.json) or a .gguf file")

    import torch

    from speft_ds.commands.merging import merge_checkpoint

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    files = merge_checkpoint(model, args.adapter, out, max_shard_bytes, dtype=dtype,
                             trust_remote_code=args.trust_remote_code)
    print(f"merged model written to {out} ({len(files)} shard{'s' if len(files) > 1 else ''})")
    return 0
