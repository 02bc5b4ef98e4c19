"""Training machinery shared by the sft, preference and ppo bookkeeping.

An optimizer from a config block, a train state `(params, opt_state, step)` laid out by the
logical-axis rules, a pure jitted train step with donation, orbax checkpoints with automatic
resume, metrics as JSONL + TensorBoard, and the loop that ties them together, `fit`. Typical
use (see cai_jax/stages/sft.py):

  tx, schedule = train_lib.make_optimizer(cfg.optimizer, total_steps)
  graphdef, state, shardings = train_lib.init_state(model, tx)
  step_fn = train_lib.make_train_step(graphdef, tx, loss_fn, shardings, schedule)
  result = train_lib.fit(stage='sft', stage_dir=stage_dir, state=state, shardings=shardings,
                         train_step=step_fn, plan=plan, steps_per_epoch=.., make_batch=..,
                         total_steps=total_steps, cfg=cfg)
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cai_jax.utils import sharding
from cai_jax.utils.errors import StageError

SCHEDULES = ('cosine', 'linear', 'constant')

# loss_fn(model, batch) -> (scalar loss, dict of scalar metrics); with a seed it also gets rng=.
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


# ---- optimizer ---------------------------------------------------------------------------------


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `cfg.learning_rate`, then `cfg.schedule` decay over the remaining steps.

  Warmup starts at lr / (warmup + 1), not 0, so that no step is wasted on a zero update.
  Decay ends at `cfg.end_lr_fraction` (default 0) of the peak.
  """
  lr = float(cfg.learning_rate)
  kind = cfg.get('schedule', 'cosine')
  if kind not in SCHEDULES:
    raise ValueError(f'optimizer.schedule must be one of {SCHEDULES}, got {kind!r}')
  warmup = max(0, min(int(cfg.get('warmup_steps', 0)), total_steps))
  end = lr * float(cfg.get('end_lr_fraction', 0.0))
  decay_steps = max(1, total_steps - warmup)
  if kind == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == 'linear':
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if not warmup:
    return decay
  ramp = optax.linear_schedule(lr / (warmup + 1), lr, warmup)
  return optax.join_schedules([ramp, decay], [warmup])


def make_optimizer(cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip_by_global_norm + AdamW(schedule) from an `optimizer` config block.

  Fields: learning_rate, warmup_steps, schedule, end_lr_fraction (optional), weight_decay, b1, b2,
  eps (optional), grad_clip (0 = off). Weight decay skips vectors and scalars (norms, biases).
  """
  schedule = make_schedule(cfg, total_steps)
  adamw = optax.adamw(
      schedule,
      b1=float(cfg.get('b1', 0.9)),
      b2=float(cfg.get('b2', 0.999)),
      eps=float(cfg.get('eps', 1e-8)),
      weight_decay=float(cfg.get('weight_decay', 0.0)),
      mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
  )
  clip = float(cfg.get('grad_clip', 0.0))
  return (
      optax.chain(optax.clip_by_global_norm(clip) if clip > 0 else optax.identity(), adamw),
      schedule,
  )


# ---- train state and its layout ----------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  params: Any  # nnx.State of the model's nnx.Params
  opt_state: Any  # optax state; its parameter-shaped parts are nnx.Params with the same names
  step: jax.Array  # int32 scalar: optimizer updates applied so far (= batches consumed)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def shardings_of(tree, mesh=None):
  """NamedShardings for an (abstract) tree: nnx Variables by their logical names, the rest replicated.

  The optimizer's moments are Variables carrying the parameter's names (optax maps over the
  params' pytree), so they are laid out exactly like the parameters they track.
  """
  mesh = mesh if mesh is not None else concrete_mesh()
  if mesh is None:
    return None

  def one(x):
    if _is_variable(x):
      shape = x.get_value().shape
      return x.replace(
          NamedSharding(mesh, sharding.logical_to_spec(sharding.variable_names(x), shape, mesh))
      )
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree, is_leaf=_is_variable)


def concrete_mesh():
  """The mesh set by `sharding.use_mesh` (with its devices), or None outside one."""
  mesh = jax.sharding.get_mesh()
  return None if mesh is None or mesh.empty else mesh


def replicated(mesh=None):
  mesh = mesh if mesh is not None else concrete_mesh()
  return None if mesh is None else NamedSharding(mesh, P())


def init_state(model, tx: optax.GradientTransformation):
  """(graphdef, TrainState, shardings) for training `model`'s nnx.Params with `tx`.

  The parameters are *copied* into the state (never donated from the model), so a model that a
  stage Context has cached stays intact while its copy is trained.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(
        'train_lib trains nnx.Param state only; the model has other state: '
        f'{jax.tree.map(jnp.shape, rest)}'
    )

  _, shardings = abstract_train_state(params, tx)
  state = jax.jit(functools.partial(_build_state, tx), out_shardings=shardings)(params)
  return graphdef, state, shardings


def _build_state(tx, params) -> TrainState:
  params = jax.tree.map(jnp.copy, params)
  return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))


