"""Task accuracy of a model, with or without a speft-ds adapter (unmerged), or of a merged directory.

    python launch/evaluate.py --model BASE_DIR_OR.gguf [--adapter OUTPUT_DIR/adapter] --task TASK.jsonl [--output r.json]
    deepspeed --num_gpus 2 launch/evaluate.py ...   # ZeRO-3: each rank holds its partition, examples split

Prints accuracy with its standard error (and, for multiple choice, the length-normalised accuracy).
"""

import os
import sys

# launch/inspect.py shares its name with the standard library's `inspect` (which torch imports): keep this
# folder off the import path.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

from speft_ds.cli import run_main  # noqa: E402
from speft_ds.evaluation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
