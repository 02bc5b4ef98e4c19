"""One Flax NNX decoder for the Llama, Mistral, Qwen2, Gemma 2 and GPT-2 families.

The families differ only in switches on `ModelConfig`; every parameter carries logical axis
names that `cai_jax.utils.sharding` maps to mesh axes. See docs/DESIGN.md for the call contract.

Why one module of ~800 lines: the presets (`ModelConfig`), the layers and the cache are one
contract -- each family is a set of switches on `ModelConfig` read by the layers, and the cache
and prefix layouts are what `Attention` reads and writes -- so adding a family or changing a
layout touches them together; the attention kernels themselves are in `attention.py`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax.models import attention, lora, quantize
from cai_jax.utils import sharding

FAMILIES = ('llama', 'mistral', 'qwen2', 'gemma2', 'gpt2')
SLIDING, FULL = 'sliding_attention', 'full_attention'
DTYPES = ('float32', 'bfloat16', 'float16')

# Rematerialization: which of a decoder layer's intermediates the backward pass may keep.
# Without remat a layer keeps every activation (the attention probabilities [B, N, T, T] and the
# MLP's [B, T, F] among them) from the forward pass until its gradient is formed, and a full-size
# model at 2k tokens does not fit a TPU's HBM that way. 'full' keeps only each layer's input and
# recomputes the layer in the backward pass (about one extra forward: +33% FLOPs); 'dots' keeps
# the outputs of the weight matmuls and recomputes the cheap rest (norms, activations, softmax).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder. Presets are classmethods; `from_hf` reads a config.json."""

  family: str = 'llama'  # one of FAMILIES; decides the HF export format
  vocab_size: int = 49152
  d_model: int = 576
  n_layers: int = 30
  n_heads: int = 9
  n_kv_heads: int = 3
  head_dim: int = 64
  d_ff: int = 1536
  max_positions: int = 8192  # context length
  norm: str = 'rms'  # 'rms' | 'layer'
  norm_eps: float = 1e-5
  norm_offset: bool = False  # Gemma's RMSNorm scales by (1 + w)
  mlp: str = 'gated'  # 'gated' (SwiGLU/GeGLU) | 'dense' (GPT-2)
  activation: str = 'silu'  # 'silu' | 'gelu_tanh' | 'gelu'
  positions: str = 'rope'  # 'rope' | 'learned'
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = (
      None  # HF rope_parameters items (llama3, linear)
  )
  qkv_bias: bool = False  # Qwen2, GPT-2
  out_bias: bool = False  # GPT-2 attention output / MLP biases
  tie_embeddings: bool = True
  embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(d_model)
  post_norms: bool = False  # Gemma 2 normalizes attention and MLP outputs too
  attn_softcap: float | None = None  # Gemma 2 attention logit soft-capping
  final_softcap: float | None = None  # Gemma 2 final logit soft-capping
  query_scale: float | None = None  # attention scale; None means head_dim ** -0.5
  sliding_window: int | None = None  # window of 'sliding_attention' layers
  layer_types: tuple[str, ...] | None = None  # per layer SLIDING / FULL; None: all FULL
  bos_token_id: int | None = None
  eos_token_id: int | None = None
  pad_token_id: int | None = None
  param_dtype: str = 'float32'
  dtype: str = 'float32'  # compute dtype
  remat: str = 'none'  # what a decoder layer keeps for the backward pass; see REMAT_POLICIES
  attention: str = 'auto'  # cai_jax.attention implementation of every pass but decoding's
  lora_rank: int = 0  # > 0: LoRA adapters of this rank on `lora_targets` (cai_jax/models/lora.py)
  lora_alpha: float = 16.0  # adapters are scaled by lora_alpha / lora_rank
  lora_targets: tuple[str, ...] = ()  # projections with adapters: q k v o gate up down
  lora_dropout: float = 0.0  # share of an adapter's inputs dropped in training steps (as PEFT)
  quantization: str = ''  # 'int8': weight-only int8 matrices (cai_jax/models/quantize.py)

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f'unknown model family {self.family!r}; supported: {", ".join(FAMILIES)}')
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f'n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}')
    if self.layer_types is not None and len(self.layer_types) != self.n_layers:
      raise ValueError(
          f'layer_types has {len(self.layer_types)} entries for {self.n_layers} layers'
      )
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'unknown remat {self.remat!r}; valid: {", ".join(REMAT_POLICIES)}')
    if self.attention not in attention.IMPLEMENTATIONS:
      raise ValueError(
          f'unknown attention {self.attention!r}; valid: {", ".join(attention.IMPLEMENTATIONS)}'
      )
    if self.lora_rank:
      problem = lora.check(
          self.lora_rank,
          self.lora_alpha,
          self.lora_targets,
          self.family,
          self.mlp,
          self.lora_dropout,
      )
      if problem:
        raise ValueError(problem)
    if self.quantization not in quantize.SCHEMES:
      raise ValueError(f"unknown quantization {self.quantization!r}; valid: '', int8")
    for field in ('dtype', 'param_dtype'):
      if getattr(self, field) not in DTYPES:
        raise ValueError(f'unknown {field} {getattr(self, field)!r}; valid: {", ".join(DTYPES)}')

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

  def is_sliding(self, layer: int) -> bool:
    return self.sliding_window is not None and (
        self.layer_types is None or self.layer_types[layer] == SLIDING
    )

  def num_params(self) -> int:
    d, f, h = self.d_model, self.d_ff, self.head_dim
    attn = d * h * (2 * self.n_heads + 2 * self.n_kv_heads)
    mlp = (3 if self.mlp == 'gated' else 2) * d * f
    emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    if self.positions == 'learned':
      emb += self.max_positions * d
    return emb + self.n_layers * (attn + mlp)

  # ---- presets -------------------------------------------------------------------------
  # Each preset is a table of its checkpoint's numbers, packed (not one per line) to read as one.
  # fmt: off
  @classmethod
  def smollm2_135m(cls, **kw) -> ModelConfig:
    return cls(**{**dict(family='llama', vocab_size=49152, d_model=576, n_layers=30, n_heads=9,
                         n_kv_heads=3, head_dim=64, d_ff=1536, max_positions=8192,
                         rope_theta=100000.0, bos_token_id=1, eos_token_id=2), **kw})

  @classmethod
  def tiny(cls, family: str = 'llama', **kw) -> ModelConfig:
    """A few-hundred-thousand-parameter model for tests, in any family's shape."""
    base = dict(family=family, vocab_size=320, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4,
                head_dim=8, d_ff=128, max_positions=1024, bos_token_id=257, eos_token_id=258,
                pad_token_id=256)
    if family == 'qwen2':
      base.update(qkv_bias=True, tie_embeddings=False, norm_eps=1e-6)
    elif family == 'gemma2':
      base.update(mlp='gated', activation='gelu_tanh', norm_offset=True, embed_scale=True,
                  post_norms=True, attn_softcap=50.0, final_softcap=30.0, query_scale=8 ** -0.5,
                  sliding_window=4, layer_types=(SLIDING, FULL), norm_eps=1e-6)
    elif family == 'gpt2':
      base.update(norm='layer', mlp='dense', activation='gelu_tanh', positions='learned',
                  qkv_bias=True, out_bias=True, n_kv_heads=8, d_ff=256, norm_eps=1e-5)
    return cls(**{**base, **kw})

  @classmethod
  def llama3_2_3b(cls, **kw) -> ModelConfig:
    return cls(**{**dict(family='llama', vocab_size=128256, d_model=3072, n_layers=28, n_heads=24,
                         n_kv_heads=8, head_dim=128, d_ff=8192, max_positions=131072,
                         rope_theta=500000.0, norm_eps=1e-5,
                         rope_scaling=(('rope_type', 'llama3'), ('factor', 32.0),
                                       ('low_freq_factor', 1.0), ('high_freq_factor', 4.0),
                                       ('original_max_position_embeddings', 8192)),
                         bos_token_id=128000, eos_token_id=128009), **kw})

  @classmethod
  def llama3_1_8b(cls, **kw) -> ModelConfig:
    return cls(**{**dict(family='llama', vocab_size=128256, d_model=4096, n_layers=32, n_heads=32,
                         n_kv_heads=8, head_dim=128, d_ff=14336, max_positions=131072,
                         rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False,
                         rope_scaling=(('rope_type', 'llama3'), ('factor', 8.0),
                                       ('low_freq_factor', 1.0), ('high_freq_factor', 4.0),
                                       ('original_max_position_embeddings', 8192)),
                         bos_token_id=128000, eos_token_id=128009), **kw})

  @classmethod
  def gemma2_2b(cls, **kw) -> ModelConfig:
    return cls(**{**dict(family='gemma2', vocab_size=256000, d_model=2304, n_layers=26, n_heads=8,
                         n_kv_heads=4, head_dim=256, d_ff=9216, max_positions=8192,
                         activation='gelu_tanh', norm_offset=True, embed_scale=True,
                         post_norms=True, attn_softcap=50.0, final_softcap=30.0,
                         query_scale=256 ** -0.5, sliding_window=4096, norm_eps=1e-6,
                         layer_types=tuple(SLIDING if i % 2 == 0 else FULL for i in range(26)),
                         bos_token_id=2, eos_token_id=1, pad_token_id=0), **kw})

  @classmethod
  def qwen2_5_7b(cls, **kw) -> ModelConfig:
    return cls(**{**dict(family='qwen2', vocab_size=152064, d_model=3584, n_layers=28, n_heads=28,
                         n_kv_heads=4, head_dim=128, d_ff=18944, max_positions=32768,
                         rope_theta=1000000.0, qkv_bias=True, tie_embeddings=False,
                         norm_eps=1e-6, eos_token_id=151645), **kw})
  # fmt: on


