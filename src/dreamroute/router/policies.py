"""The learned routing policy, and every policy by name.

- ``dreamroute`` (:class:`DreamroutePolicy`): p̂ − λ·ATP/B with Thompson sampling, learned
  cascade, audits.
- the baselines ``always:TIER``, ``random[:P]`` and ``cascade[:T]``
  (:mod:`~dreamroute.router.baselines`).

All of them follow the protocol of :mod:`~dreamroute.router.policy_base`; :func:`make_policy`
builds one from its name.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
from scipy import special

from ..config.policy import parse_policy
from .baselines import AlwaysPolicy, CascadePolicy, RandomPolicy
from .policy_base import Policy, RouteView, BasePolicy
from .types import Answer, Call, Decision, Outcome, Request


class DreamroutePolicy(BasePolicy):
    """The trust router (DESIGN.md steps 3–6).

    For each tier t: the neighbours give s_t successes in m_t trials among
    its k nearest direct experiences; the context trust Beta(α, β) over
    direct outcomes gives θ_t. Direct means decided before any answer was
    seen (first calls, audits): an escalation is observed only when a
    cheaper tier's answer looked wrong, a harder-than-typical sample that
    would bias p̂ down; it teaches the conditional answer judges instead. The
    posterior P(success | x, t) ~ Beta(1 + s_t + w·θ_t, 1 + m_t − s_t + w(1 − θ_t))
    with w = ``shrinkage`` pseudo-observations; p̂_t is its mean, and a
    Thompson draw of it (θ_t itself drawn from the trust posterior) is what
    the choice maximises, subject to the quality target: for the top tier
    draw − λ·ATP/B; for a lower tier the value of calling it first and
    escalating when its answer looks weak (:meth:`cascade_value`) minus its
    λ-priced ATP.

    Escalation (DESIGN.md step 5, with the threshold learned): after tier t
    answers a, P(success | x, t, a) combines p̂_t(x) with what the tier's
    graded answers taught: its learned answer judge
    (:class:`~dreamroute.router.judge.AnswerJudge`: the answer's form, length,
    logprobs ...), or before it has one, the outcomes of earlier answers in the
    same confidence bin (:class:`~dreamroute.router.calibration.ConfidenceCalibration`); escalate when the next tier's p̂ exceeds it by more than the next
    call's λ-priced ATP (λ is what keeps the average within budget). The confidence below which
    a tier is escalated is thus learned per tier and moves with the budget.
    Audit: with probability a + b·n(x)², budget permitting: only while the
    budget does not bind (no budget, or spending has stayed under it long
    enough for λ to fall to its floor), so a binding budget is spent on
    answers, not on checks.

    Exploration: each tier's draw carries an uncertainty bonus
    (:meth:`exploration_bonus`), so an untried or new tier is tried soon. Pacing:
    each decision hands the pacer its menu (every candidate's greedy value and
    expected ATP), from which a :class:`~dreamroute.router.pacing.SpendController`
    solves λ; no candidate (and no escalation) whose expected ATP exceeds the
    controller's ``headroom`` is chosen.
    """

    audits = True
    needs_surprise = True

    def __init__(self, tiers: list[str], config, seed: int = 0, quality_target: float | None = None):
        super().__init__(tiers, seed)
        self.config = config
        self.quality_target = quality_target if quality_target is not None else config.quality_target
        self.name = "dreamroute"
        window = max(1, config.drift_window)
        self._resid: dict[str, deque] = {t: deque(maxlen=window) for t in self.tiers}
        self._raw: dict[str, dict[str, float]] = {}  # request id → p̂ before the drift offset
        self._offsets: dict[str, float] | None = None
        self._clock = 0  # requests learned from

    def _coupled_uniforms(self) -> np.ndarray:
        """One uniform per tier from a Gaussian copula with correlation ρ = ``thompson_coupling``:
        u_t = Φ(ρ z + sqrt(1 − ρ²) e_t), z and e_t standard normal."""
        rho = self.config.thompson_coupling
        z = self.rng.standard_normal()
        e = self.rng.standard_normal(len(self.tiers))
        return special.ndtr(rho * z + math.sqrt(max(0.0, 1.0 - rho * rho)) * e)

    def _raw_estimates(self, view: RouteView, sample: bool) -> dict[str, float]:
        """p̂ per tier before the drift offset: the two-level posterior's mean, or a draw.

        θ_t ~ Beta(α, β) (the context's direct trust), then p_t ~ Beta(1 + s + wθ_t,
        1 + m − s + w(1 − θ_t)). A draw takes each level's quantile at a uniform of
        :meth:`_coupled_uniforms`: every tier's draw is exactly a draw of its own posterior,
        but the draws of tiers are correlated (ρ), so two tiers whose posteriors agree
        rarely swap places by noise alone (a common-random-numbers reduction of the
        variance of their difference), while a tier with a wider posterior still draws
        far from its mean as often as independent Thompson sampling would.
        """
        w = self.config.shrinkage
        mem = view.memory
        states = [mem.direct_trust_state(t, view.signals.context) for t in self.tiers]
        counts = [mem.neighbour_counts(view.hood, t) for t in self.tiers]
        if sample:
            theta = special.betaincinv(np.array([st.alpha for st in states]), np.array([st.beta for st in states]),
                                       self._coupled_uniforms())
        else:
            theta = np.array([st.mean for st in states])
        s = np.array([c[0] for c in counts], dtype=np.float64)
        m = np.array([c[1] for c in counts], dtype=np.float64)
        a, b = 1.0 + s + w * theta, 1.0 + (m - s) + w * (1.0 - theta)
        p = special.betaincinv(a, b, self._coupled_uniforms()) if sample else a / (a + b)
        return {t: float(v) for t, v in zip(self.tiers, p)}

    def drift_offsets(self) -> dict[str, float]:
        """Per tier, how far its recent graded direct outcomes sit from the p̂ it was given.

        Residuals r = outcome − p̂ (p̂ at decision time, before any offset) of the tier's
        last ``drift_window`` direct calls; for each recent run of the last j of them
        (j = 5, 10, 20, … up to the window) z_j = mean_j / se_j with se_j = sqrt(Σ p̂(1 − p̂)) / j,
        the spread a calibrated p̂ would give. The run with the largest |z_j| is taken when it
        exceeds ``drift_z``: its mean is the offset (else 0). The offset fades with the
        requests since the tier's last residual (e^(−age / (2·window))), so a tier that is
        no longer chosen because of it is tried again later.

        The neighbours and the context trust learn a change in a tier's success slowly
        when the prompts look as before (a batch of hard questions, a tier that got
        worse): they remember many requests. The most recent run of residuals forgets at
        once (sliding-window estimates: Garivier & Moulines, "On upper-confidence bound
        policies for switching bandit problems", ALT 2011), and the z-test with the
        change point taken where the evidence is largest keeps it silent on stationary
        traffic (a CUSUM-like change detector, as in CUSUM-UCB: Liu, Lee & Shroff, AAAI 2018).
        """
        if self._offsets is not None:
            return self._offsets
        out = {}
        window, z_thr = self.config.drift_window, self.config.drift_z
        for t, d in self._resid.items():
            out[t] = 0.0
            if window <= 0 or z_thr <= 0 or len(d) < 5:
                continue
            r = np.asarray([x[:2] for x in d])[::-1]  # newest first
            csum, cvar = np.cumsum(r[:, 0]), np.cumsum(r[:, 1])
            best_z, best_m = 0.0, 0.0
            j = 5
            while j <= len(r):
                m = csum[j - 1] / j
                z = m / (math.sqrt(max(1e-12, cvar[j - 1])) / j)
                if abs(z) > abs(best_z):
                    best_z, best_m = z, m
                j = j * 2 if j * 2 <= len(r) or j == len(r) else len(r)
            if abs(best_z) > z_thr:
                age = self._clock - d[-1][2]
                out[t] = best_m * math.exp(-age / (2.0 * window))
        self._offsets = out
        return out

    def estimates(self, view: RouteView, sample: bool) -> dict[str, float]:
        """p̂ per tier (posterior means, or one Thompson draw with ``sample``), each moved by its
        :meth:`drift_offsets` and kept in [0.001, 0.999]."""
        raw = self._raw_estimates(view, sample)
        off = self.drift_offsets()
        return {t: min(0.999, max(0.001, p + off[t])) if off[t] else p for t, p in raw.items()}

    def cascade_value(self, i: int, p_t: float, p_next: float, price_next: float, view: RouteView
                      ) -> tuple[float, float] | None:
        """Calling tier i first and escalating when its answer looks weak: (expected
        success, probability of escalating), or None before tier i has any graded answer.

        Expected success = E_a[max(P(success | x, i, a), P(next succeeds | x, a) − price_next)]
        over tier i's answers a (one-step lookahead, as in cascades that learn when to
        defer: FrugalGPT, Chen et al. 2023; AutoMix, Madaan et al. 2023). Once the tier
        has a learned answer judge, the expectation runs over its latest answers, each
        judged (and, with ``next_judge``, the next tier's chance given it), then combined
        with this item's p̂ (``p_t``, ``p_next``); before that, over its confidence bins b,
        Σ_b P(b | tier i) · max(P(success | x, i, b), p_next − price_next).
        """
        mem = view.memory
        if mem.judge.fitted(i):
            judged, q = mem.recent_judgements(i)
            p_a = mem.judge.combine(i, p_t, judged)
            alt = (mem.next_given(i, p_next, q) if q is not None else p_next) - price_next
            return float(np.maximum(p_a, alt).mean()), float((alt > p_a).mean())
        alternative = p_next - price_next
        cal = view.memory.calibration
        dist = cal.bin_distribution(i)
        if dist is None:
            return None
        value = escalate = 0.0
        for b, w in enumerate(dist):
            if w > 0:
                p_b = cal.adjust_bin(i, b, p_t)
                value += w * max(p_b, alternative)
                escalate += w * (alternative > p_b)
        return value, escalate

    def exploration_bonus(self, view: RouteView) -> dict[str, float]:
        """β·sd_t·sqrt((1 + ln(1 + N)) / (1 + n_t)) per tier: an uncertainty bonus on its draw.

        sd_t is the standard deviation of p̂_t under the two-level posterior of
        :meth:`estimates` (θ ~ the context's Beta trust, p | θ ~ Beta(1 + s + wθ,
        1 + m − s + w(1 − θ))), by the law of total variance; n_t counts the graded
        direct outcomes of the tier's current version (all contexts) and N those of all
        tiers. An untried tier, a new tier or a new model version (after DREAM) carries
        the posterior's full spread times a factor that grows with the history it has
        missed, so it is tried soon even beside well-known tiers; a tier tried n times
        keeps a bonus that shrinks like 1/sqrt(n) (the UCB schedule of Auer, Cesa-Bianchi
        & Fischer 2002 on the Beta posterior's spread, as in Bayes-UCB, Kaufmann, Cappé &
        Garivier 2012), so the draws decide once it is known. The bonus is priced like
        any value: the budget's λ and the guard still apply. β = ``explore_bonus``.
        """
        beta_ = self.config.explore_bonus
        if beta_ <= 0:
            return {t: 0.0 for t in self.tiers}
        w = self.config.shrinkage
        mem = view.memory
        counts = {t: mem.direct_count(t) for t in self.tiers}
        total = sum(counts.values())
        out = {}
        for t in self.tiers:
            st = mem.direct_trust_state(t, view.signals.context)
            s, m = mem.neighbour_counts(view.hood, t)
            ta, tb = st.alpha, st.beta
            e1 = ta / (ta + tb)
            var_t = ta * tb / ((ta + tb) ** 2 * (ta + tb + 1.0))
            e2 = var_t + e1 * e1
            S = 2.0 + m + w
            c1, c2 = 1.0 + s, 1.0 + (m - s) + w
            e_ab = c1 * c2 + w * (c2 - c1) * e1 - w * w * e2
            var = (w / S) ** 2 * var_t + e_ab / (S * S * (S + 1.0))
            out[t] = beta_ * math.sqrt(max(0.0, var)) * math.sqrt((1.0 + math.log1p(total)) / (1.0 + counts[t]))
        return out

    def route(self, request: Request, view: RouteView) -> Decision:
        raw = self._raw_estimates(view, sample=False)
        off = self.drift_offsets()
        p_hat = {t: min(0.999, max(0.001, p + off[t])) if off[t] else p for t, p in raw.items()}
        if len(self._raw) > 4096:  # requests answered but never learned from (failed): forget them
            self._raw.pop(next(iter(self._raw)))
        self._raw[request.request_id] = raw
        draw = self.estimates(view, sample=True)
        bonus = self.exploration_bonus(view)
        draw = {t: draw[t] + bonus[t] for t in self.tiers}
        atp = {t: view.memory.expected_atp(view.hood, t, view.prompt_chars, request.max_tokens) for t in self.tiers}
        price = {t: view.price(atp[t]) for t in self.tiers}
        target = self.quality_target
        if request.priority >= 0.5 and target is not None:
            target = min(1.0, target + 0.1)
        if view.quality_floor is not None:  # FOCUS: a salient request gets a tier expected to manage it
            target = max(target or 0.0, view.quality_floor)
        avail = self._available(view)
        allowed = [t for t in avail if target is None or p_hat[t] >= target] or [max(avail, key=p_hat.get)]
        headroom = view.pacer.headroom() if hasattr(view.pacer, "headroom") else None

        def candidates(est: dict[str, float]) -> list[tuple[float, float, str, float]]:
            # (gross value, expected ATP, tier, price): each allowed tier directly, and each lower
            # tier as the first step of a cascade
            out = [(est[t], atp[t], t, price[t]) for t in allowed]
            for t in allowed:
                i = self.tiers.index(t)
                if i + 1 < len(self.tiers) and self.tiers[i + 1] in avail:
                    nxt = self.tiers[i + 1]
                    cv = self.cascade_value(i, est[t], est[nxt], price[nxt], view)
                    if cv is not None:  # cv[0] is net of the escalation's price: add it back
                        esc = cv[1] * price[nxt] if cv[1] > 0 else 0.0
                        out.append((cv[0] + esc, atp[t] + cv[1] * atp[nxt], t, price[t] + esc))
            return out

        def best(cands) -> str:
            # the guard: nothing whose expected ATP would take the running average past its cap
            fit = [c for c in cands if headroom is None or c[1] <= headroom] or [min(cands, key=lambda c: c[1])]
            return max(fit, key=lambda c: (c[0] - c[3], -c[1]))[2]

        drawn = candidates(draw)
        if hasattr(view.pacer, "observe"):  # the menu as this rule decides it (draws, bonus), to price it
            view.pacer.observe([c[0] for c in drawn], [c[1] for c in drawn])
        tier = best(drawn)
        greedy = best(candidates(p_hat))
        n = view.signals.novelty
        p_audit = self.config.audit_base + self.config.audit_novelty * n * n
        up = self.tiers.index(tier) + 1
        audit = bool(up < len(self.tiers) and self.rng.random() < p_audit and not view.pacer.binding
                     and self.tiers[up] in avail)
        return self._decision(request, view, tier, p_hat=p_hat, expected_atp=atp, audit=audit,
                              explored=tier != greedy)

    def update(self, decision: Decision, answer: Answer, outcomes: list[Outcome]) -> None:
        """Keep the residual (outcome − p̂ at decision time) of each tier's graded direct call
        (first call, audit) for :meth:`drift_offsets`."""
        raw = self._raw.pop(decision.request_id, None)
        if raw is None:
            return
        seen = set()
        for c, o in zip(answer.calls, outcomes):
            if c.role == "escalated" or o.reward is None or c.tier in seen or c.tier not in raw:
                continue
            seen.add(c.tier)
            p = raw[c.tier]
            self._resid[c.tier].append((float(o.reward) - p, p * (1.0 - p), self._clock))
        self._clock += 1
        self._offsets = None

    def escalate(self, decision: Decision, call: Call, view: RouteView) -> str | None:
        nxt = self._up(call.tier, view)
        if nxt is None:
            return None
        p_now, p_next = view.memory.answer_success(call.tier, view.prompt, call, decision.p_hat.get(call.tier, 0.5),
                                                   decision.p_hat.get(nxt, 0.5))
        gain = p_next - p_now
        cost = decision.expected_atp.get(nxt, 0.0)
        spent = getattr(decision, "_spent", 0.0) + call.atp  # this request's calls so far
        decision._spent = spent
        headroom = view.pacer.headroom() if hasattr(view.pacer, "headroom") else None
        if headroom is not None and spent + cost > headroom:
            return None  # the guard: the running average would pass its cap
        if gain > view.price(cost):
            return nxt
        return None


def make_policy(spec: str, tiers: list[str], config, *, seed: int = 0) -> Policy:
    """Build a policy from its name: ``dreamroute``, ``always:TIER``, ``random[:P]``, ``cascade[:T]``
    (the grammar is :func:`dreamroute.config.policy.parse_policy`).

    Raises ConfigError (unknown name, bad number) or UnknownTierError.
    """
    p = parse_policy(spec, tiers)
    if p.kind == "dreamroute":
        return DreamroutePolicy(tiers, config, seed=seed)
    if p.kind == "always":
        return AlwaysPolicy(tiers, p.tier, seed=seed)
    if p.kind == "random":
        return RandomPolicy(tiers, p.p_top, seed=seed)
    return CascadePolicy(tiers, config.escalate_below if p.threshold is None else p.threshold, seed=seed)
