"""Requests in flight share the budget (router/inflight.py): what other threads' requests are expected
to spend counts as spent for a decision, so N concurrent requests cannot each pass the same
affordability test. Scripted tiers, a store per test."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dreamroute import DreamRoute
from dreamroute.router.dual_pacer import BudgetPacer
from dreamroute.router.inflight import InFlight
from dreamroute.router.pacing import SpendController

from .conftest import problem_answers, scripted_backends, scripted_settings


def in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@pytest.mark.parametrize("pacer", [SpendController(10.0), BudgetPacer(10.0, rate=0.1)])
def test_another_threads_reservation_counts_as_spent_and_ones_own_does_not(pacer):
    for _ in range(4):
        pacer.update(10.0)                                       # average exactly the budget
    assert pacer.allows(10.0)
    pacer.reserve(15.0)                                          # this thread's request in flight
    assert pacer.others() == (0, 0.0) and pacer.allows(10.0)     # one's own reservation is not counted twice
    assert in_thread(pacer.others) == (1, 15.0)
    assert not in_thread(lambda: pacer.allows(10.0))             # (40 + 15 + 10) / 6 > 10; (40 + 15) / 6 <= 10
    assert in_thread(lambda: pacer.allows(0.0))
    pacer.release()
    assert in_thread(lambda: pacer.allows(10.0)) and in_thread(pacer.others) == (0, 0.0)
    pacer.release()                                              # releasing twice is harmless


def test_spend_controller_guard_counts_other_requests_in_flight():
    p = SpendController(10.0)
    alone = p.headroom()
    p.reserve(25.0)
    assert p.headroom() == alone                                 # own reservation: not counted
    assert in_thread(p.headroom) == pytest.approx(alone + p.cap * 10.0 - 25.0)


def test_negative_or_nan_reservations_count_as_nothing():
    book = InFlight()
    book.reserve(float("nan"))
    assert in_thread(book.others) == (1, 0.0)
    book.reserve(-5.0)
    assert in_thread(book.others) == (1, 0.0)


class Priced:
    """A backend that holds each call ``s`` seconds (so many requests are in flight) and costs a fixed
    ``atp`` J per call (``Generation.extra["atp_joules"]``, as a recorded source fixes its own cost)."""

    def __init__(self, inner, s: float, atp: float):
        self.inner, self.s, self.atp = inner, s, atp

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, messages, **kw):
        time.sleep(self.s)
        g = self.inner.generate(messages, **kw)
        g.extra["atp_joules"] = self.atp
        return g


def run_concurrent(tmp_path, budget: float, n: int, workers: int, warm: int = 48) -> DreamRoute:
    """``warm`` requests one at a time (the router learns that only the top tier is right), then
    ``n`` over ``workers`` threads; tiers costing 1, 2 and 15 J."""
    items, answers = problem_answers(warm + n, seed=3)
    backends = {t: Priced(b, 0.05, atp) for (t, b), atp in
                zip(scripted_backends(answers, skill=(0, 0, 5)).items(), (1.0, 2.0, 15.0))}
    dr = DreamRoute(scripted_settings(tmp_path), db=tmp_path / "s.db", backends=backends, budget=budget, seed=1)
    ask = lambda it: dr.complete(it.prompt, gold=it.answer, grader="number")   # noqa: E731
    for it in items[:warm]:
        ask(it)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(ask, items[warm:]))
    return dr


def test_concurrent_requests_hold_the_budget_as_sequential_ones_do(tmp_path):
    """After 48 requests one at a time (only the 15 J top tier is right; budget 10 J), 32 decided at
    once: with the other requests' reservations counted, the run's average stays within the
    guard's bound (cap + credit/n) × B as it does one request at a time; without them every
    request passes the same test at once and the top tier is bought 32 times."""
    n, warm, budget = 32, 48, 10.0
    seq = run_concurrent(tmp_path / "seq", budget, n, 1, warm)
    conc = run_concurrent(tmp_path / "conc", budget, n, n, warm)
    with seq, conc:
        bound = budget * (seq.pacer.cap + seq.pacer.credit / (n + warm)) + 1e-9
        assert seq.pacer.n == conc.pacer.n == n + warm
        assert seq.pacer.average <= bound
        assert conc.pacer.average <= bound, (conc.pacer.average, seq.pacer.average)
        assert conc.pacer.others() == (0, 0.0)                  # every reservation released
