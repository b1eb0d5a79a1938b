"""docs/quality.md and docs/quality.png from bench/quality/quality.py's records: the base, the budget table (test
accuracy at each method's validation-chosen rate, two seeds), every sweep cell on validation, the whole
job's cost, and forgetting. The verdict at the page's end is written by hand and kept."""

from __future__ import annotations

import math
from dataclasses import replace

from bench.quality.quality import (BUDGETS, LATE, LONG_STEPS, MAIN_BUDGET, OTHER_TASK, REPO, SEEDS, START, STEPS,
                                   SWEEP_TASK, SWEEPS, Cell, base_cell, read_records, read_results, sweep)
from speft_ds.runtime.run_summary import PHASES

PAGE, FIGURE = REPO / "docs" / "quality.md", REPO / "docs" / "quality.png"
VERDICT = "<!-- verdict: written by hand, kept by bench/quality/quality.py --table -->"
METHOD_ORDER = ("speft", "channel", "cap", "random", "lora")


def _pct(value: float) -> str:
    return f"{value:.1%}"


def _with_se(accuracy: float, stderr: float) -> str:
    return f"{accuracy:.1%} ± {stderr:.1%}"


def _retention(record: dict, base: dict | None) -> str:
    """Retention loss after training, its rise over the base's, and the KL from the base."""
    after = record.get("retention_after")
    if not after:
        return "| | |"
    rise = f" (+{after['loss'] - base['retention_after']['loss']:.3f})" if base and base.get("retention_after") else ""
    kl = f"{after['kl']:.4f}" if after.get("kl") is not None else "n/a"
    return f"| {after['loss']:.3f}{rise} | {kl} |"


def _validation_columns(record: dict, base: dict | None) -> str:
    """A cell's validation accuracy, held-out loss, retention loss (rise) and KL, as table columns."""
    return (f"{_with_se(record['task_after']['accuracy'], record['task_after']['stderr'])} | "
            f"{record['eval_loss']:.4f} {_retention(record, base)}")


def sweep_table(cells: dict) -> list[str]:
    rows = ["| budget | method | trainable | lr | validation accuracy | held-out loss | retention loss (rise) | "
            "KL(base ‖ tuned) | job s |", "|---|---|---|---|---|---|---|---|---|"]
    base = cells.get(base_cell(SWEEP_TASK))
    for (method, budget) in SWEEPS:
        grid, chosen = sweep(cells, method, budget)
        for lr in grid:
            r = cells.get(Cell(method, SWEEP_TASK, budget, lr, 1))
            if r is None:
                continue
            mark = " (chosen)" if lr == chosen else ""
            if "failed" in r:
                rows.append(f"| {budget} | {method} | | {lr:g}{mark} | failed: {r['failed'][-1][:60]} | | | | |")
                continue
            rows.append(f"| {budget} | {method} | {r['trainable']:,} | {lr:g}{mark} | {_validation_columns(r, base)} "
                        f"{r['job_s']:.0f} |")
    return rows


def _mean_test(tests: list[dict]) -> str:
    if not tests:
        return ""
    mean = sum(t["accuracy"] for t in tests) / len(tests)
    se = math.sqrt(sum(t["stderr"] ** 2 for t in tests)) / len(tests)
    return _with_se(mean, se)


