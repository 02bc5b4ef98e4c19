"""Entry point: `python -m cai_jax.main --config configs/<name>.py --workdir DIR`.

Runs `config.stages` in pipeline order (critique_revision, sft, feedback, preference, ppo,
evaluate); finished stages are reused, unfinished ones resume. See cai_jax/stages.py.
"""

import json
import os
import sys
import time
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for all stage outputs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  import jax

  from cai_jax import checkpoint, sharding, stages
  from cai_jax.constitution import ConstitutionError
  from cai_jax.data import DataSourceError

  config = _CONFIG.value
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  try:
    sharding.maybe_initialize_distributed(config.distributed)
    stages.parse_stage_list(config.stages)
    stages.check_precision(config.model)
    if config.force:
      stages.parse_stage_list(config.force, 'config.force')
    mesh = sharding.make_mesh(config.mesh.shape)
    workdir = Path(_WORKDIR.value)
    workdir.mkdir(parents=True, exist_ok=True)
    with sharding.use_mesh(mesh, config.logical_axis_rules):
      ctx = stages.Context(config, workdir, mesh)
      if jax.process_index() == 0:
        print(config, flush=True)
      helpful = ctx.load(config.model.source, frozen=True)
      cfg = helpful.config
      print(f'model {config.model.source}: {cfg.family}, {cfg.num_params() / 1e6:.1f}M params, '
            f'{cfg.n_layers} layers, params {config.model.param_dtype} (trained) / '
            f'{stages.frozen_param_dtype(config.model)} (frozen), compute {cfg.dtype}, '
            f'remat {cfg.remat}, {jax.device_count()} {jax.devices()[0].platform} device(s), '
            f'mesh {dict(mesh.shape)}', flush=True)
      t0 = time.time()
      rows = stages.run_pipeline(ctx)
  except (stages.StageError, checkpoint.CheckpointError, sharding.ShardingError, ConstitutionError,
          DataSourceError) as e:
    sys.exit(f'cai_jax: error: {e}')
  if rows and jax.process_index() == 0:
    table = stages.timing_table(rows, time.time() - t0)
    print(table)
    (workdir / 'timings.md').write_text(table + '\n')
    (workdir / 'timings.json').write_text(json.dumps(rows))
  logging.info('done')


if __name__ == '__main__':
  app.run(main)
