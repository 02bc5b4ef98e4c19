#!/usr/bin/env bash
# The measured accuracy of the AI-feedback labels of SmolLM2-135M (configs/demo.py) on the
# paper's 438 HHH comparisons, one configuration at a time (each resumable: rerun to continue).
#   nohup experiments/demo_runs/fb_real_runs.sh /tmp/fb_real [LIMIT [RUN ...]] > /tmp/fb_real.log 2>&1 &
# LIMIT: the first N comparisons (0 = all 438); RUN: single debias ensemble4 cot_clamp (default
# all). Summarize finished or partial runs with experiments/demo_runs/fb_summarize.py ROOT/*.
set -u
ROOT=${1:-/tmp/fb_real}
LIMIT=${2:-0}
shift $(( $# < 2 ? $# : 2 ))
NAMES=${*:-single debias ensemble4 cot_clamp}
cd "$(dirname "$0")/../.."
COMMON="--config configs/demo.py --config.stages=evaluate_feedback --config.evaluate_feedback.limit=$LIMIT --config.feedback.num_few_shots=0"
declare -A RUNS=(
  [single]=""
  [debias]="--config.feedback.debias=True"
  [ensemble4]="--config.feedback.num_principles=4"
  [cot_clamp]="--config.feedback.cot=True --config.feedback.clamp=True"
)
for name in $NAMES; do
  dir="$ROOT/$name"; [ "$LIMIT" = 0 ] || dir="${dir}_n$LIMIT"
  echo "=== $name: $(date)"
  start=$(date +%s)
  python3.11 -m cai_jax.main $COMMON --workdir "$dir" ${RUNS[$name]}
  echo "=== $name: exit $? after $(( $(date +%s) - start )) s"
done