def abstract_train_state(params, tx: optax.GradientTransformation):
  """(abstract TrainState, its shardings) for (possibly abstract) params: what `init_state`
  builds, without building it (cai_jax/aot.py compiles train steps from this alone)."""
  abstract = jax.eval_shape(functools.partial(_build_state, tx), params)
  return abstract, shardings_of(abstract)


def abstract_state(state: TrainState, shardings=None):
  """ShapeDtypeStructs (with shardings) of `state`: the restore target of a checkpoint."""
  if shardings is None:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)),
        state,
    )
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )


# ---- steps ---------------------------------------------------------------------------------------


def make_train_step(
    graphdef,
    tx: optax.GradientTransformation,
    loss_fn: LossFn,
    shardings=None,
    schedule: optax.Schedule | None = None,
    *,
    seed: int | None = None,
    donate: bool = True,
):
  """The jitted pure step `(state, batch) -> (state, metrics)`.

  metrics: loss, grad_norm (before clipping), param_norm (after the update), lr (with a
  schedule), and loss_fn's aux. With
  `seed`, loss_fn gets `rng=fold_in(key(seed), step)`. The batch keeps the sharding it was built
  with (`sharding.global_batch`: rows over ('data', 'fsdp')). The state is donated.
  """
  base_rng = None if seed is None else jax.random.key(seed)

  def step(state: TrainState, batch):
    kwargs = {} if base_rng is None else {'rng': jax.random.fold_in(base_rng, state.step)}

    def compute(params):
      return loss_fn(nnx.merge(graphdef, params), batch, **kwargs)

    (loss, aux), grads = jax.value_and_grad(compute, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        'loss': loss,
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(params),  # after the update: the divergence guard reads it
        **aux,
    }
    if schedule is not None:
      metrics['lr'] = schedule(state.step)
    return TrainState(params, opt_state, state.step + 1), metrics

  rep = replicated()
  return jax.jit(
      step,
      in_shardings=(shardings, None) if shardings is not None else None,
      out_shardings=(shardings, rep) if shardings is not None else None,
      donate_argnums=(0,) if donate else (),
  )


def make_eval_step(graphdef, loss_fn: LossFn, param_shardings=None):
  """The jitted `(params, batch) -> (loss, aux)`, outputs replicated."""

  def evaluate(params, batch):
    return loss_fn(nnx.merge(graphdef, params), batch)

  if param_shardings is None:
    return jax.jit(evaluate)
  return jax.jit(evaluate, in_shardings=(param_shardings, None), out_shardings=replicated())


def host_metrics(metrics: dict) -> dict[str, float]:
  """Device scalars -> Python floats (ints stay ints) for logging."""
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = int(v) if np.issubdtype(v.dtype, np.integer) else float(v)
  return out


class NonFiniteError(StageError):
  """A training step produced a NaN/inf loss or gradient norm; its state was not saved."""


FINITE_KEYS = ('loss', 'grad_norm', 'policy_loss', 'value_loss')


