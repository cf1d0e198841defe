"""The ledger's hash chain: a real chain verifies; each kind of tampering is detected and named."""

from __future__ import annotations

import json
import sqlite3

import pytest

from dreamroute.errors import LedgerError
from dreamroute.store.ledger import GENESIS_HASH, canonical_json, entry_hash, parse_trust_entity
from dreamroute.store.store import Store, TrustUpdate


def build_chain(path, instance_id: str | None = None) -> dict:
    """A store with two tiers, 24 trust updates over two contexts, a calibration and a promotion
    (one chain: one Store, of ``instance_id`` or a new one)."""
    with Store(path, instance_id=instance_id) as s:
        mvs = [s.ensure_model_version("sensory", "sha256:aa", "SmolLM2"),
               s.ensure_model_version("tactical", "sha256:bb", "Qwen 0.5B")]
        state = {}
        for i in range(24):
            mv, ctx = mvs[i % 2], ("stable", "novel")[(i // 2) % 2]
            a, b, n = state.get((mv, ctx), (1.0, 1.0, 0))
            ok = i % 3 != 0
            a2, b2 = 1 + 0.995 * (a - 1) + ok, 1 + 0.995 * (b - 1) + (not ok)
            e = {"role": "chosen", "prompt": f"question {i}", "tier": "sensory", "context": ctx,
                 "model_version_id": mv, "outcome": "success" if ok else "failure", "witness": "gold"}
            s.record([e], [TrustUpdate(mv, ctx, a, b, a2, b2, n + 1, ["gold"], "graded", 0)])
            state[(mv, ctx)] = (a2, b2, n + 1)
        s.save_calibration("sha256:aa", "sensory", {"decode_s_per_token": 0.011, "rss_mb": 210.0})
        s.append_ledger("model_version:1", "promotion", {"from": 1, "to": 1}, ["validation"])
        return {"mvs": mvs, "state": state, "entries": len(s.ledger_entries())}


def tamper(path, sql: str, *args) -> None:
    con = sqlite3.connect(path)
    with con:
        assert con.execute(sql, args).rowcount >= 1
    con.close()


def verify(path):
    with Store(path) as s:
        return s.verify_ledger()


def last_seq(path, where: str = "1=1") -> int:
    con = sqlite3.connect(path)
    try:
        return con.execute(f"SELECT MAX(seq) FROM ledger WHERE {where}").fetchone()[0]
    finally:
        con.close()


def test_entry_hash_is_canonical_and_chained():
    args = ("0" * 64, 1, "2025-01-01T00:00:00+00:00", "model_version:1/novel", "trust.update")
    h = entry_hash(*args, {"b": 1, "a": 2.5}, ["gold"])
    assert len(h) == 64 and int(h, 16) >= 0
    assert h == entry_hash(*args, {"a": 2.5, "b": 1}, ["gold"])             # key order irrelevant
    assert h != entry_hash(*args, {"a": 2.5, "b": 2}, ["gold"])
    assert h != entry_hash(*args, {"a": 2.5, "b": 1}, ["user"])
    assert h != entry_hash("1" * 64, *args[1:], {"a": 2.5, "b": 1}, ["gold"])
    assert canonical_json({"b": [1, 2], "a": "é"}) == json.dumps({"a": "é", "b": [1, 2]}, separators=(",", ":"))
    with pytest.raises(ValueError):
        canonical_json({"a": float("nan")})
    assert parse_trust_entity("model_version:12/novel") == (12, "novel")
    assert parse_trust_entity("calibration:sha256:aa") is None


def test_real_chain_verifies(tmp_path):
    path = tmp_path / "s.db"
    built = build_chain(path)
    report = verify(path)
    assert report.ok and report.problems == [] and report.entries == built["entries"] == 2 + 24 + 2
    report.raise_if_bad()
    with Store(path) as s:
        entries = s.ledger_entries()
        assert entries[0]["prev_hash"] == GENESIS_HASH and [e["seq"] for e in entries] == list(range(1, 29))
        assert all(b["prev_hash"] == a["hash"] for a, b in zip(entries, entries[1:]))
        assert [e["seq"] for e in s.ledger_entries(3)] == [26, 27, 28]
        for (mv, ctx), (a, b, n) in built["state"].items():
            row = s.get_trust(mv, ctx)
            assert (row.alpha, row.beta, row.count) == (a, b, n)


def test_empty_ledger_verifies(tmp_path):
    report = verify(tmp_path / "empty.db")
    assert report.ok and report.entries == 0


def test_edited_delta_is_detected(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    con = sqlite3.connect(path)
    delta = json.loads(con.execute("SELECT delta FROM ledger WHERE seq = 10").fetchone()[0])
    con.close()
    delta["reason"] = "rewritten history"
    tamper(path, "UPDATE ledger SET delta = ? WHERE seq = 10", canonical_json(delta))
    report = verify(path)
    assert not report.ok
    assert any("seq 10" in p and "hash mismatch" in p for p in report.problems), report.problems
    with pytest.raises(LedgerError, match="seq 10"):
        report.raise_if_bad()


def test_edited_and_rehashed_entry_breaks_the_next_link(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    con = sqlite3.connect(path)
    row = con.execute("SELECT prev_hash, seq, created_at, entity, action, delta, witnesses "
                      "FROM ledger WHERE seq = 7").fetchone()
    con.close()
    witnesses = ["forged"]
    new_hash = entry_hash(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), witnesses)
    tamper(path, "UPDATE ledger SET witnesses = ?, hash = ? WHERE seq = 7", json.dumps(witnesses), new_hash)
    report = verify(path)
    assert not report.ok and any("seq 8" in p and "prev_hash" in p for p in report.problems), report.problems


def test_deleted_middle_entry_is_detected(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    tamper(path, "DELETE FROM ledger WHERE seq = 12")
    report = verify(path)
    assert not report.ok and report.entries == 27
    assert any("12..12 are missing" in p for p in report.problems), report.problems


def test_deleted_first_entry_is_detected(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    tamper(path, "DELETE FROM ledger WHERE seq = 1")
    assert any("chain starts at seq 2" in p for p in verify(path).problems)


def test_deleted_last_trust_entry_is_detected(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    seq = last_seq(path, "action = 'trust.update'")
    con = sqlite3.connect(path)
    entity = con.execute("SELECT entity FROM ledger WHERE seq = ?", (seq,)).fetchone()[0]
    con.close()
    tamper(path, "DELETE FROM ledger WHERE seq >= ?", seq)          # cut the tail from there
    report = verify(path)
    mv, ctx = parse_trust_entity(entity)
    assert not report.ok
    assert any(f"model_version {mv} / {ctx}" in p and "differs from its last ledger entry" in p
               for p in report.problems), report.problems


def test_deleted_last_entry_of_each_kind_is_detected(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    tamper(path, "DELETE FROM ledger WHERE action = 'promotion'")    # tail: a generic entry
    report = verify(path)     # no table to cross-check it against: the anchor shows it (store/anchor.py)
    assert not report.ok and len(report.problems) == 1, report.problems
    assert "ends at seq 27" in report.problems[0] and "28..28 were removed" in report.problems[0]
    tamper(path, "DELETE FROM ledger WHERE seq = ?", last_seq(path))  # tail: the calibration
    report = verify(path)
    assert not report.ok and any("calibration of sha256:aa" in p for p in report.problems), report.problems


def test_deleted_model_activation_tail_is_detected(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as s:
        old = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        new = s.ensure_model_version("sensory", "sha256:bb", "SmolLM2 v2")
        assert s.verify_ledger().ok
    tamper(path, "DELETE FROM ledger WHERE seq = ?", last_seq(path))
    problems = verify(path).problems
    assert any(f"model version {new} " in p and "no ledger entries" in p for p in problems), problems
    assert any(f"model version {old} " in p and "is retired" in p for p in problems), problems


def test_edited_model_status_is_detected(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    tamper(path, "UPDATE model_versions SET status = 'rejected' WHERE id = 2")
    problems = verify(path).problems
    assert len(problems) == 1 and "model version 2" in problems[0] and "rejected" in problems[0]


def test_edited_trust_row_is_detected(tmp_path):
    path = tmp_path / "s.db"
    built = build_chain(path)
    mv = built["mvs"][0]
    tamper(path, "UPDATE trust SET alpha = alpha + 5 WHERE model_version_id = ? AND context = 'novel'", mv)
    report = verify(path)
    assert not report.ok and len(report.problems) == 1
    assert f"model_version {mv} / novel" in report.problems[0] and "alpha" in report.problems[0]


def test_trust_row_without_ledger_and_missing_row_are_detected(tmp_path):
    path = tmp_path / "s.db"
    built = build_chain(path)
    mv = built["mvs"][1]
    tamper(path, "INSERT INTO trust VALUES (?, 'unstable', 9.0, 1.0, 8, '2025-01-01T00:00:00+00:00')", mv)
    tamper(path, "DELETE FROM trust WHERE model_version_id = ? AND context = 'stable'", mv)
    problems = verify(path).problems
    assert any(f"model_version {mv} / unstable has no ledger entries" in p for p in problems), problems
    assert any(f"model_version {mv} / stable is missing" in p for p in problems), problems
