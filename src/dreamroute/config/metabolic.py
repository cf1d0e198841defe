"""The metabolic controller's thresholds (``metabolic:`` in the YAML config).

The states and the controller that reads these thresholds are in
:mod:`dreamroute.signals.metabolic`; this module holds only the typed settings, so
configuration knows nothing of the machinery it configures.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MetabolicConfig(BaseModel):
    """Thresholds of the metabolic controller (``metabolic:`` in the YAML config).

    Attributes:
        enabled: drive states at all (off: always WAKE).
        period_s: length of the budget period, s (spending is summed over the last period_s).
        period_budget_j: ATP the period may spend, J (None: no period budget; budget left = 1).
        focus_window: recent requests whose mean salience decides FOCUS.
        focus_enter / focus_exit: mean salience at which FOCUS starts / ends (enter > exit).
        focus_min_budget: fraction of the period's budget that must be left for FOCUS.
        focus_lambda_scale: λ multiplier for a high-salience request in FOCUS, (0, 1].
        focus_quality_target: the least p̂ a tier needs to answer such a request, [0, 1].
        rest_after_s: idle seconds before REST.
        keep_loaded: cheapest tiers kept in memory in REST (≥ 1).
        dream_after_s: idle seconds before DREAM (≥ rest_after_s).
        dream_min_backlog: witnessed teacher successes since the last cycle needed to dream.
        crisis_priority: a request priority at or above it starts CRISIS, (0, 1].
        crisis_hold_s: CRISIS lasts this long after the last crisis request, s.
        history: state transitions kept in memory.
        tick_s: seconds between the server's checks of time-driven transitions.
        dream_student / dream_teacher: the tiers a DREAM cycle distils into / from (None: the
            two top tiers of the hierarchy).
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    period_s: float = Field(3600.0, gt=0)
    period_budget_j: float | None = Field(None, ge=0)
    focus_window: int = Field(20, ge=1)
    focus_enter: float = Field(0.6, ge=0, le=1)
    focus_exit: float = Field(0.5, ge=0, le=1)
    focus_min_budget: float = Field(0.25, ge=0, le=1)
    focus_lambda_scale: float = Field(0.25, gt=0, le=1)
    focus_quality_target: float = Field(0.5, ge=0, le=1)
    rest_after_s: float = Field(300.0, ge=0)
    keep_loaded: int = Field(1, ge=1)
    dream_after_s: float = Field(900.0, ge=0)
    dream_min_backlog: int = Field(50, ge=1)
    crisis_priority: float = Field(0.95, gt=0, le=1)
    crisis_hold_s: float = Field(60.0, ge=0)
    history: int = Field(500, ge=1)
    tick_s: float = Field(5.0, gt=0)
    dream_student: str | None = None
    dream_teacher: str | None = None

    @model_validator(mode="after")
    def _ordered(self) -> "MetabolicConfig":
        if self.focus_exit > self.focus_enter:
            raise ValueError(f"focus_exit ({self.focus_exit}) must not exceed focus_enter ({self.focus_enter})")
        if self.dream_after_s < self.rest_after_s:
            raise ValueError(f"dream_after_s ({self.dream_after_s}) must be >= rest_after_s ({self.rest_after_s}): "
                             "a hierarchy dreams only after resting")
        return self