def non_finite(metrics: list[dict] | dict) -> dict[str, float]:
  """The losses and gradient norms (FINITE_KEYS) among host metrics that are NaN or inf."""
  rows = metrics if isinstance(metrics, list) else [metrics]
  return {
      k: v
      for m in rows
      for k, v in m.items()
      if k in FINITE_KEYS and isinstance(v, float) and not math.isfinite(v)
  }


def _kept_checkpoint(ckpt) -> str:
  """What a stopped run keeps: its last checkpoint on disk, named, or that there is none."""
  last = ckpt.latest_step() if ckpt is not None else None
  if last is None:
    return 'no checkpoint had been saved'
  return f'the last good checkpoint (step {last}) is kept in {ckpt.directory}'


def check_finite(stage: str, step: int, metrics: list[dict] | dict, ckpt=None) -> None:
  """Raises NonFiniteError at the first step whose loss or gradient norm is not finite.

  Called before the step's state is checkpointed, so the last checkpoint on disk is the last good
  one; the stage then ends without an export or DONE.json. The message names the step, the
  values, that checkpoint and what to change.
  """
  bad = non_finite(metrics)
  if not bad:
    return
  kept = _kept_checkpoint(ckpt)
  values = ', '.join(f'{k}={v}' for k, v in sorted(bad.items()))
  raise NonFiniteError(
      f'{stage}: non-finite {values} at step {step}; stopped without saving this '
      f'state or exporting a model, {kept}. Lower the learning rate and rerun '
      f'with --config.force={stage}, or check the data and rerun as is to resume'
  )


class DivergedError(StageError):
  """A training step left a bound of the stage's `guard` config (finite, but off a cliff); its
  state was not saved."""


# guard field -> (metric, how the bound reads): 'jump' = |value| over bound x max(1, |first|)
# (param_norm's first: before the run's first update), 'max' = value over bound, 'rise' = value
# over the first logged value + bound. 0 turns one off.
GUARD_FIELDS = {
    'loss_jump': ('loss', 'jump'),
    'param_norm_jump': ('param_norm', 'jump'),
    'max_kl': ('kl', 'max'),
    'entropy_rise': ('entropy', 'rise'),
}


class Guard:
  """The divergence guard beside the NaN guard: bounds on a trainer's host metrics, from its
  stage config's `guard` block (GUARD_FIELDS). A step past one stops the run like a NaN does:
  before its state is saved, without an export. 'jump' and 'rise' bounds are measured from the
  first row of the stage's metrics.jsonl (a resumed run keeps the reference it started with),
  param_norm's from `params`, the parameters the run starts or resumes from."""

  def __init__(self, stage: str, guard_cfg, stage_dir: Path | None = None, params=None):
    self.stage = stage
    self.bounds = {
        field: float(guard_cfg[field])
        for field in GUARD_FIELDS
        if guard_cfg is not None and field in guard_cfg and float(guard_cfg[field]) > 0
    }
    rows = read_metrics(Path(stage_dir) / 'metrics.jsonl') if stage_dir is not None else []
    self.first = dict(rows[0]) if rows else {}
    if params is not None:  # the norm to measure from is the one before any update of this run
      self.first['param_norm'] = float(optax.tree.norm(params))

  def broken(self, metrics: dict) -> list[str]:
    """The bounds `metrics` (one step's host metrics) are past, as 'metric=value (bound)'."""
    out = []
    for field, limit in sorted(self.bounds.items()):
      name, kind = GUARD_FIELDS[field]
      value = metrics.get(name)
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        continue  # absent (not this trainer's metric), or the NaN guard's case
      first = self.first.setdefault(name, value)
      if kind == 'jump' and abs(value) > limit * max(1.0, abs(first)):
        out.append(
            f'{name}={value:.4g} (over guard.{field}={limit:g} x max(1, {first:.4g}) at the start)'
        )
      elif kind == 'max' and value > limit:
        out.append(f'{name}={value:.4g} (over guard.{field}={limit:g})')
      elif kind == 'rise' and value - first > limit:
        out.append(
            f"{name}={value:.4g} (up {value - first:.4g} from the first step's {first:.4g}, "
            f'over guard.{field}={limit:g})'
        )
    return out

  def check(self, step: int, metrics: dict, ckpt=None) -> None:
    """Raises DivergedError when this step's metrics are past a bound (before its checkpoint)."""
    bad = self.broken(metrics)
    if not bad:
      return
    kept = _kept_checkpoint(ckpt)
    raise DivergedError(
        f'{self.stage}: diverged at step {step}: {"; ".join(bad)}; stopped without saving this '
        f'state or exporting a model, {kept}. Lower the learning rate and rerun with '
        f'--config.force={self.stage} (or loosen config.{self.stage}.guard)'
    )


