"""DREAM: consolidate what bigger tiers answered well into a smaller tier (LoRA distillation).

``DreamConfig`` imports without the ``dream`` extra; the training and export
functions need torch, transformers, peft, accelerate and gguf
(``pip install -e '.[dream]'`` after ``pip install torch==2.13.0``) and are
imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .dream_config import DreamConfig

_LAZY = {
    "Example": "data", "TrainResult": "train", "TrainingError": "data", "encode_example": "data",
    "distill_loss": "data", "train_lora": "train", "load_student": "train", "eval_loss": "data",
    "export_gguf_lora": "export", "logit_delta_correlation": "export", "ExportError": "export",
    "UnsupportedArchitectureError": "export", "UnmappedModuleError": "export",
}

__all__ = ["DreamConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
