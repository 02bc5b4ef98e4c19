"""Times the ppo stage of configs/demo.py (SmolLM2 policy and PM) on stand-in upstream outputs.

  python experiments/demo_runs/ppo_demo.py WORKDIR [--pm PM_EXPORT_DIR] [--config.FIELD=VALUE ...]

WORKDIR/sft/export is the pretrained SmolLM2 (standing in for the SL-CAI model) and
WORKDIR/preference/export is PM_EXPORT_DIR (e.g. a real preference stage's export) or, without
--pm, SmolLM2 with a fresh score head. Both are marked finished for the demo config, then the
ppo stage runs as `python -m cai_jax.main --config configs/demo.py --config.stages=ppo` would.
Prints the stage's wall and CPU seconds and its per-step metrics.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / 'tests'))  # helpers_stages

from cai_jax import pipeline  # noqa: E402
from cai_jax.models import checkpoint  # noqa: E402
from cai_jax.training import metrics as metrics_lib
from cai_jax.utils import sharding  # noqa: E402
from configs import demo  # noqa: E402
from helpers_stages import fake_upstream  # noqa: E402


def main(argv):
  workdir, pm_dir, overrides = Path(argv[0]), None, []
  rest = argv[1:]
  while rest:
    arg = rest.pop(0)
    if arg == '--pm':
      pm_dir = rest.pop(0)
    else:
      overrides.append(arg)
  c = demo.get_config()
  c.stages = 'ppo'
  for arg in overrides:
    key, value = arg.removeprefix('--config.').split('=', 1)
    node, (*parents, leaf) = c, key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value if isinstance(node[leaf], str) else type(node[leaf])(eval(value))

  sft_export = fake_upstream(c, workdir, 'sft', {}) / 'export'
  pm_export = fake_upstream(c, workdir, 'preference', {}) / 'export'
  if not (sft_export / 'config.json').exists():
    checkpoint.save_pretrained(checkpoint.load_pretrained('smollm2-135m'), str(sft_export))
  if not (pm_export / 'config.json').exists():
    if pm_dir:
      shutil.copytree(pm_dir, pm_export, dirs_exist_ok=True)
    else:
      checkpoint.save_pretrained(
          checkpoint.load_pretrained('smollm2-135m', scalar_head=True), str(pm_export)
      )
  shutil.rmtree(workdir / 'ppo', ignore_errors=True)

  if c.compilation_cache_dir:  # as cai_jax.main does
    import jax

    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(c.compilation_cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  t0, cpu0 = time.time(), time.process_time()
  mesh = sharding.make_mesh(c.mesh.shape)
  with sharding.use_mesh(mesh, c.logical_axis_rules):
    rows = pipeline.run(pipeline.context(c, workdir, mesh))
  wall, cpu = time.time() - t0, time.process_time() - cpu0
  keys = (
      'score_mean',
      'reward_mean',
      'kl',
      'kl_coef',
      'entropy',
      'clipfrac',
      'policy_loss',
      'value_loss',
      'explained_variance',
      'response_length',
      'truncated_fraction',
      'logprob_gap',
      'sample_seconds',
      'train_seconds',
      'step_seconds',
  )
  for r in metrics_lib.read_metrics(workdir / 'ppo' / 'metrics.jsonl'):
    print(r['step'], ' '.join(f'{k}={r[k]:.4g}' for k in keys if k in r))
  print(json.dumps({'rows': rows, 'wall_seconds': round(wall, 1), 'cpu_seconds': round(cpu, 1)}))


if __name__ == '__main__':
  main(sys.argv[1:])
