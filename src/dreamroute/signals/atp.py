"""ATP accounting: the compute cost of a call, in joules (DESIGN.md).

    ATP = (evaluated prompt tokens × prefill s/token + completion tokens × decode s/token) × watts

Per-token seconds come from ``dreamroute bench`` (stored as calibration per
model identity). Before a tier is calibrated, a built-in estimate by model
size is used: seconds per generated token ≈ 0.0082 + 0.0212 × params (in
billions), a line through the decode rates DESIGN.md measured on 2 CPU cores
(about 90, 43 and 25 tokens/s for 0.135 B, 0.5 B and 1.5 B), and prefill at
one eighth of that per token. Recorded calls with no token counts are charged
their wall seconds × watts.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TierCost:
    """Per-token cost of one tier.

    Attributes:
        prefill_s_per_token: seconds to evaluate one prompt token.
        decode_s_per_token: seconds to generate one token.
        watts: power while computing, W.
        calibrated: True when measured by ``dreamroute bench``.
        per_call: a fixed cost per call that replaces the formula (RouteLLM's
            recordings: strong 1, weak 0, unitless), or None.
    """

    prefill_s_per_token: float
    decode_s_per_token: float
    watts: float
    calibrated: bool = False
    per_call: float | None = None

    def joules(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """ATP of a call; cached prompt tokens (already in a KV state) cost nothing."""
        if self.per_call is not None:
            return self.per_call
        evaluated = max(0, prompt_tokens - cached_tokens)
        return (evaluated * self.prefill_s_per_token + completion_tokens * self.decode_s_per_token) * self.watts

    def joules_from_seconds(self, seconds: float) -> float:
        """ATP of a call known only by wall time."""
        if self.per_call is not None:
            return self.per_call
        return max(0.0, seconds) * self.watts


def estimated_cost(params_b: float, watts: float) -> TierCost:
    """The uncalibrated estimate by model size (see module docstring)."""
    decode = 0.0082 + 0.0212 * params_b
    return TierCost(prefill_s_per_token=decode / 8.0, decode_s_per_token=decode, watts=watts, calibrated=False)


def cost_from_calibration(cal: dict, watts: float) -> TierCost:
    """A TierCost from a stored ``dreamroute bench`` calibration dict."""
    return TierCost(prefill_s_per_token=float(cal["prefill_s_per_token"]),
                    decode_s_per_token=float(cal["decode_s_per_token"]), watts=watts, calibrated=True)
