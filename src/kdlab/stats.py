"""Statistics for study reports: pure functions on numpy arrays (no I/O, no global random state).

Paired bootstrap of a system against a baseline on the same evaluation examples
(Efron & Tibshirani 1993; Koehn 2004 for its use in NLP), as `paired_bootstrap`:

- Inputs are per-example scores (e.g. 0/100 correctness, or SQuAD F1 x100) of the two systems on the *same*
  examples in the same order. A 2-D input is (seeds, examples): `paired_bootstrap` **averages it over seeds
  first**, per example, so only examples are resampled and the interval reflects test-set sampling, not
  training-seed variance. It is what the report uses when a system has a single seed, and it then says that
  the comparison cannot separate the method from the seed.
- Δ is mean(system) - mean(baseline) over the examples. B resamples of the example indices (with
  replacement, the same indices for both systems: that is what makes it paired) give B resampled Δ*.
- Interval and p-value are **one procedure**, so that "the interval excludes 0" holds exactly when
  "p < α", α = 1 - confidence (`significance_level`: rounded, so 95% gives α = 0.05 exactly):
  - the p-value inverts the percentile interval: p = min(1, 2 (min(#{Δ* <= 0}, #{Δ* >= 0}) + 1) / (B + 1)),
    i.e. twice the (+1-smoothed) share of resamples on the far side of 0 from the bulk. It is (on the grid
    of levels B allows) the smallest level at which the percentile interval would exclude 0. The +1 terms
    keep p > 0 (the smallest reportable value is 2 / (B + 1)); identical systems give Δ = 0 and p = 1.
  - the interval is the percentile interval taken as order statistics, [Δ*_(j), Δ*_(B+1-j)], with j the
    number of counts m = 0, 1, ... whose p, 2 (m + 1) / (B + 1), is below α (computed with the same
    floating-point expression as p). No interpolation between order statistics (np.quantile's
    default would put an end of the interval between two resamples, where the equivalence can break), and
    j ≈ α (B + 1) / 2, the usual percentile position. At least 2 / α resamples are needed (40 at 95%).
  - resampled Δ* within round-off of 0 (1e-9 of the largest score difference) count as exactly 0, so
    resamples that cancel out are ties, on both sides.
  This test is the duality of tests and intervals applied to the percentile interval: it is as accurate as
  that interval, and unlike the "shift" test (resampling a null-centred distribution) it can never disagree
  with the interval printed beside it.
- Deterministic: all randomness comes from ``numpy.random.default_rng(seed)``, and resamples are drawn in
  chunks whose size depends only on the number of examples, so the same (scores, seed, n_resamples) always
  give the same result.

Seed-aware comparison (`seed_bootstrap`, used by the report when both systems have >= 2 seeds): a two-level
paired bootstrap whose resampled Δ* hold both sources of variation,

    Δ* = Δ + SE_seeds · t*  +  r · (mean of the per-example differences d over resampled examples - mean d)

- Seed level: SE_seeds² = s_a² / n_a + s_b² / n_b, with s² the sample variance of each system's per-seed
  mean scores, and t* a Student-t draw with the Welch-Satterthwaite degrees of freedom (Welch's t-test made a
  resampling distribution). Resampling 2-3 seeds with replacement instead cannot be calibrated: 3 seeds give
  10 distinct multisets, a variance (n - 1) / n of the true one and tails far shorter than Student's
  (bench/seed_calibration.py prints how it fares).
- Example level: the paired resampling of `paired_bootstrap` (the same examples for both systems) on the
  per-example differences d of the seed-averaged scores. Their spread also holds the seed x example noise
  (which examples a seed happens to get right) that the seed means' variances already count, so only the
  rest is kept: r² = max(0, 1 - noise / var(d)), noise = σ²_a / n_a + σ²_b / n_b from the two-way
  (seed x example) residual variances σ² of each system.
- Interval and p come from these Δ* exactly as in `paired_bootstrap` (order statistics, inverted p), so they
  agree the same way; deterministic from ``seed`` (the t draws, then the example resamples).
- Calibration, by simulation (`simulate_scores`, bench/seed_calibration.py): at α = 0.05, 3 seeds per system,
  872 examples, equal true accuracy, its false-positive rate stays at or below 0.05 for seed-to-seed
  accuracy std from 1.3 (none but the examples') to 7.4 points, where the examples-only bootstrap's rises far
  above α. The price is power: with 3 seeds a seed std of several points hides a few points of gain.

Multiple comparisons: `holm` adjusts a family of p-values with Holm's step-down method (Holm 1979), which
controls the family-wise error rate under any dependence between the tests (e.g. EM and F1 of one system).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "BootstrapResult",
    "bootstrap_mean_differences",
    "collapse_seeds",
    "holm",
    "interval_rank",
    "mean_std",
    "compare_systems",
    "paired_bootstrap",
    "pareto_front",
    "seed_bootstrap",
    "significance_level",
    "welch_df",
]

# Index draws held in memory at once (int32): ~16 MB, whatever the evaluation set's size.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class BootstrapResult:
    """Outcome of `paired_bootstrap`; every score is on the scale of its inputs (percentages in kdlab)."""

    delta: float  # mean(system) - mean(baseline)
    low: float  # lower end of the percentile interval
    high: float  # upper end
    p_value: float  # two-sided, H0: delta = 0; < 1 - confidence exactly when the interval excludes 0
    n_examples: int
    n_resamples: int
    confidence: float
    seed: int = 0  # of the resampling, so the result can be recomputed
    # "examples": test-set sampling only (`paired_bootstrap`); "seeds+examples": `seed_bootstrap`.
    procedure: str = "examples"
    n_seeds: tuple[int, int] = (1, 1)  # (system, baseline) seeds behind the scores
    df: float | None = None  # the seed level's Welch-Satterthwaite degrees of freedom (seed_bootstrap)

    @property
    def seed_aware(self) -> bool:
        """Whether the interval and p include training-seed variance (both systems had >= 2 seeds)."""
        return self.procedure == "seeds+examples"

    @property
    def alpha(self) -> float:
        """The test's level, 1 - confidence (see `significance_level`)."""
        return significance_level(self.confidence)

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero (at ``confidence``), i.e. p < alpha (unadjusted)."""
        return self.low > 0.0 or self.high < 0.0


def mean_std(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value, since one seed has no spread)."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("mean_std: expected a non-empty 1-D sequence")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def collapse_seeds(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Per-example scores: a 1-D array as is, a 2-D (seeds, examples) array averaged over seeds."""
    arr = np.asarray(scores, dtype=float)
    if arr.ndim == 2:
        if arr.shape[0] == 0:
            raise ValueError("collapse_seeds: no seeds")
        arr = arr.mean(axis=0)
    if arr.ndim != 1:
        raise ValueError(f"expected (examples,) or (seeds, examples) scores, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores must be finite")
    return arr


