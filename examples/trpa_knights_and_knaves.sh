#!/usr/bin/env bash
# TRPA on generated Knights-and-Knaves puzzles with 2 and 3 people, the task of its paper at a size 2 CPU cores can
# run: the rule reward's preference levels (1 right, 2 wrong, 3 unparseable, 4 bad format) drive TRPA's pairwise
# loss. MODEL=tiny:qwen2 (a random 4-layer model) shows the mechanics in about a minute; the default, the bundled
# SmolLM2-135M-Instruct, runs at real size (about 90 s per step on 2 cores) but in our runs never wrote the
# <think>/<answer> format (bench/kk_trpa_grpo.py, 192 tokens: all 48 samples of 3 steps scored -3), so every
# sample is level 4 and TRPA finds no pairs. To give it pairs, warm it up on worked solutions first (`megarl sft`,
# docs/sft.md; `python bench/kk_trpa_grpo.py --sft-steps 32` leaves one in runs/kk-trpa-grpo/sft/hf, then
# MODEL=runs/kk-trpa-grpo/sft/hf), or point MODEL at a larger local instruct model (e.g. Qwen2.5-0.5B-Instruct).
#
#   bash examples/trpa_knights_and_knaves.sh                 # RUN=runs/trpa-kk STEPS=4
#   MODEL=tiny:qwen2 STEPS=2 RUN=/tmp/trpa bash examples/trpa_knights_and_knaves.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-bundled:smollm2}
RUN=${RUN:-runs/trpa-kk}
STEPS=${STEPS:-4}
.venv/bin/megarl train run.dir="$RUN" model.hf_dir="$MODEL" \
  data.generate=kk "data.kk_people=[2,3]" data.generate_size=64 \
  algo.loss=trpa rollout.group_size=4 rollout.max_tokens=256 train.prompts_per_step=4 \
  train.steps="$STEPS" optim.lr=1e-6 reward.num_workers=0 checkpoint.export_hf=false "$@"
echo "metrics: $RUN/metrics.jsonl (loss/pairs, loss/pref_loss, reward/acc); plot: .venv/bin/python examples/plot_metrics.py $RUN reward/mean loss/pref_loss"
