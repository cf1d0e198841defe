"""Settings of one DREAM consolidation cycle: LoRA shape, optimiser, distillation, gate.

:class:`DreamConfig` is a plain dataclass (in the style of TRL's ``SFTConfig``):
every field has a default, a help text in its ``metadata`` and a check in
``__post_init__`` that raises :class:`~dreamroute.errors.ConfigError` naming the
field, the value it got and what it accepts.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

#: LoRA target modules used when none are configured: the attention projections.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


@dataclass
class DreamConfig:
    r"""Configuration of LoRA distillation (training) and of the promotion gate.

    Parameters:
        lora_r: rank of the LoRA update matrices (A is ``r × in``, B is ``out × r``);
            integer ≥ 1.
        lora_alpha: LoRA scaling numerator; the update added to a weight is
            ``(lora_alpha / lora_r) · B·A``. Positive number.
        lora_dropout: dropout probability applied to the LoRA input during
            training only; in [0, 1).
        target_modules: names of the linear layers that get a LoRA update
            (Hugging Face module names such as ``q_proj``); a tuple or a
            comma-separated string, non-empty.
        learning_rate: peak AdamW learning rate (constant schedule), per
            optimiser step; in (0, 1].
        epochs: passes over the training examples; integer ≥ 1.
        batch_size: examples per forward/backward pass (micro-batch); integer ≥ 1.
        grad_accum: micro-batches accumulated per optimiser step, so one step
            sees ``batch_size × grad_accum`` examples; integer ≥ 1.
        max_seq_len: most tokens (prompt + response + EOS) of one encoded
            example; prompts are truncated from the left to fit, responses never.
            Integer ≥ 8.
        kl_weight: weight of the forward-KL distillation term added to the
            cross-entropy (``loss = CE + kl_weight · KL``), used only where the
            teacher's top-k logprobs are available; ≥ 0 (0 turns it off).
        kl_top_k: number of teacher logprobs kept per response token; integer ≥ 1.
        kl_temperature: softmax temperature T applied to both distributions in the
            KL term (the term is multiplied by T², Hinton et al. 2015); > 0.
        seed: seed of LoRA initialisation, data order and dropout; integer ≥ 0.
        checkpoint_every: optimiser steps between training checkpoints (a killed
            training resumes from the latest one); integer ≥ 1.
        max_examples: cap on the training examples used (the most salient first);
            ``None`` for all, else integer ≥ 1.
        heldout_fraction: fraction of the selected prompts kept out of training
            for validation; in (0, 1).
        min_examples: fewest training examples a cycle needs to run at all;
            integer ≥ 1.
        promote_margin: how much the new version's held-out accuracy must exceed
            the current student's to be promoted, as a fraction of questions
            (0.02 = 2 percentage points); in [0, 1).
        max_regression: largest accuracy drop (fraction, 0.02 = 2 percentage
            points) allowed on the general regression set; in [0, 1].
        regression_items: generated arithmetic problems (levels 1–5, equal shares) in the
            general regression set, graded; integer ≥ 0.
        perplexity_prompts: MT-Bench first-turn questions whose perplexity under the
            student is part of the regression check; integer ≥ 0.
        max_perplexity_increase: largest relative rise of that perplexity allowed
            (0.05 = 5 %); ≥ 0.
        device: where training runs: ``"auto"`` (a GPU when present, else CPU),
            ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.

    Raises:
        ConfigError: a field is out of range or of the wrong type; the message
            names the field, the value and the accepted range.
    """

    lora_r: int = field(default=8, metadata={"help": "LoRA rank (≥ 1)."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha; update scale is alpha / r (> 0)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input while training, [0, 1)."})
    target_modules: tuple[str, ...] = field(
        default=DEFAULT_TARGET_MODULES,
        metadata={"help": "Linear layers that get a LoRA update (tuple or comma-separated string)."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate per step, (0, 1]."})
    epochs: int = field(default=2, metadata={"help": "Passes over the training examples (≥ 1)."})
    batch_size: int = field(default=1, metadata={"help": "Examples per micro-batch (≥ 1)."})
    grad_accum: int = field(default=4, metadata={"help": "Micro-batches per optimiser step (≥ 1)."})
    max_seq_len: int = field(default=768, metadata={"help": "Most tokens per example, prompt truncated left (≥ 8)."})
    kl_weight: float = field(default=0.5, metadata={"help": "Weight of the top-k forward-KL term (≥ 0)."})
    kl_top_k: int = field(default=8, metadata={"help": "Teacher logprobs kept per response token (≥ 1)."})
    kl_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature T (> 0)."})
    seed: int = field(default=0, metadata={"help": "Seed of init, data order and dropout (≥ 0)."})
    checkpoint_every: int = field(default=25, metadata={"help": "Optimiser steps between checkpoints (≥ 1)."})
    max_examples: int | None = field(default=None, metadata={"help": "Cap on training examples (None: all)."})
    heldout_fraction: float = field(default=0.2, metadata={"help": "Fraction of prompts held out, (0, 1)."})
    min_examples: int = field(default=20, metadata={"help": "Fewest training examples for a cycle (≥ 1)."})
    promote_margin: float = field(default=0.0, metadata={"help": "Held-out accuracy gain needed, fraction [0, 1)."})
    max_regression: float = field(default=0.02, metadata={"help": "Regression-set accuracy loss allowed, [0, 1]."})
    regression_items: int = field(default=30, metadata={"help": "Generated problems in the regression set (≥ 0)."})
    perplexity_prompts: int = field(default=40, metadata={"help": "MT-Bench questions for perplexity (≥ 0)."})
    max_perplexity_increase: float = field(default=0.05, metadata={"help": "Relative perplexity rise allowed (≥ 0)."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:N or mps."})

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = tuple(m.strip() for m in self.target_modules.split(",") if m.strip())
        elif isinstance(self.target_modules, (list, tuple)):
            self.target_modules = tuple(self.target_modules)
        else:
            raise ConfigError(
                f"target_modules must be a list of module names or a comma-separated string, "
                f"got {type(self.target_modules).__name__}; e.g. 'q_proj,k_proj,v_proj,o_proj'.")
        if not self.target_modules or not all(isinstance(m, str) and m.strip() for m in self.target_modules):
            raise ConfigError(
                f"target_modules must name at least one module (got {self.target_modules!r}); "
                "e.g. 'q_proj,k_proj,v_proj,o_proj'.")

        _int("lora_r", self.lora_r, lo=1)
        _num("lora_alpha", self.lora_alpha, lo=0, lo_open=True)
        _num("lora_dropout", self.lora_dropout, lo=0, hi=1, hi_open=True)
        _num("learning_rate", self.learning_rate, lo=0, hi=1, lo_open=True,
             hint="typical LoRA values are 1e-4 to 5e-4")
        _int("epochs", self.epochs, lo=1)
        _int("batch_size", self.batch_size, lo=1)
        _int("grad_accum", self.grad_accum, lo=1)
        _int("max_seq_len", self.max_seq_len, lo=8)
        _num("kl_weight", self.kl_weight, lo=0, hint="use 0 to train on cross-entropy only")
        _int("kl_top_k", self.kl_top_k, lo=1)
        _num("kl_temperature", self.kl_temperature, lo=0, lo_open=True)
        _int("seed", self.seed, lo=0)
        _int("checkpoint_every", self.checkpoint_every, lo=1)
        if self.max_examples is not None:
            _int("max_examples", self.max_examples, lo=1, hint="or None for all examples")
        _num("heldout_fraction", self.heldout_fraction, lo=0, hi=1, lo_open=True, hi_open=True)
        _int("min_examples", self.min_examples, lo=1)
        _num("promote_margin", self.promote_margin, lo=0, hi=1, hi_open=True,
             hint="it is a fraction of questions: 0.02 means 2 percentage points")
        _num("max_regression", self.max_regression, lo=0, hi=1,
             hint="it is a fraction of questions: 0.02 means 2 percentage points")
        _int("regression_items", self.regression_items, lo=0)
        _int("perplexity_prompts", self.perplexity_prompts, lo=0)
        _num("max_perplexity_increase", self.max_perplexity_increase, lo=0)
        if not isinstance(self.device, str) or not _DEVICE_RE.match(self.device):
            raise ConfigError(
                f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {self.device!r}.")

    @property
    def examples_per_step(self) -> int:
        """Examples seen by one optimiser step (``batch_size × grad_accum``)."""
        return self.batch_size * self.grad_accum

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (``target_modules`` as a list)."""
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DreamConfig":
        """Build a config from a dict (a YAML section, a stored run).

        Raises:
            ConfigError: an unknown key (the message lists the known ones) or an invalid value.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"DREAM settings must be a mapping of field: value, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown DREAM setting(s): {', '.join(unknown)}; known settings: {', '.join(sorted(known))}.")
        return cls(**data)

    @classmethod
    def from_sources(cls, section: dict[str, Any] | None = None, sets: list[str] | None = None) -> "DreamConfig":
        """Defaults, then a config file's ``dream:`` section, then each ``KEY=VALUE`` of
        ``dreamroute dream --set`` (VALUE read as YAML: ``epochs=1``, ``target_modules=[q_proj,v_proj]``).

        Raises:
            ConfigError: a ``--set`` without ``=``, an unknown key or an invalid value.
        """
        import yaml
        data = dict(section or {})
        for item in sets or []:
            key, eq, raw = item.partition("=")
            if not eq or not key.strip():
                raise ConfigError(f"--set needs KEY=VALUE, got {item!r}; e.g. --set epochs=1")
            try:
                data[key.strip()] = yaml.safe_load(raw)
            except yaml.YAMLError as e:
                raise ConfigError(f"--set {item!r}: the value is not YAML: {e}") from e
        return cls.from_dict(data)


def _int(name: str, value: Any, *, lo: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer ≥ {lo}, got {value!r}" + (f"; {hint}." if hint else "."))
    if value < lo:
        raise ConfigError(f"{name} must be ≥ {lo}, got {value}" + (f"; {hint}." if hint else "."))


def _num(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
         lo_open: bool = False, hi_open: bool = False, hint: str = "") -> None:
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    rng = f"{lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ConfigError(f"{name} must be a number in {rng}, got {value!r}" + (f"; {hint}." if hint else "."))
    bad = ((lo is not None and (value <= lo if lo_open else value < lo))
           or (hi is not None and (value >= hi if hi_open else value > hi)))
    if bad:
        raise ConfigError(f"{name} must be in {rng}, got {value}" + (f"; {hint}." if hint else "."))
