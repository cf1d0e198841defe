"""Cost–quality metrics (PGR, APGR, CPT, AIQ) on small hand-computed tables, and the plot."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from dreamroute.eval.metrics import (
    aiq,
    apgr,
    average_curves,
    cpt,
    cpt_table,
    nondecreasing_convex_hull,
    pgr,
    rescale_cost,
    running_max,
    summarize_curve,
)

WEAK, STRONG = 0.5, 0.9

# Main table, given out of x order (as a knob sweep may produce it).
#   x     acc   PGR = (acc - 0.5) / 0.4
#   0     0.5   0
#   0.25  0.7   0.5
#   0.5   0.8   0.75
#   1     0.9   1
TABLE = [(0.5, 0.8), (0.0, 0.5), (1.0, 0.9), (0.25, 0.7)]


def approx(v):
    return pytest.approx(v, abs=1e-12)


def test_pgr_values_and_zero_gap():
    assert pgr(0.5, WEAK, STRONG) == approx(0.0)
    assert pgr(0.7, WEAK, STRONG) == approx(0.5)
    assert pgr(0.9, WEAK, STRONG) == approx(1.0)
    assert pgr(0.95, WEAK, STRONG) == approx(1.125)  # not clipped: beats the strong model
    assert pgr(0.4, WEAK, STRONG) == approx(-0.25)
    assert math.isnan(pgr(0.7, 0.6, 0.6))  # no gap: undefined


def test_apgr_hand_computed_trapezoid():
    # Sorted by x, trapezoids of PGR:
    #   [0, .25]:  .25 * (0   + .5 ) / 2 = 0.0625
    #   [.25, .5]: .25 * (.5  + .75) / 2 = 0.15625
    #   [.5, 1]:   .5  * (.75 + 1  ) / 2 = 0.4375
    #   sum = 0.65625, x span = 1  ->  APGR = 0.65625
    # (Unsorted, the same formula would give (-.1875 + .5 - .5625) / -.25 = 1.0.)
    assert apgr(TABLE, WEAK, STRONG) == approx(0.65625)


def test_apgr_adds_no_endpoints_like_routellm():
    # Only x = .25 and .5: RouteLLM integrates over the observed points and divides by
    # their span: .15625 / .25 = 0.625. Implied (0, weak) and (1, strong) would give 0.65625.
    assert apgr([(0.5, 0.8), (0.25, 0.7)], WEAK, STRONG) == approx(0.625)


def test_apgr_undefined_cases():
    assert math.isnan(apgr([(0.3, 0.7)], WEAK, STRONG))  # one point: no span
    assert math.isnan(apgr([(0.3, 0.7), (0.3, 0.8)], WEAK, STRONG))  # one cost: no span
    assert math.isnan(apgr(TABLE, 0.6, 0.6))  # no gap
    with pytest.raises(ValueError):
        apgr([], WEAK, STRONG)


def test_cpt_hand_computed_interpolation():
    # Running max of PGR = [0, .5, .75, 1] at x = [0, .25, .5, 1].
    #   CPT(.2): between (0, 0) and (.25, .5):  .25 * .2 / .5        = 0.1
    #   CPT(.5): reached exactly at x = .25                          = 0.25
    #   CPT(.8): between (.5, .75) and (1, 1): .5 + .5 * .05 / .25   = 0.6
    assert cpt(TABLE, WEAK, STRONG, 0.2) == approx(0.1)
    assert cpt(TABLE, WEAK, STRONG, 0.5) == approx(0.25)
    assert cpt(TABLE, WEAK, STRONG, 0.8) == approx(0.6)
    table = cpt_table(TABLE, WEAK, STRONG)
    assert set(table) == {"20", "50", "80"}
    assert table["20"] == approx(0.1) and table["50"] == approx(0.25) and table["80"] == approx(0.6)


def test_cpt_ignores_a_dip_via_running_max():
    #   x     acc   PGR     running max
    #   0     .5    0       0
    #   .25   .8    .75     .75
    #   .5    .6    .25     .75    <- dip
    #   .75   .85   .875    .875
    #   1     .9    1       1
    # CPT(.5): between (0, 0) and (.25, .75): .25 * .5 / .75 = 1/6
    # CPT(.8): between (.5, .75) and (.75, .875): .5 + .25 * .05 / .125 = 0.6
    #   (on the raw curve, between (.5, .25) and (.75, .875), it would be 0.72)
    dip = [(0.0, 0.5), (0.25, 0.8), (0.5, 0.6), (0.75, 0.85), (1.0, 0.9)]
    assert running_max([0, 0.75, 0.25, 0.875, 1]) == [0, 0.75, 0.75, 0.875, 1]
    assert cpt(dip, WEAK, STRONG, 0.5) == approx(1 / 6)
    assert cpt(dip, WEAK, STRONG, 0.8) == approx(0.6)


def test_cpt_never_reached_is_none_and_first_point_reached():
    # PGR = 0, .75, .9 at x = 0, .5, 1
    pts = [(0.0, 0.5), (0.5, 0.8), (1.0, 0.86)]
    assert cpt(pts, WEAK, STRONG, 0.95) is None
    assert cpt(pts, WEAK, STRONG, 0.9) == approx(1.0)  # reached exactly at the last point
    assert cpt_table([(0.0, 0.5), (1.0, 0.6)], WEAK, STRONG) == {"20": approx(0.8), "50": None, "80": None}
    # The cheapest point already reaches the target: its cost, no extrapolation below it.
    assert cpt([(0.2, 0.62), (1.0, 0.9)], WEAK, STRONG, 0.2) == approx(0.2)
    assert math.isnan(cpt(pts, 0.6, 0.6, 0.5))


def test_rescale_cost():
    assert rescale_cost(0.2, 0.2) == approx(0.0)
    assert rescale_cost(0.4, 0.2) == approx(0.25)  # .2 / .8
    assert rescale_cost(0.6, 0.2) == approx(0.5)
    assert rescale_cost(1.0, 0.2) == approx(1.0)
    assert rescale_cost(0.1, 0.2) == 0.0  # clipped
    assert rescale_cost(1.3, 0.2) == 1.0  # clipped
    assert rescale_cost(0.37, 0.0) == approx(0.37)  # RouteLLM data: identity
    with pytest.raises(ValueError):
        rescale_cost(0.5, 1.0)


def test_metrics_on_rescaled_axis_with_x_cheapest():
    # Same table as TABLE but with always-cheapest at 20% of top-tier ATP:
    # raw x = .2, .4, .6, 1  ->  rescaled .0, .25, .5, 1 (the TABLE's axis).
    pts = [(0.2, 0.5), (0.4, 0.7), (0.6, 0.8), (1.0, 0.9)]
    table = cpt_table(pts, WEAK, STRONG, x_cheapest=0.2)
    assert table["20"] == approx(0.1) and table["50"] == approx(0.25) and table["80"] == approx(0.6)
    # Un-rescaled, CPT(50%) would be the raw .4.
    assert cpt(pts, WEAK, STRONG, 0.5) == approx(0.4)
    assert apgr(pts, WEAK, STRONG, x_cheapest=0.2) == approx(0.65625)
    # A point below the cheapest cost clips onto x = 0 instead of widening the span:
    # rescaled, the span stays 1 and the extra point adds a zero-width piece.
    clipped = pts + [(0.1, 0.5)]
    assert apgr(clipped, WEAK, STRONG, x_cheapest=0.2) == approx(0.65625)
    # raw: [(.1,0),(.2,0),(.4,.5),(.6,.75),(1,1)] -> (0 + .05 + .125 + .35) / .9
    assert apgr(clipped, WEAK, STRONG) == approx(0.525 / 0.9)


def test_random_router_line():
    # Straight line from (0, weak) to (1, strong): PGR(x) = x, so APGR = 1/2, CPT(p) = p.
    line = [(k / 10, WEAK + (STRONG - WEAK) * k / 10) for k in range(11)]
    line.reverse()  # knob order: high threshold first
    assert apgr(line, WEAK, STRONG) == approx(0.5)
    assert cpt(line, WEAK, STRONG, 0.5) == approx(0.5)
    assert cpt(line, WEAK, STRONG, 0.8) == approx(0.8)
    assert cpt(line, WEAK, STRONG, 0.2) == approx(0.2)


def test_aiq_convex_set():
    # TABLE slopes .8, .4, .2 decrease: every point is on the hull.
    # Area: .25*(.5+.7)/2 + .25*(.7+.8)/2 + .5*(.8+.9)/2 = .15 + .1875 + .425 = .7625; range 1.
    assert nondecreasing_convex_hull(TABLE) == [(0.0, 0.5), (0.25, 0.7), (0.5, 0.8), (1.0, 0.9)]
    assert aiq(TABLE) == approx(0.7625)


def test_aiq_non_convex_set():
    # A(0,.5) B(.25,.55) C(.5,.8) D(.75,.7) E(1,.85)
    # Chord A-C at .25 is .65 > .55: B off the hull. Chord C-E at .75 is .825 > .7: D off.
    # Hull A, C, E: .5*(.5+.8)/2 + .5*(.8+.85)/2 = .325 + .4125 = .7375
    # (the raw points would give .68125)
    pts = [(0.0, 0.5), (0.25, 0.55), (0.5, 0.8), (0.75, 0.7), (1.0, 0.85)]
    assert nondecreasing_convex_hull(pts) == [(0.0, 0.5), (0.5, 0.8), (1.0, 0.85)]
    assert aiq(pts) == approx(0.7375)


def test_aiq_non_decreasing_cut_and_cost_range():
    # Top quality in the middle: hull cut at (.5, .9), then held flat to c_max = 1.
    # .5*(.5+.9)/2 + .5*.9 = .35 + .45 = .8   (following the decreasing hull would give .775)
    pts = [(0.0, 0.5), (0.5, 0.9), (1.0, 0.8)]
    assert nondecreasing_convex_hull(pts) == [(0.0, 0.5), (0.5, 0.9)]
    assert aiq(pts) == approx(0.8)
    # Raw costs .2 .. 1: area .4*(.5+.7)/2 + .4*(.7+.8)/2 = .24 + .3 = .54; / (1 - .2) = .675
    # (dividing by c_max, as RouterBench's code does, would give .54)
    assert aiq([(0.2, 0.5), (0.6, 0.7), (1.0, 0.8)]) == approx(0.675)


def test_aiq_degenerate_range():
    assert aiq([(0.3, 0.7)]) == approx(0.7)
    assert aiq([(0.3, 0.6), (0.3, 0.7)]) == approx(0.7)  # best quality at the one cost
    assert aiq([(0.3, 0.7), (0.3, 0.6)]) == approx(0.7)
    # Equal costs elsewhere too: only the best quality at a cost counts.
    # Hull (0, .5) -> (1, .9): area .7 over range 1.
    assert aiq([(0.0, 0.5), (0.0, 0.4), (1.0, 0.9)]) == approx(0.7)
    with pytest.raises(ValueError):
        aiq([])


def test_average_curves_pointwise_in_knob_order():
    a = [(0.0, 0.5), (1.0, 0.9), (0.5, 0.7)]
    b = [(0.2, 0.6), (0.8, 0.8), (0.4, 0.6)]
    avg = average_curves([a, b])
    assert len(avg) == 3
    for (x, y), (ex, ey) in zip(avg, [(0.1, 0.55), (0.9, 0.85), (0.45, 0.65)]):
        assert x == approx(ex) and y == approx(ey)
    assert average_curves([a]) == a
    with pytest.raises(ValueError):
        average_curves([a, b[:2]])
    with pytest.raises(ValueError):
        average_curves([])


def test_summarize_curve():
    s = summarize_curve(TABLE, WEAK, STRONG)
    assert s["apgr"] == approx(0.65625)
    assert s["cpt"]["80"] == approx(0.6)
    assert s["aiq"] == approx(0.7625)


def test_plot_writes_png(tmp_path):
    from dreamroute.eval.plot import plot_cost_quality

    out = plot_cost_quality(
        tmp_path / "sub" / "cq.png",
        curves={"threshold": TABLE, "random": [(0.0, 0.5), (1.0, 0.9)]},
        singles={"sensory": (0.1, 0.5), "specialized": (1.0, 0.9)},
        oracle=(0.3, 0.95),
        title="test",
    )
    data = out.read_bytes()
    assert out == tmp_path / "sub" / "cq.png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 2000


def test_plot_module_imports_matplotlib_lazily():
    code = "import sys, dreamroute.eval.plot, dreamroute.eval.metrics; print('matplotlib' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"
