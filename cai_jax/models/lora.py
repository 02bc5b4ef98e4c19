"""Low-rank adapters (LoRA, Hu et al. 2021) on the decoder's projections.

A targeted projection `y = x W` becomes `y = x W + (alpha / rank) (x A) B`, with A [in..., rank]
drawn at random and B [rank, out...] zero, so a fresh adapter leaves the model exactly as it was.
Only A and B are trained (`nnx.LoRAParam`, float32 masters with their optimizer state); the base
stays frozen in `model.frozen_param_dtype`. Two things follow that RL-CAI uses:

- the frozen reference of PPO's KL penalty and of DPO *is* the base with the adapters switched
  off (`disabled`: every B set to zero, an exact zero added to each projection), so it costs no
  second copy of the weights;
- the trained model is the base plus one low-rank product per projection (`merged`), which is
  what the stage exports in HF format (`transformers` loads it); `peft_tensors` writes the
  adapters alone in the layout `peft` loads onto the base.

LoRA dropout (as PEFT: `(alpha / rank) dropout(x) A B`) is on only inside a training step, whose
key `with_dropout` hands the model; sampling, scoring and the reference never drop anything.

Why our own and not qwix's `LoraProvider`: qwix attaches adapters by intercepting the einsums of
modules whose path matches a regex, so it cannot tell our q, k and v projections apart (three
einsums in one `Attention` module; measured: rules take a module path and op names, and every
einsum of the matched module got an adapter), has no switch that turns adapters off for a
reference pass, and applies its LoRA dropout in every call, sampling included. The projections
here are einsums over raw parameters, so the adapter is two more einsums beside each.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Projection name -> (its einsum, how many leading weight axes are contracted).
PROJECTIONS = {
    'q': ('BTD,DNH->BTNH', 1),
    'k': ('BTD,DKH->BTKH', 1),
    'v': ('BTD,DKH->BTKH', 1),
    'o': ('BTNH,NHD->BTD', 2),
    'gate': ('BTD,DF->BTF', 1),
    'up': ('BTD,DF->BTF', 1),
    'down': ('BTF,FD->BTD', 1),
}
ATTENTION, MLP = ('q', 'k', 'v', 'o'), ('gate', 'up', 'down')
# HF module names of each projection (transformers' Llama / Qwen2 / Mistral / Gemma 2 layout).
HF_NAMES = {
    'q': 'self_attn.q_proj', 'k': 'self_attn.k_proj', 'v': 'self_attn.v_proj',
    'o': 'self_attn.o_proj', 'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj', 'down': 'mlp.down_proj',
}  # fmt: skip


def check(rank: int, alpha: float, targets, family: str, mlp: str, dropout: float = 0.0):
  """Why this LoRA setting cannot run on the architecture (one line), or None."""
  if rank <= 0:
    return f'model.lora.rank={rank}: a LoRA rank must be at least 1'
  if alpha <= 0:
    return f'model.lora.alpha={alpha}: must be positive (the adapters are scaled by alpha / rank)'
  if not 0.0 <= dropout < 1.0:
    return f'model.lora.dropout={dropout}: a probability in [0, 1) (the share of inputs dropped)'
  if not targets:
    return 'model.lora.targets is empty: name at least one projection of ' + ', '.join(PROJECTIONS)
  have = set(PROJECTIONS) - ({'gate'} if mlp != 'gated' else set())
  unknown = [t for t in targets if t not in have]
  if unknown:
    return (
        f'model.lora.targets names {", ".join(map(repr, unknown))}, which the {family} '
        f'architecture has no projection of; valid: {", ".join(p for p in PROJECTIONS if p in have)}'
    )
  return None


ADAPTER_DIR = 'adapter'  # an export's PEFT adapter directory (beside the merged weights)
PEFT_FAMILIES = ('llama', 'mistral', 'qwen2', 'gemma2')  # GPT-2's fused c_attn has no q_proj


def is_adapter(path: tuple) -> bool:
  return str(path[-1]).endswith(('_lora_a', '_lora_b'))


def _initial_a(key, shape):
  """A drawn like PEFT's default: Kaiming-uniform (a = sqrt 5, as torch's nn.Linear) over the
  fan-in, the product of all but the last (rank) axis."""
  fan_in = math.prod(shape[:-1])
  bound = (3.0 / fan_in) ** 0.5
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def initial(path: tuple, shape, seed: int):
  """A fresh adapter tensor for `path` (a loaded base gets new adapters): A at random from
  (seed, path), B zero."""
  if str(path[-1]).endswith('_lora_b'):
    return jnp.zeros(shape, jnp.float32)
  name = '/'.join(map(str, path))
  return _initial_a(jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode())), shape)


def add_adapter(module: nnx.Module, name: str, rank: int, rngs: nnx.Rngs) -> None:
  """Gives `module`'s projection `name` an adapter: `{name}_lora_a` [in..., rank] at random and
  `{name}_lora_b` [rank, out...] zero, both float32, carrying the weight's logical axis names
  on their weight-sized axes."""
  weight = getattr(module, name)
  contracted = PROJECTIONS[name][1]
  shape, axes = weight.shape, weight.get_metadata().get('out_sharding') or (None,) * weight.ndim
  a = _initial_a(rngs.params(), (*shape[:contracted], rank))
  b = jnp.zeros((rank, *shape[contracted:]), jnp.float32)
  setattr(module, f'{name}_lora_a', nnx.LoRAParam(
      a, out_sharding=(*axes[:contracted], 'lora_rank'), eager_sharding=False))  # fmt: skip
  setattr(module, f'{name}_lora_b', nnx.LoRAParam(
      b, out_sharding=('lora_rank', *axes[contracted:]), eager_sharding=False))  # fmt: skip


def trainable_params(cfg, rank: int, targets) -> int:
  """Adapter parameters of a decoder of architecture `cfg` (all layers)."""
  d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
  sizes = {'q': (d, cfg.n_heads * h), 'k': (d, cfg.n_kv_heads * h), 'v': (d, cfg.n_kv_heads * h),
           'o': (cfg.n_heads * h, d), 'gate': (d, f), 'up': (d, f), 'down': (f, d)}  # fmt: skip
  return cfg.n_layers * sum(rank * sum(sizes[t]) for t in targets)


def _specs(name: str) -> tuple[str, str]:
  """The adapter's two einsums for projection `name`: x A (rank axis R) and (x A) B."""
  spec, contracted = PROJECTIONS[name]
  lhs, rest = spec.split(',')
  rhs, out = rest.split('->')
  kept = ''.join(c for c in lhs if c not in rhs)
  return f'{lhs},{rhs[:contracted]}R->{kept}R', f'{kept}R,R{rhs[contracted:]}->{out}'


