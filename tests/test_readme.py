"""The README's Python example runs as written (on scripted backends and a temporary store)."""

from __future__ import annotations

import re
from pathlib import Path

import dreamroute

from .conftest import scripted_backends, scripted_settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    real = dreamroute.DreamRoute
    settings = scripted_settings(tmp_path)

    def patched(*a, **kw):
        kw.setdefault("settings", settings)
        prompt = ("Tom has 3 apples and buys 4 more. How many apples does he have? "
                  "Solve step by step, then end with: The answer is N.")
        kw.setdefault("backends", scripted_backends({prompt: ("7", 1)}, skill=(9, 9, 9)))
        kw["db"] = tmp_path / "readme.db"
        return real(*a, **kw)

    monkeypatch.setattr(dreamroute, "DreamRoute", patched)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(blocks[0], str(README), "exec"), scope)
    with real(settings, db=tmp_path / "readme.db", backends=scripted_backends({})) as dr:
        rows = dr.trust()
        assert len(rows) == 1 and rows[0]["n"] == 1
        assert rows[0]["trust"] > 0.5  # skill 9 tiers answer "The answer is 7": judged a success
        assert dr.store.verify_ledger().ok
