"""bench/quality/stats.py: the paired bootstrap against McNemar's normal approximation on the same discordant
counts, Holm's adjustment against a hand-worked case, seeds pooled per question."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.quality.stats import compare_all, holm, paired_bootstrap, pooled


def _scores(both: int, only_first: int, only_second: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    first = [1.0] * both + [1.0] * only_first + [0.0] * only_second + [0.0] * neither
    second = [1.0] * both + [0.0] * only_first + [1.0] * only_second + [0.0] * neither
    return np.array(first), np.array(second)


@pytest.mark.parametrize("only_first,only_second", [(40, 25), (60, 10), (30, 30), (55, 75)])
def test_the_bootstrap_p_is_mcnemars_on_the_discordant_questions(only_first, only_second):
    first, second = _scores(240, only_first, only_second, 500 - 240 - only_first - only_second)
    difference, p = paired_bootstrap(first, second)
    assert difference == pytest.approx((only_first - only_second) / 500)
    z = abs(only_first - only_second) / math.sqrt(only_first + only_second)
    mcnemar = math.erfc(z / math.sqrt(2))  # two-sided, normal approximation (good from about 50 discordant)
    assert p == pytest.approx(mcnemar, abs=0.02)


def test_holm_steps_down_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5]) == [0.5] and holm([0.6, 0.7]) == [1.0, 1.0]


def test_seeds_pool_per_question_and_verdicts_follow_the_corrected_p():
    assert pooled([[True, False, True], [True, True, False]]).tolist() == [1.0, 0.5, 0.5]
    strong, weak = _scores(240, 60, 10, 190), _scores(240, 40, 25, 195)
    scores = {"a": strong[0], "b": strong[1], "c": weak[0], "d": weak[1]}
    verdicts = compare_all(scores, [("a", "b"), ("d", "c")])
    assert [v.verdict for v in verdicts] == ["a wins", "tie"]
    assert verdicts[1].difference < 0 and verdicts[1].p_holm >= verdicts[1].p