def bootstrap_mean_differences(diffs: np.ndarray, *, n_resamples: int, seed: int) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement) of the per-example differences ``diffs``."""
    diffs = np.asarray(diffs, dtype=float)
    n = diffs.size
    if diffs.ndim != 1 or n == 0:
        raise ValueError("bootstrap_mean_differences: expected a non-empty 1-D array")
    if n_resamples < 1:
        raise ValueError("n_resamples must be >= 1")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_resamples, _CHUNK_ELEMENTS // n))
    out = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        rows = min(chunk, n_resamples - start)
        idx = rng.integers(0, n, size=(rows, n), dtype=np.int32)
        out[start:start + rows] = diffs[idx].mean(axis=1)
    return out


def significance_level(confidence: float) -> float:
    """α = 1 - confidence, rounded to 12 decimals so that 0.95 gives exactly 0.05 (the float 1 - 0.95 is
    0.05000000000000004, which would count p = 0.05 as below 0.05)."""
    return round(1.0 - confidence, 12)


def _inverted_p(count: int, n_resamples: int) -> float:
    """p of the percentile-inverted test when ``count`` resamples lie on the far side of 0 (ties included).
    The one expression both `paired_bootstrap` and `interval_rank` use, so they agree to the last bit."""
    return min(1.0, 2.0 * (count + 1) / (n_resamples + 1))


def interval_rank(n_resamples: int, confidence: float) -> int:
    """j such that [Δ*_(j), Δ*_(B+1-j)] (1-based order statistics of B = ``n_resamples`` resampled Δ*) is the
    percentile interval that excludes 0 exactly when the inverted p-value is below 1 - confidence.

    j counts the numbers of far-side resamples m = 0, 1, ... that give p < α; j ≈ α (B + 1) / 2."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    alpha = significance_level(confidence)
    j = max(0, int(alpha * (n_resamples + 1) / 2) - 2)  # a guess just below; stepped up in exact arithmetic
    while _inverted_p(j, n_resamples) < alpha:
        j += 1
    while j > 0 and _inverted_p(j - 1, n_resamples) >= alpha:  # the guess overshot (it never should)
        j -= 1
    if j < 1:
        need = math.floor(2.0 / alpha - 1.0) + 1  # the smallest B with 2 / (B + 1) < α
        raise ValueError(
            f"{n_resamples} resamples cannot give a {confidence:.0%} interval that excludes 0; use >= {need}"
        )
    return j


