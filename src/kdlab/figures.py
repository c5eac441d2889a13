"""Report figures drawn at print size: one column wide (3.4 in), fonts 9-10 pt, as PNG (300 dpi) and PDF.

Every figure is one task, so it can be placed at column width in a paper without shrinking its text. The
functions take plain data (the `report` package reads the study folder) and write through
`files.atomic_output`, so a crash never leaves a half-written image behind.

matplotlib is used through ``Figure`` + the Agg canvas directly, not pyplot: no global backend switch, no
pyplot figure registry to leak, and it works in a headless process.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib import rc_context, rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

from kdlab.files import atomic_output
from kdlab.methods import METHODS, baseline
from kdlab.stats import mean_std, pareto_front

__all__ = [
    "COLUMN_WIDTH_IN",
    "CostPoint",
    "Curve",
    "EfficiencyPoint",
    "LambdaSeries",
    "efficiency_figure",
    "lambda_figure",
    "cost_figure",
    "save_figure",
    "training_figure",
]

COLUMN_WIDTH_IN = 3.4  # a two-column paper's column (ACL / IEEE ~3.3-3.5 in)
DPI = 300
TEACHER_COLOR = "#b2182b"
_EXTRA_COLORS = ("#762a83", "#8c510a", "#01665e", "#c51b7d")
_LINESTYLES = ("-", "--", ":", "-.")
STYLE = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "lines.linewidth": 1.4,
    "lines.markersize": 5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "pdf.fonttype": 42,  # embed TrueType so the PDF text stays text (searchable, editable)
    "savefig.dpi": DPI,
}


@dataclass
class LambdaSeries:
    """Selection metric of one (student, method)'s grid runs against λ (other grid axes fixed)."""

    label: str
    method: str
    lams: list[float]
    values: list[float]
    chosen_lam: float | None = None
    student_index: int = 0
    # The chosen λ's selection metric on every seed (the grid ran on the first only): the seeds' spread.
    chosen_seed_values: list[float] = field(default_factory=list)


@dataclass
class EfficiencyPoint:
    label: str
    role: str  # teacher | student
    method: str
    value: float  # evaluation metric (%)
    parameters: float
    latency_ms: float | None = None
    value_std: float = 0.0  # over the seeds of a student's chosen setting (error bar)


@dataclass
class CostPoint:
    """One (student, method): per seed, its evaluation metric and its total cost per run."""

    label: str
    method: str
    values: list[float]
    seconds: list[float]


@dataclass
class RetentionPoint:
    """One (student, method), or the adapted teacher: per seed, its task metric and benchmark retention."""

    label: str
    method: str
    values: list[float]
    retention: list[float]


@dataclass
class Curve:
    """Training losses of one run: (step, value) pairs per loss name (``ce``, ``kd``)."""

    label: str
    method: str
    losses: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    student_index: int = 0


def method_color(method: str) -> str:
    """A method's own color (`Method.color`), the teacher's, else a spare one picked by name."""
    if method == "teacher":
        return TEACHER_COLOR
    if method in METHODS and METHODS[method].color:
        return METHODS[method].color
    return _EXTRA_COLORS[sum(map(ord, method)) % len(_EXTRA_COLORS)]  # stable across runs, unlike hash()


@contextlib.contextmanager
def _quiet_font_subsetting() -> Iterator[None]:
    # Embedding fonts in the PDF runs fontTools' subsetter, which logs hundreds of INFO lines per figure
    # under the CLI's INFO logging.
    logger = logging.getLogger("fontTools")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """``stem``.png (300 dpi) and ``stem``.pdf, each written atomically."""
    FigureCanvasAgg(fig)
    paths = []
    with _quiet_font_subsetting():
        for fmt in ("png", "pdf"):
            path = stem.with_suffix(f".{fmt}")
            with atomic_output(path) as tmp:
                # The temporary name does not end in .png/.pdf, so the format is given explicitly.
                fig.savefig(tmp, format=fmt, dpi=DPI)
            paths.append(path)
    return paths


def _new_figure(height_in: float, rows: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(COLUMN_WIDTH_IN, height_in), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0].tolist()
    return fig, axes


def _legend_below(fig: Figure, axes: Sequence) -> None:
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        # Two columns only when labels are short enough to fit side by side in one column's width at 9 pt.
        ncol = 2 if max(len(lab) for lab in labels) <= 20 else 1
        fig.legend(handles, labels, loc="outside lower center", ncol=min(ncol, len(handles)), frameon=False)


