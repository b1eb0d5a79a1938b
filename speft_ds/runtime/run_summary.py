"""The block a finished run prints on rank 0, read back from its metrics.jsonl records."""

from __future__ import annotations

from pathlib import Path

# (name shown, metrics.jsonl event carrying its wall_time_s); mask updates repeat salience and selection.
PHASES = (("load", "load"), ("salience", "salience"), ("selection", "selection"), ("training", "training"),
          ("eval", "evaluation"), ("save", "adapter"))
MIB_PER_GIB = 1024.0  # the memory records are in MiB


def task_line(scores: list[dict]) -> str:
    """The task accuracy before training (where the run scored it), during, and after."""
    steps = " -> ".join(f"{r['accuracy']:.1%} ± {r['stderr']:.1%} "
                        + (f"at step {r['step']}" if r["when"] == "during" else r["when"]) for r in scores)
    return f"task {scores[-1]['task']} ({scores[-1]['examples']} held-out examples): {steps}"


def retention_line(scores: list[dict]) -> str:
    """--retention_text's loss at each scoring, and the last KL from the base where the method had one."""
    losses = " -> ".join(f"{r['loss']:.4f} " + (f"at step {r['step']}" if r["when"] == "during" else r["when"])
                         for r in scores)
    kl = f"; KL(base || tuned) {scores[-1]['kl']:.4f}" if scores[-1]["kl"] is not None else ""
    return f"retention    loss {losses} ({scores[-1]['tokens']:,} tokens){kl}"


def summary(records: list[dict], method: str, targeted: int, adapter_dir: Path) -> str:
    def events(name: str) -> list[dict]:
        return [r for r in records if r.get("event") == name]

    trainable = [r.get("k", r.get("trainable")) for r in records if r.get("event") in ("delta", "trainable")][-1]
    times = " | ".join(f"{name} {sum(r['wall_time_s'] for r in events(event)):.1f} s"
                       for name, event in PHASES if events(event))
    memory = events("memory")
    peaks = [max(per_rank) for per_rank in zip(*(r["peak_rss_mib_per_rank"] for r in memory))]
    lines = ["---- run summary ----",
             f"method       {method}: {trainable:,} trainable, {trainable / targeted:.2%} of the {targeted:,} "
             "targeted weights",
             f"time         {times}",
             f"peak memory  {', '.join(f'{p / MIB_PER_GIB:.2f}' for p in peaks)} GiB resident per rank"]
    device = [r["device_peak_mib_per_rank"] for r in memory if "device_peak_mib_per_rank" in r]
    if device:
        lines[-1] += f"; {', '.join(f'{max(p) / MIB_PER_GIB:.2f}' for p in zip(*device))} GiB on the accelerator"
    if events("eval"):
        final = events("eval")[-1]
        lines.append(f"eval loss    {final['eval_loss']:.4f} ({final['examples']} held-out examples)")
    if events("task_eval"):
        lines.append(task_line(events("task_eval")))
    if events("retention"):
        lines.append(retention_line(events("retention")))
    lines.append(f"adapter      {adapter_dir}")
    return "\n".join(lines)
