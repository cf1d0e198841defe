"""The instruction probe, llama.cpp's build flags, the thread share, and doctor's checks (no model needed)."""

from __future__ import annotations

import json
import platform
import shutil
import sys

import pytest
from typer.testing import CliRunner

from dreamroute.cli import doctor
from dreamroute.backends.threads import CoreShare
from dreamroute.cli import app
from dreamroute.backends.native import Probe, build_key, cmake_args, probe

ALL = ["sse42", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512vl", "avx512dq",
       "avx512bw", "avx512vbmi", "avx512vnni", "avx512bf16", "avxvnni", "amx_tile"]


def _flags(args):
    return dict(a[2:].split("=") for a in args)


@pytest.mark.parametrize("missing", ALL)
def test_flags_follow_what_ran(missing):
    """Every GGML option is ON only if all the extensions it compiles with ran; AMX never."""
    pr = Probe("x86_64", ran={k: k != missing for k in ALL})
    f = _flags(cmake_args(pr))
    assert f["GGML_NATIVE"] == "OFF"
    assert f["GGML_AMX_TILE"] == f["GGML_AMX_INT8"] == f["GGML_AMX_BF16"] == "OFF"
    if missing.startswith("avx512") and missing not in ("avx512vbmi", "avx512vnni", "avx512bf16"):
        assert f["GGML_AVX512"] == f["GGML_AVX512_VNNI"] == "OFF"
    need = {"GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c", "GGML_AVX_VNNI": "avxvnni",
            "GGML_AVX512_BF16": "avx512bf16", "GGML_BMI2": "bmi2"}
    base512 = missing in ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
    for opt, ext in need.items():
        assert (f[opt] == "OFF") == (ext == missing or (base512 and opt.startswith("GGML_AVX512")))


def test_safe_flags_turn_every_extension_off_and_key_the_cache_apart():
    pr = Probe("x86_64", ran={k: True for k in ALL})
    safe = _flags(cmake_args(pr, safe=True))
    assert all(v == "OFF" for v in safe.values())
    assert build_key(cmake_args(pr)) != build_key(cmake_args(pr, safe=True))
    assert build_key(cmake_args(pr)) == build_key(list(reversed(cmake_args(pr))))


def test_non_x86_uses_llama_cpp_defaults():
    assert cmake_args(Probe("aarch64")) == []


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("gcc"),
                    reason="the probe runs on x86-64 with gcc")
def test_probe_runs_each_extension_here():
    pr = probe()
    assert set(pr.ran) == set(ALL)
    assert pr.ran["sse42"]          # every x86-64 host this project runs on has SSE4.2
    for name, ok in pr.ran.items():
        assert ok == (name not in pr.detail)


def test_a_crashing_child_is_a_failed_check_not_a_dead_doctor():
    res, problem = doctor.run_json([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"], 30)
    assert res is None and "SIGILL" in problem
    res, problem = doctor.run_json([sys.executable, "-c", "import sys; print('{\"a\": 1}'); sys.exit(0)"], 30)
    assert res == {"a": 1} and problem == ""
    res, problem = doctor.run_json([sys.executable, "-c", "raise SystemExit('boom')"], 30)
    assert res is None and "boom" in problem


def test_a_tier_whose_proof_crashes_fails_with_the_rebuild_hint(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    from dreamroute.config import Settings, TierConfig
    s = Settings(tiers=[TierConfig(name="edge", model="m", source={"gguf": str(gguf)})], data_dir=tmp_path)
    monkeypatch.setattr(doctor, "run_child", lambda args, timeout_s: (None, "crashed with SIGILL"))
    checks = {c.name: c for c in doctor.check_tiers(s)}
    assert checks["tier edge weights"].ok
    bad = checks["tier edge answers"]
    assert not bad.ok and bad.required and "SIGILL" in bad.detail and "setup.sh" in bad.hint


def test_doctor_json_layout_and_exit_status(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"data_dir": str(tmp_path), "tiers": [
        {"name": "edge", "model": "m", "source": {"gguf": str(tmp_path / "absent.gguf")}}]}))
    r = CliRunner().invoke(app, ["doctor", "--json", "--no-prove", "--config", str(cfg)])
    assert r.exit_code == 1, r.output
    checks = json.loads(r.output)["checks"]
    assert all(set(c) == {"name", "ok", "required", "detail", "hint"} for c in checks)
    by = {c["name"]: c for c in checks}
    assert not by["tier edge weights"]["ok"] and "absent.gguf" in by["tier edge weights"]["detail"]
    assert by["data directory"]["ok"] and by["KV cache directory"]["ok"] and by["store"]["ok"]
    assert not by["PostgreSQL"]["required"] and not by["DREAM (torch, transformers, peft, gguf)"]["required"]


class _Samples(CoreShare):
    """CoreShare fed with scripted (monotonic s, machine busy s, own busy s) samples."""

    def __init__(self, samples, **kw):
        super().__init__(**kw)
        self.cores, self.max_threads = 2, 2
        self._it = iter(samples)

    def _sample(self):
        return next(self._it)


def test_threads_follow_the_cores_others_leave_free():
    # window 1: others busy 1 core -> 1 thread; window 2: only this process busy (2 cores) -> 2
    s = _Samples([(0.0, 0.0, 0.0), (1.0, 1.0, 0.0), (2.0, 3.0, 2.0), (3.0, 3.05, 0.0 + 2.0)])
    assert s.threads() == 1 and s.others_busy == pytest.approx(1.0)
    assert s.threads() == 2
    assert s.threads() == 2          # others at 0.05 core: still both


def test_threads_reuse_the_answer_within_a_short_window():
    s = _Samples([(0.0, 0.0, 0.0), (1.0, 1.0, 0.0), (1.1, 1.2, 0.0), (1.5, 1.5, 0.5)], min_interval_s=0.25)
    assert s.threads() == 1
    assert s.threads() == 1          # 0.1 s later: the window is too short, same answer
    assert s.threads() == 2          # from t=1.0 to 1.5: others 0 -> 2