# ---- building blocks ---------------------------------------------------------------------


def _param(rngs: nnx.Rngs, shape, axes, dtype, init='normal', std=0.02):
  if init == 'ones':
    value = jnp.ones(shape, dtype)
  elif init == 'zeros':
    value = jnp.zeros(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  # Logical names only; cai_jax.sharding maps them to mesh axes (never eagerly).
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Norm(nnx.Module):
  """RMSNorm (optionally Gemma's (1 + w)) or LayerNorm; statistics in float32."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.scale = _param(rngs, (cfg.d_model,), ('norm',), pd, 'zeros' if cfg.norm_offset else 'ones')
    if cfg.norm == 'layer':
      self.bias = _param(rngs, (cfg.d_model,), ('norm',), pd, 'zeros')

  def __call__(self, x):
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if self.cfg.norm == 'layer':
      x = x - x.mean(-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.cfg.norm_eps)
    scale = self.scale[...].astype(jnp.float32)
    if self.cfg.norm_offset:
      return (y * (1.0 + scale)).astype(dtype)
    if self.cfg.norm == 'layer':
      return (y * scale + self.bias[...].astype(jnp.float32)).astype(dtype)
    # Llama casts back to the activation dtype before scaling, as transformers does.
    return scale.astype(dtype) * y.astype(dtype)


def _activation(name: str):
  return {
      'silu': jax.nn.silu,
      'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
      'gelu': lambda x: jax.nn.gelu(x, approximate=False),
  }[name]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse RoPE frequencies [H/2], with Llama-3 or linear scaling as in transformers."""
  dim = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
  scaling = dict(cfg.rope_scaling or ())
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'linear':
    inv = inv / scaling['factor']
  elif kind == 'llama3':
    factor, lo, hi = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    old = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, smoothed, scaled)
  elif kind != 'default':
    raise ValueError(f'unsupported rope_type {kind!r}; supported: default, linear, llama3')
  return inv.astype(np.float32)


