"""The command line on bad input: each error names what was wrong, exits 2, and loses nothing stored."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from dreamroute.cli import app
from dreamroute.config import default_tiers
from dreamroute.backends.registry import resolve_model
from dreamroute.store.store import Store

runner = CliRunner()


def sensory_gguf(tmp_path):
    """The real sensory GGUF, or skip."""
    try:
        return resolve_model(default_tiers()[0].source, tmp_path / "models")
    except Exception as e:  # noqa: BLE001 - any failure means the model is not installed here
        pytest.skip(f"sensory GGUF not available: {e}")


def write_config(tmp_path, gguf, sha=None, name="sensory"):
    src = {"gguf": str(gguf)}
    if sha:
        src["sha256"] = sha
    cfg = {"tiers": [{"name": name, "model": "m", "source": src, "params_b": 0.135}], "data_dir": str(tmp_path)}
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_missing_model_file(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "nope.gguf")
    r = runner.invoke(app, ["run", "builtin:arithmetic?n=2", "--config", str(cfg), "--db", str(tmp_path / "s.db")])
    assert r.exit_code == 2
    assert "ModelFileError" in r.output and "nope.gguf" in r.output


def test_corrupt_model_file_sha_mismatch(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 1000)
    cfg = write_config(tmp_path, bad, sha="0" * 64)
    r = runner.invoke(app, ["run", "builtin:arithmetic?n=2", "--config", str(cfg), "--db", str(tmp_path / "s.db")])
    assert r.exit_code == 2
    assert "sha256" in r.output and "0000" in r.output


def test_unknown_tier_in_policy(tmp_path):
    cfg = write_config(tmp_path, tmp_path / "x.gguf")
    r = runner.invoke(app, ["run", "builtin:arithmetic?n=2", "--policy", "always:huge", "--config", str(cfg),
                            "--db", str(tmp_path / "s.db")])
    assert r.exit_code == 2
    assert "huge" in r.output


def test_invalid_config_names_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("router:\n  k: -3\n")
    r = runner.invoke(app, ["trust", "--config", str(p)])
    assert r.exit_code == 2 and "router.k" in r.output


def test_unreadable_store_is_refused_and_untouched(tmp_path):
    db = tmp_path / "notes.db"
    db.write_text("my precious notes, not a database\n")
    before = db.read_bytes()
    r = runner.invoke(app, ["trust", "--db", str(db)])
    assert r.exit_code == 2 and "StoreError" in r.output
    assert db.read_bytes() == before


def test_ledger_verify_detects_tampering(tmp_path):
    from .conftest import problem_answers, scripted_backends, scripted_settings
    from dreamroute import DreamRoute
    db = tmp_path / "s.db"
    items, answers = problem_answers(4)
    with DreamRoute(scripted_settings(tmp_path), db=db, backends=scripted_backends(answers)) as dr:
        for it in items:
            dr.complete(it.prompt, gold=it.answer, grader="gsm8k")
    ok = runner.invoke(app, ["ledger", "verify", "--db", str(db)])
    assert ok.exit_code == 0 and "ledger ok" in ok.output
    import sqlite3
    con = sqlite3.connect(db)
    seq = con.execute("SELECT min(seq) FROM ledger WHERE action = 'trust.update'").fetchone()[0]
    con.execute("UPDATE ledger SET delta = replace(delta, '\"reason\":\"', '\"reason\":\"edited ') WHERE seq = ?",
                (seq,))
    con.commit()
    con.close()
    bad = runner.invoke(app, ["ledger", "verify", "--db", str(db)])
    assert bad.exit_code == 1 and str(seq) in bad.output


@pytest.mark.model
def test_real_run_on_sensory_and_malformed_line_keeps_earlier_results(tmp_path):
    gguf = sensory_gguf(tmp_path)
    cfg = write_config(tmp_path, gguf)
    wl = tmp_path / "w.jsonl"
    lines = [json.dumps({"prompt": "What is 2 + 3? End with: The answer is N.", "answer": "5", "grader": "gsm8k"}),
             json.dumps({"prompt": "What is 10 - 4? End with: The answer is N.", "answer": "6", "grader": "gsm8k"}),
             '{"prompt": "broken line", "answer": ',
             json.dumps({"prompt": "never reached", "answer": "1"})]
    wl.write_text("\n".join(lines) + "\n")
    db = tmp_path / "s.db"
    out = tmp_path / "r.json"
    r = runner.invoke(app, ["run", str(wl), "--config", str(cfg), "--db", str(db), "--json", str(out),
                            "--max-tokens", "48"])
    assert r.exit_code == 2, r.output
    assert "w.jsonl:3" in r.output and "2 items before it" in r.output
    report = json.loads(out.read_text())
    assert report["n"] == 2 and report["graded"] == 2
    with Store(db) as s:
        rows = s.experiences(["tier", "prompt_tokens", "completion_tokens", "atp_joules", "outcome"])
        assert len(rows) == 2
        assert all(x["tier"] == "sensory" and x["prompt_tokens"] > 0 and x["completion_tokens"] > 0
                   and x["atp_joules"] > 0 and x["outcome"] in ("success", "failure") for x in rows)
        assert s.verify_ledger().ok


def test_cache_ls_stats_clear(tmp_path, monkeypatch):
    from dreamroute.cache.reality import RealityCache

    monkeypatch.setenv("DREAMROUTE_DATA_DIR", str(tmp_path))
    c = RealityCache(tmp_path / "kv")
    c.put("id-a", "conv-1", "tactical", bytes(1000), 10, 6)
    c.put("id-b", "conv-2", "sensory", bytes(500), 5, 3)
    r = runner.invoke(app, ["cache", "stats", "--json"])
    assert r.exit_code == 0, r.output
    st = json.loads(r.output)
    assert st["entries"] == 2 and st["tokens"] == 15 and set(st["by_tier"]) == {"tactical", "sensory"}
    r = runner.invoke(app, ["cache", "ls"])
    assert r.exit_code == 0 and "conv-1" in r.output and "conv-2" in r.output
    r = runner.invoke(app, ["cache", "clear", "--conversation", "conv-1"])
    assert r.exit_code == 0 and "deleted 1" in r.output
    assert [e.conversation for e in c.entries()] == ["conv-2"]
    assert runner.invoke(app, ["cache", "clear"]).exit_code == 0 and c.entries() == []


def test_error_hints_keep_their_brackets(tmp_path):
    """Rich markup must not eat a message's [..] (the conversation-record hint has some)."""
    p = tmp_path / "bad.jsonl"
    p.write_text('{"turns": [5]}\n')
    r = runner.invoke(app, ["run", str(p), "--db", str(tmp_path / "s.db")])
    assert r.exit_code == 2
    assert '{"turns": [str |' in " ".join(r.output.split())



def test_tier_lora_adapter_must_exist(tmp_path):
    gguf = sensory_gguf(tmp_path)
    cfg = {"tiers": [{"name": "sensory", "model": "m", "source": {"gguf": str(gguf)}, "params_b": 0.135,
                      "lora": str(tmp_path / "missing-adapter.gguf")}], "data_dir": str(tmp_path)}
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = runner.invoke(app, ["run", "builtin:arithmetic?n=1", "--config", str(p), "--db", str(tmp_path / "s.db")])
    assert r.exit_code == 2 and "missing-adapter.gguf does not exist" in " ".join(r.output.split())


def test_python_dash_m_runs_the_same_command_line():
    """``python -m dreamroute.cli`` is ``dreamroute`` (the old single-module CLI crashed on a
    circular import when run this way)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "dreamroute.cli", "trust", "--db", "/nonexistent/none.db"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "StoreError: no store at /nonexistent/none.db" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr and "RuntimeWarning" not in r.stderr