def budget_table(cells: dict, tests: dict) -> list[str]:
    rows = ["| budget | method | trainable | chosen lr (grid) | test seed 1 (± s.e.) | test seed 2 | mean (± s.e.) | "
            "retention loss (rise) | KL(base ‖ tuned) |", "|---|---|---|---|---|---|---|---|---|"]
    base = cells.get(base_cell(SWEEP_TASK))
    if base_cell(SWEEP_TASK) in tests:
        rows.append(f"| 0 | base | 0 | | {_pct(tests[base_cell(SWEEP_TASK)]['accuracy'])} | | | "
                    f"{base['retention_after']['loss']:.3f} | 0 |")
    for budget in BUDGETS:
        for method in METHOD_ORDER:
            if (method, budget) not in SWEEPS:
                continue
            grid, lr = sweep(cells, method, budget)
            span = f"{min(grid):g}-{max(grid):g}"
            if lr is None:
                rows.append(f"| {budget} | {method} | | not yet chosen ({span}) | | | | | |")
                continue
            seeds = [Cell(method, SWEEP_TASK, budget, lr, seed) for seed in SEEDS]
            scored = [tests[c] for c in seeds if c in tests]
            first = cells[seeds[0]]
            rows.append(f"| {budget} | {method} | {first.get('trainable', 0):,} | {lr:g} ({span}) | "
                        + " | ".join(_with_se(tests[c]["accuracy"], tests[c]["stderr"]) if c in tests else ""
                                     for c in seeds)
                        + f" | {_mean_test(scored) if len(scored) == len(SEEDS) else ''} {_retention(first, base)}")
    return rows


def other_task_table(cells: dict, tests: dict) -> list[str]:
    """Every cell on the other task: at the rate chosen on the sweep task (tested), and at a method's default
    rate where that differs (validation only: a default moves only where both tasks' validation favour it)."""
    rows = ["| method | lr | validation accuracy | test accuracy |", "|---|---|---|---|"]
    if base_cell(OTHER_TASK) in tests:
        base = tests[base_cell(OTHER_TASK)]
        rows.append(f"| base | | | {_with_se(base['accuracy'], base['stderr'])} |")
    on_other = (c for c in cells if c.task == OTHER_TASK and c.method != "base")
    for cell in sorted(on_other, key=lambda c: (c.method, c.lr)):
        record, test = cells[cell], tests.get(cell)
        validation = "failed" if "failed" in record else _with_se(record["task_after"]["accuracy"],
                                                                   record["task_after"]["stderr"])
        rows.append(f"| {cell.method} | {cell.lr:g} | {validation} | "
                    f"{_with_se(test['accuracy'], test['stderr']) if test else ''} |")
    return rows


def break_even(fixed: float, step: float, lora_fixed: float, lora_step: float) -> str:
    """The step count where a job of `fixed` seconds plus `step` per step takes as long as LoRA's, and on
    which side of it the job is the shorter."""
    if (fixed - lora_fixed) * (step - lora_step) >= 0:
        return "never: " + ("LoRA's is shorter" if fixed + step > lora_fixed + lora_step else "its job is shorter")
    even = (fixed - lora_fixed) / (lora_step - step)
    return f"{even:.0f} (its job is shorter {'beyond' if step < lora_step else 'below'})"


def cost_table(cells: dict) -> list[str]:
    """The main budget's chosen seed-1 cells, phase by phase, and the step count where each method's whole
    job takes as long as LoRA's."""
    chosen = {m: cells.get(Cell(m, SWEEP_TASK, MAIN_BUDGET, lr, 1)) for m, b in SWEEPS
              if b == MAIN_BUDGET and (lr := sweep(cells, m, b)[1]) is not None}
    chosen = {m: r for m, r in chosen.items() if r and "phase_s" in r}
    names = [name for name, _ in PHASES]
    rows = ["| method | " + " | ".join(f"{n} s" for n in names) + " | whole job s | s per step | "
            "peak RSS per rank (MiB) | steps where its job equals LoRA's |", "|---|" + "---|" * (len(names) + 4)]
    lora = chosen.get("lora")

    def fixed_and_step(r: dict) -> tuple[float, float]:
        return r["wall_s"] - r["phase_s"]["training"], r["phase_s"]["training"] / r["steps"]

    for method, r in chosen.items():
        fixed, step = fixed_and_step(r)
        even = ""
        if lora and method != "lora":
            even = break_even(fixed, step, *fixed_and_step(lora))
        rows.append(f"| {method} | " + " | ".join(f"{r['phase_s'][n]:.0f}" for n in names)
                    + f" | {r['wall_s']:.0f} | {step:.2f} | "
                    + ", ".join(f"{p:,.0f}" for p in r["job_peak_rss_mib_per_rank"]) + f" | {even} |")
    return rows


