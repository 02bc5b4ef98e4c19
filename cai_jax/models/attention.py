"""Attention implementations behind `config.model.attention`, one function each, one contract.

Every function takes queries q [B, T, K, G, H] (already scaled), keys and values in the layouts
`model.py` uses (`k_layout`: 'BKSH' for a pass without cache, 'BKHS' for the cache's keys;
values always [B, K, S, H]), a `Mask` and the soft-cap, and returns the attention output
[B, T, K, G, H] in q's dtype. With `stats=True` (the cascade join of `model.Attention`, inference
only) it returns `(acc, top, total)` instead: acc [B, K, G, T, H] and top, total [B, K, G, T]
(float32) such that the output is acc / total and the logits' log-sum-exp is top + log(total).

- `dense`: the logits [B, K, G, T, S] in float32, one softmax: the reference the others match.
- `blockwise`: an online softmax over key blocks (a `lax.scan`), with a flash-style custom VJP
  that recomputes each block's probabilities from the saved log-sum-exp: neither pass holds more
  than [B, K, G, T, block] logits.
- `splash`: `jax.experimental.pallas.ops.tpu.splash_attention` (TPU; `splash_interpret` runs it in
  Pallas interpret mode on any backend, for tests). Its masks are static, so the own-slot pass
  needs a Python-int cache index; what it cannot express (a traced cache index, the prefix piece
  whose window is on per-row positions) runs `blockwise`.
- `cudnn`: `jax.nn.dot_product_attention(implementation='cudnn')` (GPU). No soft-cap and no
  statistics: Gemma 2 and the prefix piece run `blockwise` there.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from cai_jax.utils import sharding

IMPLEMENTATIONS = ('auto', 'dense', 'blockwise', 'splash', 'splash_interpret', 'cudnn')
# Which backends run each implementation (the rest are refused by `check`).
BACKENDS = {
    'dense': ('cpu', 'gpu', 'tpu'),
    'blockwise': ('cpu', 'gpu', 'tpu'),
    'splash': ('tpu',),
    'splash_interpret': ('cpu', 'gpu', 'tpu'),
    'cudnn': ('gpu',),
}
# Key block of `blockwise`. On CPU `auto` runs blockwise for passes of CPU_BLOCKWISE_MIN_QUERIES
# queries or more, dense below: experiments/benchmarks/attention.py on this 2-core machine (loaded
# by other jobs; dense / blockwise seconds measured in turn in one run, SmolLM2's heads, batch 4,
# float32) gave T = S = 256: forward 0.99x, forward + backward 1.44x; 512: 1.02x, 1.24x; 1024:
# 1.27x, 1.17x; 2048: 1.55x, 1.40x (10.97 s vs 7.08 s; 29.2 s vs 20.9 s); but 64 queries over
# 1344 slots (a continuation after a long prompt) 0.72x: the scan costs more than the few
# logits it saves. Up to one block blockwise is dense's work in one step.
BLOCK = 512
CPU_BLOCKWISE_MIN_QUERIES = 256
_NEG = float(np.finfo(np.float32).min)


class Mask(NamedTuple):
  """Which key slots each query sees: key_mask[b, s], and when `causal` slot s <= q_slots[b, t],
  and with a `window` q_slots[b, t] - s < window. Key slot s is s (its position in a prefix).

  `q_offset` is set (a Python int) when q_slots is q_offset + arange(T) for every row: the static
  form splash's masks need.
  """

  q_slots: jax.Array  # int [B or 1, T]
  key_mask: jax.Array  # bool [B or 1, S]
  causal: bool = True
  window: int | None = None
  q_offset: int | None = None

  def allowed(self, start=0, key_mask=None):
    """bool [B, T, s]: the mask over key slots start .. start + s (key_mask's slice, if given)."""
    key_mask = self.key_mask if key_mask is None else key_mask
    k_slot = start + jnp.arange(key_mask.shape[-1])[None, None, :]
    q_slot = self.q_slots[:, :, None]
    ok = key_mask[:, None, :]
    if self.causal:
      ok = ok & (k_slot <= q_slot)
    if self.window is not None:
      ok = ok & ((q_slot - k_slot) < self.window)
    return ok


def own_slots_mask(t: int, key_mask, cache_index, window: int | None) -> Mask:
  """The rows' own slots: T queries at slots cache_index.. over S keys (docs/DESIGN.md)."""
  q_slots = (cache_index + jnp.arange(t))[None]
  offset = cache_index if isinstance(cache_index, (int, np.integer)) else None
  return Mask(q_slots, key_mask, True, window, None if offset is None else int(offset))


def resolve(name: str, platform: str, softcap: float | None = None, queries: int | None = None):
  """The implementation `name` runs on `platform` ('cpu', 'gpu', 'tpu') for a model whose logit
  soft-cap is `softcap`, in a pass of `queries` queries (None: a long one). `auto`: splash on
  TPU; cuDNN on GPU (blockwise for soft-capped Gemma 2: cuDNN's flash has no soft-cap); on CPU
  blockwise from CPU_BLOCKWISE_MIN_QUERIES queries on and dense below (measured, see above).
  """
  if name != 'auto':
    return name
  if platform == 'tpu':
    return 'splash'
  if platform == 'gpu':
    return 'cudnn' if softcap is None else 'blockwise'
  return 'dense' if queries is not None and queries < CPU_BLOCKWISE_MIN_QUERIES else 'blockwise'


def check(name: str, platform: str, softcap: float | None = None) -> str | None:
  """Why `name` cannot run on `platform` (one line naming what would), or None."""
  if name not in IMPLEMENTATIONS:
    return f'model.attention={name!r}; valid: {", ".join(IMPLEMENTATIONS)}'
  if name == 'auto' or platform in BACKENDS[name]:
    if name == 'cudnn' and softcap is not None:
      return (
          'model.attention=cudnn: cuDNN flash attention has no logit soft-cap (this model '
          f'caps at {softcap}); model.attention=auto would run blockwise'
      )
    return None
  runs = resolve('auto', platform, softcap)
  extra = ' (or splash_interpret, slow, for tests)' if name == 'splash' else ''
  return (
      f'model.attention={name} needs {" or ".join(BACKENDS[name])}, this backend is {platform}: '
      f'model.attention=auto would run {runs}{extra}'
  )


def attend(name, q, k, v, mask: Mask, *, softcap=None, k_layout='BKSH', stats=False):
  """Attention by implementation `name` ('auto': resolved for the default backend)."""
  name = resolve(name, jax.default_backend(), softcap, q.shape[1])
  kw = dict(softcap=softcap, k_layout=k_layout, stats=stats)
  if name == 'dense':
    return dense(q, k, v, mask, **kw)
  if name in ('splash', 'splash_interpret') and mask.q_offset is not None and mask.causal:
    return splash(q, k, v, mask, interpret=name == 'splash_interpret', **kw)
  if name == 'cudnn' and softcap is not None:
    raise ValueError(check(name, 'gpu', softcap))
  if name == 'cudnn' and not stats:
    return cudnn(q, k, v, mask, k_layout=k_layout)
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention {name!r}; valid: {", ".join(IMPLEMENTATIONS)}')
  return blockwise(q, k, v, mask, **kw)


def _soft_cap(logits, softcap):
  return logits if softcap is None else jnp.tanh(logits / softcap) * softcap


def mask_logits(logits, allowed, softcap):
  """Soft-caps float32 logits [B, K, G, T, S] and masks the slots `allowed` [B, T, S] forbids."""
  return jnp.where(allowed[:, None, None], _soft_cap(logits, softcap), _NEG)


# ---- dense ----------------------------------------------------------------------------------


def dense(q, k, v, mask: Mask, *, softcap=None, k_layout='BKSH', stats=False):
  dt = q.dtype
  spec = 'BTKGH,BKHS->BKGTS' if k_layout == 'BKHS' else 'BTKGH,BKSH->BKGTS'
  logits = mask_logits(
      jnp.einsum(spec, q, k.astype(dt)).astype(jnp.float32), mask.allowed(), softcap
  )
  if not stats:
    probs = jax.nn.softmax(logits, axis=-1).astype(dt)
    return jnp.einsum('BKGTS,BKSH->BTKGH', probs, v.astype(dt))
  top = logits.max(-1)  # [B, K, G, T]
  e = jnp.exp(logits - top[..., None])
  return jnp.einsum('BKGTS,BKSH->BKGTH', e.astype(dt), v.astype(dt)), top, e.sum(-1)


# ---- blockwise ------------------------------------------------------------------------------


def _key_blocks(k, v, key_mask, k_layout, block):
  """Keys, values and key mask cut into n blocks along the slots, blocks leading."""
  s = v.shape[2]
  n = -(-s // block)
  pad = n * block - s
  if pad:
    k = jnp.pad(
        k, [(0, 0)] * 3 + [(0, pad)] if k_layout == 'BKHS' else [(0, 0), (0, 0), (0, pad), (0, 0)]
    )
    v = jnp.pad(v, [(0, 0), (0, 0), (0, pad), (0, 0)])
    key_mask = jnp.pad(key_mask, [(0, 0), (0, pad)])
  b, kh, h = v.shape[0], v.shape[1], v.shape[3]
  if k_layout == 'BKHS':
    kb = jnp.moveaxis(k.reshape(b, kh, h, n, block), 3, 0)  # [n, B, K, H, block]
  else:
    kb = jnp.moveaxis(k.reshape(b, kh, n, block, h), 2, 0)  # [n, B, K, block, H]
  vb = jnp.moveaxis(v.reshape(b, kh, n, block, h), 2, 0)
  mb = jnp.moveaxis(key_mask.reshape(key_mask.shape[0], n, block), 1, 0)
  return kb, vb, mb, jnp.arange(n) * block


def _block_logits(q, kb, k_layout, softcap):
  spec = 'BTKGH,BKHS->BKGTS' if k_layout == 'BKHS' else 'BTKGH,BKSH->BKGTS'
  raw = jnp.einsum(spec, q, kb.astype(q.dtype), preferred_element_type=jnp.float32)
  return _soft_cap(raw, softcap)


def _blockwise_forward(q, k, v, q_slots, key_mask, causal, window, softcap, k_layout, block):
  """(acc [B, K, G, T, H] f32, top, total [B, K, G, T]) by an online softmax over key blocks."""
  b, t, kh, g, h = q.shape
  mask = Mask(q_slots, key_mask, causal, window)
  dt = q.dtype

  def step(carry, xs):
    acc, top, total = carry
    kb, vb, mb, start = xs
    logits = jnp.where(
        mask.allowed(start, mb)[:, None, None], _block_logits(q, kb, k_layout, softcap), _NEG
    )
    new_top = jnp.maximum(top, logits.max(-1))
    scale = jnp.exp(top - new_top)
    p = jnp.exp(logits - new_top[..., None])
    pv = jnp.einsum(
        'BKGTS,BKSH->BKGTH', p.astype(dt), vb.astype(dt), preferred_element_type=jnp.float32
    )
    return (acc * scale[..., None] + pv, new_top, total * scale + p.sum(-1)), None

  init = (
      jnp.zeros((b, kh, g, t, h), jnp.float32),
      jnp.full((b, kh, g, t), _NEG, jnp.float32),
      jnp.zeros((b, kh, g, t), jnp.float32),
  )
  (acc, top, total), _ = jax.lax.scan(step, init, _key_blocks(k, v, key_mask, k_layout, block))
  return acc, top, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _blockwise(q, k, v, q_slots, key_mask, causal, window, softcap, k_layout, block):
  acc, _, total = _blockwise_forward(
      q, k, v, q_slots, key_mask, causal, window, softcap, k_layout, block
  )
  return (acc / total[..., None]).astype(q.dtype).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H]


def _blockwise_fwd(q, k, v, q_slots, key_mask, causal, window, softcap, k_layout, block):
  acc, top, total = _blockwise_forward(
      q, k, v, q_slots, key_mask, causal, window, softcap, k_layout, block
  )
  out = acc / total[..., None]  # [B, K, G, T, H] f32
  lse = top + jnp.log(total)
  return out.astype(q.dtype).transpose(0, 3, 1, 2, 4), (q, k, v, q_slots, key_mask, out, lse)


def _blockwise_bwd(causal, window, softcap, k_layout, block, res, d_out):
  """The flash backward: per key block, probabilities from the saved log-sum-exp, then
  dS = P * (dP - rowsum(dO * O)); dq accumulates, dk and dv are each block's own."""
  q, k, v, q_slots, key_mask, out, lse = res
  mask = Mask(q_slots, key_mask, causal, window)
  dt, f32 = q.dtype, jnp.float32
  d_out = d_out.astype(f32).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
  delta = jnp.sum(d_out * out, -1)  # [B, K, G, T]
  spec = 'BTKGH,BKHS->BKGTS' if k_layout == 'BKHS' else 'BTKGH,BKSH->BKGTS'

  def step(dq, xs):
    kb, vb, mb, start = xs
    allowed = mask.allowed(start, mb)[:, None, None]
    raw = jnp.einsum(spec, q, kb.astype(dt), preferred_element_type=f32)
    capped = _soft_cap(raw, softcap)
    p = jnp.exp(jnp.where(allowed, capped, _NEG) - lse[..., None])  # [B, K, G, T, S]
    dv = jnp.einsum('BKGTS,BKGTH->BKSH', p, d_out)
    dp = jnp.einsum('BKGTH,BKSH->BKGTS', d_out, vb.astype(f32))
    ds = p * (dp - delta[..., None])
    if softcap is not None:
      ds = ds * (1 - jnp.square(capped / softcap))
    ds = jnp.where(allowed, ds, 0.0)  # masked logits are constants
    if k_layout == 'BKHS':
      dq = dq + jnp.einsum('BKGTS,BKHS->BTKGH', ds, kb.astype(f32))
      dk = jnp.einsum('BKGTS,BTKGH->BKHS', ds, q.astype(f32))
    else:
      dq = dq + jnp.einsum('BKGTS,BKSH->BTKGH', ds, kb.astype(f32))
      dk = jnp.einsum('BKGTS,BTKGH->BKSH', ds, q.astype(f32))
    return dq, (dk, dv)

  blocks = _key_blocks(k, v, key_mask, k_layout, block)
  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(q.shape, f32), blocks)
  s = v.shape[2]
  n, b, kh = dv.shape[:3]
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, kh, n * block, -1)[:, :, :s]
  if k_layout == 'BKHS':
    dk = jnp.moveaxis(dk, 0, 3).reshape(b, kh, -1, n * block)[..., :s]
  else:
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, kh, n * block, -1)[:, :, :s]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise(q, k, v, mask: Mask, *, softcap=None, k_layout='BKSH', stats=False, block=None):
  block = min(block or BLOCK, v.shape[2])
  args = (mask.q_slots, mask.key_mask, mask.causal, mask.window, softcap, k_layout, block)
  if stats:
    return _blockwise_forward(q, k, v, *args)
  return _blockwise(q, k, v, *args)


