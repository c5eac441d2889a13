"""Statistics for study reports: pure functions on numpy arrays (no I/O, no global random state).

Paired bootstrap of a system against a baseline on the same evaluation examples
(Efron & Tibshirani 1993, ch. 16; Koehn 2004 for its use in NLP), as `paired_bootstrap`:

- Inputs are per-example scores (e.g. 0/100 correctness, or SQuAD F1 x100) of the two systems on the *same*
  examples in the same order. A 2-D input is (seeds, examples): it is **averaged over seeds first**, per
  example, so each example contributes one score per system. The test then asks whether the seed-averaged
  system beats the seed-averaged baseline on this evaluation set; only examples are resampled, so the interval
  reflects test-set sampling, not training-seed variance (the summary tables show that separately as ± std).
  Resampling seeds as well (a hierarchical bootstrap) is not meaningful with the 1-3 seeds a study has, and
  averaging first also lets the two systems have different numbers of seeds.
- Δ is mean(system) - mean(baseline) over the examples; the interval is the percentile interval of the
  bootstrap distribution of Δ (resampling example indices with replacement, the same indices for both
  systems: that is what makes it paired).
- The p-value is the standard two-sided paired bootstrap test under the null hypothesis Δ = 0: the bootstrap
  distribution is shifted to mean zero (the "shift" method, Efron & Tibshirani 16.4) and
  p = (1 + #{b: |Δ*_b - Δ| >= |Δ|}) / (B + 1). The +1 terms keep p > 0 (the smallest reportable value is
  1 / (B + 1)), and identical systems give Δ = 0 and p = 1 exactly.
- Deterministic: all randomness comes from ``numpy.random.default_rng(seed)``, and resamples are drawn in
  chunks whose size depends only on the number of examples, so the same (scores, seed, n_resamples) always
  give the same result.
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
    "mean_std",
    "paired_bootstrap",
    "pareto_front",
]

# Index draws held in memory at once (int32): ~16 MB, whatever the evaluation set's size.
_CHUNK_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class BootstrapResult:
    """Outcome of `paired_bootstrap`; every score is on the scale of its inputs (percentages in kdlab)."""

    delta: float  # mean(system) - mean(baseline)
    low: float  # lower end of the percentile interval
    high: float  # upper end
    p_value: float  # two-sided, H0: delta = 0
    n_examples: int
    n_resamples: int
    confidence: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero (at ``confidence``)."""
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
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    a, b = collapse_seeds(system), collapse_seeds(baseline)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same examples: {a.size} vs {b.size} examples")
    if a.size == 0:
        raise ValueError("paired_bootstrap: no examples")
    diffs = a - b
    delta = float(diffs.mean())
    means = bootstrap_mean_differences(diffs, n_resamples=n_resamples, seed=seed)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # Shift test: how often a resample under H0 (centred at 0) lands at least as far from 0 as Δ did.
    # A tolerance absorbs summation round-off, so identical systems count every resample (p = 1).
    tol = 1e-9 * max(1.0, float(np.abs(diffs).max()))
    extreme = int(np.count_nonzero(np.abs(means - delta) >= abs(delta) - tol))
    p = (1 + extreme) / (n_resamples + 1)
    return BootstrapResult(delta=delta, low=float(low), high=float(high), p_value=min(1.0, p),
                           n_examples=int(a.size), n_resamples=int(n_resamples), confidence=confidence)


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