def long_table(cells: dict, tests: dict) -> list[str]:
    """Each long cell beside its method's short cell at the same rate and seed: does a gap change with length?"""
    rows = ["| method | lr | steps | validation accuracy | held-out loss | retention loss (rise) | "
            "KL(base ‖ tuned) | test accuracy |", "|---|---|---|---|---|---|---|---|"]
    base = cells.get(base_cell(SWEEP_TASK))
    for long in (c for c in cells if c.steps == LONG_STEPS):
        for cell in (replace(long, steps=STEPS), long):
            record, test = cells.get(cell), tests.get(cell)
            if record is None or "failed" in record:
                continue
            rows.append(f"| {cell.method} | {cell.lr:g} | {cell.steps} | {_validation_columns(record, base)} "
                        f"{_with_se(test['accuracy'], test['stderr']) if test else ''} |")
    return rows


def channel_table() -> list[str]:
    """bench/quality/quality_channels.py's records: the share of k on each layer's loudest input channels."""
    from bench.quality.quality_channels import CHANNELS

    return ["| budget | method | lr | seed | k on the top 1% of input channels | on the top 10% |",
            "|---|---|---|---|---|---|"] + [
        f"| {r['budget']} | {r['method']} | {r['lr']:g} | {r['seed']} | {_pct(r['top_1%'])} | {_pct(r['top_10%'])} |"
        for r in read_records(CHANNELS)]


def ablation_table() -> list[str]:
    """bench/quality/quality_channels.py --ablate's records: an adapter without its loud-channel entries."""
    from bench.quality.quality_channels import ABLATION

    return ["| cell | adapter | entries dropped | validation accuracy | retention loss | KL(base ‖ tuned) |",
            "|---|---|---|---|---|---|"] + [
        f"| {r['tag']} | {r['variant']} | {r['dropped']:,} of {r['k']:,} | {_with_se(r['accuracy'], r['stderr'])} | "
        f"{r['retention_loss']:.3f} | {r['kl']:.4f} |" for r in read_records(ABLATION)]


