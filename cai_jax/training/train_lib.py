"""Training machinery shared by the sft, preference, dpo and ppo stages: an optimizer from a
config block, a train state `(params, opt_state, step)` laid out by the logical-axis rules, a
pure jitted train step with donation, and the non-finite and divergence guards. Beside it in
cai_jax/training/: orbax checkpoints with automatic resume (`checkpoints`), metrics as JSONL +
TensorBoard (`metrics`), and the loop that ties them together (`loop.fit`). Typical use (see
cai_jax/stages/sft.py):

  tx, schedule = train_lib.make_optimizer(cfg.optimizer, total_steps)
  graphdef, state, shardings = train_lib.init_state(model, tx)
  step_fn = train_lib.make_train_step(graphdef, tx, loss_fn, shardings, schedule)
  result = loop.fit(stage='sft', stage_dir=stage_dir, state=state, shardings=shardings,
                    train_step=step_fn, plan=plan, steps_per_epoch=.., make_batch=..,
                    total_steps=total_steps, cfg=cfg)
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cai_jax.models import lora
from cai_jax.training.metrics import read_metrics
from cai_jax.utils import sharding
from cai_jax.utils.errors import StageError

SCHEDULES = ('cosine', 'linear', 'constant')

# loss_fn(model, batch) -> (scalar loss, dict of scalar metrics).
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


# ---- optimizer ---------------------------------------------------------------------------------


def make_schedule(cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup to `cfg.learning_rate`, then `cfg.schedule` decay over the remaining steps.

  Warmup starts at lr / (warmup + 1), not 0, so that no step is wasted on a zero update; it is
  `warmup_steps`, at most `warmup_fraction` of the run (rounded up). Decay ends at
  `cfg.end_lr_fraction` (default 0) of the peak.
  """
  lr = float(cfg.learning_rate)
  kind = cfg.get('schedule', 'cosine')
  if kind not in SCHEDULES:
    raise ValueError(f'optimizer.schedule must be one of {SCHEDULES}, got {kind!r}')
  warmup = warmup_steps(cfg, total_steps)
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


def warmup_steps(cfg, total_steps: int) -> int:
  """The warmup a run of `total_steps` updates gets: `warmup_steps`, capped at
  ceil(`warmup_fraction` x total_steps) and at the run itself."""
  warmup = int(cfg.get('warmup_steps', 0))
  fraction = float(cfg.get('warmup_fraction', 1.0))
  return max(0, min(warmup, math.ceil(fraction * total_steps), total_steps))


def warmup_warning(cfg, total_steps: int, what: str) -> str | None:
  """The warning for a run whose warmup takes all of it (the peak rate is reached at its last
  update, or never: a short run under a long run's warmup_steps), else None."""
  warmup = warmup_steps(cfg, total_steps)
  if total_steps <= 1 or warmup < total_steps:
    return None
  return (
      f'{what}: warmup_steps={int(cfg.warmup_steps)} covers all {total_steps} updates of this run, '
      f'so the learning rate never reaches its peak {cfg.learning_rate:g} before the end; set '
      f'{what}.warmup_fraction (e.g. 0.1) or a smaller warmup_steps'
  )


def make_optimizer(
    cfg, total_steps: int, what: str = 'optimizer'
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip_by_global_norm + AdamW(schedule) from an `optimizer` config block (`what`: its config
  path, for the warning of a warmup as long as the run).

  Fields: learning_rate, warmup_steps, warmup_fraction (optional), schedule, end_lr_fraction
  (optional), weight_decay, b1, b2, eps (optional), grad_clip (0 = off). Weight decay skips vectors
  and scalars (norms, biases).
  """
  warning = warmup_warning(cfg, total_steps, what)
  if warning and jax.process_index() == 0:
    logging.warning('%s', warning)
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


# What a LoRA run trains: the adapters and the scalar heads of a PM or value model (a fresh head
# has nothing to adapt); every other parameter is the frozen base (cai_jax/models/lora.py).
LORA_TRAINED = nnx.Any(nnx.LoRAParam, nnx.PathContains('head'), nnx.PathContains('head_bias'))


def split_trained(params):
  """(trained, frozen) parts of a model's nnx.Param state: with LoRA adapters present, the
  adapters (and scalar heads) against the frozen base; without, everything against nothing."""
  if any(isinstance(x, nnx.LoRAParam) for x in jax.tree.leaves(params, is_leaf=_is_variable)):
    return nnx.split_state(params, LORA_TRAINED, ...)
  return params, nnx.State({})


def _build_state(tx, params) -> TrainState:
  params = jax.tree.map(jnp.copy, params)
  # The optimizer tracks only what is trained: with LoRA, its moments are adapter-sized.
  return TrainState(params, tx.init(split_trained(params)[0]), jnp.zeros((), jnp.int32))


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
    seed: int = 0,
    donate: bool = True,
):
  """The jitted pure step `(state, batch) -> (state, metrics)`.

  metrics: loss, grad_norm (before clipping), param_norm (after the update), lr (with a
  schedule), and loss_fn's aux. The step's randomness (LoRA dropout, when the model's config has
  it) is `fold_in(key(seed), step)`: a resumed run draws the masks of the run it continues. The
  batch keeps the sharding it was built with (`sharding.global_batch`: rows over ('data',
  'fsdp')). The state is donated.
  """

  def step(state: TrainState, batch):
    # Made inside the traced step: no array exists before the first call (cai_jax.aot lowers
    # this function for a TPU without one).
    key = jax.random.fold_in(jax.random.key(seed), state.step)

    def compute(params):
      return loss_fn(lora.with_dropout(nnx.merge(graphdef, params), key), batch)

    # Gradients of the trained part only (with LoRA: the adapters; the base is a constant here).
    # The frozen part is rebuilt inside the differentiated function (jax.tree.map makes new
    # Variables there): Variables of the outer trace are ones nnx.remat's layers may not update.
    trained, frozen = split_trained(state.params)
    (loss, aux), grads = jax.value_and_grad(
        lambda t: compute(nnx.merge_state(t, jax.tree.map(lambda x: x, frozen))), has_aux=True
    )(trained)
    updates, opt_state = tx.update(grads, state.opt_state, trained)
    trained = optax.apply_updates(trained, updates)
    params = nnx.merge_state(trained, frozen)
    metrics = {
        'loss': loss,
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(trained),  # after the update: the divergence guard reads it
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
