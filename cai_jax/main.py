"""Entry point: `python -m cai_jax.main --config configs/<name>.py --workdir DIR`.

Runs `config.stages` in pipeline order -- the stage table `cai_jax.pipeline.STAGES`:
critique_revision, sft, feedback, (evaluate_feedback), preference, ppo, evaluate. Finished stages
are reused, unfinished ones resume.
"""

import errno
import glob
import json
import os
import sys
import time
from pathlib import Path


def _no_tpu_probe() -> None:
  """On a machine without a TPU, libtpu (installed with the test extra) still prints
  'Failed to find host bounds' and 'unexpected worker hostname' from C++ when jax starts its
  backends. With no Google PCI device (TPUs are vendor 0x1ae0), no NVIDIA or AMD GPU and
  JAX_PLATFORMS unset, the run is CPU only: say so before jax reads its environment."""
  if 'JAX_PLATFORMS' in os.environ or glob.glob('/dev/nvidia[0-9]*') or os.path.exists('/dev/kfd'):
    return
  for vendor in glob.glob('/sys/bus/pci/devices/*/vendor'):
    try:
      if Path(vendor).read_text().strip() == '0x1ae0':
        return
    except OSError:
      continue
  os.environ['JAX_PLATFORMS'] = 'cpu'


_no_tpu_probe()

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for all stage outputs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  # Imported once the flags have parsed: --help and a bad --config answer in one line without
  # loading jax and the models.
  import jax

  from cai_jax import bookkeeping, pipeline, validate
  from cai_jax.method.constitution import ConstitutionError
  from cai_jax.method.data import DataSourceError
  from cai_jax.models import checkpoint
  from cai_jax.utils import sharding

  config = _loaded_config()
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
    with sharding.use_mesh(mesh, config.logical_axis_rules):
      ctx = pipeline.context(config, workdir, mesh)
      banner = _model_banner(ctx)  # loads the given models: one that cannot load fails here
      workdir.mkdir(parents=True, exist_ok=True)
      _log_to_workdir(workdir)
      with bookkeeping.workdir_lock(workdir):
        if jax.process_index() == 0:
          (workdir / 'config.txt').write_text(str(config))
          print(f'config: {workdir / "config.txt"}; full log: {workdir / "log.txt"}', flush=True)
        print(banner, flush=True)
        t0 = time.time()
        rows = pipeline.run(ctx)
  except (
      bookkeeping.StageError,
      checkpoint.CheckpointError,
      sharding.ShardingError,
      ConstitutionError,
      DataSourceError,
  ) as e:
    sys.exit(f'cai_jax: error: {e}')
  except OSError as e:
    _exit_on_io_error(e, Path(_WORKDIR.value))
  if rows and jax.process_index() == 0:
    table = pipeline.timing_table(rows, time.time() - t0)
    print(table)
    (workdir / 'timings.md').write_text(table + '\n')
    (workdir / 'timings.json').write_text(json.dumps(rows))
  logging.info('done')


def _parse_flags(argv):
  """absl's flag parsing, with a config file that cannot be loaded or an override naming no
  field (`--config.sft.bogus=1`) as one error line rather than ml_collections' tracebacks."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    key = str(e).strip('"\'')
    given = [a for a in argv[1:] if a.startswith('--config.') and key in a.split('=')[0].split('.')]
    flag = given[0].split('=')[0][2:] if given else f'config field {key!r}'
    sys.exit(f'cai_jax: error: --{flag}: {key!r} is not a field of the config')
  except Exception as e:  # the config file's own code failed (a syntax error, say)
    sys.exit(f'cai_jax: error: --config {_config_arg(argv)}: cannot load it: {e!r}')


def _config_arg(argv) -> str:
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return '?'


def _loaded_config():
  """The --config file's ConfigDict; a file that is not there is one error line."""
  config = _CONFIG.value
  try:
    config.get('stages')  # ml_collections hands back a stand-in that raises on first use
  except OSError as e:
    path = _config_arg(sys.argv)
    if not Path(path).is_file():
      sys.exit(f'cai_jax: error: --config {path}: no such file')
    sys.exit(f'cai_jax: error: --config {path}: cannot load it: {e.__cause__ or e}')
  return config