# ---- paged (the engine's) ------------------------------------------------------------------


def paged(q, k_pool, v_pool, read, mask: Mask, *, softcap=None, block: int, n_blocks, k_scale=None,
          v_scale=None):  # fmt: skip
  """Attention over a page pool: row b's key slot s is pool slot `read[b, s]` (k_pool, v_pool
  [slots, K, H]). An online softmax over key blocks of `block` slots, each gathered from the pool
  when it is reached, for `n_blocks` (traced) blocks: a pass reads what its longest row holds,
  not the table's width. Every call runs the same block computation, and a block a row does not
  see adds an exact zero (its probabilities underflow to 0, the running maximum is unchanged),
  so a row's output does not depend on the other rows or on n_blocks (sampling/engine.py).
  int8 pools come with `k_scale`, `v_scale` [slots, K]: each block is dequantized as gathered.
  """
  b, t, kh, g, h = q.shape
  dt, f32 = q.dtype, jnp.float32

  def body(j, carry):
    acc, top, total = carry
    start = j * block
    slots = jax.lax.dynamic_slice_in_dim(read, start, block, axis=1)  # [B, block]
    kb, vb = k_pool[slots], v_pool[slots]  # [B, block, K, H]
    if k_scale is not None:
      kb = kb.astype(f32) * k_scale[slots][..., None]
      vb = vb.astype(f32) * v_scale[slots][..., None]
    kb, vb = kb.astype(dt), vb.astype(dt)
    key_mask = jax.lax.dynamic_slice_in_dim(mask.key_mask, start, block, axis=1)
    raw = jnp.einsum('BTKGH,BSKH->BKGTS', q, kb, preferred_element_type=f32)
    logits = jnp.where(mask.allowed(start, key_mask)[:, None, None], _soft_cap(raw, softcap), _NEG)
    new_top = jnp.maximum(top, logits.max(-1))
    scale = jnp.exp(top - new_top)
    p = jnp.exp(logits - new_top[..., None])
    pv = jnp.einsum('BKGTS,BSKH->BKGTH', p.astype(dt), vb, preferred_element_type=f32)
    return acc * scale[..., None] + pv, new_top, total * scale + p.sum(-1)

  init = (
      jnp.zeros((b, kh, g, t, h), f32),
      jnp.full((b, kh, g, t), _NEG, f32),
      jnp.zeros((b, kh, g, t), f32),
  )
  acc, _, total = jax.lax.fori_loop(0, n_blocks, body, init)
  return (acc / total[..., None]).astype(dt).transpose(0, 3, 1, 2, 4)  # [B, T, K, G, H]


