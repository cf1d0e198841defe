"""The KV-state half of :class:`~dreamroute.backends.llama.LlamaBackend`: save, parse and restore
llama.cpp sequence state (split from ``llama.py`` by responsibility).

A state is ``DRKV1`` bytes: a JSON header (identity, counts), the token ids (int32), their
known log-probabilities (float64), the llama.cpp state of sequence 0
(``llama_state_seq_get_data``; no logits buffer), and a sha256 of all of it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import struct
from array import array

from ..errors import BackendError
from .base import common_prefix

_MAGIC = b"DRKV1\n"


class LlamaKVState:
    """Mixin of :class:`~dreamroute.backends.llama.LlamaBackend` (uses its ``_model()``, ``_llm``,
    ``tier``, ``identity``, ``_lp_tokens``, ``_lp`` and ``_batched``)."""

    # ------------------------------------------------------------------ state

    def save_state(self) -> bytes:
        """Serialise the KV cache of the current tokens.

        Returns:
            ``DRKV1`` bytes: a JSON header (identity, counts), the token ids
            (int32), their known log-probabilities (float64), the llama.cpp
            sequence state, and a sha256 of all of it.

        Raises:
            BackendError: llama.cpp could not copy the state.
        """
        import llama_cpp
        llm = self._model()
        toks = llm._input_ids.tolist()
        kv = b""
        if toks:
            ctx = llm._ctx.ctx
            size = llama_cpp.llama_state_seq_get_size(ctx, 0)
            buf = (ctypes.c_uint8 * size)()
            got = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
            if got == 0 or got > size:
                raise BackendError(f"tier {self.tier.name!r}: llama.cpp could not copy the KV state")
            kv = ctypes.string_at(buf, got)
        p = common_prefix(self._lp_tokens, toks)
        lp = self._lp[: max(p - 1, 0)] if p else []
        head = json.dumps({"identity": self.identity, "n_tokens": len(toks),
                           "n_lp": len(lp), "kv_bytes": len(kv)}).encode()
        body = (_MAGIC + struct.pack("<I", len(head)) + head + array("i", toks).tobytes()
                + array("d", lp).tobytes() + kv)
        return body + hashlib.sha256(body).digest()

    def _parse_state(self, state: bytes, verify: bool = True) -> tuple[list[int], list[float], bytes]:
        """(token ids, known log-probabilities, llama.cpp sequence state) of a saved state.

        Raises BackendError for truncated or damaged bytes (checksum, with ``verify``)
        or a state saved by another model.
        """
        name = self.tier.name
        data = bytes(state)
        if len(data) < len(_MAGIC) + 4 + 32 or not data.startswith(_MAGIC):
            raise BackendError(f"tier {name!r}: not a dreamroute llama state (truncated or damaged)")
        body, digest = data[:-32], data[-32:]
        if verify and hashlib.sha256(body).digest() != digest:
            raise BackendError(f"tier {name!r}: the saved state is truncated or damaged (checksum)")
        off = len(_MAGIC)
        (hlen,) = struct.unpack_from("<I", body, off)
        try:
            head = json.loads(body[off + 4: off + 4 + hlen])
            n, n_lp, n_kv = int(head["n_tokens"]), int(head["n_lp"]), int(head["kv_bytes"])
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"tier {name!r}: the saved state has a damaged header") from e
        if head.get("identity") != self.identity:
            raise BackendError(f"tier {name!r}: the state was saved by model {head.get('identity')}, "
                               f"not {self.identity}; it cannot be restored here")
        off += 4 + hlen
        if len(body) != off + 4 * n + 8 * n_lp + n_kv:
            raise BackendError(f"tier {name!r}: the saved state is truncated or damaged (length)")
        toks = array("i", body[off: off + 4 * n]).tolist()
        lp = array("d", body[off + 4 * n: off + 4 * n + 8 * n_lp]).tolist()
        return toks, lp, body[off + 4 * n + 8 * n_lp:]

    def state_tokens(self, state: bytes) -> list[int]:
        """The token ids a saved state holds (header check only; :meth:`load_state` verifies
        the checksum). Raises BackendError like :meth:`load_state`."""
        return self._parse_state(state, verify=False)[0]

    def held_tokens(self) -> list[int]:
        """The token ids the KV cache holds now ([] before loading)."""
        return self._llm._input_ids.tolist() if self._llm is not None else []

    def load_state(self, state: bytes) -> None:
        """Restore a :meth:`save_state` result into the KV cache.

        Raises:
            BackendError: the bytes are truncated or damaged, were saved by another
                model (identity differs), do not fit ``n_ctx``, or llama.cpp rejects them.
        """
        import llama_cpp
        name = self.tier.name
        toks, lp, kv = self._parse_state(state)
        n = len(toks)
        llm = self._model()
        if n >= llm.n_ctx():
            raise BackendError(f"tier {name!r}: the state holds {n} tokens, more than n_ctx "
                               f"{llm.n_ctx()}; raise n_ctx in the tier config")
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        llm.reset()
        if kv:
            buf = (ctypes.c_uint8 * len(kv)).from_buffer_copy(kv)
            if llama_cpp.llama_state_seq_set_data(llm._ctx.ctx, buf, len(kv), 0) == 0:
                raise BackendError(f"tier {name!r}: llama.cpp rejected the saved KV state")
        llm.input_ids[:n] = toks
        llm.n_tokens = n
        llm._requires_eval = True
        self._lp_tokens, self._lp = toks[: len(lp) + 1], lp
        self._batched = n  # states are saved settled (see settle())