def gather_params(params, mesh=None):
  """The params replicated on every device, so any process can read them (for export)."""
  rep = replicated(mesh)
  if rep is None or jax.process_count() == 1:
    return params
  return jax.jit(lambda p: p, out_shardings=rep)(params)


# ---- checkpoints ----------------------------------------------------------------------------------


class Checkpointer:
  """orbax CheckpointManager with resume: `restore_latest` reads the newest finished checkpoint."""

  def __init__(
      self, directory: str | Path, *, save_every: int, max_to_keep: int, async_save: bool = True
  ):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.save_every = max(1, int(save_every))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(max_to_keep)),
        save_interval_steps=max(1, int(save_every)),
        create=True,
        enable_async_checkpointing=async_save,
    )
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, like, shardings=None):
    """The newest checkpoint restored into the layout of `like` (a state or its abstract form), or None."""
    step = self.manager.latest_step()
    if step is None:
      return None
    target = abstract_state(like, shardings)
    return self.manager.restore(step, args=self._ocp.args.StandardRestore(target))

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves if `step` is a multiple of `save_every` (or forced); returns whether it saved.

    Every call also surfaces a failure of the previous background save (a full disk) at once,
    rather than at the next save.
    """
    with self._os_errors():
      raise_background_io_error()
      self.manager.check_for_errors()
      if (step % self.save_every and not force) or self.manager.latest_step() == step:
        return False
      return self.manager.save(step, args=self._ocp.args.StandardSave(state), force=force)

  def close(self) -> None:
    with self._os_errors():
      self.manager.wait_until_finished()
      self.manager.close()

  @contextlib.contextmanager
  def _os_errors(self):
    """orbax reports a failed write (a full disk, say) from its background threads as a
    ValueError carrying `os_error_code='N'`; it becomes the OSError it is, naming the directory,
    so the entry point reports it in one line."""
    try:
      yield
    except (ValueError, RuntimeError) as e:
      code = re.search(r"os_error_code='(\d+)'", str(e))
      if code is None:
        raise
      raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(self.directory)) from e


# ---- I/O errors in background threads ----------------------------------------------------------

# tensorboardX writes events from a thread: when the disk fills, that thread dies with an
# OSError and the next add_scalar blocks forever on its full queue (a run that hangs). Every
# OSError that kills a background thread is kept here and raised in the main thread instead.
_BACKGROUND_IO_ERRORS: list[OSError] = []
_previous_excepthook = threading.excepthook


def _keep_io_errors(args) -> None:
  if isinstance(args.exc_value, OSError):
    _BACKGROUND_IO_ERRORS.append(args.exc_value)
  _previous_excepthook(args)


threading.excepthook = _keep_io_errors


def raise_background_io_error() -> None:
  """Raises the first OSError that ended a background writer thread, if any."""
  if _BACKGROUND_IO_ERRORS:
    raise _BACKGROUND_IO_ERRORS[0]


# ---- metrics --------------------------------------------------------------------------------------


class MetricsWriter:
  """One JSON object per line in `metrics.jsonl` plus TensorBoard scalars; process 0 writes.

  Resuming at `resume_step` drops the lines (and TensorBoard events) of later steps that the
  interrupted run had written past its last checkpoint, so the log reads as one run.
  """

  def __init__(
      self,
      directory: str | Path,
      *,
      resume_step: int = 0,
      filename: str = 'metrics.jsonl',
      tensorboard: bool = True,
  ):
    self.enabled = jax.process_index() == 0
    self.path = Path(directory) / filename
    self._tb = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      kept = [
          line
          for line in self.path.read_text().splitlines()
          if line.strip() and _line_step(line) <= resume_step
      ]
      self.path.write_text(''.join(line + '\n' for line in kept))
    self._file = self.path.open('a')
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(
          str(Path(directory) / 'tb'), purge_step=resume_step + 1 if resume_step else None
      )

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    raise_background_io_error()
    row = {'step': int(step), **metrics}
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None and not _BACKGROUND_IO_ERRORS:  # a dead writer thread never drains
      self._tb.close()


def _line_step(line: str) -> float:
  try:
    return json.loads(line).get('step', math.inf)
  except ValueError:  # a line cut short by a kill
    return math.inf


def read_metrics(path: str | Path) -> list[dict]:
  """The rows of a metrics.jsonl (a line cut short by a kill or still being written is skipped)."""
  path = Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


def announce(message: str) -> None:
  """A line worth the console (a resume, say): stderr on process 0, and the log."""
  logging.getLogger('cai_jax').info(message)
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def progress(total: int, initial: int = 0, desc: str = ''):
  """A tqdm bar on process 0 (a silent one elsewhere)."""
  from tqdm.auto import tqdm

  return tqdm(
      total=total,
      initial=initial,
      desc=desc,
      disable=jax.process_index() != 0,
      dynamic_ncols=True,
      mininterval=1.0,
  )


# ---- batches ------------------------------------------------------------------------------------


def bucket_length(n: int, max_len: int, min_bucket: int) -> int:
  """Pads a length to a power of two (at least min_bucket, at most max_len): few compilations."""
  return min(max_len, max(min_bucket, 1 << max(0, n - 1).bit_length()))


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    max_len: int,
    min_bucket: int,
    shuffle: bool = True,
) -> list[tuple[int, list[int]]]:
  """This epoch's batches as (padded length, example indices; -1 = an empty filler row).

  Examples are shuffled by (seed, epoch), grouped by padded length, cut into batches, and the
  batches shuffled again: the order is a pure function of (seed, epoch), so a resumed run that
  knows its step knows its next batch. The number of batches is the same every epoch.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
  buckets: dict[int, list[int]] = {}
  for i in order:
    buckets.setdefault(bucket_length(lengths[i], max_len, min_bucket), []).append(int(i))
  batches = []
  for length in sorted(buckets):
    rows = buckets[length]
    for start in range(0, len(rows), batch_size):
      chunk = rows[start : start + batch_size]
      batches.append((length, chunk + [-1] * (batch_size - len(chunk))))
  if shuffle:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


