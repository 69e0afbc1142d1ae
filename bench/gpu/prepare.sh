#!/usr/bin/env bash
# Prepare, on a machine with PyPI and megarl's venv, what a bare CUDA machine needs to run megarl's GPU tests and
# benchmarks (bench/gpu/run.sh), in two git-ignored folders ("/.whl/" and "/.gpu/" in .git/info/exclude):
#   .whl/                 the wheels its image lacks beside its own PyTorch/Triton/transformers (CPython 3.12,
#                         x86-64 Linux: the lent H100/H200 image); --no-deps, so each one is named here (~3.5 MiB)
#   .gpu/tiny-qwen2/      a tiny random Qwen2 model with SmolLM2's tokenizer for `megarl train` on the GPU (~13 MiB),
#                         since the bundled model's wheel (92 MB) is over what a device call carries (64 MiB)
#   .gpu/tiny-qwen3_moe/  likewise a tiny Qwen3-MoE (4 experts, top-2; tied embeddings, ~26 MiB)
# Not carried, and why: vLLM (its CUDA wheel and pinned torch are far over 64 MiB; the GPU run uses the native
# generator) and Transformer Engine (likewise): the results name them as absent.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
mkdir -p .whl
WHEELS=(
    megatron-core==0.16.1               # the model, pipeline schedules, DDP, optimizer, dist checkpointing
    schedulefree==1.4.1                 # optim.name=schedulefree
    math-verify==0.9.0                  # the MATH reward's second-opinion judge
    latex2sympy2_extended==1.11.0       # math-verify's parser
    antlr4-python3-runtime==4.13.2      # latex2sympy2's grammar runtime
    gguf==0.19.0                        # imported by megarl.convert.bundled
)
for w in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "$w"
done
VENV_PY=${VENV_PY:-.venv/bin/python}
rm -rf .gpu/tiny-qwen2 .gpu/tiny-qwen3_moe
"$VENV_PY" -c "from pathlib import Path; from megarl.convert.bundled import write_tiny_model; \
Path('.gpu').mkdir(exist_ok=True); write_tiny_model(Path('.gpu/tiny-qwen2'), 'qwen2', 0); \
write_tiny_model(Path('.gpu/tiny-qwen3_moe'), 'qwen3_moe', 0, tie_word_embeddings=True)"
mkdir -p .git/info
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
du -sh .whl .gpu
