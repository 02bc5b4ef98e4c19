#!/usr/bin/env bash
# The demo's ppo stage (SmolLM2 policy, the PM its preference stage trained), killed with
# SIGKILL once step 2's checkpoint is written, rerun with the same command; compares its
# metrics with those of the uninterrupted run already in WORKDIR (a finished demo workdir).
#   experiments/demo_runs/ppo_demo_kill.sh WORKDIR
set -u
W=${1:?usage: $0 DEMO_WORKDIR}
cd "$(dirname "$0")/../.."
cp "$W/ppo/metrics.jsonl" "$W/ppo_uninterrupted_metrics.jsonl"
rm -rf "$W/ppo"
python -m cai_jax.main --config configs/demo.py --workdir "$W" --config.stages=ppo > "$W/ppo_killed.log" 2>&1 &
PID=$!
while kill -0 $PID 2>/dev/null; do
  n=$( [ -f "$W/ppo/metrics.jsonl" ] && wc -l < "$W/ppo/metrics.jsonl" || echo 0 )
  if [ "$n" -ge 2 ] && [ -d "$W/ppo/checkpoints/2" ]; then
    kill -9 $PID; echo "killed with $n metric rows; checkpoints: $(ls "$W/ppo/checkpoints" | tr '\n' ' ')"; break
  fi
  sleep 0.2
done
wait $PID 2>/dev/null; echo "first run exit $?"
python -m cai_jax.main --config configs/demo.py --workdir "$W" --config.stages=ppo > "$W/ppo_rerun.log" 2>&1; echo "rerun exit $?"
grep -a "resumed" "$W/ppo_rerun.log" | sed 's/.*\] //'
python - "$W" <<'PY'
import json, sys
w = sys.argv[1]
a = [json.loads(l) for l in open(f'{w}/ppo_uninterrupted_metrics.jsonl')]
b = [json.loads(l) for l in open(f'{w}/ppo/metrics.jsonl')]
print('steps after the rerun:', [r['step'] for r in b])
for x, y in zip(a, b):
  diff = max(abs(x[k] - y[k]) for k in x if 'seconds' not in k and isinstance(x[k], (int, float)))
  print(f"step {x['step']}: max |difference| from the uninterrupted run {diff:.3g}; kl {y['kl']:.4f}, reward {y['reward_mean']:.4f}")
PY
