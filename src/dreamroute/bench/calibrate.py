"""Calibrate one tier: load time, time to first token, prefill and decode speed, memory.

``dreamroute bench`` stores the result; ATP is then charged as prompt tokens ×
``prefill_s_per_token`` + completion tokens × ``decode_s_per_token``, × watts.
"""

from __future__ import annotations

import time

import psutil

from ..config import TierConfig
from ..errors import BackendError
from ..backends.base import Backend, Generation, Message

_TEXT = (
    "The river town woke slowly under a pale sky. Fishermen checked their nets while the baker "
    "pulled the first loaves from a brick oven, and the smell drifted across the square where "
    "children waited for the school bus. An old clock above the post office ran four minutes "
    "late, as it had for thirty years, and nobody in town could remember who had last tried to "
    "fix it. Merchants unlocked shutters, a dog chased gulls along the quay, and the ferry "
    "sounded its horn twice before leaving for the island with crates of apples, letters, "
    "engine parts and a piano wrapped in blankets. The schoolteacher counted heads on the "
    "platform, the pharmacist argued about the weather with the mayor, and a cyclist repaired "
    "a punctured tyre beside the fountain while pigeons inspected his tools."
).split()


def filler_words(n: int, offset: int) -> str:
    """``n`` words of the fixed text, starting ``offset`` words in (wrapping)."""
    return " ".join(_TEXT[(offset + i) % len(_TEXT)] for i in range(n))


def _prompt(tag: str, n_words: int, offset: int, ask: str) -> list[Message]:
    # The tag leads the system message, so no two measurements share more than the
    # template's first few tokens even where a backend cannot empty its cache.
    return [{"role": "system", "content": f"{tag}. You are a careful reader."},
            {"role": "user", "content": f"{filler_words(n_words, offset)}\n\n{ask}"}]


def cold_cache(backend: Backend) -> None:
    """Empty the backend's KV cache where it can (``reset``), so the next call prefills from nothing."""
    reset = getattr(backend, "reset", None)
    if callable(reset):
        reset()


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else float("inf")


def _fastest_decode(backend: Backend, r: int, best: Generation | None) -> Generation | None:
    """Generate up to 64 tokens on prompts that invite long answers; keep the fastest per token."""
    for i, ask in enumerate(("Continue this story for several paragraphs.",
                             "Write a long, detailed description of the town.",
                             "Count from 1 to 100, separated by commas.")):
        cold_cache(backend)
        g = backend.generate(_prompt(f"Measurement {3 + i}.{r}", 40, 40 * i, ask), max_tokens=64, temperature=0.0)
        if g.completion_tokens >= 2 and g.decode_s > 0 and (
                best is None or best.completion_tokens < 2
                or g.decode_s / g.completion_tokens < best.decode_s / best.completion_tokens):
            best = g
        if g.completion_tokens >= 64:
            break
    return best


def bench_tier(backend: Backend, tier: TierConfig, repeats: int = 3) -> dict:
    """Measure a tier's speed on this machine. Every measurement starts from an
    empty KV cache (``backend.reset()`` where the backend has one) and a prompt
    no other measurement shares, and counts only the prompt tokens really evaluated.
    One short warm-up call after the load is not measured. Each speed is
    measured ``repeats`` times and the fastest kept (as ``timeit`` does): on a
    shared machine, other processes only ever add time, and ATP should charge
    the compute a call needs, not the time it waited for a core.

    Measurements:
        load_s: seconds of a fresh load (``close()`` then ``load()``; 0 for remote servers).
        ttft_s: time to first token of a ~100-token prompt, seconds.
        prefill_tok_s: evaluated prompt tokens / prefill seconds on a ~400-token prompt.
        decode_tok_s: completion tokens / decode seconds generating 64 tokens.
        rss_mb: resident memory of this process after the load and warm-up, MiB (psutil).

    Returns:
        dict with ``tier``, ``model``, ``identity``, ``load_s``, ``ttft_s``,
        ``prefill_tok_s``, ``decode_tok_s``, ``rss_mb``, ``prefill_s_per_token``,
        ``decode_s_per_token`` (seconds per token, the ATP calibration), and the
        token counts behind them (``ttft_prompt_tokens``, ``prefill_prompt_tokens``,
        ``decode_tokens``).

    Raises:
        BackendError: a backend call failed, or the model never produced enough
            tokens to time decoding.
    """
    close, load = getattr(backend, "close", None), getattr(backend, "load", None)
    if callable(close):
        close()
    t0 = time.perf_counter()
    if callable(load):
        load()
    load_s = getattr(backend, "load_s", None)
    if not isinstance(load_s, (int, float)):
        load_s = time.perf_counter() - t0
    # Warm-up: the first call after a load pages the (mmapped) weights in and sizes
    # compute buffers; that is load cost, not per-token cost.
    backend.generate([{"role": "user", "content": "Hello."}], max_tokens=2, temperature=0.0)
    rss_mb = psutil.Process().memory_info().rss / 2**20  # weights paged in by now
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    ttft = long = best = None
    for r in range(repeats):
        cold_cache(backend)
        g = backend.generate(_prompt(f"Measurement one.{r}", 72, 0, "Summarise this in one line."),
                             max_tokens=1, temperature=0.0)
        ttft = g if ttft is None or g.prefill_s < ttft.prefill_s else ttft
        cold_cache(backend)
        g = backend.generate(_prompt(f"Measurement two.{r}", 300, 17, "What time does the clock show?"),
                             max_tokens=1, temperature=0.0)
        if long is None or (g.prefill_s / max(g.prompt_tokens - g.cached_tokens, 1)
                            < long.prefill_s / max(long.prompt_tokens - long.cached_tokens, 1)):
            long = g
        best = _fastest_decode(backend, r, best)
    evaluated = max(long.prompt_tokens - long.cached_tokens, 1)
    if best is None or best.completion_tokens < 2 or best.decode_s <= 0:
        raise BackendError(f"tier {tier.name!r}: the model stopped after {best.completion_tokens} "
                           "tokens on every decode prompt; cannot time decoding")
    cold_cache(backend)
    return {
        "tier": tier.name,
        "model": tier.model,
        "identity": backend.identity,
        "load_s": float(load_s),
        "ttft_s": ttft.prefill_s,
        "prefill_tok_s": _rate(evaluated, long.prefill_s),
        "decode_tok_s": _rate(best.completion_tokens, best.decode_s),
        "rss_mb": rss_mb,
        "prefill_s_per_token": long.prefill_s / evaluated,
        "decode_s_per_token": best.decode_s / best.completion_tokens,
        "repeats": repeats,
        "ttft_prompt_tokens": ttft.prompt_tokens,
        "prefill_prompt_tokens": evaluated,
        "decode_tokens": best.completion_tokens,
    }
