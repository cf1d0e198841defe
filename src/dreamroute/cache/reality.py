"""The reality cache: each conversation's KV state per model, on disk, LRU under a byte budget.

A follow-up turn should not pay to re-read the whole conversation. After a
tier answers a turn, its backend's state (``Backend.save_state()``: for
llama.cpp the KV cells of the sequence, the token ids and their known
log-probabilities; no logits) is written here under (model identity,
conversation id). On the next turn the engine loads it back when the stored
tokens up to the end of the previous prompt are a prefix of the new prompt
(:func:`restorable_prefix`); the backend then evaluates only the tokens after
the shared prefix. Anything else is a miss: a cached state is exact or unused,
never a wrong answer.

File layout: ``<root>/<identity[:16]>/<sha256(conversation)[:32]>.kv``, each
file ``DRRC1\\n`` + a little-endian u32 header length + a JSON header
(identity, conversation, tier, token counts, state length, creation time) +
the backend's state bytes (which carry their own identity and sha256).
Writes go to a temporary file that is renamed into place, so a killed
process or a full disk leaves the previous state (or none), never a partial
one. Least recently used means oldest modification time: a restore touches
the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..backends.base import common_prefix
from ..errors import CacheError

MAGIC = b"DRRC1\n"
SUFFIX = ".kv"


@dataclass
class CachedState:
    """One stored conversation state.

    Attributes:
        identity: the model identity that made it (GGUF sha256 or version identity).
        conversation: the conversation id.
        tier: the tier that served the turn.
        n_tokens: tokens the state holds (prompt and answer of the last turn).
        n_prompt: tokens of the last turn's prompt (the part a follow-up must share).
        bytes: size of the file, bytes.
        state_bytes: size of the backend state inside it, bytes.
        created: Unix time it was written.
        last_used: Unix time it was last written or restored.
        path: the file.
    """

    identity: str
    conversation: str
    tier: str
    n_tokens: int
    n_prompt: int
    bytes: int
    state_bytes: int
    created: float
    last_used: float
    path: Path

    def read_state(self) -> bytes:
        """The backend state bytes. Raises CacheError when the file is gone or truncated."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.bytes - self.state_bytes)
                data = f.read()
        except OSError as e:
            raise CacheError(f"cannot read cached state {self.path}: {e}") from e
        if len(data) != self.state_bytes:
            raise CacheError(f"cached state {self.path} is truncated ({len(data)} of {self.state_bytes} "
                             "bytes); it was discarded and the turn is evaluated in full")
        return data


def restorable_prefix(stored: list, prompt: list, n_prompt: int) -> int:
    """Tokens of a stored state that a new prompt can reuse: their common prefix, when it
    covers at least the stored turn's whole prompt (``n_prompt``), else 0 (a miss).

    The stored tokens are the last turn's prompt then its answer; the new prompt repeats
    both and adds the new turn. If the chat template re-renders the answer with other
    tokens, the prefix ends inside the answer and only the rest is evaluated; if an earlier
    turn changed, the prefix ends before ``n_prompt`` and the state is not used.
    """
    n = common_prefix(stored, prompt)
    return n if n >= n_prompt and n > 0 else 0


