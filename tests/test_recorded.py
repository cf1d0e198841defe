"""Recorded outcomes (load_recorded), the replay backend, and `collect` round trips."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from rich.console import Console

from dreamroute import DreamRoute
from dreamroute.backends.base import Backend, Generation
from dreamroute.backends.replay import ReplayBackend, ReplayCursor, replay_backends
from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import Settings, TierConfig
from dreamroute.errors import BackendError, WorkloadError
from dreamroute.eval.collect import collect
from dreamroute.eval.recorded import load_recorded
from dreamroute.eval.recorded_set import oracle_tier, tier_accuracy
from dreamroute.eval.workloads import load_workload

from .conftest import TIERS, scripted_backends, scripted_settings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LOCAL = DATA / "local_tiers" / "gsm8k_test_outcomes.jsonl"
RLLM_GSM8K = DATA / "routellm" / "gsm8k"
RLLM_MMLU = DATA / "routellm" / "mmlu"
WORKLOAD = "builtin:arithmetic?n=5"


def quiet() -> Console:
    return Console(file=open("/dev/null", "w"), force_terminal=False)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def outcome(key, tier, correct, *, seconds=1.0, prompt=None, **kw):
    rec = {"key": key, "tier": tier, "model": f"m-{tier}", "sent_prompt": prompt or f"question {key}?",
           "prompt": prompt or f"question {key}?", "gold": "4", "grader": "gsm8k", "correct": correct,
           "prompt_tokens": 10, "completion_tokens": 5, "seconds": seconds,
           "response": f"{tier} says The answer is {4 if correct else 5}."}
    rec.update(kw)
    return rec


def write_routellm(path: Path, rows, models=("weak-m", "strong-m"), responses=False) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["prompt", *models, *([f"{m}_response" for m in models] if responses else [])])
        for prompt, a, b in rows:
            w.writerow([prompt, a, b, *([f"{models[0]} answer", f"{models[1]} answer"] if responses else [])])
    return path


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not LOCAL.is_file(), reason="recorded local-tier outcomes not present")
def test_local_tiers_loads_with_readme_accuracies():
    rs = load_recorded(LOCAL)
    assert rs.kind == "outcomes" and len(rs) == 200 and rs.dropped == 0
    assert rs.tiers == ["sensory", "tactical", "specialized"]  # by mean seconds 2.8 < 7.3 < 13.6
    assert all(set(it.calls) == set(rs.tiers) for it in rs)
    acc = tier_accuracy(rs)
    assert acc == pytest.approx({"sensory": 0.04, "tactical": 0.275, "specialized": 0.485})
    assert sum(any(c.correct for c in it.calls.values()) for it in rs) / len(rs) == pytest.approx(0.55)
    first = rs.items[0]
    assert first.key == "gsm8k:0" and first.grader == "gsm8k" and first.gold == "18"
    assert first.calls["sensory"].atp_joules is None and first.calls["sensory"].prompt_tokens == 112
    # the recorded prompt is the message as sent: the same as `dreamroute run` sends for gsm8k/test.jsonl
    test = DATA / "gsm8k" / "test.jsonl"
    if test.is_file():
        wl = load_workload(test, limit=200)
        assert [(it.key, it.prompt, it.answer) for it in wl] == [(r.key, r.prompt, r.gold) for r in rs]
    assert load_recorded(LOCAL).digest == rs.digest
    # oracle: the cheapest correct tier, else the cheapest
    assert oracle_tier(first, rs.tiers) in rs.tiers
    nobody = next(it for it in rs if not any(c.correct for c in it.calls.values()))
    assert oracle_tier(nobody, rs.tiers) == "sensory"


@pytest.mark.skipif(not RLLM_GSM8K.is_dir(), reason="RouteLLM data not present")
def test_routellm_gsm8k_drops_contaminated_prompts():
    rs = load_recorded(RLLM_GSM8K)
    contaminated = {json.loads(line)["eval_prompt"]
                    for line in (RLLM_GSM8K / "contaminated_prompts.jsonl").read_text().splitlines() if line}
    assert rs.kind == "routellm" and rs.tiers == ["weak", "strong"]
    assert rs.dropped > 0 and len(rs) == 1307  # RouteLLM: 1307/1319 after decontamination
    assert not any(it.prompt in contaminated for it in rs)
    assert rs.models["strong"] == "gpt-4-1106-preview"
    assert "Mixtral" in rs.models["weak"]
    acc = tier_accuracy(rs)
    assert acc["strong"] > acc["weak"]
    it = rs.items[0]
    assert it.grader == "gsm8k" and it.gold is None and it.key.startswith("gsm8k_responses:")
    assert it.calls["strong"].atp_joules == 1.0 and it.calls["weak"].atp_joules == 0.0
    assert it.calls["strong"].response and it.calls["weak"].prompt_tokens is None
    assert load_recorded(RLLM_GSM8K / "gsm8k_responses.csv").digest == rs.digest


@pytest.mark.skipif(not RLLM_MMLU.is_dir(), reason="RouteLLM data not present")
def test_routellm_mmlu_loads_every_subject_file():
    rs = load_recorded(RLLM_MMLU)
    files = [Path(f).name for f in rs.files]
    assert files == sorted(files) and "contaminated_prompts.jsonl" not in files and files
    assert rs.dropped > 0 and len(rs) > 0
    assert rs.tiers == ["weak", "strong"] and rs.models["strong"] == "gpt-4-1106-preview"
    assert {it.grader for it in rs} == {"choice"} and all(it.calls["weak"].response is None for it in rs)
    assert {(c.tier, c.atp_joules) for it in rs.items[:50] for c in it.calls.values()} == {("weak", 0.0),
                                                                                          ("strong", 1.0)}
    acc = tier_accuracy(rs)
    assert acc["strong"] > acc["weak"]


# --------------------------------------------------------------------------- formats and errors


def test_directory_loads_csvs_in_name_order_and_filters(tmp_path):
    write_routellm(tmp_path / "mmlu_b.csv", [("b0", "True", "True"), ("b1", "False", "True")])
    write_routellm(tmp_path / "mmlu_a.csv", [("a0", "False", "True"), ("dirty", "True", "True"),
                                             ("a2", "false", "1")])
    write_jsonl(tmp_path / "contaminated_prompts.jsonl", [{"train_prompt": "x", "eval_prompt": "dirty"}])
    rs = load_recorded(tmp_path)
    assert [Path(f).name for f in rs.files] == ["mmlu_a.csv", "mmlu_b.csv"]
    assert [it.key for it in rs] == ["mmlu_a:0", "mmlu_a:2", "mmlu_b:0", "mmlu_b:1"]  # row numbers kept
    assert rs.dropped == 1
    assert tier_accuracy(rs) == {"weak": 0.25, "strong": 1.0}
    assert rs.models == {"weak": "weak-m", "strong": "strong-m"}


def test_strong_is_the_more_accurate_model_whatever_the_column_order(tmp_path):
    path = write_routellm(tmp_path / "x.csv", [("p0", "True", "False"), ("p1", "True", "False")],
                          models=("big", "small"), responses=True)
    rs = load_recorded(path)
    assert rs.models == {"weak": "small", "strong": "big"}
    assert rs.items[0].calls["strong"].response == "big answer"
    assert rs.items[0].grader == "choice"


def test_outcome_files_of_a_directory_merge_and_tiers_order_by_seconds(tmp_path):
    write_jsonl(tmp_path / "a_big.jsonl", [outcome("k1", "big", True, seconds=9.0),
                                           outcome("k2", "big", True, seconds=11.0)])
    write_jsonl(tmp_path / "b_small.jsonl", [outcome("k1", "small", False, seconds=1.0),
                                             outcome("k2", "small", True, seconds=2.0)])
    rs = load_recorded(tmp_path)
    assert rs.tiers == ["small", "big"] and [it.key for it in rs] == ["k1", "k2"]
    assert oracle_tier(rs.get("k1"), rs.tiers) == "big" and oracle_tier(rs.get("k2"), rs.tiers) == "small"
    # without seconds: first appearance
    (tmp_path / "other").mkdir()
    single = write_jsonl(tmp_path / "other" / "x.jsonl",
                         [outcome("k", "big", True, seconds=None), outcome("k", "small", True, seconds=None)])
    assert load_recorded(single).tiers == ["big", "small"]
    assert load_recorded(single, tier_order=["small", "big"]).tiers == ["small", "big"]
    with pytest.raises(WorkloadError, match="tier_order"):
        load_recorded(single, tier_order=["small"])


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "rec.jsonl"
    good = [outcome("k1", "a", True), outcome("k1", "b", False)]
    path.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n{not json\n")
    with pytest.raises(WorkloadError, match=r"rec\.jsonl:3: not valid JSON"):
        load_recorded(path)
    write_jsonl(path, good + [outcome("k2", "a", "yes")])
    with pytest.raises(WorkloadError, match=r"rec\.jsonl:3: 'correct' must be true or false"):
        load_recorded(path)
    write_jsonl(path, good + [outcome("k2", "a", True, prompt_tokens=-3)])
    with pytest.raises(WorkloadError, match=r"rec\.jsonl:3: 'prompt_tokens'"):
        load_recorded(path)
    write_jsonl(path, good + [outcome("k1", "a", True)])
    with pytest.raises(WorkloadError, match=r"rec\.jsonl:3: .*already has a line for tier 'a'"):
        load_recorded(path)
    write_jsonl(path, good + [outcome("k2", "a", True)])
    with pytest.raises(WorkloadError, match=r"item 'k2' has no recorded line for tier\(s\) 'b'"):
        load_recorded(path)
    write_jsonl(path, [good[0], outcome("k1", "b", True, prompt="another question")])
    with pytest.raises(WorkloadError, match=r"rec\.jsonl:2: item 'k1' has a different prompt"):
        load_recorded(path)


def test_malformed_csv_row_names_file_and_row(tmp_path):
    path = write_routellm(tmp_path / "bad.csv", [("p0", "True", "False"), ("p1", "maybe", "True")])
    with pytest.raises(WorkloadError, match=r"bad\.csv:row 1 \(line 3\): column 'weak-m' must be True or False"):
        load_recorded(path)
    path.write_text("prompt,weak-m,strong-m\np0,True,False\n\"multi\nline\",True\np2,True,True\n")
    with pytest.raises(WorkloadError, match=r"bad\.csv:row 1 \(line 3\): 2 fields where the header has 3"):
        load_recorded(path)
    path.write_text("prompt,only-one\np0,True\n")
    with pytest.raises(WorkloadError, match="exactly two model columns"):
        load_recorded(path)


def test_missing_unknown_and_mixed_sources(tmp_path):
    with pytest.raises(WorkloadError, match="does not exist"):
        load_recorded(tmp_path / "nope.jsonl")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(WorkloadError, match="not a recorded source"):
        load_recorded(tmp_path / "notes.txt")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 2+2?", "answer": "4"}])
    with pytest.raises(WorkloadError, match="not a recorded source"):
        load_recorded(prompts)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WorkloadError, match="holds no recorded data"):
        load_recorded(empty)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_routellm(mixed / "a.csv", [("p", "True", "True")])
    write_jsonl(mixed / "b.jsonl", [outcome("k", "a", True)])
    with pytest.raises(WorkloadError, match="mixes"):
        load_recorded(mixed)


# --------------------------------------------------------------------------- replay backend


def small_set(tmp_path):
    recs = []
    for i in range(4):
        for tier, sec, ok in (("sensory", 1.0, i == 0), ("tactical", 2.0, i < 2), ("specialized", 4.0, i < 3)):
            recs.append(outcome(f"q{i}", tier, ok, seconds=sec, prompt=f"What is {i} + 4?",
                                mean_logprob=-0.25 if tier == "sensory" else None))
    return load_recorded(write_jsonl(tmp_path / "small.jsonl", recs))


def test_replay_backend_returns_recorded_answers_only_for_the_selected_prompt(tmp_path):
    rs = small_set(tmp_path)
    backends, cursor = replay_backends(rs)
    assert isinstance(backends["sensory"], Backend)
    assert all(b.cursor is cursor for b in backends.values())
    msgs = [{"role": "user", "content": "What is 1 + 4?"}]
    with pytest.raises(BackendError, match="no item selected"):
        backends["tactical"].generate(msgs)
    backends["sensory"].select("q1")  # selects for every tier
    gen = backends["tactical"].generate(msgs)
    rc = rs.get("q1").calls["tactical"]
    assert gen.text == rc.response and gen.prompt_tokens == 10 and gen.completion_tokens == 5
    assert gen.token_logprobs is None and gen.prefill_s == 0 and gen.decode_s == 2.0
    assert gen.extra == {"mean_logprob": None, "recorded": True}  # tokens known: the engine charges ATP
    assert gen.mean_logprob is None and "correct" not in json.dumps(gen.extra)
    assert backends["sensory"].generate(msgs).mean_logprob == -0.25
    with pytest.raises(BackendError, match="not the selected item"):
        backends["tactical"].generate([{"role": "user", "content": "What is 2 + 4?"}])
    with pytest.raises(BackendError, match="no recorded item"):
        cursor.select("nope")
    with pytest.raises(BackendError, match="recorded source has no prompt logprobs"):
        backends["sensory"].score(msgs)
    for call in (lambda b: b.save_state(), lambda b: b.load_state(b"x")):
        with pytest.raises(BackendError):
            call(backends["sensory"])
    assert backends["tactical"].calls == 1 and backends["sensory"].calls == 1
    assert cursor.calls == {"tactical": 1, "sensory": 1}
    assert cursor.log == [("q1", "tactical"), ("q1", "sensory")]
    with pytest.raises(ValueError):
        ReplayBackend("strategic", rs)
    with pytest.raises(ValueError):
        (tmp_path / "again").mkdir()
        ReplayBackend("sensory", rs, cursor=ReplayCursor(small_set(tmp_path / "again")))


def test_generation_mean_logprob_falls_back_to_extra():
    g = Generation("x", 1, 1, None, 0.0, 0.0, extra={"mean_logprob": -0.5})
    assert g.mean_logprob == -0.5
    assert Generation("x", 1, 1, None, 0.0, 0.0).mean_logprob is None
    assert Generation("x", 1, 2, [-1.0, -3.0], 0.0, 0.0, extra={"mean_logprob": -0.5}).mean_logprob == -2.0


def test_engine_over_replay_has_no_surprise_and_charges_every_call(tmp_path):
    rs = small_set(tmp_path)
    settings = scripted_settings(tmp_path, audit_base=1.0, audit_novelty=0.0)  # audit every request
    backends, cursor = replay_backends(rs)
    with DreamRoute(settings, db=tmp_path / "s.db", backends=backends, policy="always:sensory") as dr:
        for it in rs:
            cursor.select(it.key)
            ans = dr.complete(it.prompt, grader=it.grader, item_key=it.key)
            assert ans.decision.signals.surprise is None
            assert cursor.item_calls == [c.tier for c in ans.calls]
            assert all(c.atp > 0 for c in ans.calls)  # charged from recorded token counts
    assert sum(cursor.calls.values()) == sum(b.calls for b in backends.values()) >= len(rs)


@pytest.mark.skipif(not RLLM_GSM8K.is_dir(), reason="RouteLLM data not present")
def test_engine_over_routellm_replay_charges_the_paper_costs(tmp_path):
    rs = load_recorded(RLLM_GSM8K)
    tiers = [TierConfig(name=n, model=rs.models[n], backend="scripted") for n in rs.tiers]
    settings = Settings(tiers=tiers, data_dir=tmp_path)
    backends, cursor = replay_backends(rs)
    with DreamRoute(settings, db=tmp_path / "s.db", backends=backends, policy="always:strong") as dr:
        for it in rs.items[:3]:
            cursor.select(it.key)
            ans = dr.complete(it.prompt, grader=it.grader, item_key=it.key)
            assert ans.final.tier == "strong" and ans.final.atp == 1.0
            assert ans.final.text == it.calls["strong"].response
    assert backends["strong"].calls == 3


# --------------------------------------------------------------------------- collect


def arithmetic_backends(skill=(0, 2, 5)):
    items = load_workload(WORKLOAD).items
    return scripted_backends({it.prompt: (it.answer, it.meta["level"]) for it in items}, skill)


def test_collect_round_trip(tmp_path):
    settings = scripted_settings(tmp_path)
    out = tmp_path / "rec" / "outcomes.jsonl"
    counts = collect(settings, WORKLOAD, tiers=None, limit=None, out=out, console=quiet(),
                     backends=arithmetic_backends())
    assert counts["written"] == 15 and counts["skipped"] == 0 and counts["items"] == 5
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["tier"] for r in lines[:5]] == ["sensory"] * 5  # tier by tier
    assert all(r["atp_joules"] > 0 and r["sent_prompt"] and r["key"].startswith("arith:") for r in lines)
    assert all(r["mean_logprob"] is not None and "cached_tokens" in r for r in lines)
    rs = load_recorded(out)
    assert rs.tiers == list(TIERS) and len(rs) == 5
    wl = load_workload(WORKLOAD)
    assert [it.key for it in rs] == [it.key for it in wl] and [it.prompt for it in rs] == [it.prompt for it in wl]
    for r in lines:
        rc = rs.get(r["key"]).calls[r["tier"]]
        assert rc.correct == r["correct"] and rc.response == r["response"]
    assert tier_accuracy(rs)["sensory"] == 0.0 and tier_accuracy(rs)["specialized"] == 1.0
    # a replay of the collected set answers what was collected
    backends, cursor = replay_backends(rs)
    it = rs.items[0]
    cursor.select(it.key)
    assert backends["tactical"].generate([{"role": "user", "content": it.prompt}]).text == \
        it.calls["tactical"].response
    # a rerun has nothing left to do
    again = collect(settings, WORKLOAD, tiers=None, limit=None, out=out, console=quiet(),
                    backends=arithmetic_backends())
    assert again["written"] == 0 and again["skipped"] == 15
    # another workload under the same keys is refused
    with pytest.raises(WorkloadError, match="different prompt"):
        collect(settings, "builtin:arithmetic?n=5&seed=0&levels=5", tiers=None, limit=None, out=out,
                console=quiet(), backends=arithmetic_backends())


def test_collect_resumes_after_a_kill_without_duplicates(tmp_path):
    settings = scripted_settings(tmp_path)
    out = tmp_path / "outcomes.jsonl"
    backends = arithmetic_backends()
    real = backends["sensory"].script
    n = {"calls": 0}

    def dies_on_third(messages):
        n["calls"] += 1
        if n["calls"] == 3:
            raise BackendError("killed")
        return real(messages)

    backends["sensory"] = ScriptedBackend("sha-sensory", dies_on_third)
    with pytest.raises(BackendError, match="killed"):
        collect(settings, WORKLOAD, tiers=None, limit=None, out=out, console=quiet(), backends=backends)
    assert len(out.read_text().splitlines()) == 2
    # a kill in the middle of writing a line leaves a partial last line
    with out.open("a") as fh:
        fh.write('{"index": 2, "key": "arith:0:2", "tier": "sens')
    counts = collect(settings, WORKLOAD, tiers=None, limit=None, out=out, console=quiet(),
                     backends=arithmetic_backends())
    assert counts["repaired"] and counts["skipped"] == 2 and counts["written"] == 13
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    pairs = [(r["key"], r["tier"]) for r in lines]
    assert len(pairs) == 15 and len(set(pairs)) == 15
    assert len(load_recorded(out)) == 5


def test_collect_subset_of_tiers_and_limit(tmp_path):
    settings = scripted_settings(tmp_path)
    out = tmp_path / "o.jsonl"
    counts = collect(settings, WORKLOAD, tiers=["specialized"], limit=2, out=out, console=quiet(),
                     backends=arithmetic_backends())
    assert counts["per_tier"] == {"specialized": {"written": 2, "correct": 2}}
    rs = load_recorded(out)
    assert rs.tiers == ["specialized"] and len(rs) == 2


@pytest.mark.model
@pytest.mark.skipif(not (LOCAL.is_file() and (DATA / "gsm8k" / "test.jsonl").is_file()),
                    reason="GSM8K test set or local-tier outcomes not present")
def test_real_collect_on_sensory_matches_the_recorded_prompt(tmp_path):
    """One real call (sensory, one GSM8K question) is recorded the way local_tiers was."""
    from dreamroute.config import default_tiers
    from dreamroute.backends.registry import resolve_model

    tier = default_tiers()[0].model_copy(update={"n_threads": 1})
    models = Path("/tmp/dreamroute-test-models")
    try:
        resolve_model(tier.source, models)
    except Exception as e:  # noqa: BLE001 - any failure means the model is not installed here
        pytest.skip(f"sensory GGUF not available: {e}")
    settings = Settings(tiers=[tier], data_dir=tmp_path, model_cache=models)
    out = tmp_path / "real.jsonl"
    counts = collect(settings, str(DATA / "gsm8k" / "test.jsonl"), tiers=None, limit=1, out=out,
                     console=quiet())
    assert counts["written"] == 1
    rec = json.loads(out.read_text())
    recorded = load_recorded(LOCAL).get("gsm8k:0").calls["sensory"]
    assert rec["key"] == "gsm8k:0" and rec["index"] == 0
    assert rec["prompt_tokens"] == recorded.prompt_tokens  # same message, same chat template
    assert 0 < rec["completion_tokens"] <= 320 and rec["atp_joules"] > 0 and rec["mean_logprob"] < 0
    rs = load_recorded(out)
    assert rs.tiers == ["sensory"] and rs.get("gsm8k:0").prompt == load_recorded(LOCAL).get("gsm8k:0").prompt
    print("same text as recorded:", rec["response"] == recorded.response)
