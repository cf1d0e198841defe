"""The Python API: build the hierarchy and router from a config and use it.

    >>> from dreamroute import DreamRoute
    >>> with DreamRoute() as dr:                       # the default hierarchy
    ...     ans = dr.complete("What is 17 + 25? End with: The answer is N.", grader="gsm8k")
    ...     print(ans.tier, ans.text)
    ...     dr.record_outcome(ans.request.request_id, "success")
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .signals.atp import TierCost, cost_from_calibration, estimated_cost
from .backends import make_backend
from .backends.base import Backend, CancelCheck, GenOptions
from .cache.reality import RealityCache
from .cache.response import CachedAnswer, ResponseCache
from .cache.reuse import ConversationKV
from .config import Settings, load_settings
from .errors import ConfigError
from .router.engine import Engine
from .router.feedback import feedback_update
from .router.gate import Quiesce, TierGate, all_exclusive
from .router.memory import Memory
from .router.pacing import make_pacer
from .router.policies import make_policy
from .router.types import Answer, Outcome, Request
from .store.store import Store, read_calibration


def tier_costs(settings: Settings, store: Store, identities: dict[str, str]) -> dict[str, TierCost]:
    """ATP model per tier: the ``bench`` calibration in this store, else the one in the
    machine's default store (calibration describes the machine, not a run; that store is
    read-only here, never created or migrated), else the estimate by model size
    (:func:`dreamroute.signals.atp.estimated_cost`)."""
    default_db = settings.data_dir / "dreamroute.db"
    other = Path(store.path or "") != default_db
    out = {}
    for t in settings.tiers:
        cal = store.get_calibration(identities[t.name])
        if cal is None and other:
            cal = read_calibration(default_db, identities[t.name])
        out[t.name] = cost_from_calibration(cal, t.watts) if cal else estimated_cost(t.params_b, t.watts)
    return out


class DreamRoute:
    """A routed hierarchy with its store: the object programs embed.

    Args:
        settings: a :class:`Settings` (default: built-in hierarchy, default store).
        config: path of a YAML config, used when ``settings`` is None.
        db: store path (overrides the settings).
        policy: ``dreamroute`` (default), ``always:TIER``, ``random[:P]``, ``cascade[:T]``.
        budget: average ATP per request, J (None: no budget).
        seed: seed of every random choice.
        backends: tier → Backend, to use instead of building them from the settings
            (tests pass scripted backends; replay passes recorded ones).
        store: an open Store to use instead of opening ``db``.
        run_id: the run experiences are filed under.
        fast_path: keep a response cache of answers with a witnessed success (loaded from the
            store, kept current by the engine) for :meth:`cached` (the server's fast path).
        cooldown_s: fall back to another tier when a backend fails, and skip the failing tier
            this long, s (None: a backend failure fails the request).

    Raises:
        ConfigError, UnknownTierError, ModelFileError, StoreError: as their names say.

    Thread-safe: :meth:`complete`, :meth:`record_outcome`, :meth:`idle` and
    :meth:`refresh_versions` may be called from many threads at once. Each tier runs at most
    its ``max_in_flight`` calls at once (more wait in its queue of ``max_queue``; see
    :mod:`dreamroute.router.gate`); the learned state is guarded by ``engine.state``.
    """

    def __init__(self, settings: Settings | None = None, *, config: str | Path | None = None,
                 db: str | Path | None = None, policy: str = "dreamroute", budget: float | None = None,
                 seed: int = 0, backends: dict[str, Backend] | None = None, store: Store | None = None,
                 run_id: int | None = None, fast_path: bool = False, cooldown_s: float | None = None):
        self.settings = settings or load_settings(config)
        self.seed = seed
        self.budget = budget
        tiers = self.settings.tier_names
        if budget is not None and not budget >= 0:
            raise ConfigError(f"budget must be >= 0 J per request (or None for no budget), got {budget}")
        if seed < 0:
            raise ConfigError(f"seed must be >= 0, got {seed}")
        self.policy = make_policy(policy, tiers, self.settings.router, seed=seed)  # validate before loading
        self._own_store = store is None
        self.store = store or Store(db or self.settings.db_path, instance_id=self.settings.store.instance_id)
        if backends is None:
            backends = {t.name: make_backend(t, self.settings, seed=seed) for t in self.settings.tiers}
        missing = [t for t in tiers if t not in backends]
        if missing:
            raise ValueError(f"backends missing for tiers {missing}")
        self.backends = backends
        # the configured identities (a config `lora:` included), before any DREAM adapter is applied
        self._identities = {t: backends[t].identity for t in tiers}
        self.memory = self._load_versions()
        self.pacer = make_pacer(budget, self.settings.router)  # router.pacer: spend (default) | dual
        cc = self.settings.cache
        self.kv = ConversationKV(RealityCache(self.settings.kv_dir, cc.max_bytes)) if cc.enabled else None
        self.responses = ResponseCache() if fast_path else None
        if self.responses is not None:
            self.responses.load(self.store)
        self.gates = {t.name: TierGate(t.name, t.in_flight, t.max_queue) for t in self.settings.tiers}
        self._quiesce = Quiesce()  # requests read; refresh_versions writes (swaps the memory)
        self.engine = Engine(tiers, backends, self.store, self.memory, self.policy, self.pacer, run_id,
                             kv=self.kv, handoff=cc.handoff, responses=self.responses, cooldown_s=cooldown_s,
                             gates=self.gates)

    def _load_versions(self) -> Memory:
        """Serve each tier's active version (a promoted DREAM adapter on its base) and build the
        learned memory for those versions from the store."""
        tiers, backends = self.settings.tier_names, self.backends
        versions = {t.name: self.store.ensure_model_version(t.name, self._identities[t.name], t.model)
                    for t in self.settings.tiers}
        for tier, vid in versions.items():
            b = backends[tier]
            if not hasattr(b, "use_adapter"):
                continue
            v = self.store.get_version(vid)
            want = v.adapter_path if v.adapter_path else (self.settings.tier(tier).lora or None)
            if str(want or "") != str(getattr(b, "lora_path", None) or ""):
                b.use_adapter(want)
        # speed calibration describes the base model: an adapter (DREAM, config `lora:`) reuses it
        base_ids = {t: getattr(backends[t], "base_identity", self._identities[t]) for t in tiers}
        memory = Memory(tiers, self.settings.router, tier_costs(self.settings, self.store, base_ids))
        memory.load(self.store, versions)
        return memory

    def refresh_versions(self) -> bool:
        """Serve the store's active versions again, after a DREAM cycle in another process
        promoted one (or a rollback reverted it). Rebuilds the learned memory when a tier's
        version changed (its trust is the new version's). Returns whether anything changed.

        Safe while requests run: a change waits until no request is in flight (new ones wait
        meanwhile), takes every tier's gate and the state lock, then swaps the memory (and any
        adapter), so no request decides with one memory and learns into another."""
        if not self._versions_changed():
            return False
        with self._quiesce.writing(), all_exclusive(self.gates), self.engine.state:
            if not self._versions_changed():
                return False
            before = dict(self.memory.versions)
            memory = self._load_versions()
            memory.conversations, memory.serving = self.memory.conversations, self.memory.serving
            self.memory = self.engine.memory = memory
            return dict(memory.versions) != before

    def _versions_changed(self) -> bool:
        before = self.memory.versions
        active = self.store.active_versions()
        return not all((v := active.get(t)) is not None and v.id == before.get(t) for t in self.settings.tier_names)

    def complete(self, prompt: str | list[dict], *, gold: str | None = None, grader: str | None = None,
                 conversation_id: str | None = None, priority: float = 0.0, max_tokens: int = 320,
                 item_key: str | None = None, tier: str | None = None,
                 request_id: str | None = None, options: GenOptions | None = None,
                 cancel: CancelCheck | None = None, on_text: Callable[[str], None] | None = None,
                 queue_timeout_s: float | None = None) -> Answer:
        """Answer a prompt (a string or chat messages) through the router.

        With ``gold`` and ``grader`` the answer is graded at once (ground truth);
        otherwise its outcome stays unknown until :meth:`record_outcome` or an audit.
        ``tier`` forces one tier for this request (as policy ``always:TIER``; UnknownTierError
        for a tier the hierarchy lacks); ``request_id`` names the request (default: a new uuid).
        ``options`` (stop strings, logprobs, a JSON mode) apply to every call the router makes
        for it; ``cancel`` is polled between tokens and stops the request with
        GenerationCancelled, recording nothing of it but its ATP (background work ``cancelled``).
        An option a tier cannot honour raises OptionError (a RequestError). ``on_text``: with
        ``tier``, called with each new piece of text as it is generated (``Request.on_text``).
        ``queue_timeout_s``: longest the request waits for its tiers' turns, s; TierBusyError
        past it, or at once when a tier's queue is full (None: no limit but the queues').
        Safe to call from many threads at once.
        Returns the :class:`Answer` (``.text``, ``.tier``, ``.atp``, ``.request.request_id``).
        """
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        req = Request(messages, conversation_id=conversation_id, priority=priority, max_tokens=max_tokens,
                      grader=grader, item_key=item_key, tier=tier, options=options or GenOptions(), cancel=cancel,
                      on_text=on_text, queue_timeout_s=queue_timeout_s)
        if request_id is not None:
            req.request_id = request_id
        with self._quiesce.reading():
            ans, outcomes = self.engine.handle(req, gold)
        ans.outcomes = outcomes
        return ans

    def cached(self, messages: list[dict], *, max_tokens: int | None = None,
               tier: str | None = None) -> CachedAnswer | None:
        """The fast path: the stored answer of exactly this conversation (every role and content
        as given, see :mod:`dreamroute.cache.response`) when it has a witnessed success on record, else None
        (always None without ``fast_path``). Costs no model call and changes nothing stored."""
        if self.responses is None:
            return None
        return self.responses.get(messages, max_tokens=max_tokens, tier=tier)

    def record_outcome(self, request_id: str, outcome: str | float, witness: str = "user") -> Outcome:
        """Report how a response turned out: ``"success"``, ``"failure"`` or a rating in [0, 1].

        Updates trust and appends a ledger entry witnessed by ``witness``.
        Raises RequestError (a ValueError) for an unknown request id or outcome.
        Safe to call from many threads (it takes ``engine.state``).
        """
        with self.engine.state:
            return feedback_update(self.engine, request_id, outcome, witness)

    def idle(self, max_jobs: int = 1) -> int:
        """Use idle time: run up to ``max_jobs`` queued warm-handoff prefills (see ``Engine.idle``:
        a job whose tier is busy waits for the next idle moment)."""
        with self._quiesce.reading():
            return self.engine.idle(max_jobs)

    def trust(self) -> list[dict]:
        """Trust per model version × context: ``{tier, model, context, trust, alpha, beta, n}``."""
        return [dict(tier=r.tier, model=r.model, context=r.context, trust=r.mean, alpha=r.alpha,
                     beta=r.beta, n=r.count) for r in self.store.trust_table()]

    # ---- several routers sharing one store (router/sync.py) ----------------------------------
    def sync(self) -> int:
        """Add what other routers sharing this store recorded since the last sync to the
        learned memory now (their experiences: index, direct trust, tier stats, judges; and
        every served trust row reread), under ``engine.state``. Returns the experiences added.
        Raises StoreError on a failed read."""
        return self._syncer().poll()

    def start_sync(self, interval_s: float | None = None, *, force: bool = False) -> bool:
        """Start the background poll that keeps memory current with other routers (every
        ``interval_s``, default ``store.sync_interval_s``), when ``store.sync`` says so (by
        default only for a server URL such as PostgreSQL) or ``force``. Returns whether it
        runs. :meth:`close` stops it."""
        on = self.settings.store.sync
        if not (force or (on if on is not None else self.store.dialect == "postgresql")):
            return False
        syncer = self._syncer()
        syncer.interval_s = float(interval_s or self.settings.store.sync_interval_s)
        syncer.start()
        return True

    def stop_sync(self) -> None:
        """Stop the background poll (if it runs)."""
        if getattr(self, "_sync", None) is not None:
            self._sync.stop()

    def _syncer(self):
        if getattr(self, "_sync", None) is None:
            from .router.sync import StoreSync
            self._sync = StoreSync(self, self.settings.store.sync_interval_s)
        return self._sync

    def close(self) -> None:
        self.stop_sync()
        for b in self.backends.values():
            b.close()
        if self._own_store:
            self.store.close()

    def __enter__(self) -> "DreamRoute":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