def apply_rope(x, positions, inv_freq):
  """Rotates x [B, T, N, H] by positions [B, T] (transformers' rotate-half layout)."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
  return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def _quantize_and_adapt(module: nnx.Module, names, cfg: ModelConfig, rngs: nnx.Rngs) -> None:
  """A block's projections `names` in int8 (`cfg.quantization`), then their LoRA adapters."""
  if cfg.quantization:
    quantize.quantize_weights(module, names)
  lora.add_adapters(module, names, cfg, rngs)


def _project(module: nnx.Module, name: str, x):
  """Projection `name` of `x` (lora.PROJECTIONS' einsum) in x's dtype: an int8 weight's output
  times its channel scales, plus the LoRA adapter's low-rank term when there is one."""
  w = getattr(module, name)[...].astype(x.dtype)
  if name == 'o':  # 'BTNH,NHD->BTD' by dot_general: jnp.einsum contracts (H, N) in that order,
    y = jax.lax.dot_general(x, w, (((2, 3), (0, 1)), ((), ())))  # which made XLA transpose W
  else:
    y = jnp.einsum(lora.PROJECTIONS[name][0], x, w)
  return lora.project(module, name, x, quantize.rescale(module, name, y))


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.cfg, self.layer = cfg, layer
    pd = jnp.dtype(cfg.param_dtype)
    d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.q = _param(rngs, (d, n, h), ('embed', 'heads', 'head_dim'), pd)
    self.k = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), pd)
    self.v = _param(rngs, (d, k, h), ('embed', 'kv_heads', 'head_dim'), pd)
    self.o = _param(rngs, (n, h, d), ('heads', 'head_dim', 'embed'), pd)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (n, h), ('heads', 'head_dim'), pd, 'zeros')
      self.k_bias = _param(rngs, (k, h), ('kv_heads', 'head_dim'), pd, 'zeros')
      self.v_bias = _param(rngs, (k, h), ('kv_heads', 'head_dim'), pd, 'zeros')
    if cfg.out_bias:
      self.o_bias = _param(rngs, (d,), ('norm',), pd, 'zeros')
    _quantize_and_adapt(self, lora.ATTENTION, cfg, rngs)

  def _window(self):
    return self.cfg.sliding_window if self.cfg.is_sliding(self.layer) else None

  def _prefix_mask(self, prefix: SharedPrefix, positions) -> attention.Mask:
    """The prefix slots each query sees: all valid ones (the prefix comes first), within the
    window on sliding-window layers (prefix slot s holds position s)."""
    mask = prefix.mask if prefix.mask.ndim == 2 else prefix.mask[None]  # [B or 1, Sp]
    return attention.Mask(positions, mask, causal=False, window=self._window())

  def _decode_attention(self, q, k_cache, v_cache, allowed, dt, prefix=None, prefix_allowed=None):
    """One new token per row (q [B, 1, K, G, H]) against the cache, as two reductions.

    A batched dot here is B x K tiny matrix products that XLA:CPU runs one after another on one
    thread; the multiply-and-reduce forms are loop fusions it vectorizes along the contiguous
    axis (S for the keys, H for the values) and splits over threads: about half the time.
    With a shared prefix, the rows' queries meet its one copy of keys and values in one matrix
    product each (rows x prefix slots), so a decode step reads the prefix once for the batch.
    """
    f32 = jnp.float32
    q = q[:, 0].astype(f32)  # [B, K, G, H]
    logits = jnp.sum(q[..., None] * k_cache.astype(f32)[:, :, None], axis=-2)  # [B, K, G, S]
    softcap = self.cfg.attn_softcap
    logits = attention.mask_logits(logits[:, :, :, None], allowed, softcap)[:, :, :, 0]
    if prefix is not None:
      shared = jnp.einsum(prefix.spec('BKGH,{}KHS->BKGS'), q, prefix.k.astype(f32))
      shared = attention.mask_logits(shared[:, :, :, None], prefix_allowed, softcap)[:, :, :, 0]
      logits = jnp.concatenate([shared, logits], axis=-1)  # one softmax over prefix + own slots
    # A fusion barrier: otherwise XLA recomputes the softmax inside the value reduction.
    probs = jax.lax.optimization_barrier(jax.nn.softmax(logits, axis=-1))
    if prefix is not None:
      sp = prefix.k.shape[-1]
      shared, probs = probs[..., :sp], probs[..., sp:]
    out = jnp.sum(probs[..., None] * v_cache.astype(f32)[:, :, None], axis=-2)  # [B, K, G, H]
    if prefix is not None:
      out = out + jnp.einsum(prefix.spec('BKGS,{}KSH->BKGH'), shared, prefix.v.astype(f32))
    return out[:, None].astype(dt)

  def _with_prefix(self, impl, q, k, v, own: attention.Mask, prefix: SharedPrefix, shared, dt):
    """Attention over the prefix (mask `shared`) and the rows' own slots (mask `own`, cache
    layout) as two softmax pieces joined by their maxima and sums: the cascade decomposition.

    Each piece is `attention.attend(..., stats=True)` by implementation `impl`. For `dense` the
    prefix piece keeps the layout XLA:CPU's matrix product makes, [K, B, G, T, Sp] for one shared
    copy (every row's queries against it in one product per KV head) and [B, K, G, T, Sp] per
    row; the layout the own slots use ('BTKGH,KHS->BKGTS') costs three times as long here, where
    the logits over a long prefix are most of the work. The others fold the rows into the query
    axis (one copy is one batch row) and never form the prefix's logits whole.
    """
    f32 = jnp.float32
    b, t, kh, g, h = q.shape
    softcap = self.cfg.attn_softcap
    impl = attention.resolve(impl, jax.default_backend(), softcap, b * t)
    shared_copy = prefix.k.ndim == 3
    if impl != 'dense':
      if shared_copy:
        folded = attention.Mask(
            shared.q_slots.reshape(1, b * t), shared.key_mask, False, shared.window
        )
        p_out, p_top, p_sum = attention.attend(
            impl, q.reshape(1, b * t, kh, g, h), prefix.k[None], prefix.v[None], folded,
            softcap=softcap, k_layout='BKHS', stats=True,
        )  # fmt: skip
        p_out = p_out.reshape(kh, g, b, t, h).transpose(2, 0, 1, 3, 4)
        p_top, p_sum = (x.reshape(kh, g, b, t).transpose(2, 0, 1, 3) for x in (p_top, p_sum))
      else:
        p_out, p_top, p_sum = attention.attend(
            impl, q, prefix.k, prefix.v, shared, softcap=softcap, k_layout='BKHS', stats=True
        )
    else:
      prefix_allowed = shared.allowed()  # [B, T, Sp]
      if shared_copy:
        qq = q.transpose(2, 0, 3, 1, 4).reshape(kh, b * g * t, h)
        pl = jnp.einsum('KMH,KHS->KMS', qq, prefix.k.astype(dt)).reshape(kh, b, g, t, -1)
        allowed = prefix_allowed[None, :, None]  # [1, B, 1, T, Sp]
      else:
        qq = q.transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
        pl = jnp.einsum('BKMH,BKHS->BKMS', qq, prefix.k.astype(dt)).reshape(b, kh, g, t, -1)
        allowed = prefix_allowed[:, None, None]  # [B, 1, 1, T, Sp]
      pl = pl.astype(f32)
      if softcap is not None:
        pl = jnp.tanh(pl / softcap) * softcap
      pl = jnp.where(allowed, pl, jnp.finfo(f32).min)
      p_top = pl.max(-1)
      pe = jnp.exp(pl - p_top[..., None])
      p_sum = pe.sum(-1)
      if shared_copy:
        p_out = jnp.einsum('KMS,KSH->KMH', pe.reshape(kh, b * g * t, -1).astype(dt), prefix.v)
        p_out = p_out.reshape(kh, b, g, t, h).transpose(1, 0, 2, 3, 4)  # [B, K, G, T, H]
        p_top, p_sum = p_top.transpose(1, 0, 2, 3), p_sum.transpose(1, 0, 2, 3)
      else:
        p_out = jnp.einsum('BKMS,BKSH->BKMH', pe.reshape(b, kh, g * t, -1).astype(dt), prefix.v)
        p_out = p_out.reshape(b, kh, g, t, h)
    o_out, o_top, o_sum = attention.attend(
        impl, q, k, v, own, softcap=softcap, k_layout='BKHS', stats=True
    )
    top = jnp.maximum(p_top, o_top)
    wp, wo = jnp.exp(p_top - top), jnp.exp(o_top - top)  # each piece's share, rescaled
    out = (p_out.astype(f32) * wp[..., None] + o_out.astype(f32) * wo[..., None]) / (
        p_sum * wp + o_sum * wo
    )[..., None]
    return out.transpose(0, 3, 1, 2, 4).astype(dt)  # [B, T, K, G, H]

  def _paged(self, q, k, v, positions, key_mask, pool, slots: PagedSlots):
    """Attention over a page pool (sampling/engine.py): the new keys and values are written to
    their pool slots, then each row reads its own, in logical order (`attention.paged`)."""
    b, t, kh, h = k.shape
    flat = slots.write.reshape(b * t)
    new = {'k': k.reshape(b * t, kh, h), 'v': v.reshape(b * t, kh, h)}
    if 'k_scale' in pool:  # int8 pages: a scale per token and head beside them
      for kv in ('k', 'v'):
        new[kv], new[f'{kv}_scale'] = quantize_kv(new[kv])
    pool = {name: pool[name].at[flat].set(x.astype(pool[name].dtype)) for name, x in new.items()}
    mask = attention.Mask(positions, key_mask, True, self._window())
    out = attention.paged(
        q, pool['k'], pool['v'], slots.read, mask, softcap=self.cfg.attn_softcap,
        block=slots.block, n_blocks=slots.n_blocks, k_scale=pool.get('k_scale'),
        v_scale=pool.get('v_scale'),
    )  # fmt: skip
    return out, pool

  def _contiguous(self, q, k, v, positions, key_mask, cache, cache_index, prefix, dt):
    """Attention over a contiguous cache (`init_cache`, written at `cache_index`) or, without
    one, over the pass's own keys; with a shared `prefix`, the cascade of `_with_prefix`."""
    cfg, t = self.cfg, q.shape[1]
    if cache is not None:
      # The cache layout (see init_cache): keys [B, K, H, S], values [B, K, S, H].
      new = {'k': k.transpose(0, 2, 3, 1), 'v': v.transpose(0, 2, 1, 3)}
      cache = {
          kv: jax.lax.dynamic_update_slice_in_dim(
              cache[kv], new[kv].astype(cache[kv].dtype), cache_index, CACHE_SLOT_AXIS[kv]
          )
          for kv in ('k', 'v')
      }
      k, v = cache['k'], cache['v']
    else:
      # [B, K, S, H]: the layout whose forward and backward dots XLA runs without transposes.
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    own = attention.own_slots_mask(t, key_mask, cache_index, self._window())
    shared = None if prefix is None else self._prefix_mask(prefix, positions)

    if cache is not None and t == 1:
      allowed = own.allowed()  # [B, 1, S]
      prefix_allowed = None if prefix is None else shared.allowed()
      out = self._decode_attention(q, k, v, allowed, dt, prefix, prefix_allowed)
    elif prefix is not None:
      out = self._with_prefix(cfg.attention, q, k, v, own, prefix, shared, dt)
    else:
      out = attention.attend(
          cfg.attention, q, k, v, own, softcap=cfg.attn_softcap,
          k_layout='BKHS' if cache is not None else 'BKSH',
      )  # fmt: skip
    return out, cache

  def __call__(self, x, positions, key_mask, cache, cache_index, inv_freq, prefix=None):
    cfg, dt = self.cfg, x.dtype
    q, k, v = _project(self, 'q', x), _project(self, 'k', x), _project(self, 'v', x)
    if cfg.qkv_bias:
      q, k, v = (
          q + self.q_bias[...].astype(dt),
          k + self.k_bias[...].astype(dt),
          v + self.v_bias[...].astype(dt),
      )
    if cfg.positions == 'rope':
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    q = sharding.constrain(q, ('batch', 'length', 'heads', 'head_dim'))

    t = x.shape[1]
    b, n, kh = x.shape[0], cfg.n_heads, cfg.n_kv_heads
    scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim**-0.5
    q = q.reshape(b, t, kh, n // kh, cfg.head_dim) * jnp.asarray(scale, dt)
    if isinstance(cache_index, PagedSlots):
      out, cache = self._paged(q, k, v, positions, key_mask, cache, cache_index)
    else:
      out, cache = self._contiguous(q, k, v, positions, key_mask, cache, cache_index, prefix, dt)
    out = _project(self, 'o', out.reshape(b, t, n, cfg.head_dim))
    if cfg.out_bias:
      out = out + self.o_bias[...].astype(dt)
    return out, cache


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    d, f = cfg.d_model, cfg.d_ff
    if cfg.mlp == 'gated':
      self.gate = _param(rngs, (d, f), ('embed', 'mlp'), pd)
    self.up = _param(rngs, (d, f), ('embed', 'mlp'), pd)
    self.down = _param(rngs, (f, d), ('mlp', 'embed'), pd)
    if cfg.out_bias:
      self.up_bias = _param(rngs, (f,), ('mlp',), pd, 'zeros')
      self.down_bias = _param(rngs, (d,), ('norm',), pd, 'zeros')
    _quantize_and_adapt(self, lora.MLP, cfg, rngs)

  def __call__(self, x):
    cfg, dt = self.cfg, x.dtype
    act = _activation(cfg.activation)
    up = _project(self, 'up', x)
    if cfg.out_bias:
      up = up + self.up_bias[...].astype(dt)
    if cfg.mlp == 'gated':
      h = act(_project(self, 'gate', x)) * up
    else:
      h = act(up)
    h = sharding.constrain(h, ('batch', 'length', 'mlp'))
    out = _project(self, 'down', h)
    if cfg.out_bias:
      out = out + self.down_bias[...].astype(dt)
    return out


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = Norm(cfg, rngs=rngs)
    self.attn = Attention(cfg, layer, rngs=rngs)
    self.mlp_norm = Norm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    if cfg.post_norms:
      self.attn_post_norm = Norm(cfg, rngs=rngs)
      self.mlp_post_norm = Norm(cfg, rngs=rngs)

  def __call__(self, x, positions, key_mask, cache, cache_index, inv_freq, prefix=None):
    h, cache = self.attn(
        self.attn_norm(x), positions, key_mask, cache, cache_index, inv_freq, prefix
    )
    if self.cfg.post_norms:
      h = self.attn_post_norm(h)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if self.cfg.post_norms:
      h = self.mlp_post_norm(h)
    return sharding.constrain(x + h, ('batch', 'length', 'embed')), cache


class Decoder(nnx.Module):
  """Decoder-only language model: `logits, cache = model(tokens, ...)`."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), pd)
    if cfg.positions == 'learned':
      self.pos_embed = _param(rngs, (cfg.max_positions, cfg.d_model), ('positions', 'embed'), pd)
    self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
    self.final_norm = Norm(cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ('embed', 'vocab'), pd)
    if cfg.quantization:
      quantize.quantize_weights(self, ('embed', 'lm_head'))

  def hidden(self, tokens, positions=None, key_mask=None, cache=None, cache_index=0, prefix=None):
    """Final-norm hidden states [B, T, D] and the updated cache.

    `prefix` (a `Prefix`, optional): one copy of a token prefix's keys and values that every row
    continues; `positions` must then count from the prefix's length (see docs/DESIGN.md).
    """
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
    if key_mask is None:
      s = t if cache is None else cache_length(cache)
      key_mask = jnp.ones((b, s), bool)
    x = quantize.embed_rows(self, tokens, dt)
    if cfg.embed_scale:
      x = x * jnp.asarray(math.sqrt(cfg.d_model), dt)
    if cfg.positions == 'learned':
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
    x = sharding.constrain(x, ('batch', 'length', 'embed'))
    inv_freq = jnp.asarray(rope_inv_freq(cfg)) if cfg.positions == 'rope' else None
    if cache is None and prefix is None and cfg.remat != 'none':
      # Remat only matters for passes that are differentiated, which never carry a cache.
      layer = nnx.remat(
          lambda block, x: block(x, positions, key_mask, None, cache_index, inv_freq)[0],
          policy=REMAT_POLICIES[cfg.remat],
      )
      for block in self.layers:
        x = layer(block, x)
      return self.final_norm(x), None
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.layers):
      layer_prefix = None if prefix is None else prefix.layer(i)
      x, layer_cache = block(
          x,
          positions,
          key_mask,
          None if cache is None else cache[i],
          cache_index,
          inv_freq,
          layer_prefix,
      )
      if cache is not None:
        new_cache.append(layer_cache)
    return self.final_norm(x), new_cache

  def logits_from_hidden(self, h):
    cfg = self.cfg
    if cfg.tie_embeddings:  # contract with embed [V, D] directly: no transposed copy of it
      name, logits = 'embed', jnp.einsum('BTD,VD->BTV', h, self.embed[...].astype(h.dtype))
    else:
      name, logits = 'lm_head', jnp.einsum('BTD,DV->BTV', h, self.lm_head[...].astype(h.dtype))
    logits = quantize.rescale(self, name, logits.astype(jnp.float32))  # int8: scales in float32
    if cfg.final_softcap is not None:
      logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return sharding.constrain(logits, ('batch', 'length', 'vocab'))

  def __call__(self, tokens, positions=None, key_mask=None, cache=None, cache_index=0, prefix=None):
    h, cache = self.hidden(tokens, positions, key_mask, cache, cache_index, prefix)
    return self.logits_from_hidden(h), cache


# The KV cache: per layer, keys [B, K, H, S] and values [B, K, S, H], slots (S) minor for the
# keys so that decoding's query-key reduction runs along contiguous memory.
CACHE_SLOT_AXIS = {'k': 3, 'v': 2}
_CACHE_NAMES = {
    'k': ('batch', 'kv_heads', 'head_dim', 'length'),
    'v': ('batch', 'kv_heads', 'length', 'head_dim'),
}


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> list[dict]:
  """Zeroed KV cache of `length` slots (layout above), placed by the mesh rules."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shapes = {
      'k': (batch, cfg.n_kv_heads, cfg.head_dim, length),
      'v': (batch, cfg.n_kv_heads, length, cfg.head_dim),
  }
  return [
      {kv: sharding.zeros(shapes[kv], dtype, _CACHE_NAMES[kv]) for kv in ('k', 'v')}
      for _ in range(cfg.n_layers)
  ]


