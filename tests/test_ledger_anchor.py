"""The end of the ledger is anchored outside the database (store/anchor.py): a removed tail is
detected even when every table was rolled back to match it; normal use, several stores and a
crash between a commit and its anchor write all verify."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine

from dreamroute.store.anchor import Anchor, anchor_path, read_anchor
from dreamroute.store.ledger import TRUST_FIELDS, parse_trust_entity, verify
from dreamroute.store.store import Store, TrustUpdate

from .test_ledger import build_chain

N_ENTRIES = 28   # build_chain: 2 activations, 24 trust updates, a calibration, a promotion


def chain_only(path):
    """``ledger.verify`` alone: the chain and the tables, without the anchor."""
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            return verify(conn)
    finally:
        engine.dispose()


def verify_store(path):
    with Store(path) as s:
        return s.verify_ledger()


def cut_tail_and_roll_back(path, k: int) -> None:
    """Delete the last ``k`` entries and make every table agree with what is left: each trust row
    set to its last remaining entry (or deleted), calibration likewise: the attack a chain alone
    cannot see."""
    con = sqlite3.connect(path)
    with con:
        top = con.execute("SELECT MAX(seq) FROM ledger").fetchone()[0]
        con.execute("DELETE FROM ledger WHERE seq > ?", (top - k,))
        last_trust, last_calib = {}, {}
        for entity, action, delta in con.execute("SELECT entity, action, delta FROM ledger ORDER BY seq"):
            d = json.loads(delta)
            key = parse_trust_entity(entity)
            if key is not None and all(f in d for f in TRUST_FIELDS):
                last_trust[key] = d
            if action == "calibration":
                last_calib[entity.partition(":")[2]] = d
        for mv, ctx in con.execute("SELECT model_version_id, context FROM trust").fetchall():
            d = last_trust.get((mv, ctx))
            if d is None:
                con.execute("DELETE FROM trust WHERE model_version_id = ? AND context = ?", (mv, ctx))
            else:
                con.execute("UPDATE trust SET alpha = ?, beta = ?, count = ? WHERE model_version_id = ? "
                            "AND context = ?", (d["alpha_after"], d["beta_after"], d["count_after"], mv, ctx))
        for (identity,) in con.execute("SELECT identity FROM calibration").fetchall():
            if identity not in last_calib:
                con.execute("DELETE FROM calibration WHERE identity = ?", (identity,))
    con.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("chain") / "s.db"
    build_chain(path)
    return path


def copy_store(template, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for suffix in ("", ".ledger-head"):
        shutil.copy(f"{template}{suffix}", dest / f"s.db{suffix}")
    return dest / "s.db"


def test_normal_operation_verifies_and_the_anchor_is_the_head(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    report = verify_store(path)
    assert report.ok and report.entries == N_ENTRIES, report.problems
    with Store(path) as s:
        head = s.ledger_entries(1)[0]
        first = s.ledger_entries()[0]
    a = read_anchor(anchor_path(path))
    assert (a.seq, a.hash, a.first) == (N_ENTRIES, head["hash"], first["hash"])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(min_value=1, max_value=N_ENTRIES - 2))
def test_a_cut_tail_with_the_tables_rolled_back_is_detected(template, tmp_path, k):
    path = copy_store(template, tmp_path / f"cut{k}")
    cut_tail_and_roll_back(path, k)
    assert chain_only(path).ok          # the chain and the tables agree: only the anchor knows
    report = verify_store(path)
    assert not report.ok and len(report.problems) == 1, report.problems
    p = report.problems[0]
    assert f"ends at seq {N_ENTRIES - k}" in p and f"{N_ENTRIES - k + 1}..{N_ENTRIES} were removed" in p
    assert str(anchor_path(path)) in p
    with Store(path) as s:              # writing on does not paper over it: the anchor is left as it was
        mv = s.ensure_model_version("sensory", "sha256:aa", "SmolLM2")
        s.record([{"role": "chosen", "prompt": "q", "tier": "sensory", "context": "moving",
                   "model_version_id": mv}], [TrustUpdate(mv, "moving", 1, 1, 2, 1, 1, ["gold"], "x", 0)])
        assert s.anchor.frozen and not s.verify_ledger().ok
    assert read_anchor(anchor_path(path)).seq == N_ENTRIES


def test_a_deliberately_restored_backup_is_anchored_anew_once_its_anchor_is_deleted(template, tmp_path):
    path = copy_store(template, tmp_path)
    cut_tail_and_roll_back(path, 3)
    assert not verify_store(path).ok
    anchor_path(path).unlink()
    assert verify_store(path).ok and read_anchor(anchor_path(path)).seq == N_ENTRIES - 3


def test_a_replaced_chain_is_detected_by_its_first_entry(tmp_path):
    a, b = tmp_path / "a" / "s.db", tmp_path / "b" / "s.db"
    for p in (a, b):
        build_chain(p, instance_id="router-1")   # same chain id and shape, other timestamps: other hashes
    shutil.copy(b, a)                   # b's database where a's was, a's anchor left
    problems = verify_store(a).problems
    assert any("first entry differs" in p for p in problems) and any(f"seq {N_ENTRIES} differs" in p
                                                                      for p in problems), problems


def test_a_replaced_database_is_detected_by_its_missing_chain(tmp_path):
    a, b = tmp_path / "a" / "s.db", tmp_path / "b" / "s.db"
    for p in (a, b):
        build_chain(p)                  # each its own instance: other chains
    shutil.copy(b, a)
    problems = verify_store(a).problems
    assert len(problems) == 1 and "holds none of them" in problems[0] and "database replaced" in problems[0], problems


def test_each_store_has_its_own_anchor(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    build_chain(a)
    with Store(b) as s:
        s.append_ledger("x", "note", {"n": 1}, ["test"])
    assert read_anchor(anchor_path(a)).seq == N_ENTRIES and read_anchor(anchor_path(b)).seq == 1
    con = sqlite3.connect(b)
    with con:
        con.execute("DELETE FROM ledger")
    con.close()
    assert verify_store(a).ok and not verify_store(b).ok


def test_a_new_database_replaces_the_anchor_a_deleted_one_left(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    for f in tmp_path.glob("s.db*"):
        if not f.name.endswith(".ledger-head"):
            f.unlink()                  # the user deletes the database (not its anchor) to start over
    report = verify_store(path)
    assert report.ok and report.entries == 0
    assert read_anchor(anchor_path(path)) == Anchor(0, "0" * 64, None, read_anchor(anchor_path(path)).written_at)


def test_a_store_without_an_anchor_is_anchored_when_opened(tmp_path):
    path = tmp_path / "s.db"
    build_chain(path)
    anchor_path(path).unlink()          # a database from before anchoring
    assert verify_store(path).ok and read_anchor(anchor_path(path)).seq == N_ENTRIES
    anchor_path(path).write_text("{not json")   # damaged: read as none, anchored again
    assert verify_store(path).ok and read_anchor(anchor_path(path)).seq == N_ENTRIES


def test_a_failed_anchor_write_never_fails_the_commit(tmp_path, monkeypatch):
    import dreamroute.store.anchor as A

    path = tmp_path / "s.db"
    with Store(path) as s:
        s.append_ledger("x", "note", {"n": 1}, ["test"])
        s.anchor.flush()

        def full(*a, **k):
            raise OSError(28, "No space left on device")
        monkeypatch.setattr(A, "write_anchors", full)
        seq = s.append_ledger("x", "note", {"n": 2}, ["test"])
        s.anchor.flush()
        assert seq == 2 and "No space left" in s.anchor.error
        assert s.verify_ledger().ok     # the database is ahead of its anchor: fine
    monkeypatch.undo()
    assert read_anchor(anchor_path(path)).seq == 1


def test_a_crash_between_commit_and_anchor_write_still_verifies(tmp_path):
    """A process killed (SIGKILL) right after a commit, before it writes the anchor (one chain,
    continued by each restart: a configured instance id)."""
    path = tmp_path / "s.db"
    with Store(path, instance_id="r1") as s:
        s.append_ledger("x", "note", {"n": 1}, ["test"])
    script = textwrap.dedent(f"""
        import os, signal
        from dreamroute.store.anchor import LedgerAnchor
        from dreamroute.store.store import Store
        LedgerAnchor.committed = lambda self, head: os.kill(os.getpid(), signal.SIGKILL)
        s = Store({str(path)!r}, instance_id="r1")
        s.append_ledger("x", "note", {{"n": 2}}, ["test"])
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9 and "not reached" not in proc.stdout, proc.stderr
    assert read_anchor(anchor_path(path)).seq == 1
    with Store(path, instance_id="r1") as s:
        assert len(s.ledger_entries()) == 2          # the commit itself is there
        assert s.verify_ledger().ok
        s.append_ledger("x", "note", {"n": 3}, ["test"])
    assert read_anchor(anchor_path(path)).seq == 3 and verify_store(path).ok