def paired_bootstrap(
    system: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Paired bootstrap of mean(system) - mean(baseline) over examples (see the module docstring).

    ``system`` and ``baseline``: per-example scores, 1-D (examples,) or 2-D (seeds, examples), same examples.
    """
    j = interval_rank(n_resamples, confidence)  # checks confidence and n_resamples first
    a, b = collapse_seeds(system), collapse_seeds(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: {a.size} vs {b.size} examples")
    if a.size == 0:
        raise ValueError("paired_bootstrap: no examples")
    diffs = a - b
    # Round-off of resample means that cancel out must not decide a side of 0: snap it to an exact tie.
    tol = 1e-9 * max(1.0, float(np.abs(diffs).max()))
    means = bootstrap_mean_differences(diffs, n_resamples=n_resamples, seed=seed)
    n_seeds = (_n_seeds(system), _n_seeds(baseline))
    return _percentile_result(float(diffs.mean()), means, tol, j, n_examples=int(a.size),
                              confidence=confidence, seed=seed, procedure="examples", n_seeds=n_seeds)


def _n_seeds(scores: Sequence[float] | np.ndarray) -> int:
    arr = np.asarray(scores)
    return int(arr.shape[0]) if arr.ndim == 2 else 1


def _percentile_result(delta: float, means: np.ndarray, tol: float, j: int, **fields: Any) -> BootstrapResult:
    """Δ, the order-statistic interval and the inverted p of resampled Δ* ``means`` (see the module
    docstring): the one place both procedures turn resamples into a result, so they agree the same way."""
    n_resamples = means.size
    delta = 0.0 if abs(delta) <= tol else delta
    means[np.abs(means) <= tol] = 0.0
    # Order statistics j and B+1-j (0-based j-1 and B-j): no interpolation, see the module docstring.
    ends = np.partition(means, [j - 1, n_resamples - j])
    low, high = float(ends[j - 1]), float(ends[n_resamples - j])
    far = min(int(np.count_nonzero(means <= 0.0)), int(np.count_nonzero(means >= 0.0)))
    return BootstrapResult(delta=delta, low=low, high=high, p_value=_inverted_p(far, n_resamples),
                           n_resamples=int(n_resamples), **fields)


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of s_a²/n_a + s_b²/n_b (sample variances of n_a, n_b values).
    n_a + n_b - 2 when both variances are 0 (the value then does not matter: the seed term is 0)."""
    a, b = var_a / n_a, var_b / n_b
    den = a * a / (n_a - 1) + b * b / (n_b - 1)
    return float((a + b) ** 2 / den) if den > 0 else float(n_a + n_b - 2)


def seed_bootstrap(
    system: Sequence[Sequence[float]] | np.ndarray,
    baseline: Sequence[Sequence[float]] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Seed-aware comparison of mean(system) - mean(baseline): a two-level paired bootstrap whose interval
    and p include training-seed variance as well as test-set sampling (see the module docstring).
    ``system`` (seeds_a, examples) and ``baseline`` (seeds_b, examples): per-example scores of
    each seed on the same examples, at least 2 seeds each."""
    j = interval_rank(n_resamples, confidence)
    a, b = np.asarray(system, dtype=float), np.asarray(baseline, dtype=float)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError("seed_bootstrap: expected (seeds, examples) scores for both systems")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired scores need the same examples: {a.shape[1]} vs {b.shape[1]} examples")
    if a.shape[1] == 0:
        raise ValueError("seed_bootstrap: no examples")
    n_a, n_b = a.shape[0], b.shape[0]
    if n_a < 2 or n_b < 2:
        raise ValueError(f"seed_bootstrap needs >= 2 seeds per system, got {n_a} and {n_b}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("scores must be finite")
    n = a.shape[1]
    # Seed level: each seed's mean score; their sample variances give the seed part of Var(Δ).
    acc_a, acc_b = a.mean(axis=1), b.mean(axis=1)
    var_a, var_b = float(acc_a.var(ddof=1)), float(acc_b.var(ddof=1))
    se_seeds = math.sqrt(var_a / n_a + var_b / n_b)
    df = welch_df(var_a, n_a, var_b, n_b)
    # Example level: per-example differences of the seed-averaged scores. Their spread holds the
    # seed x example noise that the seed means' variances already count; only the rest (how the two
    # systems differ example by example) is added, so that noise is not counted twice.
    diffs = a.mean(axis=0) - b.mean(axis=0)
    var_d = float(diffs.var(ddof=1)) if n > 1 else 0.0
    noise = _residual_variance(a) / n_a + _residual_variance(b) / n_b
    share = math.sqrt(max(0.0, 1.0 - noise / var_d)) if var_d > 0 else 0.0
    rng = np.random.default_rng(seed)
    # Student-t draws first, then the example resamples in fixed-size chunks: the same inputs and seed
    # always give the same Δ*.
    t_draws = rng.standard_t(df, size=n_resamples) if se_seeds > 0 else np.zeros(n_resamples)
    example_part = bootstrap_mean_differences(diffs - diffs.mean(), n_resamples=n_resamples,
                                              seed=int(rng.integers(2**63 - 1)))
    delta = float(a.mean() - b.mean())
    means = delta + se_seeds * t_draws + share * example_part
    tol = 1e-9 * max(1.0, float(np.abs(diffs).max()), abs(delta))
    return _percentile_result(delta, means, tol, j, n_examples=int(n), confidence=confidence, seed=seed,
                              procedure="seeds+examples", n_seeds=(n_a, n_b), df=df)


def _residual_variance(scores: np.ndarray) -> float:
    """Seed x example variance of a (seeds, examples) matrix: what is left after the example means and the
    seed means are removed (two-way ANOVA residual, (seeds - 1)(examples - 1) degrees of freedom)."""
    s, n = scores.shape
    if s < 2 or n < 2:
        return 0.0
    resid = scores - scores.mean(axis=0, keepdims=True) - scores.mean(axis=1, keepdims=True) + scores.mean()
    return float((resid**2).sum() / ((s - 1) * (n - 1)))


def compare_systems(
    system: Sequence[float] | np.ndarray,
    baseline: Sequence[float] | np.ndarray,
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """The report's comparison: `seed_bootstrap` when both systems have >= 2 seeds (2-D scores), else
    `paired_bootstrap` over examples only (its result's ``seed_aware`` is False: it cannot separate the
    method from the seed)."""
    if _n_seeds(system) >= 2 and _n_seeds(baseline) >= 2:
        return seed_bootstrap(system, baseline, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return paired_bootstrap(system, baseline, n_resamples=n_resamples, confidence=confidence, seed=seed)


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values (Holm 1979), in the input order: the i-th smallest p times (m - i + 1), made
    non-decreasing in that order and capped at 1. Rejecting where adjusted p < α controls the family-wise
    error rate at α over the m tests, whatever their dependence."""
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1:
        raise ValueError("holm: expected a 1-D sequence of p-values")
    if not np.all((p >= 0.0) & (p <= 1.0)):  # also rejects NaN
        raise ValueError("holm: p-values must be in [0, 1]")
    m = p.size
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (m - np.arange(m))
    adjusted = np.empty(m)
    # The running maximum keeps the step-down order: a larger p never gets a smaller adjusted p.
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled)) if m else scaled
    return adjusted


