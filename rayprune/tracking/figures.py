"""The figures a job logs (score distributions, probe scatter, composition, training curves).

Matplotlib only, no MLflow. Figures are built without pyplot, on their own Agg canvas, so
nothing touches the global backend or figure registry.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - typing only
    import numpy as np
    from matplotlib.figure import Figure


def close_figure(fig: Figure) -> None:
    """Release a figure; pyplot-managed figures must be closed through pyplot."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is not None and getattr(fig.canvas, "manager", None) is not None:
        pyplot.close(fig)
    else:
        fig.clear()


def _new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    """A Figure on the Agg canvas, without pyplot (no global backend or figure registry)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finite(values: Any) -> np.ndarray:
    import numpy as np

    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def figure_score_distributions(measured_scores: Any, extrapolated_scores: Any, bins: int = 40) -> Figure:
    """Overlaid density histograms of measured (subset) and extrapolated (pool) scores."""
    import numpy as np

    measured, extrapolated = _finite(measured_scores), _finite(extrapolated_scores)
    fig = _new_figure()
    ax = fig.add_subplot()
    both = np.concatenate([measured, extrapolated])
    edges = np.histogram_bin_edges(both, bins=bins) if both.size else bins
    for values, label in ((measured, "measured"), (extrapolated, "extrapolated")):
        if values.size:
            ax.hist(values, bins=edges, density=True, alpha=0.5, label=f"{label} (n={values.size})")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title("Score distributions")
    if both.size:
        ax.legend()
    return fig


def figure_scatter(x: Any, y: Any, xlabel: str, ylabel: str, title: str) -> Figure:
    """Scatter of paired values with the y = x line and Pearson r (e.g. extrapolated vs measured)."""
    import numpy as np

    xs = np.asarray(x, dtype=np.float64).ravel()
    ys = np.asarray(y, dtype=np.float64).ravel()
    if xs.shape != ys.shape:
        raise ValueError(f"x and y must have the same length; got {xs.size} and {ys.size}")
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot()
    ax.scatter(xs, ys, s=8, alpha=0.5)
    if xs.size:
        lo, hi = float(min(xs.min(), ys.min())), float(max(xs.max(), ys.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="y = x")
        if xs.size > 1 and xs.std() > 0 and ys.std() > 0:
            title = f"{title} (Pearson r = {np.corrcoef(xs, ys)[0, 1]:.3f}, n = {xs.size})"
        ax.legend(loc="upper left")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def figure_composition(before: Mapping[str, int], after: Mapping[str, int], title: str) -> Figure:
    """Grouped bars of counts per key (class or source) before and after pruning."""
    import numpy as np

    keys = sorted(set(before) | set(after), key=str)
    pos = np.arange(len(keys))
    fig = _new_figure(max(6.4, 0.6 * len(keys) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.4
    bars_before = ax.bar(pos - width / 2, [before.get(k, 0) for k in keys], width, label="before")
    bars_after = ax.bar(pos + width / 2, [after.get(k, 0) for k in keys], width, label="after")
    ax.bar_label(bars_before, fontsize=7)
    ax.bar_label(bars_after, fontsize=7)
    ax.set_xticks(pos, [str(k) for k in keys])
    ax.set_ylabel("samples")
    ax.set_title(title)
    ax.legend()
    return fig


def figure_curves(curves: Mapping[str, Sequence[float]], xlabel: str, title: str = "") -> Figure:
    """One line per named series (e.g. training loss and accuracy per epoch), x from 1."""
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, values in curves.items():
        ys = list(values)
        ax.plot(range(1, len(ys) + 1), ys, marker="o" if len(ys) <= 30 else None, markersize=3, label=name)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title)
    if curves:
        ax.legend()
    return fig