def plan_epochs(
    cfg, lengths: Sequence[int], seed: int, max_len: int
) -> tuple[Callable[[int], list[tuple[int, list[int]]]], int, int]:
  """(plan, steps_per_epoch, total_steps) of a trainer's stage config (batch_size, min_bucket,
  num_steps, epochs): plan(epoch) is that epoch's `epoch_batches`; total_steps is num_steps, or
  else enough steps for `epochs` passes (at least one)."""
  plan = lambda epoch: epoch_batches(  # noqa: E731
      lengths, cfg.batch_size, seed, epoch, max_len=max_len, min_bucket=cfg.min_bucket
  )
  steps_per_epoch = len(plan(0))
  total = cfg.num_steps if cfg.num_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
  return plan, steps_per_epoch, total


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's slice of a global batch (multi-host: each process feeds its own rows)."""
  n, p = jax.process_count(), jax.process_index()
  return {k: np.split(v, n)[p] for k, v in batch.items()}


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """A host batch (the same on every process) as global arrays, rows over ('data', 'fsdp')."""
  return sharding.global_batch(local_rows(batch))


def planned_batches(plan, steps_per_epoch: int, start: int, total_steps: int):
  """(step, length, rows) for steps start .. total_steps - 1, from `plan(epoch)` (a list of
  (length, rows) per step of that epoch), made once per epoch: resuming mid-epoch is free."""
  epoch, batches = -1, []
  for step in range(start, total_steps):
    if step // steps_per_epoch != epoch:
      epoch = step // steps_per_epoch
      batches = plan(epoch)
    length, rows = batches[step % steps_per_epoch]
    yield step, length, rows