class RealityCache:
    """Conversation KV states on disk under a byte budget (see the module docstring).

    Args:
        root: the cache directory (created on first write).
        max_bytes: byte budget; after each write the least recently used states are
            deleted until the total is within it.
    """

    def __init__(self, root: str | Path, max_bytes: int = 2 * 1024**3):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)

    # ------------------------------------------------------------------ paths
    def path(self, identity: str, conversation: str) -> Path:
        """Where (identity, conversation)'s state lives."""
        conv = hashlib.sha256(conversation.encode("utf-8")).hexdigest()[:32]
        return self.root / identity[:16] / f"{conv}{SUFFIX}"

    def _files(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return [p for p in self.root.glob(f"*/*{SUFFIX}") if p.is_file()]

    # ------------------------------------------------------------------ reading
    def _read_header(self, path: Path) -> CachedState:
        try:
            st = path.stat()
            with open(path, "rb") as f:
                head = f.read(len(MAGIC) + 4)
                if len(head) < len(MAGIC) + 4 or not head.startswith(MAGIC):
                    raise CacheError(f"{path} is not a dreamroute cache file (truncated or damaged)")
                (hlen,) = struct.unpack_from("<I", head, len(MAGIC))
                meta = json.loads(f.read(hlen))
        except OSError as e:
            raise CacheError(f"cannot read cached state {path}: {e}") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise CacheError(f"cached state {path} has a damaged header") from e
        try:
            c = CachedState(str(meta["identity"]), str(meta["conversation"]), str(meta["tier"]),
                            int(meta["n_tokens"]), int(meta["n_prompt"]), st.st_size, int(meta["state_bytes"]),
                            float(meta["created"]), st.st_mtime, path)
        except (KeyError, TypeError, ValueError) as e:
            raise CacheError(f"cached state {path} has a damaged header ({e})") from e
        if c.bytes != len(MAGIC) + 4 + hlen + c.state_bytes:
            raise CacheError(f"cached state {path} is truncated ({c.bytes} bytes, header says "
                             f"{len(MAGIC) + 4 + hlen + c.state_bytes})")
        return c

    def get(self, identity: str, conversation: str) -> CachedState | None:
        """The stored state of (identity, conversation), or None; marks it recently used.

        Raises:
            CacheError: the file is damaged, truncated, or was made by another model
                (it is deleted, so the next turn stores a fresh one).
        """
        path = self.path(identity, conversation)
        if not path.is_file():
            return None
        try:
            c = self._read_header(path)
            if c.identity != identity or c.conversation != conversation:
                raise CacheError(f"cached state {path} belongs to model {c.identity[:16]}… / conversation "
                                 f"{c.conversation!r}, not {identity[:16]}… / {conversation!r}; discarded")
        except CacheError:
            path.unlink(missing_ok=True)
            raise
        now = time.time()
        os.utime(path, (now, now))
        c.last_used = now
        return c

    def entries(self) -> list[CachedState]:
        """Every readable stored state, most recently used first (damaged files are skipped)."""
        out = []
        for p in self._files():
            try:
                out.append(self._read_header(p))
            except CacheError:
                continue
        return sorted(out, key=lambda c: c.last_used, reverse=True)

    def stats(self) -> dict:
        """``{"entries", "bytes", "max_bytes", "tokens", "by_tier": {tier: {"entries", "bytes"}}}``."""
        es = self.entries()
        by: dict[str, dict] = {}
        for c in es:
            d = by.setdefault(c.tier, {"entries": 0, "bytes": 0})
            d["entries"] += 1
            d["bytes"] += c.bytes
        return {"entries": len(es), "bytes": sum(c.bytes for c in es), "max_bytes": self.max_bytes,
                "tokens": sum(c.n_tokens for c in es), "by_tier": by}

    # ------------------------------------------------------------------ writing
    def put(self, identity: str, conversation: str, tier: str, state: bytes, n_tokens: int,
            n_prompt: int) -> CachedState:
        """Store a state (replacing the conversation's previous one for this model), then evict.

        Raises:
            CacheError: the write failed (full disk, permissions); nothing partial is left and
                the previous state, if any, is unchanged.
        """
        path = self.path(identity, conversation)
        meta = json.dumps({"identity": identity, "conversation": conversation, "tier": tier,
                           "n_tokens": int(n_tokens), "n_prompt": int(n_prompt),
                           "state_bytes": len(state), "created": time.time()}).encode()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # one per writer
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(meta)) + meta)
                f.write(state)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CacheError(f"cannot write the KV state of conversation {conversation!r} to {path.parent}: "
                             f"{e.strerror or e}; free disk space or lower cache.max_bytes "
                             "(the turn was answered; only the next turn's reuse is lost)") from e
        self.evict(keep=path)
        return self._read_header(path) if path.exists() else None

    def evict(self, keep: Path | None = None) -> int:
        """Delete least recently used states until the total is within ``max_bytes``.

        ``keep`` (the state just written) goes last, and only if it alone exceeds the budget.
        Returns the number of files deleted.
        """
        files = []
        for p in self._files():
            try:
                st = p.stat()
            except OSError:
                continue
            files.append((p == keep, st.st_mtime, st.st_size, p))
        total = sum(f[2] for f in files)
        removed = 0
        for _, _, size, p in sorted(files, key=lambda f: (f[0], f[1])):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

    def clear(self, conversation: str | None = None) -> int:
        """Delete every state (or one conversation's, for every model). Returns files deleted."""
        n = 0
        for p in self._files():
            if conversation is not None:
                try:
                    if self._read_header(p).conversation != conversation:
                        continue
                except CacheError:
                    continue
            p.unlink(missing_ok=True)
            n += 1
        return n

    def drop(self, identity: str, conversation: str) -> None:
        """Forget one state (after the backend rejected it)."""
        self.path(identity, conversation).unlink(missing_ok=True)
