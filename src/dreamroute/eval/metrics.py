"""Cost–quality curve metrics for routing policies: PGR, APGR, CPT (RouteLLM) and AIQ (RouterBench).

A replay sweep of one policy knob yields a *curve*: a list of points
``(cost_fraction, accuracy)``, shape ``[(x_0, a_0), ..., (x_{n-1}, a_{n-1})]``, where

    cost_fraction x = ATP spent / ATP of always-top-tier on the same items   (x >= 0)
    accuracy      a = fraction of items answered correctly                   (0 <= a <= 1)

The points come in sweep-knob order, which need not be x order; every metric here sorts
by x itself (``average_curves`` deliberately does not, see there).

Sources (read, not copied):

* RouteLLM — Ong et al., "RouteLLM: Learning to Route LLMs with Preference Data"
  (arXiv:2406.18665); code lm-sys/RouteLLM, ``routellm/evals/evaluate.py``
  (``generate_results``: ``pct_call_metric``, ``auc_metric``, ``apgr_metric``) and
  ``routellm/evals/benchmarks.py`` (the threshold sweep). There the x axis is the percentage
  of calls to the strong model; for a two-model pair that is exactly our cost fraction.
* RouterBench — Hu et al., "RouterBench: A Benchmark for Multi-LLM Routing System"
  (arXiv:2403.12031); code withmartian/routerbench, ``evaluation/AIQ.py``.

More than two tiers. RouteLLM's metrics are defined between a *weak* and a *strong* model.
Here weak = always-cheapest-tier (cost fraction ``x_cheapest``, accuracy ``weak_acc``) and
strong = always-top-tier (cost fraction 1, accuracy ``strong_acc``); the cost axis is
rescaled by :func:`rescale_cost` so that weak sits at 0 and strong at 1. For RouteLLM's own
two-model data ``x_cheapest`` = 0 and the rescaling is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Point = tuple[float, float]
"""One operating point ``(cost_fraction, accuracy)``."""

Curve = list[Point]
"""A cost–quality curve: ``[(x, accuracy), ...]`` of length n >= 1 (sweep order)."""

CPT_TARGETS: dict[str, float] = {"20": 0.2, "50": 0.5, "80": 0.8}
"""RouteLLM's reported CPT levels (its columns "20% qual", "50% qual", "80% qual")."""

_EPS = 1e-9  # tolerance for "reaches the target" (PGR values are differences of floats)


# --------------------------------------------------------------------------- helpers

def sort_by_cost(points: Sequence[Point]) -> Curve:
    """The points as floats, sorted by cost (x), ties kept in input order (stable).

    Args:
        points: ``[(x, acc), ...]``, any order.
    Returns:
        ``[(x, acc), ...]`` with non-decreasing x.
    """
    return sorted(((float(x), float(a)) for x, a in points), key=lambda p: p[0])