def _log_axis(ax, values: Sequence[float]) -> None:
    """Log x axis with plain-number tick labels: a few points get ticks at their own values (matplotlib's
    default leaves one or no labelled tick within a decade, or overlapping 6x10^1-style minor labels)."""
    ax.set_xscale("log")
    ax.margins(x=0.15)
    positive = sorted({float(f"{v:.3g}") for v in values if v > 0})
    if 0 < len(positive) <= 6:
        span = max(math.log10(positive[-1] / positive[0]), 1e-9)
        ticks = [positive[0]]
        for v in positive[1:]:
            if math.log10(v / ticks[-1]) / span > 0.12:  # labels closer than this would overlap at 9 pt
                ticks.append(v)
        ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def lambda_figure(stem: Path, *, title: str, ylabel: str, series: Sequence[LambdaSeries],
                  baselines: Mapping[str, float] | None = None) -> list[Path]:
    """λ sensitivity: one line (with markers, so a single λ still shows) per series; a hollow ring marks the
    chosen λ; ``baselines`` (label -> value, e.g. SFT) are dashed horizontal lines."""
    with rc_context(STYLE):
        fig, (ax,) = _new_figure(2.9)
        for s in series:
            pairs = sorted(zip(s.lams, s.values, strict=True))
            color = method_color(s.method)
            ls = _LINESTYLES[s.student_index % len(_LINESTYLES)]
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", color=color, linestyle=ls,
                    label=s.label)
            if s.chosen_lam is not None:
                chosen = [v for lam, v in pairs if math.isclose(lam, s.chosen_lam)]
                if chosen:
                    ax.plot([s.chosen_lam], [chosen[0]], marker="o", markersize=11, markerfacecolor="none",
                            markeredgecolor=color, linestyle="none")
                if len(s.chosen_seed_values) > 1:
                    ax.plot([s.chosen_lam] * len(s.chosen_seed_values), s.chosen_seed_values, marker="_",
                            markersize=9, color=color, linestyle="none")
        for i, (label, value) in enumerate((baselines or {}).items()):
            ax.axhline(value, color=method_color(baseline().name),
                       linestyle=_LINESTYLES[(i + 1) % len(_LINESTYLES)], linewidth=1.0, label=label)
        ax.set_xlabel("λ, weight of the KD term (unitless)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        lams = sorted({lam for s in series for lam in s.lams})
        if lams:
            ax.set_xticks(lams)
            pad = 0.05 * max(1.0, lams[-1] - lams[0])
            ax.set_xlim(lams[0] - pad, lams[-1] + pad)
        _legend_below(fig, [ax])
        return save_figure(fig, stem)


def efficiency_figure(stem: Path, *, title: str, ylabel: str,
                      points: Sequence[EfficiencyPoint]) -> list[Path]:
    """Metric against parameters (top) and against median latency (bottom); the dashed line is the frontier
    (no other model is both cheaper and better)."""
    with_latency = [p for p in points if p.latency_ms is not None and math.isfinite(p.latency_ms)]
    panels: list[tuple[str, str, list[EfficiencyPoint]]] = [
        ("parameters", "parameters (millions, log scale)", list(points))]
    if with_latency:
        panels.append(("latency", "latency p50 (ms, log scale)", with_latency))
    with rc_context(STYLE):
        fig, axes = _new_figure(2.5 * len(panels) + 0.6, rows=len(panels))
        markers = ("o", "s", "^", "D", "v", "P", "X")
        for ax, (kind, xlabel, pts) in zip(axes, panels, strict=True):
            xs = [p.parameters / 1e6 if kind == "parameters" else float(p.latency_ms or 0.0) for p in pts]
            ys = [p.value for p in pts]
            front = pareto_front(xs, ys)
            if len(front) > 1:
                ax.plot([xs[i] for i in front], [ys[i] for i in front], linestyle="--", color="#999999",
                        linewidth=1.0, drawstyle="steps-post", label="frontier", zorder=1)
            for j, (p, x, y) in enumerate(zip(pts, xs, ys, strict=True)):
                teacher = p.role == "teacher"
                color = method_color("teacher" if teacher else p.method)
                ax.errorbar([x], [y], yerr=[p.value_std] if p.value_std else None, capsize=2,
                            linestyle="none", marker="*" if teacher else markers[j % len(markers)],
                            markersize=10 if teacher else 6, color=color, label=p.label, zorder=3)
            _log_axis(ax, xs)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
        axes[0].set_title(title)
        _legend_below(fig, axes)
        return save_figure(fig, stem)


def cost_figure(stem: Path, *, title: str, ylabel: str, points: Sequence[CostPoint]) -> list[Path]:
    """Metric against total cost per run (seconds, log scale): every seed as a small dot, the seed mean with
    ±1 std bars on both axes, the dashed line the Pareto front of the means (no other method both cheaper
    and better)."""
    pts = [p for p in points if p.values and p.seconds]
    with rc_context(STYLE):
        fig, (ax,) = _new_figure(3.1)
        xs = [sum(p.seconds) / len(p.seconds) for p in pts]
        ys = [sum(p.values) / len(p.values) for p in pts]
        front = pareto_front(xs, ys)
        if len(front) > 1:
            ax.plot([xs[i] for i in front], [ys[i] for i in front], linestyle="--", color="#999999",
                    linewidth=1.0, drawstyle="steps-post", label="Pareto front", zorder=1)
        for p, x, y in zip(pts, xs, ys, strict=True):
            color = method_color(p.method)
            n = min(len(p.values), len(p.seconds))
            ax.plot(p.seconds[:n], p.values[:n], linestyle="none", marker=".", markersize=4, color=color,
                    alpha=0.6, zorder=2)
            ax.errorbar([x], [y], xerr=[mean_std(p.seconds)[1]], yerr=[mean_std(p.values)[1]], marker="o",
                        markersize=6, color=color, capsize=2, linestyle="none", label=p.label, zorder=3)
        _log_axis(ax, xs)
        ax.set_xlabel("cost per run (s, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        _legend_below(fig, [ax])
        return save_figure(fig, stem)


def retention_figure(stem: Path, *, title: str, xlabel: str, ylabel: str,
                     points: Sequence[RetentionPoint]) -> list[Path]:
    """Task metric against benchmark retention: every seed as a small dot, the seed mean with ±1 std bars on
    both axes (up and right: better on the task, more general ability kept)."""
    pts = [p for p in points if p.values and p.retention]
    with rc_context(STYLE):
        fig, (ax,) = _new_figure(3.1)
        # 100%: the base teacher's scores, everything kept
        ax.axvline(100.0, linestyle="--", color="#999999", linewidth=1.0, label="base teacher", zorder=1)
        for p in pts:
            color = method_color(p.method)
            n = min(len(p.values), len(p.retention))
            ax.plot(p.retention[:n], p.values[:n], linestyle="none", marker=".", markersize=4, color=color,
                    alpha=0.6, zorder=2)
            ax.errorbar([mean_std(p.retention)[0]], [mean_std(p.values)[0]],
                        xerr=[mean_std(p.retention)[1]], yerr=[mean_std(p.values)[1]],
                        marker="s" if p.method == "teacher" else "o", markersize=6, color=color, capsize=2,
                        linestyle="none", label=p.label, zorder=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        _legend_below(fig, [ax])
        return save_figure(fig, stem)


def training_figure(stem: Path, *, title: str, curves: Sequence[Curve]) -> list[Path]:
    """Task cross-entropy (top) and, when any run has one, the KD term (bottom) against the optimizer step."""
    names = [("ce", "task CE loss (nats/token)")]
    if any(c.losses.get("kd") for c in curves):
        names.append(("kd", "KD loss (per answer token)"))
    with rc_context(STYLE):
        fig, axes = _new_figure(2.3 * len(names) + 0.6, rows=len(names))
        for ax, (name, ylabel) in zip(axes, names, strict=True):
            for c in curves:
                steps, values = c.losses.get(name, ([], []))
                if steps:
                    ax.plot(steps, values, color=method_color(c.method),
                            linestyle=_LINESTYLES[c.student_index % len(_LINESTYLES)],
                            marker="." if len(steps) < 30 else None, label=c.label)
            ax.set_ylabel(ylabel)
            ax.set_xlabel("optimizer step")
        axes[0].set_title(title)
        _legend_below(fig, axes)
        return save_figure(fig, stem)


def style_font_sizes() -> list[float]:
    """Every font size the figures use, in points (for tests: none may be below 9 pt)."""
    with rc_context(STYLE):
        keys = ("font.size", "axes.titlesize", "axes.labelsize", "xtick.labelsize", "ytick.labelsize",
                "legend.fontsize")
        from matplotlib.font_manager import FontProperties

        return [FontProperties(size=rcParams[k]).get_size_in_points() for k in keys]
