"""Cost–quality plot of routing policies (PNG, matplotlib's Agg renderer, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

Point = tuple[float, float]


def plot_cost_quality(path: str | Path, curves: Mapping[str, Sequence[Point]],
                      singles: Mapping[str, Point], oracle: Point | None, title: str) -> Path:
    """Write a cost–quality plot to ``path`` (PNG) and return it as a ``Path``.

    Args:
        path: output file; parent folders are created.
        curves: policy name -> ``[(cost_fraction, accuracy), ...]`` (any order; drawn sorted
            by cost) — one line with markers each.
        singles: tier name -> ``(cost_fraction, accuracy)`` of always using that tier — one
            labelled marker each.
        oracle: ``(cost_fraction, accuracy)`` of the per-item oracle, drawn as a star, or None.
        title: figure title.

    x axis: cost fraction (ATP / ATP of the top tier); y axis: accuracy.

    matplotlib is imported here, not at module import, and only its object API with the Agg
    canvas is used (no pyplot, so no global backend switch and no figure left open).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    for name, pts in curves.items():
        pts = sorted(((float(x), float(y)) for x, y in pts), key=lambda p: p[0])
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4,
                linestyle="-", linewidth=1.5, label=name)

    for name, (x, y) in singles.items():
        ax.plot([x], [y], marker="s", markersize=7, linestyle="none", color="0.35")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, -10), fontsize=8)

    if oracle is not None:
        ax.plot([oracle[0]], [oracle[1]], marker="*", markersize=15, linestyle="none",
                color="gold", markeredgecolor="black", label="oracle")

    ax.set_xlabel("cost fraction (ATP / ATP of the top tier)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out
