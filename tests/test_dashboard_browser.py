"""The dashboard rendered by headless Chromium (Debian's ``chromium``) against a live server.

The page's script fetches ``/dashboard/data`` and draws every panel; the test reads the DOM after
the script ran and keeps a screenshot in the test artefacts (``$DREAMROUTE_TEST_ARTIFACTS``, default
``test-artifacts/`` in the repository). ``.ci/run`` installs Chromium; elsewhere the test skips
when it is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dreamroute import DreamRoute
from dreamroute.metabolic import MetabolicConfig, MetabolicController
from dreamroute.server import create_app

from .conftest import TIERS, problem_answers, scripted_backends, scripted_settings
from .test_server_live import served

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("DREAMROUTE_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--virtual-time-budget=15000"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


def chromium(tmp_path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)


def test_dashboard_renders_every_panel_in_headless_chromium(tmp_path):
    items, answers = problem_answers(16)
    settings = scripted_settings(tmp_path)
    dr = DreamRoute(settings, db=tmp_path / "s.db", backends=scripted_backends(answers), budget=40.0)
    for it in items:
        dr.complete(it.prompt, gold=it.answer, grader=it.grader)
    ctl = MetabolicController(MetabolicConfig(), list(TIERS))
    ctl.set_crisis(True)
    ctl.set_crisis(False)
    with served(create_app(settings, dr=dr, metabolic=ctl)) as base:
        dom = chromium(tmp_path, "--dump-dom", f"{base}/dashboard")
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert 'data-loaded="1"' in html, html[-3000:]
        assert '<span id="state">WAKE</span>' in html
        assert "16 recent requests" in html
        assert html.count('data-series="spent"') == 1 and html.count('data-series="budget"') == 1
        assert 'data-tier="sensory"' in html or 'data-tier="tactical"' in html  # tier mix bars
        assert "<circle" in html                                   # cost–quality points
        assert "crisis flag cleared" in html                       # metabolic history table
        assert html.count("<path") >= 3                            # trust series + ATP lines
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        shot.unlink(missing_ok=True)
        r = chromium(tmp_path, f"--screenshot={shot}", "--window-size=1400,1100", f"{base}/dashboard")
        assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    import matplotlib.image as mpimg
    img = mpimg.imread(shot)
    assert img.shape[0] == 1100 and img.shape[1] == 1400
    assert img[..., :3].std() > 0.05  # drawn, not a blank page


def test_dashboard_data_needs_the_key_but_the_page_does_not(tmp_path):
    from fastapi.testclient import TestClient

    from dreamroute.config import ServerConfig
    items, answers = problem_answers(2)
    settings = scripted_settings(tmp_path).model_copy(update={"server": ServerConfig(api_key="k3y")})
    dr = DreamRoute(settings, db=tmp_path / "s.db", backends=scripted_backends(answers))
    c = TestClient(create_app(settings, dr=dr))
    assert c.get("/dashboard").status_code == 200
    assert c.get("/dashboard/data").status_code == 401
    assert c.get("/dashboard/data", headers={"Authorization": "Bearer k3y"}).json()["requests"] == 0
