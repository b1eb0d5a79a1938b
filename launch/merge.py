"""Fold a sparse-delta adapter into its base model and write a standard HF model directory.

    python launch/merge.py --model BASE_DIR --adapter OUTPUT_DIR/adapter --out MERGED_DIR
"""

import os
import sys

# launch/inspect.py shares its name with the standard library's `inspect` (which torch imports): keep this
# folder off the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import shutil
from pathlib import Path

from speft_ds.cli import adapter_tool_parser, run_main
from speft_ds.config import ConfigError


def main(argv) -> int:
    parser = adapter_tool_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="New directory for the merged model (must not exist).")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"--out {out} already exists: choose a new directory")
    if not Path(args.model, "config.json").is_file():
        raise ConfigError(f"--model {args.model} is not a model directory (no config.json)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from speft_ds import merge_adapter

    model = AutoModelForCausalLM.from_pretrained(args.model, use_safetensors=True, dtype="auto",
                                                 trust_remote_code=args.trust_remote_code)
    merge_adapter(model, args.adapter)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code).save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