def pareto_front(cost: Sequence[float] | np.ndarray, value: Sequence[float] | np.ndarray) -> list[int]:
    """Indices of the points no other point beats (lower-or-equal cost and higher-or-equal value, one
    strictly), sorted by cost: the efficiency frontier. Non-finite points are never on it."""
    c, v = np.asarray(cost, dtype=float), np.asarray(value, dtype=float)
    if c.shape != v.shape or c.ndim != 1:
        raise ValueError("pareto_front: cost and value must be 1-D arrays of the same length")
    order = sorted((i for i in range(c.size) if math.isfinite(c[i]) and math.isfinite(v[i])),
                   key=lambda i: (c[i], -v[i]))
    front: list[int] = []
    best = -math.inf
    for i in order:
        if v[i] > best:  # cheapest first: a point is on the frontier when it beats everything cheaper
            front.append(i)
            best = v[i]
    return front


def simulate_scores(
    rng: np.random.Generator,
    *,
    n_examples: int,
    n_seeds: int,
    seed_logit_std: float,
    accuracy: float = 0.8,
    effect_logit: float = 0.0,
    difficulty_std: float = 1.5,
    interaction_std: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic study for calibrating the comparisons: (system, baseline) 0/100 correctness of shape
    (n_seeds, n_examples) on one fresh test set. Example i, seed j of a system is right with probability
    sigmoid(logit(accuracy) + d_i + c_i + u_j (+ effect_logit for the system)): d_i the example's difficulty
    (shared by both systems: what makes the comparison paired), c_i the system's own per-example deviation
    (the systems err on partly different examples), u_j the training seed's effect. Both systems have the
    same true accuracy when ``effect_logit`` is 0."""
    base = math.log(accuracy / (1.0 - accuracy))
    difficulty = rng.normal(0.0, difficulty_std, n_examples)

    def one(effect: float) -> np.ndarray:
        own = rng.normal(0.0, interaction_std, n_examples)
        shifts = rng.normal(0.0, seed_logit_std, (n_seeds, 1))
        p = 1.0 / (1.0 + np.exp(-(base + effect + difficulty + own + shifts)))
        return 100.0 * (rng.random((n_seeds, n_examples)) < p)

    return one(effect_logit), one(0.0)