def running_max(values: Sequence[float]) -> list[float]:
    """Prefix maximum: ``m_i = max(v_0, ..., v_i)``; same length as ``values``."""
    out: list[float] = []
    best = -math.inf
    for v in values:
        best = max(best, float(v))
        out.append(best)
    return out


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Trapezoid rule ``sum_i (x_{i+1} - x_i) * (y_i + y_{i+1}) / 2`` (as ``numpy.trapz(ys, xs)``)."""
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2.0 for i in range(len(xs) - 1))


def _check_points(points: Sequence[Point]) -> None:
    if len(points) == 0:
        raise ValueError("a cost–quality curve needs at least one point")


# --------------------------------------------------------------------------- RouteLLM

def pgr(accuracy: float, weak_acc: float, strong_acc: float) -> float:
    """Performance gap recovered (RouteLLM, arXiv:2406.18665 §2):

        PGR = (accuracy - weak_acc) / (strong_acc - weak_acc)

    0 at the weak model's accuracy, 1 at the strong model's; it can leave [0, 1] (a router
    may beat the strong model or fall below the weak one) and is not clipped.

    When ``strong_acc == weak_acc`` there is no gap to recover and PGR is undefined: the
    result is ``math.nan`` (RouteLLM's code would divide by zero). Callers that aggregate
    should treat NaN as "not applicable", not as 0.
    """
    gap = float(strong_acc) - float(weak_acc)
    if gap == 0.0:
        return math.nan
    return (float(accuracy) - float(weak_acc)) / gap


def rescale_cost(x: float, x_cheapest: float) -> float:
    """Cost fraction rescaled so always-cheapest is 0 and always-top is 1:

        x' = clip((x - x_cheapest) / (1 - x_cheapest), 0, 1)

    ``x`` and ``x_cheapest`` are fractions of the always-top-tier ATP. This is the
    generalisation of RouteLLM's "strong-model calls (%)" to more than two tiers (weak =
    always-cheapest tier, strong = always-top tier). ``x_cheapest = 0`` (RouteLLM's two-model
    data, where a weak call counts as free) gives the identity on [0, 1]. Points cheaper than
    always-cheapest clip to 0, points dearer than always-top clip to 1.

    Raises:
        ValueError: if ``x_cheapest >= 1`` (the cheapest tier costs as much as the top one,
            so the rescaled axis has no length).
    """
    x_cheapest = float(x_cheapest)
    if x_cheapest >= 1.0:
        raise ValueError(f"x_cheapest must be < 1 (got {x_cheapest})")
    v = (float(x) - x_cheapest) / (1.0 - x_cheapest)
    return min(1.0, max(0.0, v))


def _rescaled_sorted(points: Sequence[Point], x_cheapest: float) -> Curve:
    return sort_by_cost([(rescale_cost(x, x_cheapest), a) for x, a in points])


def apgr(points: Sequence[Point], weak_acc: float, strong_acc: float,
         x_cheapest: float = 0.0) -> float:
    """Average performance gap recovered (RouteLLM): the area under PGR over the rescaled
    strong-call fraction, by the trapezoid rule, exactly as ``apgr_metric`` in
    lm-sys/RouteLLM ``routellm/evals/evaluate.py`` computes it.

    With the points rescaled (:func:`rescale_cost`) and sorted by x (what RouteLLM does with
    ``sort_values(by=["strong_percentage"])``), x_0 <= ... <= x_{n-1}:

        AUC      = trapz(acc_i, x_i)
        weak_auc = trapz(weak_acc, x_i)   = weak_acc   * (x_{n-1} - x_0)
        strong_auc = trapz(strong_acc, x_i) = strong_acc * (x_{n-1} - x_0)
        APGR     = (AUC - weak_auc) / (strong_auc - weak_auc)
                 = trapz(PGR_i, x_i) / (x_{n-1} - x_0)

    Endpoints. RouteLLM adds no points: neither (0, weak) nor (1, strong) is inserted or
    implied; the integral runs over the observed points only and is normalised by their
    x span. It equals "the area under PGR from 0 to 1" because RouteLLM's sweep always
    contains both extremes: ``benchmarks.py`` takes ``pd.qcut`` bin edges of the router
    scores as thresholds, the first (min score, ``>=``) sends every call to the strong model
    (x = 1) and the last (max score, strict ``>``) sends none (x = 0). This function matches
    that: a sweep here should likewise include the always-cheapest and always-top settings,
    otherwise the result is the mean PGR over the sub-range [x_0, x_{n-1}] only.

    Args:
        points: ``[(cost_fraction, accuracy), ...]``, any order, n >= 1.
        weak_acc, strong_acc: accuracy of always-cheapest / always-top on the same items.
        x_cheapest: cost fraction of always-cheapest (0 for RouteLLM data).
    Returns:
        APGR (1 = recovers the whole gap everywhere; 0.5 for a random router, whose curve
        is the straight line from (0, weak) to (1, strong)). ``math.nan`` when the gap is 0
        (see :func:`pgr`) or the rescaled x span is 0 (fewer than two distinct costs), where
        RouteLLM's formula is 0/0.
    """
    _check_points(points)
    pts = _rescaled_sorted(points, x_cheapest)
    xs = [x for x, _ in pts]
    span = xs[-1] - xs[0]
    if span <= 0.0 or float(strong_acc) == float(weak_acc):
        return math.nan
    pgrs = [pgr(a, weak_acc, strong_acc) for _, a in pts]
    return _trapezoid(xs, pgrs) / span


def cpt(points: Sequence[Point], weak_acc: float, strong_acc: float, pgr_target: float,
        x_cheapest: float = 0.0) -> float | None:
    """Call-performance threshold CPT(p): the least rescaled cost fraction at which the curve
    reaches PGR >= p (RouteLLM's "p% qual" columns, e.g. CPT(50%)).

    Procedure: rescale and sort the points by x; compute PGR_i; take the running maximum
    M_i = max(PGR_0..PGR_i) (spending more never has to lose quality: a cheaper setting
    stays available, so a dip in the curve is ignored); with i the first index where
    M_i >= p,

        CPT(p) = x_0                                                   if i = 0
        CPT(p) = x_{i-1} + (p - M_{i-1}) / (M_i - M_{i-1}) * (x_i - x_{i-1})   otherwise

    i.e. linear interpolation on the running-maximum curve through (x_i, M_i).

    Difference from RouteLLM. ``pct_call_metric`` in ``routellm/evals/evaluate.py`` computes
    ``np.interp(weak + p * (strong - weak), accuracy, strong_percentage)`` over the points
    sorted by strong percentage, i.e. it interpolates x as a function of *raw* accuracy.
    ``np.interp`` assumes its x-coordinates (here the accuracies) increase and does not check,
    so a non-monotone curve gives an ill-defined answer; and it clamps, so an unreached
    target yields the last point's x (100%) instead of "never", and a target below the first
    accuracy yields the first x. On a curve whose accuracy increases with cost and that
    reaches the target, the two agree; here dips are removed by the running max and an
    unreached target is ``None``. RouteLLM prints the value in percent; this returns a
    fraction.

    Args:
        points: ``[(cost_fraction, accuracy), ...]``, any order, n >= 1.
        weak_acc, strong_acc: accuracy of always-cheapest / always-top.
        pgr_target: p, e.g. 0.5 for CPT(50%).
        x_cheapest: cost fraction of always-cheapest (0 for RouteLLM data).
    Returns:
        The rescaled cost fraction in [0, 1]; ``None`` if no point reaches PGR >= p;
        ``math.nan`` if ``strong_acc == weak_acc`` (PGR undefined).
    """
    _check_points(points)
    if float(strong_acc) == float(weak_acc):
        return math.nan
    pts = _rescaled_sorted(points, x_cheapest)
    xs = [x for x, _ in pts]
    m = running_max([pgr(a, weak_acc, strong_acc) for _, a in pts])
    p = float(pgr_target)
    for i, mi in enumerate(m):
        if mi >= p - _EPS:
            if i == 0:
                return xs[0]
            lo, hi = m[i - 1], mi  # lo < p - eps <= hi, so hi > lo
            t = min(1.0, max(0.0, (p - lo) / (hi - lo)))
            return xs[i - 1] + t * (xs[i] - xs[i - 1])
    return None


def cpt_table(points: Sequence[Point], weak_acc: float, strong_acc: float,
              x_cheapest: float = 0.0) -> dict[str, float | None]:
    """CPT at RouteLLM's three levels: ``{"20": CPT(0.2), "50": CPT(0.5), "80": CPT(0.8)}``.

    Values are rescaled cost fractions in [0, 1] (not percent), ``None`` where the level is
    never reached; see :func:`cpt`.
    """
    return {k: cpt(points, weak_acc, strong_acc, p, x_cheapest) for k, p in CPT_TARGETS.items()}


# --------------------------------------------------------------------------- RouterBench

def nondecreasing_convex_hull(points: Sequence[Point]) -> Curve:
    """RouterBench's non-decreasing convex hull (NDCH, arXiv:2403.12031 §3) of cost–quality
    points: the upper convex hull, from the cheapest point up to the cheapest point of
    highest quality.

    Mixing two routers at random realises any point on the segment between them, so the
    achievable frontier is the upper hull; after its highest point the hull would decrease,
    and since paying more need not lower quality that part is cut (the metric then holds
    the top quality flat, see :func:`aiq`). At equal cost only the best quality counts.

    Args:
        points: ``[(cost, quality), ...]``, any order, n >= 1.
    Returns:
        Hull vertices ``[(cost, quality), ...]``, strictly increasing in cost and in quality
        (collinear middle points dropped); 1 <= length <= n.
    """
    _check_points(points)
    best: dict[float, float] = {}
    for x, y in points:
        x, y = float(x), float(y)
        if x not in best or y > best[x]:
            best[x] = y
    pts = sorted(best.items())
    hull: list[Point] = []
    for p in pts:  # Andrew's monotone chain, upper half: keep clockwise (right) turns only
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            cross = (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1)
            if cross >= 0:  # hull[-1] lies on or below the chord hull[-2] -> p
                hull.pop()
            else:
                break
        hull.append(p)
    top = max(range(len(hull)), key=lambda i: (hull[i][1], -i))  # first (cheapest) maximum
    return hull[: top + 1]


def aiq(points: Sequence[Point]) -> float:
    """Average improvement in quality (RouterBench, arXiv:2403.12031 §3): the mean height of the
    non-decreasing convex hull over the cost range of the points,

        AIQ = 1 / (c_max - c_min) * integral_{c_min}^{c_max} NDCH(c) dc

    with c_min, c_max the least and greatest cost among ``points`` (raw cost fractions, not
    rescaled), NDCH from :func:`nondecreasing_convex_hull` and held flat at its top quality
    from its last vertex to c_max; the integral is exact for this piecewise-linear function
    (trapezoid rule on the vertices).

    Degenerate range: with a single point, or all points at one cost (c_max == c_min), the
    range has no length; AIQ is then the limit of the mean, the hull's quality at that cost
    (the best quality there).

    Difference from RouterBench's code. ``calc_AIQ`` in withmartian/routerbench
    ``evaluation/AIQ.py`` builds the hull per router, extends every hull flat to the greatest
    cost over *all routers being compared*, integrates with ``np.trapz`` from the hull's first
    point and divides by that greatest cost (not by c_max - c_min). That makes AIQ depend on
    the set of routers compared; this function follows the paper's per-curve definition over
    the curve's own cost range. To compare on a common range, add the same extreme points.

    Args:
        points: ``[(cost_fraction, accuracy), ...]``, any order, n >= 1.
    Returns:
        AIQ, in accuracy units.
    """
    hull = nondecreasing_convex_hull(points)
    c_min = min(float(x) for x, _ in points)
    c_max = max(float(x) for x, _ in points)
    if c_max <= c_min:
        return hull[0][1]
    xs = [x for x, _ in hull] + [c_max]
    ys = [y for _, y in hull] + [hull[-1][1]]
    return _trapezoid(xs, ys) / (c_max - c_min)


# --------------------------------------------------------------------------- several seeds

def average_curves(curves: Sequence[Sequence[Point]]) -> Curve:
    """Point-by-point mean of several seeds' sweeps of the same knob values.

    The k-th point of every curve is the same knob setting (curves are in sweep order, not
    x order, and are *not* re-sorted), so the result's k-th point is

        ( mean_s x_{s,k},  mean_s acc_{s,k} )

    Args:
        curves: S >= 1 curves, each ``[(x, acc), ...]`` of the same length n.
    Returns:
        ``[(x, acc), ...]`` of length n, in the same knob order.
    Raises:
        ValueError: no curves, or curves of different lengths.
    """
    if len(curves) == 0:
        raise ValueError("average_curves needs at least one curve")
    n = len(curves[0])
    if any(len(c) != n for c in curves):
        raise ValueError(f"curves differ in length: {[len(c) for c in curves]}")
    s = len(curves)
    return [(sum(float(c[k][0]) for c in curves) / s, sum(float(c[k][1]) for c in curves) / s)
            for k in range(n)]


def summarize_curve(points: Sequence[Point], weak_acc: float, strong_acc: float,
                    x_cheapest: float = 0.0) -> dict:
    """All metrics of one curve: ``{"apgr": float, "cpt": {"20"|"50"|"80": float|None},
    "aiq": float}`` (APGR and CPT on the rescaled axis, AIQ on raw cost fractions)."""
    return {
        "apgr": apgr(points, weak_acc, strong_acc, x_cheapest),
        "cpt": cpt_table(points, weak_acc, strong_acc, x_cheapest),
        "aiq": aiq(points),
    }
