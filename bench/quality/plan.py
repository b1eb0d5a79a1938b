"""The quality benchmark's plan: the methods and budgets, each sweep's grid and how it is extended and chosen,
the screening's rule, and the jobs of the third protocol in the order they run (docs/quality.md states the
protocol; records.py reads the results this plan decides from).

A sweep trains one method at one budget over a grid of one knob (the learning rate, or for `decay` the weight
decay at a fixed rate), seed 1, on the arithmetic task's validation split, and chooses the best validation
accuracy (ties: the lower held-out loss) once it is interior: a best at an edge extends the grid by the next
value on LADDER.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.quality.records import STEPS, Cell, base_cell

WORLD_SIZE, MICRO_BATCH, SEQ_LEN, CALIBRATION = 2, 8, 96, 128
LONG_STEPS, SAVE_STEPS = 1000, 50
LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0, 100.0)  # half decades
# Two shipped general English texts (Debian's base-files): the GNU GPL v3 scores forgetting, the Apache
# License 2.0 is the general text a forgetting-aware score may look at. Never the same one.
RETENTION = Path("/usr/share/common-licenses/GPL-3")
FISHER_TEXT = Path("/usr/share/common-licenses/Apache-2.0")

# method -> (bench/common/compare_worker.py's method, extra training flags)
METHODS = {"base": ("base", []), "speft": ("speft", []), "random": ("speft", ["--metric", "random"]),
           "lora": ("lora", []),
           # the second protocol's forgetting remedies
           "channel": ("speft", ["--metric", "gradient_over_input"]), "cap": ("speft", ["--input_channel_cap", "2"]),
           # the third protocol's candidates (docs/quality.md says why each)
           "snr": ("speft", ["--metric", "gradient_snr"]),
           "fisher": ("speft", ["--metric", "gradient_over_fisher", "--fisher_text", str(FISHER_TEXT)]),
           "mixed": ("speft", ["--random_fraction", "0.5"]),
           "local": ("speft", ["--selection", "local"]),
           "scaled": ("speft", ["--delta_scaling", "input_channel"]),
           "decay": ("speft", []),  # the weight decay is the cell's own knob
           # screened only if none of CANDIDATES clears the bars (docs/quality.md): LoRA r = 1 on every targeted
           # linear plus sparse deltas for the rest of the budget, so only where the budget holds LoRA r >= 2
           "rosa": ("rosa", [])}
CANDIDATES = ("snr", "fisher", "mixed", "local", "scaled", "decay")
HYBRID, HYBRID_LORA_R = "rosa", 1
DECAY_LR = 3e-3  # `decay` sweeps the weight decay at SPEFT's rate chosen at every budget


@dataclass(frozen=True)
class Budget:
    """A trainable count: LoRA's at rank `lora_r` on every targeted linear (SPEFT and the masks then train
    exactly as many entries), or, below LoRA's floor, a fraction `density` of the targeted weights, which LoRA
    reaches only at r = 1 on fewer modules (`lora_targets`, its --target_modules)."""
    lora_r: int | None = None
    density: float | None = None
    lora_targets: str | None = None


# r = 1 on v_proj (576 -> 192) of every other layer up to 26: 14 x 768 = 10,752, 1.3% over 0.01% of the
# targeted weights (10,617)
V_PROJ_EVERY_OTHER = r"model\.layers\.(" + "|".join(str(i) for i in range(0, 28, 2)) + r")\.self_attn\.v_proj"
BUDGETS = {"0%": Budget(), "0.01%": Budget(lora_r=1, density=1e-4, lora_targets=V_PROJ_EVERY_OTHER),
           "0.29%": Budget(lora_r=1), "0.86%": Budget(lora_r=3), "1%": Budget(density=1e-2)}
MAIN_BUDGET, SWEEP_TASK, OTHER_TASKS, SEEDS = "0.86%", "arith", ("choose", "cities"), (1, 2)
CONFIRM_BUDGETS = ("0.86%", "0.29%", "0.01%")
LOW_BUDGET = "0.01%"  # where the screening's best two are swept too

# The second protocol's first grids (docs/quality_v2.md); their chosen rates serve the third protocol.
START = {("speft", "0.86%"): (3e-4, 1e-3, 3e-3), ("random", "0.86%"): (1e-3, 3e-3, 1e-2),
         ("lora", "0.86%"): (1e-3, 3e-3, 1e-2), ("channel", "0.86%"): (3e-4, 1e-3, 3e-3),
         ("speft", "0.01%"): (3e-3, 1e-2, 3e-2), ("random", "0.01%"): (1e-2, 3e-2, 1e-1),
         ("speft", "0.29%"): (1e-3, 3e-3, 1e-2), ("random", "0.29%"): (3e-3, 1e-2, 3e-2),
         ("lora", "0.29%"): (1e-3, 3e-3, 1e-2), ("lora", "0.01%"): (3e-3, 1e-2, 3e-2),
         ("cap", "0.86%"): (1e-3, 3e-3, 1e-2)}
# The screening's first grids at the main budget: around SPEFT's 3e-3, a step up for the spread masks (the
# random mask chose 1e-2); `decay`'s are weight decays.
SCREEN = {("snr", "0.86%"): (3e-3, 1e-2, 3e-2), ("fisher", "0.86%"): (1e-3, 3e-3, 1e-2),
          ("mixed", "0.86%"): (3e-3, 1e-2, 3e-2), ("local", "0.86%"): (1e-3, 3e-3, 1e-2),
          ("scaled", "0.86%"): (1e-3, 3e-3, 1e-2), ("decay", "0.86%"): (1.0, 3.0, 10.0),
          ("rosa", "0.86%"): (1e-3, 3e-3, 1e-2)}  # around LoRA's 3e-3


def knob_cell(method: str, task: str, budget: str, value: float, seed: int, steps: int = STEPS) -> Cell:
    """The cell a sweep's value names: a rate, or for `decay` a weight decay at DECAY_LR."""
    if method == "decay":
        return Cell(method, task, budget, DECAY_LR, seed, steps, weight_decay=value)
    return Cell(method, task, budget, value, seed, steps)