# ---- splash (TPU) ---------------------------------------------------------------------------


def _splash_block(n: int) -> int:
  return next(b for b in (512, 256, 128) if n % b == 0)


def splash(q, k, v, mask: Mask, *, softcap=None, k_layout='BKSH', stats=False, interpret=False):
  """Splash attention, vmapped over rows: the causal (or local, for a window) mask is static,
  padding rides on segment ids (query 1, key 1 where key_mask else 0). T and S are padded to
  multiples of 128, the kernel's lane width. Under a mesh it runs in a shard_map over batch and
  heads, as each shard's kernel sees only its rows and heads."""
  b, t, kh, g, h = q.shape
  s = v.shape[2]
  tp, sp = -(-t // 128) * 128, -(-s // 128) * 128
  qn = jnp.pad(q.reshape(b, t, kh * g, h), [(0, 0), (0, tp - t), (0, 0), (0, 0)]).transpose(
      0, 2, 1, 3
  )
  kk = k.transpose(0, 1, 3, 2) if k_layout == 'BKHS' else k
  kk = jnp.pad(kk.astype(q.dtype), [(0, 0), (0, 0), (0, sp - s), (0, 0)])
  vv = jnp.pad(v.astype(q.dtype), [(0, 0), (0, 0), (0, sp - s), (0, 0)])
  key_seg = jnp.pad(
      jnp.broadcast_to(mask.key_mask, (b, s)).astype(jnp.int32), [(0, 0), (0, sp - s)]
  )
  q_seg = jnp.ones((b, tp), jnp.int32)
  if mask.window is None:
    head_mask = sa.CausalMask((tp, sp), offset=mask.q_offset)
  else:
    head_mask = sa.LocalMask((tp, sp), (mask.window - 1, 0), offset=mask.q_offset)
  bq, bkv = _splash_block(tp), _splash_block(sp)
  blocks = sa.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
      block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv,
  )  # fmt: skip
  kernel = sa.make_splash_mha(
      sa.MultiHeadMask([head_mask] * (kh * g)),
      block_sizes=blocks,
      head_shards=1,
      q_seq_shards=1,
      save_residuals=stats,
      attn_logits_soft_cap=softcap,
      interpret=interpret,
  )

  def run(qn, kk, vv, q_seg, key_seg):
    return jax.vmap(kernel)(qn, kk, vv, segment_ids=sa.SegmentIds(q_seg, key_seg))

  mesh = sharding.current_mesh()
  if mesh is not None:
    q_spec = sharding.logical_to_spec(('batch', 'heads', None, None), qn.shape)
    kv_spec = sharding.logical_to_spec(('batch', 'kv_heads', None, None), kk.shape)
    if q_spec[1] != kv_spec[1]:  # heads and KV heads must split alike, or not at all
      q_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
      kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    out_spec = q_spec if not stats else (q_spec, (jax.sharding.PartitionSpec(*q_spec[:3]),))
    run = jax.shard_map(
        run,
        in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec),
        out_specs=out_spec,
        check_vma=False,
    )
  result = run(qn, kk, vv, q_seg, key_seg)
  if not stats:
    return result[:, :, :t].transpose(0, 2, 1, 3).reshape(b, t, kh, g, h)
  out, (lse,) = result
  out = out[:, :, :t].reshape(b, kh, g, t, h)
  lse = lse[:, :, :t].reshape(b, kh, g, t)
  return out, lse, jnp.ones_like(lse)


# ---- cuDNN (GPU) ----------------------------------------------------------------------------


def cudnn(q, k, v, mask: Mask, *, k_layout='BKSH'):
  """cuDNN's flash attention; the mask goes in as a [B, 1, T, S] boolean (no per-head logits)."""
  b, t, kh, g, h = q.shape
  kk = k.transpose(0, 3, 1, 2) if k_layout == 'BKHS' else k.transpose(0, 2, 1, 3)  # [B, S, K, H]
  out = jax.nn.dot_product_attention(
      q.reshape(b, t, kh * g, h),
      kk.astype(q.dtype),
      v.transpose(0, 2, 1, 3).astype(q.dtype),
      mask=mask.allowed()[:, None],
      scale=1.0,
      implementation='cudnn',
  )
  return out.reshape(b, t, kh, g, h)