def test_a_burst_of_commits_is_anchored_within_the_interval_without_a_close(tmp_path):
    import time

    from dreamroute.store.anchor import INTERVAL_S

    s = Store(tmp_path / "s.db")
    for n in range(20):                                  # faster than one anchor write per INTERVAL_S
        s.append_ledger("x", "note", {"n": n}, ["test"])
    time.sleep(INTERVAL_S * 4)                           # the timer writes the last head
    assert read_anchor(anchor_path(tmp_path / "s.db")).seq == 20
    s.close()


def test_a_store_anchored_before_ledger_chains_keeps_its_anchor_as_the_legacy_chain(tmp_path):
    """A database at migration 9 with a format-1 anchor (one chain): after the upgrade its entries
    are the chain ``legacy`` and the old anchor still guards their tail."""
    from dreamroute.store import schema as T
    from dreamroute.store.ledger import canonical_json, entry_hash
    from dreamroute.store.migrations import MIGRATIONS, sqlite_engine

    path = tmp_path / "s.db"
    engine = sqlite_engine(path)
    with engine.execution_options(dreamroute_write=True).begin() as conn:
        T.migrations_table.create(conn)
        for version, name, fn in MIGRATIONS[:9]:
            fn(conn)
            conn.execute(T.migrations_table.insert().values(version=version, name=name, applied_at=T.utc_now()))
    engine.dispose()
    now, prev, rows = T.utc_now(), T.GENESIS_HASH, []
    for seq in (1, 2, 3):
        delta, witnesses = {"n": seq}, ["test"]
        h = entry_hash(prev, seq, now, "x", "note", delta, witnesses)
        rows.append((seq, now, "x", "note", canonical_json(delta), canonical_json(witnesses), prev, h))
        prev = h
    con = sqlite3.connect(path)
    with con:
        con.executemany("INSERT INTO ledger VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    con.close()
    anchor_path(path).write_text(json.dumps({"format": 1, "seq": 3, "hash": rows[-1][-1], "first": rows[0][-1],
                                             "written_at": now}))
    report = verify_store(path)
    assert report.ok and report.chains == {"legacy": 3}, report.problems
    with Store(path) as s:
        s.append_ledger("x", "note", {"n": 4}, ["test"])
        me = s.instance_id
    anchors = __import__("dreamroute.store.anchor", fromlist=["read_anchors"]).read_anchors(anchor_path(path))
    assert anchors["legacy"].seq == 3 and anchors[me].seq == 1
    con = sqlite3.connect(path)
    with con:
        con.execute("DELETE FROM ledger WHERE instance_id = 'legacy' AND chain_seq = 3")
    con.close()
    problems = verify_store(path).problems
    assert len(problems) == 1 and "chain legacy: the ledger ends at seq 2" in problems[0], problems
