"""Tests for the seed-aware comparison (kdlab.stats.seed_bootstrap / compare_systems) and its calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kdlab.stats import (
    compare_systems,
    paired_bootstrap,
    seed_bootstrap,
    simulate_scores,
    welch_df,
)


def _seeds(rng: np.random.Generator, accuracies: list[float], n: int = 400) -> np.ndarray:
    """(seeds, examples) 0/100 correctness with the given per-seed accuracies (exactly, up to rounding)."""
    rows = []
    for acc in accuracies:
        row = np.zeros(n)
        row[rng.permutation(n)[: round(acc * n)]] = 100.0
        rows.append(row)
    return np.stack(rows)


def test_one_seed_falls_back_to_examples_only() -> None:
    rng = np.random.default_rng(0)
    a, b = _seeds(rng, [0.8]), _seeds(rng, [0.7, 0.72])
    r = compare_systems(a[0], b, n_resamples=500)
    assert r.procedure == "examples" and not r.seed_aware and r.n_seeds == (1, 2) and r.df is None
    assert r == paired_bootstrap(a[0], b, n_resamples=500)
    with pytest.raises(ValueError, match=">= 2 seeds"):
        seed_bootstrap(a, b, n_resamples=500)
    with pytest.raises(ValueError, match="same examples"):
        seed_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))


def test_equal_systems() -> None:
    rng = np.random.default_rng(1)
    a = _seeds(rng, [0.7, 0.75, 0.8])
    same = seed_bootstrap(a, a.copy(), n_resamples=2000)
    # Identical systems: Δ is exactly 0 and the resamples are symmetric around it.
    assert same.delta == 0.0 and same.seed_aware and same.n_seeds == (3, 3)
    assert same.low < 0 < same.high and same.p_value > 0.9
    flat = np.full((2, 50), 60.0)
    tied = seed_bootstrap(flat, flat.copy(), n_resamples=200)
    assert (tied.delta, tied.low, tied.high, tied.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_clear_effect_is_found() -> None:
    rng = np.random.default_rng(2)
    better, base = _seeds(rng, [0.90, 0.91, 0.92]), _seeds(rng, [0.60, 0.61, 0.62])
    r = seed_bootstrap(better, base, n_resamples=4000, seed=3)
    assert r.delta == pytest.approx(30.0, abs=0.5)
    assert r.low > 0 and r.p_value < 0.01 and r.significant and r.low <= r.delta <= r.high
    worse = seed_bootstrap(base, better, n_resamples=4000, seed=3)
    assert worse.high < 0 and worse.delta == pytest.approx(-r.delta)


def test_seed_variance_widens_the_interval() -> None:
    # +4 points on 2000 examples: the examples alone call it significant, but the seeds spread by ~8
    # points, so with 3 seeds it is not.
    rng = np.random.default_rng(4)
    a, b = _seeds(rng, [0.64, 0.74, 0.84], 2000), _seeds(rng, [0.62, 0.70, 0.78], 2000)
    examples_only = paired_bootstrap(a, b, n_resamples=4000)
    seeds = seed_bootstrap(a, b, n_resamples=4000)
    assert examples_only.significant and not seeds.significant
    assert seeds.delta == pytest.approx(examples_only.delta)
    assert seeds.high - seeds.low > 3 * (examples_only.high - examples_only.low)


def test_seed_level_matches_welch_by_hand() -> None:
    # Every example of a seed scores the same: no example-level variation, so the interval is Welch's
    # Δ ± t_{df, 0.975} · SE, computed here by hand.
    scipy_stats = pytest.importorskip("scipy.stats")
    a = np.repeat([[70.0], [74.0], [81.0]], 30, axis=1)
    b = np.repeat([[60.0], [66.0]], 30, axis=1)
    va, vb = np.var([70, 74, 81], ddof=1), np.var([60, 66], ddof=1)
    se = math.sqrt(va / 3 + vb / 2)
    df = (va / 3 + vb / 2) ** 2 / ((va / 3) ** 2 / 2 + (vb / 2) ** 2 / 1)
    assert welch_df(va, 3, vb, 2) == pytest.approx(df)
    r = seed_bootstrap(a, b, n_resamples=200_000, seed=5)
    delta = (70 + 74 + 81) / 3 - 63
    half = scipy_stats.t.ppf(0.975, df) * se
    assert r.df == pytest.approx(df) and r.delta == pytest.approx(delta)
    assert r.low == pytest.approx(delta - half, abs=0.02 * half)
    assert r.high == pytest.approx(delta + half, abs=0.02 * half)
    welch = scipy_stats.ttest_ind([70, 74, 81], [60, 66], equal_var=False)
    assert r.p_value == pytest.approx(welch.pvalue, rel=0.05)


def test_interval_excludes_zero_iff_p_below_alpha() -> None:
    rng = np.random.default_rng(6)
    outcomes = {True: 0, False: 0}
    for case in range(200):
        n, seeds = int(rng.integers(2, 80)), (int(rng.integers(2, 5)), int(rng.integers(2, 5)))
        gain = rng.choice([0.0, 0.05, 0.15, 0.4])
        a = 100.0 * (rng.random((seeds[0], n)) < 0.5 + gain)
        b = 100.0 * (rng.random((seeds[1], n)) < 0.5)
        if case % 10 == 0:
            b = a.copy()  # ties
        resamples = int(rng.choice([40, 199, 999, 2000]))
        r = seed_bootstrap(a, b, n_resamples=resamples, seed=case)
        excludes = r.low > 0.0 or r.high < 0.0
        assert excludes == (r.p_value < 0.05) == r.significant, (case, r)
        assert r.low <= r.high and 0.0 < r.p_value <= 1.0
        outcomes[excludes] += 1
    assert min(outcomes.values()) > 30, outcomes


def test_deterministic_from_its_seed() -> None:
    rng = np.random.default_rng(7)
    a, b = _seeds(rng, [0.7, 0.75, 0.8]), _seeds(rng, [0.68, 0.7, 0.77])
    assert seed_bootstrap(a, b, seed=11) == seed_bootstrap(a, b, seed=11)
    assert seed_bootstrap(a, b, seed=11) != seed_bootstrap(a, b, seed=12)
    assert seed_bootstrap(a, b, seed=11).seed == 11


def test_calibration_by_simulation() -> None:
    # 300 simulated studies, 3 seeds each, 872 examples, equal true accuracy, seed-to-seed accuracy std
    # ~4.5 points (the demo's middle figure): the seed-aware false-positive rate stays near α while the
    # examples-only bootstrap's is several times α. bench/seed_calibration.py runs the full 1000+.
    rng = np.random.default_rng(8)
    hits = {"seeds": 0, "examples": 0}
    stds = []
    n = 300
    for k in range(n):
        a, b = simulate_scores(rng, n_examples=872, n_seeds=3, seed_logit_std=0.3)
        stds.append(a.mean(axis=1).std(ddof=1))
        hits["seeds"] += seed_bootstrap(a, b, n_resamples=400, seed=k).p_value < 0.05
        hits["examples"] += paired_bootstrap(a, b, n_resamples=400, seed=k).p_value < 0.05
    assert 3.0 < math.sqrt(np.mean(np.square(stds))) < 6.0
    assert hits["seeds"] / n <= 0.06, hits
    assert hits["examples"] / n >= 0.3, hits
    # and it still finds a large true effect (+10 points or so) most of the time
    found = 0
    for k in range(100):
        a, b = simulate_scores(rng, n_examples=872, n_seeds=3, seed_logit_std=0.15, effect_logit=0.9)
        found += seed_bootstrap(a, b, n_resamples=400, seed=k).p_value < 0.05
    assert found >= 70, found


def test_not_conservative_without_a_seed_effect() -> None:
    # No seed effect at all (the seeds differ only by which examples they get right): the seed x example
    # noise must not be counted twice (seed level and example level), or the test loses its power for
    # nothing; its false-positive rate stays near α, like the examples-only bootstrap's.
    rng = np.random.default_rng(9)
    hits, n = 0, 300
    for k in range(n):
        a, b = simulate_scores(rng, n_examples=872, n_seeds=3, seed_logit_std=0.0)
        hits += seed_bootstrap(a, b, n_resamples=400, seed=k).p_value < 0.05
    assert 0.02 <= hits / n <= 0.07, hits
