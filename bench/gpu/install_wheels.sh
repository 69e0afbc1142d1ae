#!/usr/bin/env bash
# Install the carried wheels (.whl/, made by prepare.sh) into a target folder beside the image's own packages, as
# the device tool's notes prescribe: no index (nothing can be fetched there), no deps (each wheel is named in
# prepare.sh), nothing compiled. Used by run.sh there and by rehearse.sh here. Then: export PYTHONPATH=<target>.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${1:-/tmp/site}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" .whl/*.whl
