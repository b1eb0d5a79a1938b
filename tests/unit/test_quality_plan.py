"""bench/quality/plan.py: the jobs of the third protocol, run to the end against a synthetic benchmark whose best
rate per method is known, so that every sweep's choice, the screening's outcome (the hybrid screened only when no
candidate clears) and the confirmation's jobs can be checked against what docs/quality.md's rules say."""

from __future__ import annotations

import math

import pytest

from bench.quality import plan
from bench.quality.records import Cell

# method -> (its best rate, the validation accuracy there, its KL); accuracy falls 10 points per half decade
# away from the best, so a sweep must walk its grid to the best. `decay`'s knob is the weight decay.
BEST = {"speft": (3e-3, 0.45, 3.0), "random": (1e-2, 0.575, 0.2), "lora": (3e-3, 0.55, 0.54),
        "snr": (3e-2, 0.49, 5.8), "fisher": (1e-3, 0.45, 0.03), "mixed": (3e-3, 0.52, 3.2),
        "local": (3e-3, 0.51, 2.7), "scaled": (1e-4, 0.50, 0.4), "decay": (30.0, 0.46, 1.0),
        "rosa": (1e-2, 0.56, 0.5)}


def _record(cell: Cell, best: dict) -> dict:
    rate, accuracy, kl = best[cell.method]
    knob = cell.weight_decay if cell.method == "decay" else cell.lr
    away = abs(math.log10(knob / rate)) * 2  # half decades
    return {"task_after": {"accuracy": accuracy - 0.1 * away}, "eval_loss": 0.05, "retention_after": {"kl": kl}}


def _second_protocol(best: dict) -> dict:
    """The second protocol's sweeps of SPEFT, the random mask and LoRA, each run until it has chosen."""
    cells = {}
    for method, budget in [(m, b) for m in ("speft", "random", "lora") for b in plan.CONFIRM_BUDGETS]:
        while grid := [v for v in plan.sweep(cells, method, budget)[0]
                       if plan.knob_cell(method, plan.SWEEP_TASK, budget, v, 1) not in cells]:
            for value in grid:
                cell = plan.knob_cell(method, plan.SWEEP_TASK, budget, value, 1)
                cells[cell] = _record(cell, best)
    return cells


def _run_to_the_end(best: dict) -> tuple[dict, list[tuple[str, Cell]]]:
    cells, tests, ran = _second_protocol(best), {}, []
    while jobs := plan.planned(cells, tests):
        kind, cell = jobs[0]
        ran.append((kind, cell))
        if kind == "cell":
            cells[cell] = _record(cell, best) if cell.method != "base" else {}
        else:
            assert cell in cells, f"{cell.tag} scored on test before its cell ran"
            tests[cell] = {}
        assert len(ran) < 500, "the plan does not end"
    return cells, ran


def test_every_sweep_walks_to_its_best_rate_and_chooses_it_interior():
    cells, _ = _run_to_the_end(BEST)
    for method in plan.CANDIDATES:
        grid, chosen = plan.sweep(cells, method, plan.MAIN_BUDGET)
        assert chosen == pytest.approx(BEST[method][0])
        assert grid[0] < chosen < grid[-1]
    assert plan.sweep(cells, "scaled", plan.MAIN_BUDGET)[0][0] == pytest.approx(3e-5)  # extended down twice


def test_no_candidate_clears_so_the_hybrid_is_screened_and_the_best_two_advance():
    cells, ran = _run_to_the_end(BEST)
    outcome = plan.screening(cells)
    assert outcome["clears"] == [] and outcome["random_bar"] == pytest.approx(0.575)
    assert outcome["advanced"] == ["rosa", "mixed"]  # 56%, then 52%
    rosa_budgets = {cell.budget for kind, cell in ran if cell.method == "rosa"}
    assert rosa_budgets == {"0.86%"}  # the hybrid fits only the budget that holds LoRA r = 1 and more
    assert {cell.budget for kind, cell in ran if cell.method == "mixed"} == set(plan.CONFIRM_BUDGETS)


def test_a_candidate_that_clears_advances_alone_and_the_hybrid_never_runs():
    best = {**BEST, "local": (3e-3, 0.60, 0.3)}
    cells, ran = _run_to_the_end(best)
    assert plan.screening(cells)["advanced"] == ["local"]
    assert not any(cell.method == "rosa" for _, cell in ran)


def test_the_confirmation_scores_every_confirmed_cell_once_and_the_long_cells_come_last():
    cells, ran = _run_to_the_end(BEST)
    assert len(ran) == len(set(ran))
    long = [cell for kind, cell in ran if cell.steps == plan.LONG_STEPS]
    assert [c.method for c in long[::2]] == ["speft", "random", "lora", "rosa"]
    assert ran[-len(long):] == [(kind, c) for c in long[::2] for kind in ("cell", "test")]
    tested = {cell for kind, cell in ran if kind == "test"}
    for method in plan.confirmed_methods(plan.screening(cells)):
        for seed in plan.SEEDS:
            assert plan.chosen_cell(cells, method, "0.86%", "cities", seed) in tested
