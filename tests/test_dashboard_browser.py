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
from dreamroute.config import MetabolicConfig
from dreamroute.signals.metabolic import MetabolicController
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


# A same-origin page that loads the dashboard in frames of two widths and, once each has drawn,
# reports every chart label's getBBox() against its chart's viewBox (and its screen box against
# its panel's), the single-point markers and the tier-mix bars, as JSON in <pre id="result">.
LAYOUT_CHECK = """<!doctype html><html><body><pre id="result">pending</pre>
<iframe id="wide" src="/dashboard" style="width:1400px;height:1200px;border:0"></iframe>
<iframe id="narrow" src="/dashboard" style="width:500px;height:2600px;border:0"></iframe>
<script>
const out = {};
function check(f) {
  const doc = f.contentDocument;
  if (!doc || !doc.body || doc.body.dataset.loaded !== "1") { setTimeout(() => check(f), 100); return; }
  const r = {texts: 0, outside: [], markers: [], mix: [], legend: []};
  for (const svg of doc.querySelectorAll("section svg")) {
    const vb = svg.viewBox.baseVal, section = svg.closest("section"), pr = section.getBoundingClientRect();
    for (const t of svg.querySelectorAll("text")) {
      r.texts++;
      const b = t.getBBox(), s = t.getBoundingClientRect();
      const inBox = b.x >= -0.5 && b.y >= -0.5 && b.x + b.width <= vb.width + 0.5 && b.y + b.height <= vb.height + 0.5;
      const inPanel = s.left >= pr.left - 0.5 && s.right <= pr.right + 0.5 && s.top >= pr.top - 0.5
                      && s.bottom <= pr.bottom + 0.5;
      if (!inBox || !inPanel) r.outside.push([section.id, t.textContent, [b.x, b.y, b.width, b.height], [vb.width, vb.height]]);
    }
  }
  r.markers = [...doc.querySelectorAll("circle[data-series]")].map(c => [c.closest("section").id, c.dataset.series,
                                                                         c.getBBox().width]);
  r.mix = [...doc.querySelectorAll("#mix rect[data-tier]")].map(x => [x.dataset.tier, x.getBBox().width]);
  r.legend = [...doc.querySelectorAll("#cq-legend [data-tier]")].map(x => x.dataset.tier);
  out[f.id] = r;
  if (Object.keys(out).length === 2) {
    document.getElementById("result").textContent = JSON.stringify(out);
    document.body.dataset.done = "1";
  }
}
for (const f of document.querySelectorAll("iframe")) f.addEventListener("load", () => check(f));
</script></body></html>"""
LONG = ("sensory", "tactical-qwen2.5-coder-0.5b-instruct-q4", "specialized-qwen2.5-coder-1.5b-instruct-q4_k_m")


@pytest.mark.parametrize("n", [1, 12])
def test_single_points_every_tier_and_labels_inside_their_panels(tmp_path, n):
    """One request (every series a single point) or twelve, tiers with long names, a large budget:
    every series is visible, every tier that answered has a bar, no label leaves its panel."""
    import html
    import json

    from fastapi.responses import HTMLResponse

    from dreamroute.backends.scripted import ScriptedBackend
    from dreamroute.config import Settings, TierConfig

    items, answers = problem_answers(n)
    settings = Settings(tiers=[TierConfig(name=t, model=t, backend="scripted", params_b=p)
                               for t, p in zip(LONG, (0.135, 0.5, 1.5))], data_dir=tmp_path)
    base = scripted_backends(answers)
    backends = {long: ScriptedBackend(f"sha-{long}", base[short].script, decode_s_per_token=40.0 * (i + 1),
                                      logprob=base[short].logprob)
                for i, (long, short) in enumerate(zip(LONG, TIERS))}
    dr = DreamRoute(settings, db=tmp_path / "s.db", backends=backends, policy="cascade:0.6", budget=123456.789)
    answered = [dr.complete(it.prompt, gold=it.answer, grader=it.grader) for it in items]
    assert any(a.escalated for a in answered)
    called = {r["tier"] for r in dr.store.experiences(["tier"])}
    app = create_app(settings, dr=dr)
    app.add_api_route("/layout-check", lambda: HTMLResponse(LAYOUT_CHECK), methods=["GET"])
    with served(app) as url:
        dom = chromium(tmp_path, "--dump-dom", "--window-size=1400,1100", f"{url}/layout-check")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-done="1"' in dom.stdout, dom.stdout[-3000:]
    text = dom.stdout.split('<pre id="result">', 1)[1].split("</pre>", 1)[0]
    result = json.loads(html.unescape(text))
    for width, r in result.items():
        assert r["texts"] > 10 and r["outside"] == [], (width, r["outside"])
        assert [t for t, w in r["mix"]] == [t for t in LONG if t in called] and all(w >= 1 for _, w in r["mix"])
        assert set(r["legend"]) >= {a.tier for a in answered}
        if n == 1:  # every series is one point: each is drawn as a visible dot
            panels = {(p, s) for p, s, w in r["markers"] if w >= 6}
            assert {("atp-panel", "spent"), ("atp-panel", "budget")} <= panels
            assert {p for p, _ in panels} >= {"trust-panel", "atp-panel"}
