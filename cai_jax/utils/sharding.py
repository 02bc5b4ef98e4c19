"""Meshes and logical-axis rules: parallelism is a config edit, never a code edit.

Parameters and activations name their axes logically (`('embed', 'mlp')`); `config.logical_axis_rules`
maps those names to the mesh axes `('data', 'fsdp', 'tensor')`. The mesh is made once with
`jax.make_mesh` and everything runs under `jax.set_mesh` (the modern form of pjit).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')

DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('positions', None),
    ('norm', None),
    # A LoRA adapter's rank axis: over fsdp where its other axis is not (B [rank, out...] and the
    # A of o and down), so that no adapter or AdamW moment is whole on every device.
    ('lora_rank', 'fsdp'),
)

_rules: tuple = DEFAULT_RULES


class ShardingError(ValueError):
  pass


def resolve_mesh_shape(shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
  """Fills the one allowed -1 from the device count and checks the product."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ShardingError(
        f'mesh.shape {shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}'
    )
  if shape.count(-1) > 1:
    raise ShardingError(
        f'mesh.shape {shape} has {shape.count(-1)} entries of -1; at most one is allowed'
    )
  known = math.prod(s for s in shape if s != -1)
  if any(s == 0 or s < -1 for s in shape):
    raise ShardingError(f'mesh.shape {shape} has a non-positive entry')
  if -1 in shape:
    if n_devices % known:
      raise ShardingError(f'mesh.shape {shape}: {n_devices} devices are not divisible by {known}')
    shape = tuple(n_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != n_devices:
    raise ShardingError(
        f'mesh.shape {shape} has {math.prod(shape)} slots but there are ' f'{n_devices} devices'
    )
  return shape


def validate_rules(rules) -> tuple:
  out = []
  for item in rules:
    name, axes = item
    targets = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    for a in targets:
      if a not in MESH_AXES:
        raise ShardingError(
            f'logical_axis_rules: {name!r} maps to unknown mesh axis {a!r}; '
            f'mesh axes are {MESH_AXES}'
        )
    out.append(
        (str(name), None if axes is None else (axes if isinstance(axes, str) else tuple(axes)))
    )
  return tuple(out)


def make_mesh(shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = resolve_mesh_shape(shape, len(devices))
  return jax.make_mesh(
      shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


@contextlib.contextmanager
def use_mesh(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
  """Sets the mesh (jax.set_mesh) and the logical-axis rules for everything inside."""
  global _rules
  old, _rules = _rules, validate_rules(rules)
  try:
    with jax.set_mesh(mesh):
      yield mesh
  finally:
    _rules = old


def current_mesh():
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def _mesh_axes_for(name):
  for rule_name, axes in _rules:
    if rule_name == name:
      return axes
  return None


def logical_to_spec(
    names: Sequence[str | None], shape: Sequence[int] | None = None, mesh=None
) -> P:
  """PartitionSpec for logical `names` under the current rules.

  A dimension that the mapped mesh axes do not divide evenly is replicated instead (and each
  mesh axis is used at most once), so a model with 3 KV heads still runs on tensor=2.
  """
  mesh = mesh if mesh is not None else current_mesh()
  used, spec = set(), []
  for i, name in enumerate(names):
    axes = _mesh_axes_for(name) if name is not None else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None and shape is not None:
      size = math.prod(mesh.shape[a] for a in axes) if axes else 1
      if shape[i] % size:
        axes = ()
    used.update(axes)
    spec.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*spec)


def constrain(x, names):
  """with_sharding_constraint by logical names; a no-op outside a mesh."""
  if current_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape))


def named_sharding(names, shape, mesh=None) -> NamedSharding:
  mesh = mesh if mesh is not None else _concrete_mesh()
  return NamedSharding(mesh, logical_to_spec(names, shape, mesh))


def _concrete_mesh():
  mesh = jax.sharding.get_mesh() if hasattr(jax.sharding, 'get_mesh') else None
  if mesh is None or getattr(mesh, 'empty', True):
    raise ShardingError('no mesh is set: wrap the call in sharding.use_mesh(mesh, rules)')
  return mesh


def zeros(shape, dtype, names):
  if current_mesh() is None:
    return jnp.zeros(shape, dtype)
  return jax.device_put(jnp.zeros(shape, dtype), named_sharding(names, shape))


def _is_variable(x):
  return isinstance(x, nnx.Variable)


def variable_names(v: nnx.Variable):
  meta = v.get_metadata()
  for key in ('out_sharding', 'sharding_names', 'sharding'):
    if meta.get(key) is not None:
      return tuple(meta[key])
  return (None,) * np.ndim(v.get_value())


def state_shardings(state, mesh=None):
  """The NamedSharding of every variable in an (abstract) NNX state, by its logical names."""
  mesh = mesh if mesh is not None else _concrete_mesh()
  return jax.tree.map(
      lambda v: v.replace(
          NamedSharding(mesh, logical_to_spec(variable_names(v), v.get_value().shape, mesh))
      ),
      state,
      is_leaf=_is_variable,
  )


def create_sharded(ctor: Callable[[], Any]):
  """Builds an NNX module with each parameter created directly in its sharded layout."""
  with nnx.use_eager_sharding(False):
    if current_mesh() is None:
      # One compiled program instead of one per random draw (seconds saved per model).
      box = {}

      def init_unsharded():
        box['graphdef'], state = nnx.split(ctor())
        return state

      state = jax.jit(init_unsharded)()
      return nnx.merge(box['graphdef'], state)
    # jax.eval_shape, not nnx.eval_shape: the latter would read our *logical* names as mesh axes.
    box = {}

    def abstract_state():
      box['graphdef'], state = nnx.split(ctor())
      return state

    out_shardings = state_shardings(jax.eval_shape(abstract_state))

    @jax.jit(out_shardings=out_shardings)
    def init():
      return nnx.state(ctor())

    return nnx.merge(box['graphdef'], init())


def shard_module(module):
  """Moves an existing module's parameters to their sharded layout (no-op without a mesh)."""
  if current_mesh() is None:
    return module
  state = nnx.state(module)
  nnx.update(module, jax.device_put(state, state_shardings(state)))
  return module


def batch_axis_size(mesh=None) -> int:
  mesh = mesh if mesh is not None else current_mesh()
  if mesh is None:
    return 1
  axes = _mesh_axes_for('batch') or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def check_batch_size(batch_size: int, what: str = 'batch size', mesh=None) -> None:
  n = batch_axis_size(mesh)
  if batch_size % n:
    mesh = mesh if mesh is not None else current_mesh()
    raise ShardingError(
        f'{what} {batch_size} is not divisible by the data x fsdp size {n} '
        f'of mesh {dict(mesh.shape)}'
    )


def global_batch(local: dict[str, np.ndarray], names=('batch', 'length')) -> dict[str, jax.Array]:
  """Global arrays from this process's rows (multi-host: each process holds its slice)."""
  mesh = current_mesh()
  if mesh is None:
    return {k: jnp.asarray(v) for k, v in local.items()}
  mesh = _concrete_mesh()
  out = {}
  for k, v in local.items():
    v = np.asarray(v)
    sh = NamedSharding(
        mesh,
        logical_to_spec(
            names[: v.ndim] + (None,) * (v.ndim - len(names)),
            (v.shape[0] * jax.process_count(),) + v.shape[1:],
            mesh,
        ),
    )
    out[k] = jax.make_array_from_process_local_data(sh, v)
  return out


def per_device_bytes(tree) -> dict[str, int]:
  """Bytes each device holds of a tree of (possibly abstract) arrays: max and total."""
  per = {}
  for x in jax.tree.leaves(tree):
    sh = getattr(x, 'sharding', None)
    if sh is None:
      continue
    shard_shape = sh.shard_shape(x.shape)
    nbytes = math.prod(shard_shape) * jnp.dtype(x.dtype).itemsize
    for d in sh.device_set:
      per[d.id] = per.get(d.id, 0) + nbytes
  return {'max': max(per.values(), default=0), 'total': sum(per.values())}


def maybe_initialize_distributed(cfg) -> None:
  """jax.distributed.initialize from config (or the TPU environment when fields are empty)."""
  if not cfg.get('enabled', False):
    return
  kwargs = {}
  if cfg.get('coordinator_address'):
    kwargs['coordinator_address'] = cfg.coordinator_address
  if cfg.get('num_processes', -1) not in (None, -1):
    kwargs['num_processes'] = int(cfg.num_processes)
  if cfg.get('process_id', -1) not in (None, -1):
    kwargs['process_id'] = int(cfg.process_id)
  if cfg.get('local_device_ids'):
    kwargs['local_device_ids'] = list(cfg.local_device_ids)
  if jax.config.jax_platforms in (None, '', 'cpu') and os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  logging.info('jax.distributed.initialize(%s)', kwargs)
  jax.distributed.initialize(**kwargs)


def shard_for_process(
    items: Sequence, process_index: int | None = None, process_count: int | None = None
) -> list:
  """This process's contiguous slice of `items`; slices of processes 0..n-1 concatenate to
  `items`, so gathered results come back in the original order. Sizes differ by at most one
  (the first len(items) % n processes get the extra item). Defaults come from jax."""
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  base, extra = divmod(len(items), process_count)
  start = process_index * base + min(process_index, extra)
  stop = start + base + (process_index < extra)
  return list(items[start:stop])
