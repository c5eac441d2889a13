"""Statistics for study reports: pure functions on numpy arrays (no I/O, no global random state).

Paired bootstrap of a system against a baseline on the same evaluation examples
(Efron & Tibshirani 1993; Koehn 2004 for its use in NLP), as `paired_bootstrap`:

- Inputs are per-example scores (e.g. 0/100 correctness, or SQuAD F1 x100) of the two systems on the *same*
  examples in the same order. A 2-D input is (seeds, examples): it is **averaged over seeds first**, per
  example, so each example contributes one score per system. The test then asks whether the seed-averaged
  system beats the seed-averaged baseline on this evaluation set; only examples are resampled, so the interval
  reflects test-set sampling, not training-seed variance (the summary tables show that separately as ± std).
  Resampling seeds as well (a hierarchical bootstrap) is not meaningful with the 1-3 seeds a study has, and
  averaging first also lets the two systems have different numbers of seeds.
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

Multiple comparisons: `holm` adjusts a family of p-values with Holm's step-down method (Holm 1979), which
controls the family-wise error rate under any dependence between the tests (e.g. EM and F1 of one system).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "BootstrapResult",
    "bootstrap_mean_differences",
    "collapse_seeds",
    "holm",
    "interval_rank",
    "mean_std",
    "paired_bootstrap",
    "pareto_front",
    "significance_level",
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
    delta = float(diffs.mean())
    delta = 0.0 if abs(delta) <= tol else delta
    means = bootstrap_mean_differences(diffs, n_resamples=n_resamples, seed=seed)
    means[np.abs(means) <= tol] = 0.0
    # Order statistics j and B+1-j (0-based j-1 and B-j): no interpolation, see the module docstring.
    ends = np.partition(means, [j - 1, n_resamples - j])
    low, high = float(ends[j - 1]), float(ends[n_resamples - j])
    far = min(int(np.count_nonzero(means <= 0.0)), int(np.count_nonzero(means >= 0.0)))
    return BootstrapResult(delta=delta, low=low, high=high, p_value=_inverted_p(far, n_resamples),
                           n_examples=int(a.size), n_resamples=int(n_resamples), confidence=confidence,
                           seed=int(seed))


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
