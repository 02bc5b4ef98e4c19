"""What generation and scoring share: shape buckets, prompt checks and padding, placement on the
mesh, the jit cache, and running prompts into a KV cache."""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from cai_jax.models import decoder as model_lib
from cai_jax.utils import sharding

# Every trace of a jitted sampling function bumps its counter: tests assert that a second call
# whose shapes fall in the same buckets compiles nothing.
compile_counts: collections.Counter = collections.Counter()

MIN_LEN_BUCKET = 16

# ---- buckets --------------------------------------------------------------------------------


def length_bucket(n: int, minimum: int = MIN_LEN_BUCKET) -> int:
  """Smallest of minimum, 2^k or 3 * 2^k that holds n (at most a third is padding)."""
  b = minimum
  while b < n:
    b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
  return b


def batch_bucket(n: int) -> int:
  """A power of two, and a multiple of the mesh's data x fsdp size so rows shard evenly."""
  b = 1
  while b < n:
    b *= 2
  shards = sharding.batch_axis_size()
  return max(b, shards) if shards & (shards - 1) == 0 else -(-b // shards) * shards


# ---- jit cache ------------------------------------------------------------------------------


def _compiler_options():
  # XLA:CPU's YNN fusions run the small decode matmuls at about half the speed of its default
  # dot emitter on AVX2 machines (see experiments/benchmarks/sampling.py).
  if jax.default_backend() == 'cpu':
    return {'xla_cpu_experimental_ynn_fusion_type': ''}
  return None


_JIT_CACHE: dict = {}


def jitted(fn, graphdef, *static, **jit_kwargs):
  """jax.jit(partial(fn, graphdef, *static)), built once per (fn, model structure, static args,
  mesh, rules); jax then caches one executable per shape bucket."""
  key = (fn, graphdef, static, sharding.current_mesh(), sharding._rules)
  compiled = _JIT_CACHE.get(key)
  if compiled is None:
    compiled = jax.jit(
        functools.partial(fn, graphdef, *static), compiler_options=_compiler_options(), **jit_kwargs
    )
    _JIT_CACHE[key] = compiled
  return compiled


# ---- prompts --------------------------------------------------------------------------------


def prompt_positions(mask):
  """Positions of left-padded prompts [B, P]: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def run_prompt(model, tokens, positions, mask, cache, shared=None):
  """Hidden states of the prompts [B, P] and `cache` with them in its first P slots.

  Attends over the P prompt slots only (and a `shared` prefix, if any), then writes them into
  the full-length cache.
  """
  hidden, prompt_kv = model.hidden(
      tokens, positions, mask, model_lib.cache_prefix(cache, tokens.shape[1]), 0, shared
  )
  return hidden, model_lib.cache_write_prefix(cache, prompt_kv)


def prepare_prompts(prompt_tokens, vocab_size, limit, truncate):
  if truncate not in ('error', 'left'):
    raise ValueError(f"truncate must be 'error' or 'left', got {truncate!r}")
  if isinstance(prompt_tokens, (str, bytes)):
    raise ValueError(
        'prompt_tokens is a string; it takes lists of token ids (tokenize the text first, or '
        'call generate_responses with the text)'
    )
  prompts, dropped = [], []
  for i, p in enumerate(prompt_tokens):
    try:
      if isinstance(p, (str, bytes)) or (
          isinstance(p, (list, tuple)) and any(isinstance(t, (str, bytes)) for t in p)
      ):
        raise ValueError  # np.asarray would read '7' as 7
      p = [int(t) for t in np.asarray(p, dtype=np.int64).reshape(-1)]
    except (ValueError, TypeError, OverflowError):
      raise ValueError(
          f'prompt_tokens[{i}] is {str(p)[:40]!r}, not a list of token ids (tokenize the text '
          'first, or call generate_responses with the text)'
      ) from None
    if not p:
      raise ValueError(f'prompt {i} is empty; every prompt needs at least one token')
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f'prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}')
    if len(p) > limit:
      if truncate == 'error':
        raise ValueError(
            f'prompt {i} has {len(p)} tokens, more than the limit of {limit} '
            '(max_prompt_len / model context minus max_new_tokens); pass '
            "truncate='left' to drop its oldest tokens"
        )
      logging.warning(
          'prompt %d: dropped its first %d of %d tokens (limit %d)',
          i,
          len(p) - limit,
          len(p),
          limit,
      )
      dropped.append(len(p) - limit)
      p = p[-limit:]
    else:
      dropped.append(0)
    prompts.append(p)
  return prompts, dropped


def left_pad(rows, batch, length, pad_id):
  tokens = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), bool)
  for i, r in enumerate(rows):
    tokens[i, length - len(r) :] = r
    mask[i, length - len(r) :] = True
  mask[len(rows) :, -1] = True  # batch-padding rows see one (pad) token: no empty softmax
  return tokens, mask


def put_batch(x):
  """Places a [B, ...] host array with its batch axis sharded by the mesh rules."""
  if sharding.current_mesh() is None:
    return jnp.asarray(x)
  names = ('batch',) + (None,) * (x.ndim - 1)
  return jax.device_put(x, sharding.named_sharding(names, x.shape))


def progress_bar(enabled: bool, total: int, desc: str = 'sampling'):
  """A tqdm bar of `total` prompts, or None when `enabled` is False."""
  if not enabled:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc=desc, unit='prompt', dynamic_ncols=True)