def validation_score(record: dict) -> tuple[float, float]:
    """What a sweep chooses by: validation accuracy, then the lower held-out loss; a failed run is last."""
    if "failed" in record:
        return float("-inf"), float("-inf")
    return record["task_after"]["accuracy"], -record["eval_loss"]


def first_grid(cells: dict, method: str, budget: str) -> tuple[float, ...] | None:
    """A sweep's first grid: given, or (the third protocol's sweeps at other budgets) the value chosen at
    the main budget with its neighbours on LADDER."""
    if (method, budget) in START or (method, budget) in SCREEN:
        return {**START, **SCREEN}[(method, budget)]
    main = sweep(cells, method, MAIN_BUDGET)[1]
    if main is None:
        return None
    at = LADDER.index(main)
    return LADDER[at - 1:at + 2]


def sweep(cells: dict, method: str, budget: str) -> tuple[list[float], float | None]:
    """(the values the seed-1 sweep needs, the chosen value once the best of them is interior)."""
    start = first_grid(cells, method, budget)
    if start is None:
        return [], None
    grid = sorted(start)
    while True:
        done = [cells.get(knob_cell(method, SWEEP_TASK, budget, value, 1)) for value in grid]
        if any(r is None for r in done):
            return grid, None
        best = max(range(len(grid)), key=lambda i: validation_score(done[i]))
        at = LADDER.index(grid[best])
        if best == 0 and at > 0:
            grid.insert(0, LADDER[at - 1])
        elif best == len(grid) - 1 and at < len(LADDER) - 1:
            grid.append(LADDER[at + 1])
        else:
            return grid, grid[best]


def chosen_cell(cells: dict, method: str, budget: str, task: str = SWEEP_TASK, seed: int = 1,
                steps: int = STEPS) -> Cell | None:
    """A method's cell at its value chosen on the sweep task at `budget` (None until chosen). SPEFT at "1%" is
    the product's default: density 1% at the default rate."""
    if budget == "1%":
        return Cell("speft", task, budget, 1e-3, seed, steps) if method == "speft" else None
    value = sweep(cells, method, budget)[1]
    return None if value is None else knob_cell(method, task, budget, value, seed, steps)


def _kl(record: dict) -> float:
    return record["retention_after"]["kl"]


def fits(method: str, budget: str) -> bool:
    """The hybrid needs room for its LoRA part and a sparse part; every other method fits every budget."""
    return method != HYBRID or (BUDGETS[budget].lora_r or 0) > HYBRID_LORA_R