def plot(cells: dict, tests: dict) -> None:
    """Left: test accuracy (mean of the seeds scored so far) against trainable count per method. Right:
    every sweep cell's validation accuracy against its retention loss rise, one marker per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = cells.get(base_cell(SWEEP_TASK))
    if not base or "retention_after" not in base:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.5, 4.2))
    markers = dict(zip((b for b in BUDGETS if b != "0%"), "v^so"))
    for color, method in zip(("C0", "C1", "C4", "C2", "C3"), METHOD_ORDER):
        points = []
        for budget in BUDGETS:
            lr = sweep(cells, method, budget)[1] if (method, budget) in SWEEPS else None
            scored = [tests[c] for c in (Cell(method, SWEEP_TASK, budget, lr, s) for s in SEEDS) if c in tests]
            if lr is not None and scored:
                points.append((cells[Cell(method, SWEEP_TASK, budget, lr, 1)]["trainable"],
                               sum(t["accuracy"] for t in scored) / len(scored)))
        if points:
            left.plot(*zip(*sorted(points)), marker="o", color=color, label=method)
        for budget, marker in markers.items():
            swept = [r for c, r in cells.items() if c.method == method and c.task == SWEEP_TASK
                     and c.budget == budget and c.steps == STEPS and "retention_after" in r]
            if swept:
                right.scatter([r["retention_after"]["loss"] - base["retention_after"]["loss"] for r in swept],
                              [r["task_after"]["accuracy"] for r in swept], color=color, marker=marker,
                              label=f"{method} {budget}")
    left.set(xscale="log", xlabel="trainable parameters",
             ylabel=f"test accuracy ({SWEEP_TASK}, mean of the seeds scored)")
    right.set_xscale("symlog", linthresh=0.1)  # the rises span 0.01 (random masks) to 10 (a collapse)
    right.set(xlabel="rise of the loss on the general text (GPL-3)", ylabel=f"validation accuracy ({SWEEP_TASK})",
              title="learning against forgetting, every rate and budget")
    for axes in (left, right):
        axes.grid(alpha=0.3)
    if left.get_legend_handles_labels()[0]:
        left.legend()
    if right.get_legend_handles_labels()[0]:  # beside the axes: inside it hides the cells
        right.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=110)


def write_page(remaining: int) -> None:
    """The page from the records; read here, with this module's Cell (bench/quality/quality.py runs as __main__,
    whose Cell is another class)."""
    import bench.quality.quality as quality

    cells, tests = read_results()
    about, commands, protocol, retention = quality.__doc__.split("\n\n")[:4]
    _, marker, kept = PAGE.read_text().partition(VERDICT) if PAGE.is_file() else ("", "", "")
    sweep_cells, at_main = sum(len(grid) for grid in START.values()), sum(b == MAIN_BUDGET for _, b in START)
    late_cells = sum(len(grid) for grid in LATE.values())
    planned_total = 2 + sweep_cells + len(START) + 2 * at_main + len(quality.default_checks(cells)) + late_cells
    status = (f"Cells run: {len(cells)}; test scorings: {len(tests)}; planned jobs not yet run: {remaining} "
              "(`python bench/quality/quality.py --run_next N`; a cell takes 5 to 15 minutes on 2 CPU cores). "
              "The plan, "
              "budget by budget: " + "; ".join(f"{b}: " + ", ".join(m for m, at in START if at == b)
                                               for b in dict.fromkeys(b for _, b in START))
              + "; each budget's sweeps end with the test scoring of seed 1 at each chosen rate, so the curve "
              "over budgets fills first. Then the second seeds and the other task at the chosen rates (and at "
              "a method's default rate where the chosen one differs, validation only), then "
              f"one {LONG_STEPS}-step cell per method at {MAIN_BUDGET}. In all at least {planned_total} "
              f"cells, more where a grid extends: 2 base, at least {sweep_cells} in the sweeps, {len(START)} "
              f"second seeds, {at_main} on {OTHER_TASK}, {at_main} long ones, at least {late_cells} in the late "
              "sweeps ("
              + ", ".join(f"{m} at {b}" for m, b in LATE) + ": seed 1 only, run last); each reported cell then "
              "scores the test once.")
    plot(cells, tests)
    sections = ["# Quality on a pretrained model", about, commands, protocol, retention, status,
                "## Test accuracy by budget", "\n".join(budget_table(cells, tests)),
                f"![accuracy by budget, and learning against forgetting]({FIGURE.name})",
                f"## The other task ({OTHER_TASK}) at {MAIN_BUDGET}", "\n".join(other_task_table(cells, tests)),
                f"## The whole job's cost at {MAIN_BUDGET}", "\n".join(cost_table(cells)),
                "## Every sweep cell (validation)", "\n".join(sweep_table(cells)),
                "## Where the mask sits: input channels by activation norm on the general text",
                "(`python bench/quality/quality_channels.py`; an even spread puts 1% and 10% there.)",
                "\n".join(channel_table()),
                "Do the entries on the loud channels cause the forgetting? One adapter scored whole, without its "
                "entries on each layer's top 1% of input channels, and without as many entries drawn at random "
                "(`python bench/quality/quality_channels.py --ablate TAG`; one process, validation task):",
                "\n".join(ablation_table()),
                f"## Long cells ({LONG_STEPS} steps)", "\n".join(long_table(cells, tests)),
                VERDICT + (kept if marker else "")]
    PAGE.write_text("\n\n".join(section.strip("\n") for section in sections) + "\n")
