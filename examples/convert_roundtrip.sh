#!/usr/bin/env bash
# The bundled SmolLM2-135M-Instruct from Hugging Face layout to a Megatron torch_dist checkpoint (loadable at any
# TP/PP) and back, with the logit check of `convert verify` and a file-by-file comparison of the round trip.
#
#   bash examples/convert_roundtrip.sh [OUT_DIR]             # default /tmp/megarl-roundtrip
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/megarl-roundtrip}
rm -rf "$OUT" && mkdir -p "$OUT"
.venv/bin/megarl convert smollm2 "$OUT/hf"                                 # the bundled model as an HF directory
.venv/bin/megarl convert hf-to-mcore "$OUT/hf" "$OUT/mcore"               # -> Megatron (with checksums.sha256)
.venv/bin/megarl convert verify "$OUT/hf" "$OUT/mcore"                     # Megatron logits vs HF transformers
.venv/bin/megarl convert mcore-to-hf "$OUT/mcore" "$OUT/back"              # -> HF again
.venv/bin/python - "$OUT/hf" "$OUT/back" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file
def tensors(d):  # one file or shards: every tensor of the directory
    return {k: v for f in sorted(Path(d).glob("*.safetensors")) for k, v in load_file(f).items()}
a, b = (tensors(d) for d in sys.argv[1:3])
assert a.keys() == b.keys(), set(a) ^ set(b)
assert all((a[k] == b[k]).all() for k in a), "a tensor changed"
print(f"round trip bit-exact: {len(a)} tensors")
PY