def cache_length(cache: list[dict]) -> int:
  return cache[0]['v'].shape[CACHE_SLOT_AXIS['v']]


def cache_prefix(cache: list[dict], length: int) -> list[dict]:
  """The first `length` slots of every layer's keys and values."""
  return [
      {kv: jax.lax.slice_in_dim(c[kv], 0, length, axis=CACHE_SLOT_AXIS[kv]) for kv in c}
      for c in cache
  ]


def cache_write_prefix(cache: list[dict], prefix: list[dict]) -> list[dict]:
  """`cache` with its first slots replaced by `prefix` (e.g. a prefill's cache_prefix)."""
  return [
      {kv: jax.lax.dynamic_update_slice_in_dim(c[kv], p[kv], 0, CACHE_SLOT_AXIS[kv]) for kv in c}
      for c, p in zip(cache, prefix)
  ]


class PagedSlots(NamedTuple):
  """How a call reads and writes a page pool (`init_pages`) instead of a contiguous cache.

  A pool slot is page * page_size + offset; page 0 is scratch, where padding writes land. Row
  b's logical slot s (which holds position s) is pool slot `read[b, s]`; the pass's T new keys
  and values go to `write[b, t]`. Attention reads the first `n_blocks` blocks of `block` slots
  (`attention.paged`); S is a multiple of `block`.
  """

  write: jax.Array  # int32 [B, T]
  read: jax.Array  # int32 [B, S]
  block: int
  n_blocks: jax.Array  # int32 scalar


