"""Shared fixtures: a scripted three-tier hierarchy and a temporary store per test (no network)."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import tempfile
import uuid
from pathlib import Path

import pytest

from dreamroute.backends.scripted import ScriptedBackend
from dreamroute.config import Settings, TierConfig
from dreamroute.eval.generated import generate_problems

TIERS = ("sensory", "tactical", "specialized")


def scripted_settings(tmp_path, **router) -> Settings:
    """Settings with three scripted tiers (sizes as in the default hierarchy) and a store in tmp_path."""
    tiers = [TierConfig(name=n, model=f"scripted-{n}", backend="scripted", params_b=p)
             for n, p in zip(TIERS, (0.135, 0.5, 1.5))]
    return Settings(tiers=tiers, data_dir=tmp_path, router=router or {})


def problem_answers(n=60, seed=0):
    items = generate_problems(n, seed=seed)
    return items, {it.prompt: (it.answer, it.meta["level"]) for it in items}


def scripted_backends(answers: dict, skill=(0, 2, 5)) -> dict:
    """sensory/tactical/specialized answer correctly up to level skill[i] (0: never), wrong otherwise.

    Wrong answers are malformed (no "The answer is"), so confidence separates them.
    """
    def make(name, max_level):
        def script(messages):
            prompt = messages[-1]["content"]
            gold, level = answers.get(prompt, ("0", 9))
            if level <= max_level:
                return f"Step by step it works out. The answer is {gold}."
            return "I think it is about 3 or maybe 4"
        return ScriptedBackend(f"sha-{name}", script, decode_s_per_token=0.01 * (1 + 2 * TIERS.index(name)),
                               logprob=-0.1 if max_level else -1.5)
    return {n: make(n, lvl) for n, lvl in zip(TIERS, skill)}


@pytest.fixture
def tmp_settings(tmp_path):
    return scripted_settings(tmp_path)


def final_number(text: str):
    m = re.findall(r"-?\d+", text)
    return m[-1] if m else None


@functools.cache
def native_problem() -> str | None:
    """Why llama.cpp cannot run here (it crashed or failed proving the sensory tier), or None.

    The proof runs in a subprocess (dreamroute doctor's), so a build that traps on this CPU
    fails the real-model tests with its cause instead of killing the test runner. None also
    when llama-cpp-python or the GGUF is absent: those tests skip themselves.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from dreamroute.config import default_tiers
    from dreamroute.cli.doctor import REBUILD_HINT, run_child
    from dreamroute.backends.registry import resolve_model
    tier = default_tiers()[0]
    try:
        path = resolve_model(tier.source, Path(tempfile.gettempdir()) / "dreamroute-test-models")
    except Exception:  # noqa: BLE001 - not installed here: the tests skip
        return None
    res, problem = run_child(["prove", tier.model_copy(update={"n_threads": 2}).model_dump_json(), str(path)], 300)
    if res is None:
        return f"llama.cpp cannot run the sensory tier on this host: the proof {problem}; {REBUILD_HINT}"
    return None


@pytest.fixture(autouse=True)
def _native_gate(request):
    """Real-model tests fail with the cause when this host's llama.cpp build crashes (see native_problem)."""
    if request.node.get_closest_marker("model") is not None:
        problem = native_problem()
        if problem:
            pytest.fail(problem, pytrace=False)


# ---- PostgreSQL (scripts/pg_test_cluster.sh; .ci/run starts one) -----------------------------------
PG_ENV = "DREAMROUTE_TEST_PG_URL"


def pg_required() -> bool:
    """In CI (``CI`` set) or with ``DREAMROUTE_REQUIRE_PG=1`` the PostgreSQL tests must run: a
    missing server fails them instead of skipping them."""
    return os.environ.get("DREAMROUTE_REQUIRE_PG", "") not in ("", "0") or os.environ.get("CI", "") not in ("", "0", "false")


def pg_admin_url() -> str | None:
    """The server's URL (``$DREAMROUTE_TEST_PG_URL``: a superuser, an existing database), or
    None when unset here (skip) or in CI (fail)."""
    url = os.environ.get(PG_ENV, "").strip()
    if url:
        return url
    if pg_required():
        pytest.fail(f"{PG_ENV} is not set, but the PostgreSQL tests must run here (CI or DREAMROUTE_REQUIRE_PG=1): "
                    'start a cluster with eval "$(bash scripts/pg_test_cluster.sh start)"', pytrace=False)
    pytest.skip(f'PostgreSQL tests: set {PG_ENV} (eval "$(bash scripts/pg_test_cluster.sh start)")')
    return None


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for this test (CREATE DATABASE with a unique name on the
    server of ``$DREAMROUTE_TEST_PG_URL``, dropped afterwards): its SQLAlchemy URL. Skips when
    that variable is unset, fails instead in CI or with ``DREAMROUTE_REQUIRE_PG=1``."""
    admin = pg_admin_url()
    try:
        import psycopg
    except ImportError:
        if pg_required():
            pytest.fail("psycopg is not installed: pip install -e '.[postgres]'", pytrace=False)
        pytest.skip("psycopg is not installed (the postgres extra)")
    from sqlalchemy.engine import make_url

    from dreamroute.config.db_url import normalise_url
    base = make_url(normalise_url(admin))
    name = f"dr_test_{uuid.uuid4().hex[:16]}"
    libpq = dict(host=base.host, port=base.port or 5432, user=base.username, password=base.password,
                 dbname=base.database or "postgres", connect_timeout=10)
    try:
        with psycopg.connect(**libpq, autocommit=True) as con:
            con.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as e:
        msg = f"cannot create a test database on {base.render_as_string(hide_password=True)}: {e}"
        if pg_required():
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    yield base.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(**libpq, autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgres"])
def store_db(request, tmp_path):
    """A fresh store to open with ``Store(store_db)``, once as an SQLite file path and once as a
    PostgreSQL URL (``pg_url``: skipped locally without a server, failed in CI)."""
    if request.param == "sqlite":
        return tmp_path / "s.db"
    return request.getfixturevalue("pg_url")