def add_adapters(module: nnx.Module, names, cfg, rngs: nnx.Rngs) -> None:
  """Adapters on those of `module`'s projections `names` that `cfg.lora_targets` names."""
  for name in names:
    if cfg.lora_rank and name in cfg.lora_targets:
      add_adapter(module, name, cfg.lora_rank, rngs)


class DropoutKey(nnx.Variable):
  """A module's LoRA dropout key for one training step (set by `with_dropout`, never saved)."""


def with_dropout(model: nnx.Module, key) -> nnx.Module:
  """`model` with LoRA dropout on for one training step: each module with adapters gets its own
  key folded from `key` (the step's), when its config's `lora_dropout` is above zero. Called on
  the model a train step builds inside its traced loss, so nothing outlives the step."""
  modules = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)]
  for i, module in enumerate(m for m in modules if _dropout_rate(m) and has_adapters(m)):
    module.lora_dropout_key = DropoutKey(jax.random.fold_in(key, i))
  return model


def _dropout_rate(module: nnx.Module) -> float:
  cfg = getattr(module, 'cfg', None)
  return float(getattr(cfg, 'lora_dropout', 0.0) or 0.0)


def _dropped(module: nnx.Module, name: str, x):
  """x with LoRA dropout applied for projection `name` (inverted dropout: kept inputs scaled by
  1 / (1 - rate), so the adapter's output is unbiased); x itself outside a training step."""
  key = getattr(module, 'lora_dropout_key', None)
  rate = _dropout_rate(module)
  if key is None or not rate:
    return x
  keep = jax.random.bernoulli(
      jax.random.fold_in(key[...], list(PROJECTIONS).index(name)), 1.0 - rate, x.shape
  )
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def project(module: nnx.Module, name: str, x, y):
  """Projection `name`'s output `y` of input `x`, plus `alpha/rank (x A) B` (in x's dtype) when
  the projection has an adapter."""
  a = getattr(module, f'{name}_lora_a', None)
  if a is None:
    return y
  cfg = module.cfg
  down, up = _specs(name)
  b = getattr(module, f'{name}_lora_b')
  xa = jnp.einsum(down, _dropped(module, name, x), a[...].astype(x.dtype))
  scale = jnp.asarray(cfg.lora_alpha / cfg.lora_rank, x.dtype)
  return y + jnp.einsum(up, xa, b[...].astype(x.dtype)) * scale