def init_pages(cfg: ModelConfig, pages: int, page_size: int, dtype=None) -> list[dict]:
  """A zeroed page pool: per layer, keys and values [pages * page_size, K, H]. With dtype int8,
  also `k_scale` and `v_scale` [pages * page_size, K] float32: one scale per token and head."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (pages * page_size, cfg.n_kv_heads, cfg.head_dim)
  names = (None, 'kv_heads', 'head_dim')
  layer = {kv: (shape, dtype, names) for kv in ('k', 'v')}
  if dtype == jnp.int8:
    layer |= {f'{kv}_scale': (shape[:2], jnp.float32, names[:2]) for kv in ('k', 'v')}
  return [{n: sharding.zeros(*spec) for n, spec in layer.items()} for _ in range(cfg.n_layers)]


def quantize_kv(x):
  """int8 values and float32 scales [..., K] of keys or values [..., K, H]: x ~ q * scale, the
  scale each token's and head's largest magnitude / 127."""
  x = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
  scale = jnp.where(scale > 0, scale, 1.0)
  return jnp.clip(jnp.round(x / scale[..., None]), -127, 127).astype(jnp.int8), scale


class SharedPrefix(NamedTuple):
  """One layer's view of a prefix: keys [K, H, Sp], values [K, Sp, H] and mask [Sp] when all
  rows share one copy; [B, K, H, Sp], [B, K, Sp, H] and [B, Sp] when each row has its group's."""

  k: jax.Array
  v: jax.Array
  mask: jax.Array

  def spec(self, template: str) -> str:
    """An einsum spec whose prefix operand has a row axis (B) only when per row."""
    return template.format('B' if self.k.ndim == 4 else '')


