#!/usr/bin/env bash
# evaluate_feedback of configs/demo.py (SmolLM2-135M) on the paper's HHH comparisons with and
# without prefix reuse (`sampling.prefix_reuse`), in its zero-shot `hhh_prompt=file` mode and with
# rendered few-shot prompts (`hhh_prompt=render`, the demo's few-shots), one fresh workdir per run.
# Prints each run's stage seconds (summary.json's `seconds`), then checks that reuse left the accuracy records unchanged.
#   experiments/demo_runs/fb_reuse.sh ROOT [LIMIT_FILE [LIMIT_RENDER]]   (defaults 96 and 32)
# The untimed first run of each mode compiles what the timed ones read from the JAX cache.
set -eu
ROOT=${1:-/tmp/fb_reuse}
FILE_N=${2:-96}
RENDER_N=${3:-32}
cd "$(dirname "$0")/../.."
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$ROOT/_jax_cache}
run() {  # name limit reuse extra...
  local name=$1 limit=$2 reuse=$3; shift 3
  rm -rf "$ROOT/$name"
  python -m cai_jax.main --config configs/demo.py --workdir "$ROOT/$name" \
    --config.stages=evaluate_feedback --config.evaluate_feedback.limit="$limit" \
    --config.sampling.prefix_reuse="$reuse" "$@" > "$ROOT/$name.log" 2>&1
  python -c "import json, sys; s = json.load(open(sys.argv[1])); print(f'$name: {s[\"seconds\"]:.1f} s, accuracy {s[\"accuracy\"]:.3f} on {s[\"n\"]}')" \
    "$ROOT/$name/evaluate_feedback/summary.json"
}
mkdir -p "$ROOT"
for mode in file render; do
  limit=$FILE_N; extra=(--config.feedback.num_few_shots=0)
  [ "$mode" = render ] && limit=$RENDER_N && extra=(--config.evaluate_feedback.hhh_prompt=render)
  run "${mode}_warmup" "$limit" True "${extra[@]}" > /dev/null
  run "${mode}_reuse" "$limit" True "${extra[@]}"
  run "${mode}_plain" "$limit" False "${extra[@]}"
  python - "$ROOT/${mode}_reuse" "$ROOT/${mode}_plain" <<'PY'
import json, sys
a, b = ([json.loads(l) for l in open(f'{d}/evaluate_feedback/records.jsonl')] for d in sys.argv[1:])
assert [r['correct'] for r in a] == [r['correct'] for r in b], 'prefix reuse changed the accuracy'
diff = max(abs(x['p_chosen'] - y['p_chosen']) for x, y in zip(a, b))
print(f'  same accuracy records ({len(a)}) with and without reuse; p_chosen within {diff:.1e}')
PY
done
