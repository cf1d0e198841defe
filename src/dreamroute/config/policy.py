"""Routing policy names: the grammar ``dreamroute``, ``always:TIER``, ``random[:P]``, ``cascade[:T]``.

Configuration checks a name (``server.policy``, ``--policy``) here, knowing nothing of the
policies themselves; :func:`dreamroute.router.policies.make_policy` builds the policy a
parsed name describes, where the router is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError, UnknownTierError


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy name.

    Attributes:
        kind: ``dreamroute``, ``always``, ``random`` or ``cascade``.
        tier: the tier of ``always:TIER``.
        p_top: P of ``random:P`` (None: uniform over the tiers), in [0, 1].
        threshold: T of ``cascade:T`` (None: the router's ``escalate_below``), in [0, 1].
    """

    kind: Literal["dreamroute", "always", "random", "cascade"]
    tier: str | None = None
    p_top: float | None = None
    threshold: float | None = None


def parse_policy(spec: str, tiers: list[str]) -> PolicySpec:
    """Parse a policy name against the hierarchy's tier names.

    Raises:
        ConfigError: an unknown name, or a P or T that is no number in [0, 1].
        UnknownTierError: ``always:TIER`` names no tier of ``tiers``.
    """
    name, _, arg = spec.partition(":")
    try:
        if name == "dreamroute" and not arg:
            return PolicySpec("dreamroute")
        if name == "always" and arg:
            if arg not in tiers:
                raise UnknownTierError(arg, tiers)
            return PolicySpec("always", tier=arg)
        if name == "random":
            p = float(arg) if arg else None
            if p is not None and not 0.0 <= p <= 1.0:
                raise ConfigError(f"random:P needs P in [0, 1], got {p}")
            return PolicySpec("random", p_top=p)
        if name == "cascade":
            t = float(arg) if arg else None
            if t is not None and not 0.0 <= t <= 1.0:
                raise ConfigError(f"cascade:T needs a confidence threshold T in [0, 1], got {arg}; e.g. cascade:0.6")
            return PolicySpec("cascade", threshold=t)
    except ValueError as e:
        raise ConfigError(f"policy {spec!r}: {e}; e.g. random:0.3 or cascade:0.6") from e
    raise ConfigError(f"unknown policy {spec!r}; use dreamroute, always:TIER ({', '.join(tiers)}), "
                      "random, random:P or cascade:T")
