#!/usr/bin/env bash
# megarl's GPU checks in one call, sized for a lent H100/H200 (about 10 minutes): install the carried wheels, run
# the GPU tests, then the kernel and training-step benchmarks. Every step runs under its own time limit and the next
# one starts whatever the last one did, so one call returns all that could be measured. Results land in
# bench/results/<gpu name>/ and, with the log, in $OUT (the device tool's return folder) when set.
#
# Here, once:   bash bench/gpu/prepare.sh      (then bash bench/gpu/rehearse.sh: the same software on this CPU)
# There, with the device tool's run: carry [".whl", ".gpu"], command
#               MEGARL_BENCH_COMMIT=$(git rev-parse --short HEAD) bash bench/gpu/run.sh
# (the command is composed here, so the commit is this checkout's; the copy there has no .git.)
# A rerun of some steps: MEGARL_GPU_STEPS="tests kernels" (names: tests, kernels, train-step, packing; packing
# runs only when named, in a second call, since the first three fill one 600 s call).
# Then copy the returned JSON files into bench/results/<gpu name>/ (the log names it), run
# `python bench/summary.py` and commit them.
set -u -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/megarl-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

STEPS=${MEGARL_GPU_STEPS:-"tests kernels train-step"}  # a rerun can name fewer of them
step() {  # step SECONDS NAME COMMAND...: run with a limit, report its status and time, save results, carry on
    local limit=$1 name=$2; shift 2
    case " $STEPS " in *" ${name%% *} "*) ;; *) echo "=== $name: not in MEGARL_GPU_STEPS"; return;; esac
    local t0=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0))s"
    save
}
save() {  # the benches write their JSON after every row: whatever was measured goes to $OUT
    cp bench/results/"$DEV"/*.json bench/results/"$DEV"/SUMMARY.md "$OUT"/ 2>/dev/null || true
}

bash bench/gpu/install_wheels.sh /tmp/site || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
export MEGARL_TINY_MODEL_DIR=$PWD/.gpu/tiny-qwen2 MEGARL_TINY_MOE_DIR=$PWD/.gpu/tiny-qwen3_moe MEGARL_CACHE=/tmp/megarl-cache

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers, megatron.core as m; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__, '| megatron-core', \
m.__version__)"
python3 -m megarl.cli env
DEV=$(cd bench && python3 -c "import results_io; print(results_io.device_dir())")
# and every 15 s, in case the device call's own limit (600 s) ends this script inside a step
( while sleep 15; do save; done ) &
SYNC=$!

# the limits add up to 540 s, so with the install and imports the script ends inside a 600 s call. Measured on an
# H200 (2026-12-04): the GPU tests 165-300 s (each `megarl train` run 40-65 s), the kernels 27 s, the train steps
# ~115 s; the packing step ~140 s (six processes)
step 300 "tests (GPU)" python3 -m pytest -p no:cacheprovider -m gpu tests/gpu -q -rA --durations=10
step 60 "kernels benchmark" python3 bench/logprob_kernels.py --tokens 4096 16384 65536
# not 7B: bf16 weights, fp32 gradients, fp32 main weights and Adam state (18 bytes/param) take ~137 GB of the
# H200's 150 GB, and the first Adam step ran out of memory even with activations recomputed (measured 2026-12-04);
# 3B ran out of memory without recompute (the local spec keeps every [heads, s, s] score matrix): with it here
step 180 "train-step benchmark" python3 bench/train_step.py --rows 8 --prompt 256 --response 1792 \
    --micro-batch-tokens 8192 --impl auto torch --shapes qwen2.5-0.5b qwen2.5-1.5b --recompute-shapes qwen2.5-3b

# packed against padded micro-batches on a Qwen2.5-0.5B-sized model (local spec: per-sample causal attention in batches, not TE's THD kernel)
step 150 "packing benchmark" python3 bench/packing.py --layers 24 --hidden 896 --kv-heads 2 --rows 64 --repeats 1

kill $SYNC 2>/dev/null
echo "results folder: bench/results/$DEV"
ls -la "$OUT"