def has_adapters(module: nnx.Module) -> bool:
  return bool(jax.tree.leaves(nnx.state(module, nnx.LoRAParam)))


def _is_b(path, x) -> bool:
  return isinstance(x, nnx.LoRAParam) and str(path[-1]).endswith('_lora_b')


def disabled(params):
  """A model's nnx.Param state with every adapter's B zero: the base model exactly (each
  projection adds an exact 0), sharing every other array with `params` (no copy)."""
  b, rest = nnx.split_state(params, _is_b, ...)
  return nnx.merge_state(jax.tree.map(jnp.zeros_like, b), rest)


def _merge_one(w, a, b, scale):
  product = np.tensordot(np.asarray(a, np.float32), np.asarray(b, np.float32), axes=1)
  return (np.asarray(w, np.float32) + scale * product).astype(np.asarray(w).dtype)


def merged_params(flat: dict[tuple, object], scale: float) -> dict[tuple, object]:
  """Flat parameters {path: array} with every adapter folded into its weight and removed:
  W + scale A B, in W's dtype. Paths without adapters pass through."""
  out = {k: v for k, v in flat.items() if not is_adapter(k)}
  for k, a in flat.items():
    name = str(k[-1])
    if name.endswith('_lora_a'):
      base = (*k[:-1], name[: -len('_lora_a')])
      b = flat[(*k[:-1], name[: -len('_lora_a')] + '_lora_b')]
      out[base] = _merge_one(out[base], a, b, scale)
  return out


def peft_tensors(flat: dict[tuple, object]) -> dict[str, object]:
  """The adapters in PEFT's safetensors layout: `base_model.model.model.layers.{i}.{module}.
  lora_A.weight` [rank, in] and `lora_B.weight` [out, rank] (torch's Linear layout, the
  weight-sized axes flattened in HF's order)."""
  out = {}
  for k, x in flat.items():
    if not is_adapter(k):
      continue
    name = str(k[-1])
    layer = int(k[k.index('layers') + 1])
    proj, which = name.rsplit('_lora_', 1)
    prefix = f'base_model.model.model.layers.{layer}.{HF_NAMES[proj]}'
    x = np.asarray(x, np.float32)
    if which == 'a':  # [in..., R] -> [R, in]
      out[f'{prefix}.lora_A.weight'] = x.reshape(-1, x.shape[-1]).T
    else:  # [R, out...] -> [out, R]
      out[f'{prefix}.lora_B.weight'] = x.reshape(x.shape[0], -1).T
  return out


def peft_config(rank: int, alpha: float, targets, base: str, dropout: float = 0.0) -> dict:
  """adapter_config.json for `peft_tensors`."""
  return {
      'peft_type': 'LORA',
      'task_type': 'CAUSAL_LM',
      'base_model_name_or_path': base,
      'r': rank,
      'lora_alpha': alpha,
      'lora_dropout': dropout,
      'target_modules': sorted(HF_NAMES[t].split('.')[-1] for t in targets),
      'bias': 'none',
      'fan_in_fan_out': False,
      'inference_mode': True,
  }