# ---- the train loop -----------------------------------------------------------------------------


class Fit(NamedTuple):
  state: TrainState
  metrics: dict  # the last step's host metrics; {} when resumed after the last step
  eval_metrics: dict  # the last evaluation's; {} when none ran
  start: int  # the step the run began at: 0, or the checkpoint it resumed from
  seconds: float  # wall time of the steps run (the wait for the last checkpoint write aside)
  tokens: int  # sum of the steps' 'tokens' metric (0 when the loss reports none)


def fit(
    *,
    stage: str,
    stage_dir: Path,
    state: TrainState,
    shardings,
    train_step,
    plan,
    steps_per_epoch: int,
    make_batch,
    total_steps: int,
    cfg,
    evaluate=None,
    postfix: dict[str, str] | None = None,
) -> Fit:
  """The train loop of the sft and preference stages, written once (big_vision's train.py shape).

  Resumes from the newest checkpoint in stage_dir/checkpoints, then trains on
  `make_batch(length, rows)` (a host batch) of `planned_batches(plan, ...)` up to total_steps.
  A non-finite step, or one past a bound of cfg.guard (`Guard`), stops the run before its
  state is saved. The stage config `cfg` sets the
  rhythm: `evaluate(params) -> dict` runs every cfg.eval_every steps and at the end, into that
  step's row; rows are written every cfg.log_every steps and at every evaluation; checkpoints
  every cfg.checkpoint_every steps and at the end (0 = none), cfg.max_to_keep of them kept.
  postfix: bar label -> format over the step's metrics, e.g. {'loss': '{loss:.3f}'}. However
  the loop ends, the pending checkpoint is finished, so a rerun resumes from it.
  """
  eval_every, log_every = cfg.eval_every, cfg.log_every
  ckpt = (
      Checkpointer(
          Path(stage_dir) / 'checkpoints',
          save_every=cfg.checkpoint_every,
          max_to_keep=cfg.max_to_keep,
      )
      if cfg.checkpoint_every > 0
      else None
  )
  restored = ckpt.restore_latest(state, shardings) if ckpt else None
  if restored is not None:
    state = restored
    announce(f'{stage}: resumed from the checkpoint at step {int(state.step)}')
  start = int(state.step)
  writer = MetricsWriter(stage_dir, resume_step=start)
  guard = Guard(stage, cfg.get('guard'), stage_dir, state.params)
  bar = progress(total_steps, start, stage)
  metrics, eval_metrics, tokens, t0 = {}, {}, 0, time.time()
  try:
    for step, length, rows in planned_batches(plan, steps_per_epoch, start, total_steps):
      state, metrics = train_step(state, device_batch(make_batch(length, rows)))
      metrics = host_metrics(metrics)
      done = step + 1
      check_finite(stage, done, metrics, ckpt)  # the finally below closes ckpt
      guard.check(done, metrics, ckpt)
      tokens += metrics.get('tokens', 0)
      evaluated = done == total_steps or (eval_every and done % eval_every == 0)
      if evaluated and evaluate is not None:
        eval_metrics = evaluate(state.params)
        metrics.update(eval_metrics)
      if evaluated or done % log_every == 0:
        writer.write(done, metrics)
      if ckpt:
        ckpt.save(done, state, force=done == total_steps)
      bar.update(1)
      bar.set_postfix({label: f.format_map(metrics) for label, f in (postfix or {}).items()})
    seconds = time.time() - t0
  finally:
    bar.close()
    if ckpt:
      ckpt.close()  # waits for the pending save
    writer.close()
  return Fit(state, metrics, eval_metrics, start, seconds, tokens)
