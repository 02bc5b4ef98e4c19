"""Weight-only int8 for frozen models: half the HBM of bfloat16, the matmuls unchanged.

RL-CAI holds several models it never updates: the feedback model that labels comparisons, PPO's
preference model, the evaluation judge, and, under LoRA, the base under every adapter. With
`model.frozen_quantization='int8'` each of their projection and embedding matrices is stored as
int8 with one float32 scale per output channel (symmetric, absmax / 127):

    W[in, out] ~ Q[in, out] * s[out],   Q = round(W / s) in [-127, 127]

Because the scale belongs to an output channel, it factors out of the matmul: `x W = (x Q) s`.
So a projection casts Q to the compute dtype (exact: every int8 is a bfloat16), runs the same
einsum as before, and multiplies its output by s. No dequantized copy of a weight is formed.
The embedding [V, D] keeps one scale per row (per token): the lookup scales the rows it takes,
and the tied output layer's logits are per-row outputs too.

Norms, biases, scalar heads and learned positions stay in `frozen_param_dtype` (they are small,
and a norm's error would reach every channel). What this costs in accuracy is measured on
SmolLM2-135M by `experiments/benchmarks/frozen_int8.py` (logits, greedy tokens, feedback labels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax.models import lora

SCHEMES = ('', 'int8')
# Quantized weights -> how many leading axes the matmul contracts (the rest are output channels):
# the projections as LoRA lists them, and an untied LM head [D, V].
CONTRACTED = {name: n for name, (_, n) in lora.PROJECTIONS.items()} | {'lm_head': 1}
SUFFIX = '_scale'


class Scale(nnx.Param):
  """The float32 per-channel scales of an int8 weight: a parameter that is never trained and
  never cast (a bfloat16 scale would add 0.4% of error to every channel)."""


def _reduced_axes(name: str, ndim: int) -> tuple[int, ...]:
  """Axes of a weight that one scale spans: the contracted ones (the embedding's: D)."""
  if name == 'embed':
    return tuple(range(1, ndim))
  return tuple(range(CONTRACTED[name]))


def int8(w, name: str):
  """(int8 values, float32 scales) of weight `name`; works on numpy and jax arrays alike."""
  xp = np if isinstance(w, np.ndarray) else jnp
  w = w.astype(xp.float32)
  axes = _reduced_axes(name, w.ndim)
  amax = xp.max(xp.abs(w), axis=axes, keepdims=True)
  scale = xp.where(amax > 0, amax / 127.0, 1.0).astype(xp.float32)
  q = xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8)
  return q, xp.squeeze(scale, axis=axes)


def is_quantized_name(name: str) -> bool:
  return name in CONTRACTED or name == 'embed'


def quantize_weights(module: nnx.Module, names) -> None:
  """Replaces each weight `names` of `module` that exists by int8 values and a `Scale` beside
  it (`{name}_scale`), keeping the weight's logical sharding for both."""
  for name in names:
    var = getattr(module, name, None)
    if var is None:
      continue
    axes = var.get_metadata().get('out_sharding') or (None,) * var.ndim
    q, s = int8(var[...], name)
    kept = tuple(a for i, a in enumerate(axes) if i not in _reduced_axes(name, var.ndim))
    setattr(module, name, nnx.Param(q, out_sharding=axes, eager_sharding=False))
    setattr(module, name + SUFFIX, Scale(s, out_sharding=kept, eager_sharding=False))


def rescale(module: nnx.Module, name: str, y):
  """Projection `name`'s output `y` = x Q, times its scales when `name` is int8 (else `y`)."""
  s = getattr(module, name + SUFFIX, None)
  return y if s is None else y * s[...].astype(y.dtype)


def embed_rows(module: nnx.Module, tokens, dtype):
  """The embedding rows of `tokens` in `dtype` (each row times its scale when int8)."""
  rows = jnp.take(module.embed[...], tokens, axis=0).astype(dtype)
  s = getattr(module, 'embed' + SUFFIX, None)
  return rows if s is None else rows * jnp.take(s[...], tokens, axis=0)[..., None].astype(dtype)


def weight(module: nnx.Module, name: str):
  """Weight `name` as a float array: the stored one, or int8 values times scales (float32)."""
  w = getattr(module, name)[...]
  s = getattr(module, name + SUFFIX, None)
  if s is None:
    return w
  return w.astype(jnp.float32) * jnp.expand_dims(s[...], _reduced_axes(name, w.ndim))


def is_quantized(module: nnx.Module) -> bool:
  return bool(jax.tree.leaves(nnx.state(module, Scale)))


def dequantized(flat: dict[tuple, object], dtype) -> dict[tuple, object]:
  """Flat parameters {path: array} with every int8 weight multiplied back by its scales (in
  `dtype`, numpy) and the scales removed: what an HF export writes. Others pass through."""
  out = {k: v for k, v in flat.items() if not str(k[-1]).endswith(SUFFIX)}
  for k, s in flat.items():
    name = str(k[-1])
    if not name.endswith(SUFFIX):
      continue
    base = (*k[:-1], name[: -len(SUFFIX)])
    w = np.asarray(out[base], np.float32)
    s = np.expand_dims(np.asarray(s, np.float32), _reduced_axes(base[-1], w.ndim))
    out[base] = (w * s).astype(dtype)
  return out


class QuantizingGetters(dict):
  """A checkpoint's tensor getters {path: () -> float array} as an int8 model reads them: an
  int8 weight's path gives its values and `{path}_scale` its scales, each quantized once (the
  pair is forgotten once both are read, so a large model never holds two host copies)."""

  def __init__(self, getters: dict):
    super().__init__(getters)
    self._pending: dict[tuple, list] = {}
    for key, get in getters.items():
      if is_quantized_name(str(key[-1])):
        self[key] = self._reader(key, get, 0)
        self[(*key[:-1], str(key[-1]) + SUFFIX)] = self._reader(key, get, 1)

  def _reader(self, key, get, which: int):
    def read():
      pair = self._pending.get(key)
      if pair is None:
        pair = self._pending[key] = [*int8(np.asarray(get()), str(key[-1])), 0]
      pair[2] += 1
      if pair[2] == 2:
        del self._pending[key]
      return pair[which]

    return read
