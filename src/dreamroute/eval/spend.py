"""Spending against the budget, read from a replay's per-request trace.

A trace (``simulate --json``'s ``trace``) is a list with one object per request,
in the order served: ``{"i", "key", "tiers", "roles", "atp_joules", "correct",
"final", "lam"}`` (tiers called in order and their roles, the ATP charged for the
request, J, whether the answer was graded correct, the answering tier and the λ
it was decided with). :func:`spend_summary` turns it into the figures issue 12
asks for (whole-run and windowed spend against the budget); :func:`plot_spend`
draws the running ATP per request against the budget line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def running_average(atp: Sequence[float]) -> np.ndarray:
    """Running mean ATP per request after each request: r_n = (a_1 + … + a_n) / n, shape (N,)."""
    a = np.asarray(atp, dtype=np.float64)
    return np.cumsum(a) / np.arange(1, len(a) + 1) if len(a) else a


def windowed_average(atp: Sequence[float], window: int) -> np.ndarray:
    """Mean ATP of each run of ``window`` consecutive requests, shape (max(0, N − window + 1),)."""
    a = np.asarray(atp, dtype=np.float64)
    if len(a) < window:
        return np.zeros(0)
    c = np.concatenate([[0.0], np.cumsum(a)])
    return (c[window:] - c[:-window]) / window


def spend_summary(trace: list[dict], budget: float | None, *, after: int = 50, window: int = 50) -> dict:
    """Spend figures of one trace against ``budget`` (J per request).

    Returns ``{"n", "atp_per_request", "whole_run_ratio", "max_running_ratio_after",
    "after", "max_window_ratio", "window", "accuracy"}``: the run's mean ATP, that mean over
    the budget, the largest running average after the first ``after`` requests over the
    budget (issue 12's "never above 1.10 × budget after the first 50"), and the largest mean
    of ``window`` consecutive requests over the budget. Ratios are None without a budget
    (or a zero one).
    """
    atp = [float(t["atp_joules"]) for t in trace]
    n = len(atp)
    run = running_average(atp)
    win = windowed_average(atp, window)
    ok = budget is not None and budget > 0
    return {
        "n": n,
        "atp_per_request": float(run[-1]) if n else 0.0,
        "whole_run_ratio": float(run[-1] / budget) if ok and n else None,
        "max_running_ratio_after": float(run[after:].max() / budget) if ok and n > after else None,
        "after": after,
        "max_window_ratio": float(win.max() / budget) if ok and len(win) else None,
        "window": window,
        "accuracy": float(np.mean([bool(t["correct"]) for t in trace])) if n else 0.0,
    }


def segment_summary(trace: list[dict], bounds: Sequence[int]) -> list[dict]:
    """Per segment [b_i, b_{i+1}) of the trace: requests, accuracy, mean ATP and tier mix
    (``{"start", "end", "n", "accuracy", "atp_per_request", "final_tiers"}``)."""
    out = []
    edges = [0, *[b for b in bounds if 0 < b < len(trace)], len(trace)]
    for s, e in zip(edges, edges[1:]):
        seg = trace[s:e]
        mix: dict[str, int] = {}
        for t in seg:
            mix[t["final"]] = mix.get(t["final"], 0) + 1
        out.append({"start": s, "end": e, "n": len(seg),
                    "accuracy": float(np.mean([bool(t["correct"]) for t in seg])) if seg else 0.0,
                    "atp_per_request": float(np.mean([t["atp_joules"] for t in seg])) if seg else 0.0,
                    "final_tiers": mix})
    return out


def plot_spend(path: str | Path, traces: dict[str, list[dict]], budget: float | None, title: str,
               marks: Sequence[int] = ()) -> Path:
    """Write a PNG of the running ATP per request of each trace against the budget line.

    Args:
        path: output file; parent folders are created.
        traces: label → trace (see the module docstring); one line each.
        budget: J per request, drawn as a horizontal line with the 1.10 × budget bound
            (nothing drawn when None).
        title: figure title.
        marks: request indices drawn as vertical dotted lines (e.g. where difficulty shifts).

    matplotlib's object API with the Agg canvas (no pyplot, no display).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for label, tr in traces.items():
        run = running_average([t["atp_joules"] for t in tr])
        if len(run):
            ax.plot(np.arange(1, len(run) + 1), run, linewidth=1.3, label=label)
    if budget is not None:
        ax.axhline(budget, color="black", linewidth=1.0, label=f"budget {budget:g}")
        ax.axhline(1.10 * budget, color="black", linewidth=0.8, linestyle="--", label="1.10 × budget")
    for m in marks:
        ax.axvline(m, color="0.5", linewidth=0.8, linestyle=":")
    ax.set_xlabel("request")
    ax.set_ylabel("running ATP per request")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
    return out