def _model_banner(ctx) -> str:
  """Which model plays which role, then each given model's size and the run's precision and mesh:
  'models: helpful = pretrained: X' (or 'models: pretrained: X; helpful: Y'), 'model X: ...'."""
  import jax

  from cai_jax import bookkeeping, pipeline  # as main's: loaded once the flags have parsed
  from cai_jax.models import lora  # as bookkeeping: after the flags have parsed

  m = ctx.config.model
  lines, base, base_line = [f'models: {bookkeeping.roles_line(m)}'], None, 1
  shown = {}  # source -> (its config, its line)
  for role in bookkeeping.GIVEN_ROLES:
    source = ctx.model_source(role)
    if role == 'helpful' and source == ctx.model_source('pretrained'):
      continue  # one model plays both roles
    cfg = ctx.load_role(role, frozen=True, cache=False).config
    shown[source] = (cfg, len(lines))
    if role == 'pretrained':  # what the trained models start from
      base = cfg
    lines.append(
        f'model {source}: {cfg.family}, {cfg.num_params() / 1e6:.1f}M params, '
        f'{cfg.n_layers} layers'
    )
  policy = ctx.config.ppo.get('policy_source', '') if 'ppo' in ctx.config else ''
  stages = pipeline.parse_stage_list(ctx.config.stages)
  if policy and 'ppo' in stages:
    # PPO starts from its own model: a run of PPO alone trains that model, not the pretrained one.
    lines[0] += f'; ppo policy: {policy}'
    if policy not in shown:
      cfg = ctx.load(policy, frozen=True, cache=False).config
      shown[policy] = (cfg, len(lines))
      lines.append(
          f'model {policy}: {cfg.family}, {cfg.num_params() / 1e6:.1f}M params, '
          f'{cfg.n_layers} layers'
      )
    if stages == ['ppo']:
      base, base_line = shown[policy]
  trained = f'params {m.param_dtype} (trained)'
  if bookkeeping.lora_rank(m):  # only the adapters train; the base is frozen
    trained = (
        f'LoRA rank {m.lora.rank} on {" ".join(m.lora.targets)} (float32 adapters; '
        f'{lora.trainable_params(base, m.lora.rank, m.lora.targets) / 1e6:.2f}M trained params)'
    )
  frozen = bookkeeping.frozen_param_dtype(m)
  if m.get('frozen_quantization', ''):  # matrices int8; norms, biases and heads in the dtype
    frozen = f'{m.frozen_quantization} matrices + {frozen}'
  lines[base_line] += (
      f', {trained} / {frozen} (frozen), '
      f'compute {m.dtype}, remat {m.get("remat", "none")}, {jax.device_count()} '
      f'{jax.devices()[0].platform} device(s), mesh {dict(ctx.mesh.shape)}'
  )
  return '\n'.join(lines)


def _quiet_console() -> None:
  """The console keeps the progress bars, one summary per stage, warnings and errors; absl,
  orbax and TFDS INFO go to WORKDIR/log.txt only (`_log_to_workdir`). `--verbosity=1` brings
  INFO back to the console."""
  import logging as std

  import tensorflow_datasets as tfds

  if flags.FLAGS.verbosity < 1:
    # transformers' advice that PyTorch is absent reads as a failure; we use it for tokenizers only.
    os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')
    console = logging.get_absl_handler()
    console.setLevel(std.WARNING)
    # TFDS warns on every read of our own named builder configs; the log keeps it.
    console.addFilter(lambda r: not str(r.msg).startswith('Using custom data configuration'))
    # orbax's background save threads log every failed write with its traceback (a full disk:
    # dozens), and asyncio reports their closed event loops: the log keeps them, the console
    # ends with our one line (`_exit_on_io_error`).
    console.addFilter(lambda r: f'{os.sep}orbax{os.sep}' not in r.pathname and r.name != 'asyncio')
    tfds.disable_progress_bar()
    # A handler that fails in a dying background thread prints '--- Logging error ---' blocks,
    # and event loops collected after a failed save print 'Exception ignored in' tracebacks:
    # both go to the log only.
    std.raiseExceptions = False
    sys.unraisablehook = lambda u: std.getLogger('cai_jax').debug(
        'ignored in %r: %r', u.object, u.exc_value
    )


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
    print(
        f'cai_jax: error: no space left on device writing {where} ({free}); free space or use '
        'another --workdir, then rerun the same command to resume',
        file=sys.stderr,
        flush=True,
    )
  else:
    print(
        f'cai_jax: error: {e.strerror or e} at {where}; check that path (or use another '
        '--workdir), then rerun the same command to resume',
        file=sys.stderr,
        flush=True,
    )
  sys.stdout.flush()
  os._exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