def _outcome(cells: dict, methods: tuple[str, ...]) -> dict | None:
    chosen = {m: chosen_cell(cells, m, MAIN_BUDGET) for m in methods}
    if any(c is None for c in chosen.values()):
        return None
    records = {m: cells[c] for m, c in chosen.items()}
    random_bar = cells[chosen_cell(cells, "random", MAIN_BUDGET)]["task_after"]["accuracy"]
    lora_bar = _kl(cells[chosen_cell(cells, "lora", MAIN_BUDGET)])
    clears = [m for m, r in records.items() if r["task_after"]["accuracy"] >= random_bar and _kl(r) <= lora_bar]
    ranked = sorted(methods, key=lambda m: (m in clears, validation_score(records[m])), reverse=True)
    return {"chosen": chosen, "random_bar": random_bar, "lora_bar": lora_bar, "clears": clears,
            "best_two": ranked[:2], "advanced": [m for m in ranked[:2] if m in clears] or ranked[:2]}


def screened(cells: dict) -> tuple[str, ...]:
    """The screening's candidates: CANDIDATES, and the hybrid once they have all chosen and none clears."""
    first = _outcome(cells, CANDIDATES)
    return CANDIDATES if first is None or first["clears"] else (*CANDIDATES, HYBRID)


def screening(cells: dict) -> dict | None:
    """The screening's outcome once every screened candidate's main-budget sweep has chosen (None before):
    each candidate's chosen cell, the bars (the random mask's validation accuracy, LoRA's KL), those that
    clear both, the best two (the clearing ones first, then by validation accuracy), and those that advance
    to the confirmation: the clearing ones, at most the best two, or the best two where none clears."""
    return _outcome(cells, screened(cells))


def confirmed_methods(outcome: dict) -> list[str]:
    return [*outcome["advanced"], "speft", "random", "lora"]


def _sweep_jobs(cells: dict, method: str, budget: str) -> list[tuple[str, Cell]]:
    if not fits(method, budget):
        return []
    return [("cell", knob_cell(method, SWEEP_TASK, budget, value, 1)) for value in sweep(cells, method, budget)[0]]


def _reported(cells: dict, method: str, budget: str, tasks: tuple[str, ...]) -> list[tuple[str, Cell]]:
    """A method's chosen cells at `budget` on `tasks`, both seeds, each followed by its test scoring."""
    return [(kind, cell) for task in tasks for seed in SEEDS if fits(method, budget)
            and (cell := chosen_cell(cells, method, budget, task, seed)) is not None for kind in ("cell", "test")]


def planned(cells: dict, tests: dict) -> list[tuple[str, Cell]]:
    """The third protocol's jobs not yet run, in order: the third task's pilot (the base and LoRA at the main
    budget, validation); the screening at the main budget, then the best two at 0.01%; the confirmation,
    budget by budget (the advanced candidates' sweeps where missing, then every confirmed method's chosen
    cells on both seeds with their test scorings; at the main budget on all three tasks), SPEFT's default
    (1% at 1e-3); then the long cells. `tests`: the third protocol's test scorings."""
    jobs = [("cell", base_cell("cities"))]
    jobs += [("cell", c) for c in [chosen_cell(cells, "lora", MAIN_BUDGET, "cities")] if c is not None]
    for method in screened(cells):
        jobs += _sweep_jobs(cells, method, MAIN_BUDGET)
    outcome = screening(cells)
    if outcome is not None:
        for method in outcome["best_two"]:
            jobs += _sweep_jobs(cells, method, LOW_BUDGET)
        jobs += [(kind, base_cell(task)) for task in (SWEEP_TASK, *OTHER_TASKS) for kind in ("cell", "test")]
        for budget in CONFIRM_BUDGETS:
            methods = confirmed_methods(outcome)
            for method in outcome["advanced"]:
                jobs += _sweep_jobs(cells, method, budget)
            tasks = (SWEEP_TASK, *OTHER_TASKS) if budget == MAIN_BUDGET else (SWEEP_TASK,)
            for method in methods:
                jobs += _reported(cells, method, budget, tasks)
        jobs += _reported(cells, "speft", "1%", (SWEEP_TASK,))
        for method in ("speft", "random", "lora", outcome["advanced"][0]):
            cell = chosen_cell(cells, method, MAIN_BUDGET, steps=LONG_STEPS)
            jobs += [("cell", cell), ("test", cell)] if cell is not None else []
    return [(kind, cell) for kind, cell in dict.fromkeys(jobs)
            if (kind == "cell" and cell not in cells) or (kind == "test" and cell not in tests)]
