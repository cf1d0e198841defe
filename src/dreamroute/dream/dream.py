"""One DREAM consolidation cycle (the trainer of the pair ``dream_config.py`` / ``dream.py``).

plan → labels → train → export → evaluate → decide, each stage recorded in the
store's ``dream_cycles`` row and the cycle's work directory as it completes, so
a cycle stopped anywhere (a killed process, the end of a session) continues
where it was when run again with the same student and teacher. Nothing reaches
serving before the gate passes: the exported adapter becomes a ``candidate``
model version; only :meth:`Dreamer.decide` activates it, and it does so in one
transaction with the new version's starting trust (from its validation
results, never copied from the old version), ledgered with its witnesses.
``rollback`` reactivates the version a promoted one was trained from.
The evaluate and decide stages live in :mod:`~dreamroute.dream.validation`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from ..errors import DreamrouteError
from ..grading import get_grader
from .dream_config import DreamConfig
from .select import Plan, ReplayItem, plan_replay
from .validation import EvaluateAndDecide, item_grader

STAGES = ("started", "plan", "labels", "train", "export", "evaluate", "decided")
MT_BENCH = Path(__file__).resolve().parents[3].parent / "shared" / "data" / "routellm" / "mt_bench" / "question.jsonl"


class DreamError(DreamrouteError):
    """A cycle cannot run (too few examples, tiers that cannot be distilled) or a stage failed."""


class Dreamer(EvaluateAndDecide):
    """Runs (or resumes) one consolidation cycle of ``student`` from ``teacher``.

    Args:
        settings: the hierarchy (tiers resolve to GGUF files).
        store: an open Store (the experiences to replay; versions, trust, ledger, cycles).
        config: :class:`DreamConfig`.
        student / teacher: tier names (teacher: a bigger tier).
        backends: tier → llama backend, to reuse loaded models (built from settings if absent).
        console: where progress goes.
        perplexity_source: a conversation JSONL whose first turns measure perplexity (default:
            MT-Bench's question.jsonl in ``shared/data`` next to the repository, when present).
    """

    def __init__(self, settings, store, config: DreamConfig, *, student: str, teacher: str,
                 backends: dict | None = None, console: Console | None = None,
                 perplexity_source: str | Path | None = None):
        names = settings.tier_names
        for t in (student, teacher):
            settings.tier(t)
        if names.index(teacher) <= names.index(student):
            raise DreamError(f"the teacher ({teacher}) must be a bigger tier than the student ({student}); "
                             f"tiers cheapest first: {', '.join(names)}")
        self.settings, self.store, self.config = settings, store, config
        self.student, self.teacher = student, teacher
        self.backends = dict(backends or {})
        self.console = console or Console(stderr=True)
        self.perplexity_source = Path(perplexity_source) if perplexity_source else MT_BENCH
        self.cycle: dict | None = None

    # ------------------------------------------------------------------ cycle bookkeeping
    def _backend(self, tier: str):
        if tier not in self.backends:
            from ..backends import make_backend
            self.backends[tier] = make_backend(self.settings.tier(tier), self.settings)
        return self.backends[tier]

    def base_version(self) -> int:
        b = self._backend(self.student)
        return self.store.ensure_model_version(self.student, b.base_identity if hasattr(b, "base_identity")
                                               else b.identity, self.settings.tier(self.student).model)

    def open_cycle(self) -> dict:
        """The running cycle for this student, teacher and base version, or a new one."""
        base = self.base_version()
        for c in self.store.cycles(student=self.student, status="running"):
            if c["teacher"] == self.teacher and c["base_version_id"] == base:
                Path(c["workdir"]).mkdir(parents=True, exist_ok=True)  # a machine may have lost it
                self.cycle = c
                self.console.print(f"resuming DREAM cycle {c['id']} after stage {c['stage']!r}")
                return c
        root = self.settings.data_dir / "dream"
        cid = self.store.start_cycle(self.student, self.teacher, base, str(root / "pending"),
                                     self.config.to_dict())
        workdir = root / f"cycle-{cid}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.store.update_cycle(cid, workdir=str(workdir))  # the work directory is named after the id
        self.cycle = self.store.cycles(student=self.student, status="running")[0]
        return self.cycle

    @property
    def workdir(self) -> Path:
        return Path(self.cycle["workdir"])

    def _done(self, stage: str) -> bool:
        return STAGES.index(self.cycle["stage"]) >= STAGES.index(stage)

    def _record(self, stage: str | None = None, **result) -> None:
        """Store results so far and, when it is later than the last, the stage just completed."""
        self.cycle["result"].update(result)
        if stage is not None and STAGES.index(stage) <= STAGES.index(self.cycle["stage"]):
            stage = None  # a resumed cycle repeating a cheap stage does not move backwards
        if stage is not None:
            self.cycle["stage"] = stage
        self.store.update_cycle(self.cycle["id"], stage=stage, result=self.cycle["result"])

    # ------------------------------------------------------------------ stages
    def plan(self, max_examples: int | None = None) -> Plan:
        """The replay set (see :func:`~dreamroute.dream.select.plan_replay`)."""
        cap = max_examples if max_examples is not None else self.config.max_examples
        return plan_replay(self.store, self.student, self.teacher, heldout_fraction=self.config.heldout_fraction,
                           seed=self.config.seed, max_examples=cap)

    def _running(self) -> bool:
        base = self.base_version()
        return any(c["teacher"] == self.teacher and c["base_version_id"] == base
                   for c in self.store.cycles(student=self.student, status="running"))

    def _check_plan(self, plan: Plan) -> Plan:
        if len(plan.train) < self.config.min_examples:
            raise DreamError(
                f"only {len(plan.train)} training examples (teacher {self.teacher} answers judged correct, "
                f"{len(plan.heldout)} more held out); a cycle needs {self.config.min_examples}. Route more "
                f"graded requests to the teacher, e.g. `dreamroute run FILE --policy always:{self.teacher}`.")
        return plan

    def _plan_stage(self, max_examples: int | None) -> Plan:
        path = self.workdir / "plan.json"
        if self._done("plan") and path.exists():
            d = json.loads(path.read_text())
            return Plan(d["student"], d["teacher"], [ReplayItem(**x) for x in d["train"]],
                        [ReplayItem(**x) for x in d["heldout"]], d["candidates"], d["student_failures"],
                        d.get("missing_responses", 0))
        plan = self._check_plan(self.plan(max_examples))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**plan.summary(), "train": [i.__dict__ for i in plan.train],
                                   "heldout": [i.__dict__ for i in plan.heldout]}))
        tmp.replace(path)
        self._record("plan", examples=len(plan.train), heldout=len(plan.heldout))
        return plan

    def fresh_responses(self, plan: Plan) -> Plan:
        """Ask the teacher again where the store has a witnessed success but not its text.

        Greedy, ``max_tokens`` 320, as answers are served. With a gold answer the fresh
        response is kept only if it is graded correct; without one (a user's or an audit's
        witness) it stands for the answer that was judged. Each result is appended to
        ``responses.jsonl`` in the work directory as it comes (a resumed cycle does not ask
        twice); items left without a response are dropped. Returns the completed plan.
        """
        from .labels import read_labels, write_labels
        missing = [it for it in plan.train + plan.heldout if not it.response.strip()]
        if not missing:
            return plan
        path = self.workdir / "responses.jsonl"
        done = read_labels(path)
        todo = [it for it in missing if it.prompt_hash not in done]
        if todo:
            t = self._backend(self.teacher)
            for it in todo:
                text = t.generate([{"role": "user", "content": it.prompt}], max_tokens=320).text
                ok = True
                if it.gold is not None:
                    grader, ref = item_grader(it)
                    ok = bool(get_grader(grader).grade(text, ref).correct)
                row = {"key": it.prompt_hash, "response": text if ok else "", "correct": ok}
                write_labels(path, [row])
                done[it.prompt_hash] = row
            t.close()

        def fill(items: list[ReplayItem]) -> list[ReplayItem]:
            out = []
            for it in items:
                if not it.response.strip():
                    it = ReplayItem(**{**it.__dict__, "response": done[it.prompt_hash]["response"]})
                if it.response.strip():
                    out.append(it)
            return out

        kept = sum(bool(done[it.prompt_hash]["response"]) for it in missing)
        self._record(None, fresh_responses=kept, fresh_rejected=len(missing) - kept)
        return Plan(plan.student, plan.teacher, fill(plan.train), fill(plan.heldout), plan.candidates,
                    plan.student_failures, 0)

    def _labels(self, plan: Plan) -> dict[str, dict]:
        """Teacher top-k logprobs per training item (when the vocabularies are shared), resumable."""
        from .labels import label_row, read_labels, shared_vocabulary, write_labels
        path = self.workdir / "labels.jsonl"
        done = read_labels(path)
        if self.config.kl_weight > 0 and not self._done("labels"):
            t, s = self._backend(self.teacher), self._backend(self.student)
            if shared_vocabulary(t, s):
                for it in plan.train:
                    if it.prompt_hash in done:
                        continue
                    row = label_row(t, it.prompt_hash, [{"role": "user", "content": it.prompt}], it.response,
                                    self.config.kl_top_k)
                    write_labels(path, [row])
                    done[it.prompt_hash] = row
                t.close()
            else:
                self.console.print(f"{self.teacher} and {self.student} tokenize differently: "
                                   "training on the teacher's answers without the KL term")
        self._record("labels", teacher_logprobs=len(done))
        return done

    def _train(self, plan: Plan, labels: dict[str, dict]):
        from .train import Example, load_student, train_lora
        model, tok = load_student(self._backend(self.student).model_path)
        examples = [Example([{"role": "user", "content": it.prompt}], it.response,
                            (labels[it.prompt_hash]["ids"], labels[it.prompt_hash]["logprobs"])
                            if it.prompt_hash in labels else None, it.prompt_hash,
                            labels.get(it.prompt_hash, {}).get("tokens")) for it in plan.train]
        res = train_lora(model, tok, examples, self.config, self.workdir / "train")
        self._record("train", steps=res.steps, train_wall_s=res.wall_s,
                     final_loss=res.losses[-1] if res.losses else None, teacher_kd=res.kd)
        return res, tok

    def _export(self, model, tok, plan: Plan) -> int:
        from .export import export_gguf_lora, logit_delta_correlation
        base = self._backend(self.student).model_path
        out = self.workdir / "adapter.gguf"
        export_gguf_lora(model, base, out)
        prompts = [it.prompt for it in (plan.heldout or plan.train)[:3]]
        # the export is linear in the adapter, so it is checked on the adapter scaled up until its
        # effect stands above llama.cpp's quantization noise (logits differ from the fp32 model by
        # ~0.13 std on the sensory model): a small, barely trained adapter would otherwise look wrong
        for amplify in (10.0, 40.0):
            corr = logit_delta_correlation(base, out, model, tok, prompts, amplify=amplify)
            if corr >= 0.98:
                break
        if corr < 0.98:
            raise DreamError(f"the exported adapter does not reproduce the trained one in llama.cpp "
                             f"(logit-change correlation {corr:.3f} < 0.98); not promoted")
        b = self._backend(self.student)
        vid = self.store.add_version(self.student, b.base_identity, f"{self.settings.tier(self.student).model} "
                                     f"+ dream {self.cycle['id']}", adapter_path=str(out),
                                     parent_id=self.cycle["base_version_id"],
                                     witnesses=[f"dream:{self.cycle['id']}"], reason="exported adapter")
        self.store.update_cycle(self.cycle["id"], version_id=vid)
        self.cycle["version_id"] = vid
        self._record("export", export_correlation=corr, export_amplify=amplify)
        return vid

    # ------------------------------------------------------------------ the cycle
    def run(self, *, max_examples: int | None = None, dry_run: bool = False) -> dict:
        """Run or resume the cycle; returns the report (see ``dreamroute dream --json``)."""
        t0 = time.perf_counter()
        if dry_run:
            plan = self.plan(max_examples)
            return {"student": self.student, "teacher": self.teacher, "dry_run": True, **plan.summary()}
        if not self._running():  # check there is enough to learn before a cycle is put on record
            self._check_plan(self.plan(max_examples))
        self.open_cycle()
        plan = self._check_plan(self.fresh_responses(self._plan_stage(max_examples)))
        labels = self._labels(plan)
        if not self._done("export"):
            res, tok = self._train(plan, labels)
            self._export(res.model, tok, plan)
        if not self._done("evaluate"):
            self._evaluate(plan)
        promoted = self.decide(plan) if not self._done("decided") else self.cycle["result"]["promoted"]
        r = self.cycle["result"]
        r["wall_s"] = r.get("wall_s", 0.0) + time.perf_counter() - t0
        self._record(None)
        return {"student": self.student, "teacher": self.teacher, "cycle": self.cycle["id"],
                "examples": r.get("examples"), "steps": r.get("steps"), "wall_s": r["wall_s"],
                "heldout_accuracy": {"before": r.get("heldout_before"), "after": r.get("heldout_after")},
                "regression_accuracy": {"before": r.get("regression_before"), "after": r.get("regression_after")},
                "perplexity": {"before": r.get("perplexity_before"), "after": r.get("perplexity_after")},
                "promoted": promoted, "version": self.cycle.get("version_id"), "reasons": r.get("reasons", [])}


def rollback(store, tier: str) -> int:
    """Reactivate the version the tier's active DREAM version was trained from; returns its id.

    Raises:
        DreamError: the active version is not a DREAM version (it has no parent).
    """
    active = store.active_versions().get(tier)
    if active is None or active.parent_id is None:
        raise DreamError(f"tier {tier!r} is serving its base model; there is no DREAM version to roll back")
    store.set_version_status(active.parent_id, "active", witnesses=["user:rollback"],
                             reason=f"rollback of version {active.id}")
    return active.parent_id