class Prefix(NamedTuple):
  """A token prefix shared by every row of a batch, held once (the cascade / Hydragen layout).

  `kv` is a batch-1 KV cache (`init_cache(cfg, 1, Sp)`, filled by running the prefix's tokens at
  positions 0..Sp-1); `mask` [Sp] marks its valid slots (a prefix may be right-padded to a
  block). Rows attend to it and to their own cache in one softmax, so the result equals
  attending to the prefix copied in front of every row.
  """

  kv: list[dict]
  mask: jax.Array
  # Groups: kv holds G prefixes (batch G, mask [G, Sp]) and rows [B] names each row's. Rows of a
  # group share text no other group has (the two option orders of one feedback label); each row
  # reads a gathered copy -- prefill is saved, the reads are not. None: one prefix for all rows.
  rows: jax.Array | None = None

  def layer(self, i: int) -> SharedPrefix:
    k, v = self.kv[i]['k'], self.kv[i]['v']
    if self.rows is None:
      return SharedPrefix(k[0], v[0], self.mask)
    return SharedPrefix(k[self.rows], v[self.rows], self.mask[self.rows])

  @property
  def length(self) -> int:
    return self.mask.shape[-1]


class ScalarHeadModel(nnx.Module):
  """LM trunk + linear scalar head: the preference model and the PPO value function."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, trunk: Decoder | None = None):
    self.cfg = cfg
    self.trunk = trunk if trunk is not None else Decoder(cfg, rngs=rngs)
    pd = jnp.dtype(cfg.param_dtype)
    self.head = _param(rngs, (cfg.d_model,), ('embed',), pd, std=cfg.d_model**-0.5)
    self.head_bias = _param(rngs, (), (), pd, 'zeros')

  def values(self, tokens, positions=None, key_mask=None):
    """A scalar for every position [B, T] (float32)."""
    h, _ = self.trunk.hidden(tokens, positions, key_mask)
    return self.values_from_hidden(h)

  def values_from_hidden(self, h):
    """The head on trunk hidden states [B, T, D] -> [B, T] (float32); PPO's shared-trunk value."""
    return jnp.einsum(
        'BTD,D->BT', h.astype(jnp.float32), self.head[...].astype(jnp.float32)
    ) + self.head_bias[...].astype(jnp.float32)

  def __call__(self, tokens, read_index, positions=None, key_mask=None):
    """The scalar read at `read_index` [B] (e.g. the last real token), shape [B]."""
    v = self.values(tokens, positions, key_mask)
    return jnp.take_along_axis(v, read_index[:, None].astype(jnp.int32), axis=1)[:, 0]


