"""``dreamroute bench --kv``: what the reality cache saves, measured side by side in one run.

For each conversation length L (tokens), a conversation is built from the
fixed text of :mod:`dreamroute.bench` (a first user turn of about L tokens,
the tier's own short answer to it) and a follow-up turn of about 50 tokens.
Its time to first token (TTFT: template, tokenizing, prompt evaluation and the
first sampled token) is measured twice on the same backend: cold (KV cache
emptied) and restored (the conversation's state loaded from the on-disk
reality cache, load time included). The handoff point does the same for an
escalation to the next tier up: cold, versus after a warm-handoff prefill of
that tier (:meth:`ConversationKV.run_prefill`) whose state is then restored
from disk. Bytes per cached token are the stored file's bytes over the tokens
it holds; the theoretical figure is layers × 2 (K and V) × KV heads × head
dimension × 2 bytes (llama.cpp's default f16 cache), read from the GGUF
metadata.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .calibrate import cold_cache, filler_words
from ..cache.reality import RealityCache
from ..cache.reuse import ConversationKV, Prefill
from ..errors import BackendError

FOLLOW_UP = "Now answer in one short sentence: which animal chased the gulls along the quay?"


def _conversation(backend, n_tokens: int, tag: str) -> list[dict]:
    """A user turn of about ``n_tokens`` tokens (fitted with the backend's tokenizer)."""
    words = max(8, int(n_tokens * 0.75))
    for _ in range(4):
        msgs = [{"role": "user", "content": f"{tag}. Read this.\n\n{filler_words(words, 0)}"}]
        got = len(backend.prompt_tokens(msgs))
        if abs(got - n_tokens) <= max(8, n_tokens // 50):
            break
        words = max(8, int(words * n_tokens / got))
    return msgs


def _follow_up() -> dict:
    return {"role": "user", "content": f"{filler_words(28, 17)}. {FOLLOW_UP}"}


def theoretical_bytes_per_token(backend) -> float | None:
    """layers × 2 × KV heads × head dim × 2 bytes (f16 K and V), from the GGUF metadata; None if unknown."""
    llm = getattr(backend, "_llm", None)
    md = getattr(llm, "metadata", None) or {}
    arch = md.get("general.architecture")
    try:
        layers = int(md[f"{arch}.block_count"])
        heads = int(md[f"{arch}.attention.head_count"])
        kv_heads = int(md.get(f"{arch}.attention.head_count_kv", heads))
        k_dim = int(md.get(f"{arch}.attention.key_length", int(md[f"{arch}.embedding_length"]) // heads))
        v_dim = int(md.get(f"{arch}.attention.value_length", k_dim))
    except (KeyError, ValueError, ZeroDivisionError):
        return None
    return float(layers * kv_heads * (k_dim + v_dim) * 2)


def _ttft(backend, messages) -> tuple[float, object]:
    g = backend.generate(messages, max_tokens=1, temperature=0.0)
    return g.prefill_s, g


def _prepare(kv: ConversationKV, tier: str, backend, conv: str, first: list[dict]) -> list[dict]:
    """Answer the first turn on ``backend`` and store its state; returns the conversation so far."""
    cold_cache(backend)
    g = backend.generate(first, max_tokens=24, temperature=0.0)
    if not kv.save(tier, backend, conv, g.prompt_tokens):
        raise BackendError(f"could not store the KV state: {kv.errors[-1]}")
    return first + [{"role": "assistant", "content": g.text}]


def bench_kv(backends: dict, tier: str, up: str | None, *, contexts=(500, 2000, 4000),
             handoff_context: int = 2000, cache_dir: str | Path | None = None) -> dict:
    """Measure cold versus restored TTFT per context length, the warm handoff, and bytes per token.

    Args:
        backends: tier → loaded-on-demand backend (llama.cpp; ``n_ctx`` above the longest context).
        tier: the tier serving the conversation.
        up: the tier an escalation goes to (None: no handoff measurement).
        contexts: conversation lengths to measure, tokens.
        handoff_context: conversation length of the handoff measurement, tokens.
        cache_dir: where states are written (default: a temporary directory, removed after).

    Returns the JSON object of ``dreamroute bench --kv`` (see the module docstring).

    Raises:
        BackendError: a backend without token-level KV state, or a failed call.
    """
    tmp = tempfile.TemporaryDirectory(prefix="dreamroute-kv-") if cache_dir is None else None
    kv = ConversationKV(RealityCache(cache_dir or tmp.name, max_bytes=1 << 40))
    b = backends[tier]
    points, sizes = [], {}
    try:
        for n in contexts:
            conv = f"bench-{tier}-{n}"
            history = _prepare(kv, tier, b, conv, _conversation(b, n, f"Conversation {n}"))
            msgs = history + [_follow_up()]
            cold_cache(b)
            cold, gc = _ttft(b, msgs)
            cold_cache(b)  # nothing held: the state comes from disk
            r = kv.restore(tier, b, conv, msgs)
            if not r.hit:
                raise BackendError(f"the stored state was not reused ({r.reason})")
            warm, gw = _ttft(b, msgs)
            entry = kv.cache.get(b.identity, conv)
            sizes[n] = (entry.bytes, entry.n_tokens)
            points.append({"context_tokens": gc.prompt_tokens, "ttft_cold_s": cold,
                           "ttft_restored_s": r.seconds + warm, "restore_load_s": r.seconds,
                           "restored_tokens": r.tokens, "evaluated_tokens_restored": gc.prompt_tokens - gw.cached_tokens,
                           "speedup": cold / (r.seconds + warm) if r.seconds + warm > 0 else None,
                           "state_bytes": entry.bytes})
        out = {"tier": tier, "model": b.identity, "points": points}
        n_bpt = min(sizes, key=lambda n: abs(n - 2000)) if sizes else None
        if n_bpt is not None:
            out["bytes_per_token"] = sizes[n_bpt][0] / sizes[n_bpt][1]
            out["bytes_per_token_context"] = sizes[n_bpt][1]
        out["theoretical_bytes_per_token"] = theoretical_bytes_per_token(b)
        if up is not None:
            out["handoff"] = _handoff(kv, tier, b, up, backends[up], handoff_context)
        return out
    finally:
        if tmp is not None:
            tmp.cleanup()


def _handoff(kv: ConversationKV, tier: str, b, up: str, bu, n: int) -> dict:
    conv = f"bench-handoff-{n}"
    history = _prepare(kv, tier, b, conv, _conversation(b, n, f"Handoff {n}"))
    msgs = history + [_follow_up()]
    cold_cache(bu)
    cold, gc = _ttft(bu, msgs)
    cold_cache(bu)
    res = kv.run_prefill(Prefill(up, conv, history), bu)
    if res is None:
        raise BackendError(f"the warm-handoff prefill failed: {kv.errors[-1] if kv.errors else '?'}")
    cold_cache(bu)  # the next turn finds the state on disk
    r = kv.restore(up, bu, conv, msgs)
    if not r.hit:
        raise BackendError(f"the handoff state was not reused ({r.reason})")
    warm, _ = _ttft(bu, msgs)
    return {"tier": up, "context_tokens": gc.prompt_tokens, "ttft_cold_s": cold, "ttft_warm_s": r.seconds + warm,
            "restore_load_s": r.seconds, "prefill_tokens": res[0], "prefill_s": res[1],
            "speedup": cold / (r.seconds + warm) if r.seconds + warm > 0 else None}
