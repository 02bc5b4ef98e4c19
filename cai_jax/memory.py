"""Per-device memory of the pipeline's largest stage (PPO), from abstract shapes only.

PPO holds the most state at once: the policy and its AdamW moments, the value network and its
moments, the frozen reference, the preference model, one set of gradients and the rollout KV
cache. Everything is computed with `jax.eval_shape` and the config's mesh rules, so a TPU config
can be checked on a laptop with fake CPU devices before a TPU day is spent on it.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from cai_jax import sharding, train_lib
from cai_jax.model import Decoder, ModelConfig, ScalarHeadModel

# HBM per JAX device (one chip; v4 and v5p megacore chips are one device each).
HBM_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32, 'h100': 80, 'h200': 141}


def _abstract_params(cfg: ModelConfig, scalar_head: bool = False):
  cls = ScalarHeadModel if scalar_head else Decoder
  return jax.eval_shape(lambda: nnx.state(cls(cfg, rngs=nnx.Rngs(0)), nnx.Param))


def _tree_bytes_per_device(tree, mesh) -> int:
  """Bytes the most loaded device holds of an abstract tree of nnx Variables / arrays."""
  total = 0
  for leaf in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    if isinstance(leaf, nnx.Variable):
      value = leaf.get_value()
      spec = sharding.logical_to_spec(sharding.variable_names(leaf), value.shape, mesh)
    else:
      value, spec = leaf, jax.sharding.PartitionSpec()
    shard = jax.sharding.NamedSharding(mesh, spec).shard_shape(value.shape)
    total += math.prod(shard) * jnp.dtype(value.dtype).itemsize
  return total


def ppo_peak_bytes(cfg: ModelConfig, config, mesh) -> dict[str, int]:
  """Per-device bytes of each part of the PPO stage's state under `mesh` and the config's rules."""
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    policy = _abstract_params(cfg)
    value = _abstract_params(cfg, scalar_head=True)
    pm = _abstract_params(cfg, scalar_head=True)
    tx_policy, _ = train_lib.make_optimizer(config.ppo.policy_optimizer, max(1, config.ppo.steps))
    tx_value, _ = train_lib.make_optimizer(config.ppo.value_optimizer, max(1, config.ppo.steps))
    parts = {
        'policy': _tree_bytes_per_device(policy, mesh),
        'policy_adam': _tree_bytes_per_device(jax.eval_shape(tx_policy.init, policy), mesh),
        'reference': _tree_bytes_per_device(policy, mesh),
        'value': _tree_bytes_per_device(value, mesh),
        'value_adam': _tree_bytes_per_device(jax.eval_shape(tx_value.init, value), mesh),
        'preference_model': _tree_bytes_per_device(pm, mesh),
        'gradients': _tree_bytes_per_device(policy, mesh),
    }
    batch = config.ppo.batch_size
    length = config.ppo.max_prompt_tokens + config.ppo.max_new_tokens
    cache_shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
    spec = sharding.logical_to_spec(('batch', 'length', 'kv_heads', 'head_dim'), cache_shape, mesh)
    shard = jax.sharding.NamedSharding(mesh, spec).shard_shape(cache_shape)
    parts['kv_cache'] = 2 * cfg.n_layers * math.prod(shard) * jnp.dtype(cfg.dtype).itemsize
  parts['total'] = sum(parts.values())
  return parts
