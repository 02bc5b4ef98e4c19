"""Entry point: `python -m cai_jax.main --config configs/<name>.py --workdir DIR`.

Runs `config.stages` in pipeline order (critique_revision, sft, feedback, preference, ppo,
evaluate); finished stages are reused, unfinished ones resume. See cai_jax/stages.py.
"""

import errno
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

  from cai_jax import checkpoint, sharding, stages, validate
  from cai_jax.constitution import ConstitutionError
  from cai_jax.data import DataSourceError

  config = _CONFIG.value
  _quiet_console()
  if config.compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  try:
    sharding.maybe_initialize_distributed(config.distributed)
    workdir = Path(_WORKDIR.value)
    # Everything is checked before the workdir is touched: a bad value costs nothing.
    problems = validate.problems(config, workdir)
    if problems:
      sys.exit('\n'.join(f'cai_jax: error: {p}' for p in problems))
    mesh = sharding.make_mesh(config.mesh.shape)
    workdir.mkdir(parents=True, exist_ok=True)
    _log_to_workdir(workdir)
    with stages.workdir_lock(workdir), sharding.use_mesh(mesh, config.logical_axis_rules):
      ctx = stages.Context(config, workdir, mesh)
      if jax.process_index() == 0:
        (workdir / 'config.txt').write_text(str(config))
        print(f'config: {workdir / "config.txt"}; full log: {workdir / "log.txt"}', flush=True)
      helpful = ctx.load(config.model.source, frozen=True, cache=False)
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
  except OSError as e:
    _exit_on_io_error(e, Path(_WORKDIR.value))
  if rows and jax.process_index() == 0:
    table = stages.timing_table(rows, time.time() - t0)
    print(table)
    (workdir / 'timings.md').write_text(table + '\n')
    (workdir / 'timings.json').write_text(json.dumps(rows))
  logging.info('done')


def _quiet_console() -> None:
  """The console keeps the progress bars, one summary per stage, warnings and errors; absl,
  orbax and TFDS INFO go to WORKDIR/log.txt only (`_log_to_workdir`). `--verbosity=1` brings
  INFO back to the console."""
  import logging as std

  import tensorflow_datasets as tfds

  if flags.FLAGS.verbosity < 1:
    console = logging.get_absl_handler()
    console.setLevel(std.WARNING)
    # TFDS warns on every read of our own named builder configs; the log keeps it.
    console.addFilter(lambda r: not str(r.msg).startswith('Using custom data configuration'))
    tfds.disable_progress_bar()


def _log_to_workdir(workdir: Path) -> None:
  """Everything logged from here on, INFO included, also goes to WORKDIR/log.txt."""
  import logging as std

  handler = std.FileHandler(workdir / 'log.txt')
  handler.setFormatter(std.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
  handler.setLevel(std.DEBUG)
  std.getLogger().addHandler(handler)


def _exit_on_io_error(e: OSError, workdir: Path) -> None:
  """A full disk or an I/O error: one line naming the path and the free space, then exit at once
  (background checkpoint and metrics writers may still hold threads that would never finish)."""
  import shutil

  where = e.filename or workdir
  try:
    free = f'{shutil.disk_usage(workdir).free / 2**20:.1f} MiB free on its filesystem'
  except OSError:
    free = 'free space unknown'
  if e.errno == errno.ENOSPC:
    print(f'cai_jax: error: no space left on device writing {where} ({free}); free space or use '
          'another --workdir, then rerun the same command to resume', file=sys.stderr, flush=True)
  else:
    print(f'cai_jax: error: {e.strerror or e} at {where}; check that path (or use another '
          '--workdir), then rerun the same command to resume', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(1)


if __name__ == '__main__':
  app.run(main)
