"""GGUF (llama.cpp) import: dequantize with the `gguf` package and map tensors to ours.

llama.cpp's converter permutes the Q and K projections of Llama-architecture models for its
RoPE layout (interleaved pairs); we undo that so the weights match transformers' rotate-half.
"""

from __future__ import annotations

import numpy as np

from cai_jax.models.decoder import ModelConfig
from cai_jax.models.hf_format import CheckpointError, from_hf_getters

SUPPORTED_ARCHS = ('llama', 'qwen2')


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  # Inverse of llama.cpp's `w.reshape(n, 2, r // n // 2, c).swapaxes(1, 2).reshape(r, c)`.
  rows = w.shape[0]
  return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read(path: str):
  """(ModelConfig, {our path: thunk}, tokenizer) for a GGUF file."""
  import gguf
  from gguf import quants

  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:  # noqa: BLE001 - the reader raises bare ValueErrors/struct errors
    raise CheckpointError(
        f'{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:120]})'
    ) from None

  def field(name, default=None):
    f = reader.fields.get(name)
    return default if f is None else f.contents()

  arch = field('general.architecture')
  if arch not in SUPPORTED_ARCHS:
    raise CheckpointError(
        f'{path}: unsupported GGUF architecture {arch!r}; supported: {", ".join(SUPPORTED_ARCHS)}'
    )
  tensors = {t.name: t for t in reader.tensors}
  if 'rope_freqs.weight' in tensors:
    raise CheckpointError(
        f'{path}: GGUF with llama3-style RoPE scaling (rope_freqs) is not supported; '
        'load the HF checkpoint directory instead'
    )
  vocab = field(f'{arch}.vocab_size') or len(field('tokenizer.ggml.tokens'))
  d = field(f'{arch}.embedding_length')
  n = field(f'{arch}.attention.head_count')
  cfg = ModelConfig(
      family='llama' if arch == 'llama' else 'qwen2',
      vocab_size=int(vocab),
      d_model=int(d),
      n_layers=int(field(f'{arch}.block_count')),
      n_heads=int(n),
      n_kv_heads=int(field(f'{arch}.attention.head_count_kv', n)),
      head_dim=int(field(f'{arch}.rope.dimension_count', d // n)),
      d_ff=int(field(f'{arch}.feed_forward_length')),
      max_positions=int(field(f'{arch}.context_length', 8192)),
      norm_eps=float(field(f'{arch}.attention.layer_norm_rms_epsilon', 1e-5)),
      rope_theta=float(field(f'{arch}.rope.freq_base', 10000.0)),
      qkv_bias=arch == 'qwen2',
      tie_embeddings='output.weight' not in tensors,
      bos_token_id=field('tokenizer.ggml.bos_token_id'),
      eos_token_id=field('tokenizer.ggml.eos_token_id'),
      pad_token_id=field('tokenizer.ggml.padding_token_id'),
  )
  # Refuse unsupported quantizations up front, naming them, rather than mid-load.
  for t in reader.tensors:
    qt = t.tensor_type
    if (
        qt not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
        and qt not in quants._type_traits
    ):
      raise CheckpointError(
          f'{path}: tensor {t.name} uses GGUF quantization type {qt.name}, which the gguf '
          'package cannot dequantize'
      )

  names = {
      'model.embed_tokens.weight': 'token_embd.weight',
      'model.norm.weight': 'output_norm.weight',
      'lm_head.weight': 'output.weight',
  }
  per_layer = {
      'input_layernorm.weight': 'attn_norm.weight',
      'post_attention_layernorm.weight': 'ffn_norm.weight',
      'self_attn.q_proj': 'attn_q',
      'self_attn.k_proj': 'attn_k',
      'self_attn.v_proj': 'attn_v',
      'self_attn.o_proj.weight': 'attn_output.weight',
      'mlp.gate_proj.weight': 'ffn_gate.weight',
      'mlp.up_proj.weight': 'ffn_up.weight',
      'mlp.down_proj.weight': 'ffn_down.weight',
  }

  def get(hf_name: str) -> np.ndarray:
    if hf_name in names:
      gname = names[hf_name]
    else:
      _, _, i, rest = hf_name.split('.', 3)
      base = rest.rsplit('.', 1)[0] if rest.endswith(('.weight', '.bias')) else rest
      suffix = rest[len(base) :]
      gname = f'blk.{i}.' + (per_layer[base] + suffix if base in per_layer else per_layer[rest])
    if gname not in tensors:
      raise KeyError(gname)
    t = tensors[gname]
    shape = tuple(int(s) for s in reversed(t.shape))
    x = quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    if arch == 'llama' and gname.endswith(('attn_q.weight', 'attn_k.weight')):
      x = _unpermute(x, cfg.n_heads if 'attn_q' in gname else cfg.n_kv_heads)
    return x

  try:
    tok = bpe_tokenizer(field)
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(
        f'{path}: cannot build the tokenizer from GGUF metadata ({type(e).__name__}: '
        f'{str(e)[:200]})'
    ) from None
  return cfg, from_hf_getters(cfg, get), tok


def bpe_tokenizer(field):
  """A fast tokenizer from GGUF tokenizer metadata ('gpt2' byte-level BPE), built with the
  `tokenizers` library alone: transformers' own GGUF path imports torch, which the main install
  does not have. `field(name)` reads a metadata field.

  The 'smollm' pre-tokenizer splits off every digit before the byte-level split, as llama.cpp
  and SmolLM2's own tokenizer.json (Digits, then ByteLevel) do. transformers' GGUF loader keeps
  only the byte-level split, so it differs where whitespace precedes a digit ('\n\n1': ours
  'ĊĊ', '1'; theirs 'Ċ', 'Ċ', '1').
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  kind = field('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise CheckpointError(
        f'GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, '
        "'gpt2'); load the HF checkpoint directory instead"
    )
  tokens = list(field('tokenizer.ggml.tokens'))
  types = list(field('tokenizer.ggml.token_type') or [1] * len(tokens))
  merges = [tuple(m.split(' ', 1)) for m in field('tokenizer.ggml.merges')]
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
  pre = [
      pre_tokenizers.ByteLevel(
          add_prefix_space=bool(field('tokenizer.ggml.add_space_prefix', False)), use_regex=True
      )
  ]
  if field('tokenizer.ggml.pre') == 'smollm':
    pre.insert(0, pre_tokenizers.Digits(individual_digits=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  _CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
  tok.add_special_tokens(
      [
          AddedToken(t, special=True, normalized=False)
          for t, ty in zip(tokens, types)
          if ty in (_CONTROL, _USER_DEFINED)
      ]
  )

  def token(key):
    i = field(key)
    return None if i is None else tokens[int(i)]

  return PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token=token('tokenizer.ggml.bos_token_id'),
      eos_token=token('tokenizer.ggml.eos_token_id'),
      unk_token=token('tokenizer.ggml.unknown_token_id'),
      pad_token=token('tokenizer.ggml.padding_token_id'),
      chat_template=field('tokenizer.chat_template'),
  )
