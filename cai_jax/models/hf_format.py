"""The Hugging Face checkpoint format: safetensors files, config.json <-> ModelConfig, and the map
between HF tensor names ([out, in] layout) and our parameters. `cai_jax.checkpoint` loads and
exports models with it; `cai_jax.gguf_import` reuses the name map."""

from __future__ import annotations

import json
import os
import struct
from typing import Callable

import ml_dtypes
import numpy as np

from cai_jax.models.decoder import FULL, ModelConfig, SLIDING

HF_MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'gemma2', 'gpt2')


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message is one line naming the problem."""


# ---- safetensors (a simple, documented format: 8-byte header size, JSON header, raw data) ---

_ST_DTYPES = {
    'F32': np.float32,
    'F16': np.float16,
    'BF16': ml_dtypes.bfloat16,
    'F64': np.float64,
    'I64': np.int64,
    'I32': np.int32,
    'I8': np.int8,
    'U8': np.uint8,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
  """Memory-mapped, lazily read safetensors file with integrity checks."""

  def __init__(self, path: str | os.PathLike):
    self.path = str(path)
    size = os.path.getsize(self.path)
    with open(self.path, 'rb') as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f'{self.path}: truncated safetensors file (no header)')
      n = struct.unpack('<Q', head)[0]
      if n > size - 8:
        raise CheckpointError(
            f'{self.path}: corrupt safetensors header (claims {n} bytes, file has {size})'
        )
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise CheckpointError(f'{self.path}: corrupt safetensors header ({e})') from None
    self.metadata = header.pop('__metadata__', {}) or {}
    self.entries = header
    self.offset = 8 + n
    end = max((e['data_offsets'][1] for e in header.values()), default=0)
    if self.offset + end > size:
      raise CheckpointError(
          f'{self.path}: truncated safetensors file ({size} bytes, '
          f'tensors need {self.offset + end})'
      )
    self._mm = np.memmap(self.path, dtype=np.uint8, mode='r')

  def keys(self):
    return self.entries.keys()

  def get(self, name: str) -> np.ndarray:
    e = self.entries[name]
    if e['dtype'] not in _ST_DTYPES:
      raise CheckpointError(f'{self.path}: tensor {name} has unsupported dtype {e["dtype"]}')
    a, b = e['data_offsets']
    return (
        self._mm[self.offset + a : self.offset + b].view(_ST_DTYPES[e['dtype']]).reshape(e['shape'])
    )


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
  header, offset = {}, 0
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  for k, v in arrays.items():
    header[k] = {
        'dtype': _ST_NAMES[v.dtype],
        'shape': list(v.shape),
        'data_offsets': [offset, offset + v.nbytes],
    }
    offset += v.nbytes
  if metadata:
    header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for v in arrays.values():
      f.write(v.tobytes())
  os.replace(tmp, path)


# ---- HF config <-> ModelConfig ----------------------------------------------------------


def config_from_hf(hf: dict, where: str = 'config.json') -> ModelConfig:
  mt = hf.get('model_type')
  if mt not in HF_MODEL_TYPES:
    raise CheckpointError(
        f'{where}: unsupported model_type {mt!r}; supported: {", ".join(HF_MODEL_TYPES)}'
    )
  if mt == 'gpt2':
    if hf.get('scale_attn_by_inverse_layer_idx') or hf.get('reorder_and_upcast_attn'):
      raise CheckpointError(f'{where}: GPT-2 attention variants are not supported')
    d = hf['n_embd']
    act = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}
    return ModelConfig(
        family='gpt2',
        vocab_size=hf['vocab_size'],
        d_model=d,
        n_layers=hf['n_layer'],
        n_heads=hf['n_head'],
        n_kv_heads=hf['n_head'],
        head_dim=d // hf['n_head'],
        d_ff=hf.get('n_inner') or 4 * d,
        max_positions=hf['n_positions'],
        norm='layer',
        norm_eps=hf.get('layer_norm_epsilon', 1e-5),
        mlp='dense',
        activation=act[hf.get('activation_function', 'gelu_new')],
        positions='learned',
        qkv_bias=True,
        out_bias=True,
        tie_embeddings=True,
        bos_token_id=hf.get('bos_token_id'),
        eos_token_id=hf.get('eos_token_id'),
        pad_token_id=hf.get('pad_token_id'),
    )
  biased = [k for k in ('attention_bias', 'mlp_bias') if hf.get(k)]
  if biased:  # we would silently drop those tensors
    raise CheckpointError(f'{where}: {mt} with {" and ".join(biased)} is not supported')
  rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  theta = rope.pop('rope_theta', hf.get('rope_theta', 10000.0))
  kind = rope.get('rope_type', rope.get('type', 'default'))
  scaling = tuple(sorted(rope.items())) if kind != 'default' else None
  heads = hf['num_attention_heads']
  common = dict(
      family=mt,
      vocab_size=hf['vocab_size'],
      d_model=hf['hidden_size'],
      n_layers=hf['num_hidden_layers'],
      n_heads=heads,
      n_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads,
      d_ff=hf['intermediate_size'],
      max_positions=hf.get('max_position_embeddings', 8192),
      norm_eps=hf.get('rms_norm_eps', 1e-6),
      rope_theta=float(theta),
      rope_scaling=scaling,
      tie_embeddings=bool(hf.get('tie_word_embeddings', mt == 'gemma2')),
      bos_token_id=hf.get('bos_token_id'),
      eos_token_id=_first(hf.get('eos_token_id')),
      pad_token_id=hf.get('pad_token_id'),
      activation=_activation_from_hf(hf, where),
  )
  if mt == 'qwen2':
    common.update(qkv_bias=True)
    if hf.get('use_sliding_window'):
      # transformers' rule when layer_types is absent: layers from max_window_layers on slide.
      first = hf.get('max_window_layers', 28)
      types = hf.get('layer_types') or [
          SLIDING if i >= first else FULL for i in range(hf['num_hidden_layers'])
      ]
      common.update(sliding_window=hf['sliding_window'], layer_types=tuple(types))
  if mt == 'mistral' and hf.get('sliding_window'):
    common.update(sliding_window=hf['sliding_window'])
  if mt == 'gemma2':
    n = hf['num_hidden_layers']
    common.update(
        norm_offset=True,
        embed_scale=True,
        post_norms=True,
        attn_softcap=hf.get('attn_logit_softcapping'),
        final_softcap=hf.get('final_logit_softcapping'),
        query_scale=hf.get('query_pre_attn_scalar', 256) ** -0.5,
        sliding_window=hf.get('sliding_window'),
        layer_types=tuple(
            hf.get('layer_types') or [SLIDING if i % 2 == 0 else FULL for i in range(n)]
        ),
    )
  return ModelConfig(**common)


def _first(x):
  return x[0] if isinstance(x, (list, tuple)) else x


def _activation_from_hf(hf: dict, where: str) -> str:
  # Gemma 2 reads `hidden_activation`; 'gelu' is the exact erf GELU in transformers.
  name = hf.get('hidden_activation') or hf.get('hidden_act') or 'silu'
  acts = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_new': 'gelu_tanh', 'gelu': 'gelu'}
  if name not in acts:
    raise CheckpointError(f'{where}: unsupported activation {name!r}; supported: {", ".join(acts)}')
  return acts[name]


def config_to_hf(cfg: ModelConfig) -> dict:
  import transformers  # heavy; only needed for export

  # Our fields under transformers' names: tables, packed (# fmt: off) to read as such.
  # fmt: off
  ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
             pad_token_id=cfg.pad_token_id)
  if cfg.family == 'gpt2':
    kw = dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers,
              n_head=cfg.n_heads, n_inner=cfg.d_ff, n_positions=cfg.max_positions,
              layer_norm_epsilon=cfg.norm_eps,
              activation_function='gelu_new' if cfg.activation == 'gelu_tanh' else 'gelu', **ids)
  else:
    rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
    if cfg.rope_scaling:
      rope.update(dict(cfg.rope_scaling))
    act = {'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh', 'gelu': 'gelu'}[cfg.activation]
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
              max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
              rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings, hidden_act=act, **ids)
    if cfg.family == 'gemma2':
      kw.update(hidden_activation=act, attn_logit_softcapping=cfg.attn_softcap,
                final_logit_softcapping=cfg.final_softcap,
                query_pre_attn_scalar=round(cfg.query_scale ** -2),
                sliding_window=cfg.sliding_window, layer_types=list(cfg.layer_types))
    if cfg.family == 'qwen2' and cfg.sliding_window:
      kw.update(use_sliding_window=True, sliding_window=cfg.sliding_window,
                layer_types=list(cfg.layer_types or [SLIDING] * cfg.n_layers))
    if cfg.family == 'mistral':
      kw.update(sliding_window=cfg.sliding_window)
  # fmt: on
  hf = transformers.AutoConfig.for_model(cfg.family, **kw).to_dict()
  hf['torch_dtype'] = hf['dtype'] = cfg.param_dtype
  return hf


# ---- parameter name maps -----------------------------------------------------------------


def _hf_layer_names(cfg: ModelConfig, i: int) -> dict[tuple, str]:
  p = f'model.layers.{i}.'
  names = {
      ('attn_norm', 'scale'): p + 'input_layernorm.weight',
      ('attn', 'q'): p + 'self_attn.q_proj.weight',
      ('attn', 'k'): p + 'self_attn.k_proj.weight',
      ('attn', 'v'): p + 'self_attn.v_proj.weight',
      ('attn', 'o'): p + 'self_attn.o_proj.weight',
      ('mlp', 'gate'): p + 'mlp.gate_proj.weight',
      ('mlp', 'up'): p + 'mlp.up_proj.weight',
      ('mlp', 'down'): p + 'mlp.down_proj.weight',
  }
  if cfg.post_norms:  # Gemma 2: four norms, named differently from Llama's two.
    names.update(
        {
            ('attn_post_norm', 'scale'): p + 'post_attention_layernorm.weight',
            ('mlp_norm', 'scale'): p + 'pre_feedforward_layernorm.weight',
            ('mlp_post_norm', 'scale'): p + 'post_feedforward_layernorm.weight',
        }
    )
  else:
    names[('mlp_norm', 'scale')] = p + 'post_attention_layernorm.weight'
  if cfg.qkv_bias:
    for x in 'qkv':
      names[('attn', f'{x}_bias')] = p + f'self_attn.{x}_proj.bias'
  return names


def to_hf_tensors(cfg: ModelConfig, params: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
  """Our flat params {path: array} -> HF tensor dict (PyTorch [out, in] layout)."""
  d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
  out = {}
  if cfg.family == 'gpt2':
    out['transformer.wte.weight'] = params[('embed',)]
    out['transformer.wpe.weight'] = params[('pos_embed',)]
    for i in range(cfg.n_layers):
      g = lambda *p: params[('layers', i) + p]
      p = f'transformer.h.{i}.'
      out[p + 'ln_1.weight'], out[p + 'ln_1.bias'] = g('attn_norm', 'scale'), g('attn_norm', 'bias')
      out[p + 'ln_2.weight'], out[p + 'ln_2.bias'] = g('mlp_norm', 'scale'), g('mlp_norm', 'bias')
      out[p + 'attn.c_attn.weight'] = np.concatenate(
          [g('attn', x).reshape(d, -1) for x in 'qkv'], 1
      )
      out[p + 'attn.c_attn.bias'] = np.concatenate(
          [g('attn', f'{x}_bias').reshape(-1) for x in 'qkv']
      )
      out[p + 'attn.c_proj.weight'] = g('attn', 'o').reshape(n * h, d)
      out[p + 'attn.c_proj.bias'] = g('attn', 'o_bias')
      out[p + 'mlp.c_fc.weight'], out[p + 'mlp.c_fc.bias'] = g('mlp', 'up'), g('mlp', 'up_bias')
      out[p + 'mlp.c_proj.weight'], out[p + 'mlp.c_proj.bias'] = g('mlp', 'down'), g(
          'mlp', 'down_bias'
      )
    out['transformer.ln_f.weight'] = params[('final_norm', 'scale')]
    out['transformer.ln_f.bias'] = params[('final_norm', 'bias')]
    return out
  out['model.embed_tokens.weight'] = params[('embed',)]
  out['model.norm.weight'] = params[('final_norm', 'scale')]
  if not cfg.tie_embeddings:
    out['lm_head.weight'] = params[('lm_head',)].T
  for i in range(cfg.n_layers):
    for sub, name in _hf_layer_names(cfg, i).items():
      x = params[('layers', i) + sub]
      if sub in (('attn', 'q'), ('attn', 'k'), ('attn', 'v')):
        x = x.reshape(d, -1).T
      elif sub == ('attn', 'o'):
        x = x.reshape(n * h, d).T
      elif sub[0] == 'mlp':
        x = x.T
      elif sub[1].endswith('_bias'):
        x = x.reshape(-1)
      out[name] = x
  return out


def from_hf_getters(
    cfg: ModelConfig, get: Callable[[str], np.ndarray]
) -> dict[tuple, Callable[[], np.ndarray]]:
  """{our path: thunk reading and converting that one parameter} for lazy, per-tensor loading."""
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  out: dict[tuple, Callable[[], np.ndarray]] = {}
  if cfg.family == 'gpt2':
    pre = 'transformer.' if _has(get, 'transformer.wte.weight') else ''
    out[('embed',)] = lambda: get(pre + 'wte.weight')
    out[('pos_embed',)] = lambda: get(pre + 'wpe.weight')
    out[('final_norm', 'scale')] = lambda: get(pre + 'ln_f.weight')
    out[('final_norm', 'bias')] = lambda: get(pre + 'ln_f.bias')
    for i in range(cfg.n_layers):
      p, L = f'{pre}h.{i}.', ('layers', i)
      for ours, theirs in (('attn_norm', 'ln_1'), ('mlp_norm', 'ln_2')):
        out[L + (ours, 'scale')] = lambda p=p, t=theirs: get(p + t + '.weight')
        out[L + (ours, 'bias')] = lambda p=p, t=theirs: get(p + t + '.bias')
      for j, x in enumerate('qkv'):
        out[L + ('attn', x)] = lambda p=p, j=j: get(p + 'attn.c_attn.weight')[
            :, j * d : (j + 1) * d
        ].reshape(d, n, h)
        out[L + ('attn', f'{x}_bias')] = lambda p=p, j=j: get(p + 'attn.c_attn.bias')[
            j * d : (j + 1) * d
        ].reshape(n, h)
      out[L + ('attn', 'o')] = lambda p=p: get(p + 'attn.c_proj.weight').reshape(n, h, d)
      out[L + ('attn', 'o_bias')] = lambda p=p: get(p + 'attn.c_proj.bias')
      out[L + ('mlp', 'up')] = lambda p=p: get(p + 'mlp.c_fc.weight')
      out[L + ('mlp', 'up_bias')] = lambda p=p: get(p + 'mlp.c_fc.bias')
      out[L + ('mlp', 'down')] = lambda p=p: get(p + 'mlp.c_proj.weight')
      out[L + ('mlp', 'down_bias')] = lambda p=p: get(p + 'mlp.c_proj.bias')
    return out
  out[('embed',)] = lambda: get('model.embed_tokens.weight')
  out[('final_norm', 'scale')] = lambda: get('model.norm.weight')
  if not cfg.tie_embeddings:
    out[('lm_head',)] = lambda: get('lm_head.weight').T
  for i in range(cfg.n_layers):
    for sub, name in _hf_layer_names(cfg, i).items():
      if sub in (('attn', 'q'), ('attn', 'k'), ('attn', 'v')):
        heads = n if sub[1] == 'q' else k
        fn = lambda name=name, heads=heads: get(name).T.reshape(d, heads, h)
      elif sub == ('attn', 'o'):
        fn = lambda name=name: get(name).T.reshape(n, h, d)
      elif sub[0] == 'mlp':
        fn = lambda name=name: get(name).T
      elif sub[1].endswith('_bias'):
        heads = n if sub[1] == 'q_bias' else k
        fn = lambda name=name, heads=heads: get(name).reshape(heads, h)
      else:
        fn = lambda name=name: get(name)
      out[('layers', i) + sub] = fn
  return out


def _has(get, name) -> bool:
  try:
    get(name)
    return True
  except KeyError:
    return False
