"""Paired verdicts over per-question results (the rule docs/quality.md fixes before the confirmation runs).

Two methods scored on the same test questions are compared question by question: each question's score is
its correctness averaged over the seeds (0, 1/2 or 1 with two seeds), and the difference of the two means is
tested with a paired bootstrap over questions (questions resampled with replacement, BOOTSTRAP times, a fixed
stream): the two-sided p-value is twice the smaller share of resampled differences on either side of zero.
Within one table the p-values are Holm-corrected; a method wins where its corrected p is below ALPHA.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP, ALPHA, STREAM = 10_000, 0.05, 20261207


@dataclass(frozen=True)
class Paired:
    first: str
    second: str
    difference: float  # mean score of `first` minus `second`, over the questions
    p: float           # two-sided, uncorrected
    p_holm: float = float("nan")

    @property
    def verdict(self) -> str:
        if not self.p_holm < ALPHA:
            return "tie"
        return f"{self.first} wins" if self.difference > 0 else f"{self.second} wins"


def pooled(per_seed: list[list[bool]]) -> np.ndarray:
    """Each question's correctness averaged over the seeds (every seed scored the same questions in order)."""
    if len({len(seed) for seed in per_seed}) != 1:
        raise ValueError("the seeds scored different numbers of questions")
    return np.asarray(per_seed, dtype=np.float64).mean(axis=0)


def paired_bootstrap(first: np.ndarray, second: np.ndarray, resamples: int = BOOTSTRAP,
                     stream: int = STREAM) -> tuple[float, float]:
    """(mean difference, two-sided p) of paired per-question scores."""
    difference = first - second
    rng = np.random.default_rng(stream)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # a thousand resamples of the questions at a time
        rows = rng.integers(0, difference.size, size=(min(1000, resamples - start), difference.size))
        means[start:start + rows.shape[0]] = difference[rows].mean(axis=1)
    p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    return float(difference.mean()), float(min(1.0, p))


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment, in the input's order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def compare_all(scores: dict[str, np.ndarray], pairs: list[tuple[str, str]]) -> list[Paired]:
    """Every pair's paired test over the same questions, Holm-corrected together (one table)."""
    raw = [(a, b, *paired_bootstrap(scores[a], scores[b])) for a, b in pairs]
    corrected = holm([p for *_, p in raw])
    return [Paired(a, b, d, p, q) for (a, b, d, p), q in zip(raw, corrected)]
