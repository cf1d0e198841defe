"""Log-probabilities from llama.cpp's logits for :class:`~dreamroute.backends.llama.LlamaBackend`
(split from ``llama.py`` by responsibility): ``score()`` of a chat-templated prompt, and the
last-position readout ``generate()`` takes for each sampled token.

* score(): the prompt is decoded in chunks of at most :data:`SCORE_CHUNK` tokens with logits
  requested for every position of the chunk (llama.cpp batch API), so the logits buffer holds
  at most ``SCORE_CHUNK × n_vocab`` floats; log-probabilities already computed for a prompt
  sharing the prefix are reused (see :mod:`.llama` for why generated tokens' are not).
* ``_logprob_last`` / ``_detail``: a sampled token's log-softmax and top alternatives from the
  last-position logits (``llama_get_logits_ith(ctx, -1)``), and the token as a TokenLogprob.
"""

from __future__ import annotations

import numpy as np

from .base import Message, TokenLogprob, common_prefix
from .options import log_softmax_top

#: the most prompt tokens score() decodes in one batch with logits for every position
SCORE_CHUNK = 64


class LlamaLogprobs:
    """Mixin of :class:`~dreamroute.backends.llama.LlamaBackend` (uses its ``_llm``,
    ``prompt_and_stops()``, ``reset()``, ``_err()``, ``_lp_tokens``, ``_lp`` and ``_batched``)."""

    def _logprob_last(self, token: int, k: int = 0) -> tuple[float, list[tuple[int, float]]]:
        """log-softmax of the last-position logits at ``token`` (natural log), and the ``k`` most
        likely tokens there as ``(id, logprob)`` (:func:`~.options.log_softmax_top`)."""
        import llama_cpp
        llm = self._llm
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                    shape=(llm.n_vocab(),))
        return log_softmax_top(row, token, k)

    def _detail(self, tok: int, lp: float, alts: list[tuple[int, float]]) -> TokenLogprob:
        """A generated token as a TokenLogprob (its piece's bytes; alternatives with theirs)."""
        def piece(t: int, logprob: float, top=()) -> TokenLogprob:
            b = self._llm.detokenize([t])
            return TokenLogprob(b.decode("utf-8", errors="ignore"), b, logprob, top)
        return piece(tok, lp, tuple(piece(t, v) for t, v in alts))

    def score(self, messages: list[Message], *, new_only: bool = False) -> list[float]:
        """Natural-log probability of each prompt token given those before it.

        Args:
            new_only: score only the tokens the KV cache does not hold yet (a new
                conversation turn after a restore), evaluating them once: the
                surprise of the turn, computed while it is prefilled.

        Returns:
            ``prompt_tokens - 1`` floats (all ``<= 0``) for the chat-templated prompt
            (generation prompt included), i.e. exactly the tokens generate() evaluates;
            with ``new_only``, the last ``m`` of them, where ``m`` is the number of
            prompt tokens after the prefix the KV cache held (the first token has no
            log-probability, so at most ``prompt_tokens - 1``; ``[]`` when all are held).

        Raises:
            BackendError: prompt too long for ``n_ctx``, or llama.cpp failed.
        """
        import llama_cpp
        tokens, _ = self.prompt_and_stops(messages)
        llm = self._llm
        n = len(tokens)
        p = common_prefix(self._lp_tokens, tokens)
        known = self._lp[: max(p - 1, 0)]
        q = common_prefix(llm._input_ids.tolist(), tokens)
        need_from = max(p - 1, 0)  # first position whose logits are needed
        if new_only:
            if q >= n:
                return []
            # token j's log-probability comes from the logits at position j − 1: re-evaluate one held token
            need_from = start = max(q - 1, 0)
            known = known[:need_from] if len(known) >= need_from else None
        elif len(known) >= n - 1:
            if q >= n:
                return known[: n - 1]
            start = q
        else:
            start = min(q, need_from)
        new: list[float] = []
        n_vocab = llm.n_vocab()
        try:
            if not llm._ctx.kv_cache_seq_rm(-1, start, -1):
                start = 0
                llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            chunk = max(1, min(SCORE_CHUNK, llm.n_batch))
            for i in range(start, n, chunk):
                piece = tokens[i: i + chunk]
                want = (new_only or len(known) < n - 1) and i + len(piece) - 1 >= need_from
                llm._batch.set_batch(batch=piece, n_past=i, logits_all=want)
                llm._ctx.decode(llm._batch)
                llm.input_ids[i: i + len(piece)] = piece
                llm.n_tokens = i + len(piece)
                if not want:
                    continue
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm._ctx.ctx),
                                               shape=(len(piece), n_vocab))
                lo = max(need_from - i, 0)
                hi = min(len(piece), n - 1 - i)  # the last token predicts nothing in the prompt
                if hi <= lo:
                    continue
                x = logits[lo:hi]
                m = x.max(axis=1, keepdims=True)
                lse = m[:, 0].astype(np.float64) + np.log(np.exp(x - m).sum(axis=1, dtype=np.float64))
                nxt = np.asarray(tokens[i + lo + 1: i + hi + 1])
                new.extend((x[np.arange(hi - lo), nxt].astype(np.float64) - lse).tolist())
            llm._requires_eval = False  # the last decode produced the last token's logits
        except Exception as e:
            self.reset()
            raise self._err("scoring failed", e) from e
        if new_only:
            if known is not None:  # the scores of earlier tokens are still valid: keep them all
                self._lp_tokens, self._lp = list(tokens), known + new
            if self._batched >= start and n - start >= 2:
                self._batched = n
            return new
        out = known + new if len(known) < n - 1 else known[: n - 1]
        self._lp_tokens, self._lp = list(tokens), out
        if self._batched >= start and n - start >= 2:
            self._batched = n
        return out