def with_param_dtype(module: nnx.Module, dtype: str) -> nnx.Module:
  """`module` with its floating-point parameters stored in `dtype`, each in its own layout.

  Mixed precision keeps trained models in float32 (master weights) and may keep frozen copies,
  such as PPO's KL reference, in bfloat16: half the HBM, and the matmuls cast to the compute
  dtype anyway. The module itself when it already is in `dtype` (no copy).
  """
  dtype = jnp.dtype(dtype)
  # LoRA adapters stay float32 (they are what a LoRA run trains; a frozen copy's are tiny), and
  # so do int8 weights' scales; int8 values are not floating point, so they are never cast.
  graphdef, adapters, params, rest = nnx.split(
      module, nnx.Any(nnx.LoRAParam, quantize.Scale), nnx.Param, ...
  )
  floats = [x for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)]
  if all(x.dtype == dtype for x in floats):
    return module
  cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return nnx.merge(graphdef, adapters, jax.tree.map(cast, params), rest)


def param_bytes(cfg: ModelConfig) -> int:
  """Bytes of all of a decoder's parameters (int8 scales and LoRA adapters included), counted
  on its abstract state: nothing is allocated."""
  state = jax.eval_shape(lambda: nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def create(cfg: ModelConfig, seed: int = 0, *, scalar_head: bool = False):
  """A randomly initialized model (HF-style normal(0.02) init), sharded under the current mesh."""
  cls = ScalarHeadModel if scalar_head else Decoder
  return sharding.create_sharded(lambda: cls(cfg, rngs=nnx.Rngs(params=seed)))
