"""Import and export in cai_jax/models/checkpoint.py and cai_jax/models/gguf_import.py, against
transformers.

Exports must load in `transformers.AutoModelForCausalLM` with the same logits and read back
into identical parameters; the real SmolLM2 GGUF must match transformers' own GGUF loader; bad
inputs must fail with a one-line `CheckpointError` that names the problem.
"""

import functools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.models import checkpoint, hf_format
from cai_jax.models.checkpoint import CheckpointError
from cai_jax.models.decoder import FULL, SLIDING
from cai_jax.utils import sharding
from helpers import (
    HF_CASES,
    hf_logits,
    hf_reference,
    max_abs_diff,
    our_logits,
    padded_batch,
    randomize,
)

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

ATOL = 1e-4
T = 12


def _hf_load(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation='eager', dtype=torch.float32
  ).eval()


def _assert_same_logits(ours_model, hf_model, atol=ATOL):
  tokens, _, _ = padded_batch([T, T], T, left=False, seed=1)
  diff = max_abs_diff(our_logits(ours_model, tokens), hf_logits(hf_model, tokens))
  assert diff <= atol, f'unpadded: max |logits - transformers| = {diff}'
  tokens, mask, positions = padded_batch([T, 5], T, left=True, seed=2)
  diff = max_abs_diff(
      our_logits(ours_model, tokens, mask, positions),
      hf_logits(hf_model, tokens, mask, positions),
      mask,
  )
  assert diff <= atol, f'left-padded: max |logits - transformers| = {diff}'


def _assert_same_params(a, b):
  pa, pb = checkpoint.flat_params(a), checkpoint.flat_params(b)
  assert pa.keys() == pb.keys()
  for k in pa:
    assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


def _one_line_error(match, fn, *args, **kw):
  with pytest.raises(CheckpointError, match=match) as err:
    fn(*args, **kw)
  assert '\n' not in str(err.value), str(err.value)
  return str(err.value)


# ---- export: ours -> HF directory -> transformers, and back ---------------------------------


EXPORTS = [
    ('tiny', {}),
    ('tiny-gemma2', {}),
    ('tiny-gpt2', {}),
    ('tiny-qwen2', {}),
    ('tiny', dict(activation='gelu', tie_embeddings=False)),
    ('tiny-gpt2', dict(activation='gelu')),
    ('tiny-qwen2', dict(sliding_window=4, layer_types=(FULL, SLIDING))),
]


@pytest.mark.parametrize(
    'preset,overrides', EXPORTS, ids=[p + ''.join(f'-{k}' for k in o) for p, o in EXPORTS]
)
def test_export_loads_in_transformers_and_reads_back(tmp_path, preset, overrides):
  pre = checkpoint.load_pretrained(f'random:{preset}', seed=3, model_overrides=overrides)
  randomize(pre.model, pre.config, seed=3)  # biases and norm scales away from 0 and 1
  checkpoint.save_pretrained(pre, tmp_path)
  assert json.loads((tmp_path / 'config.json').read_text())['model_type'] == pre.config.family

  _assert_same_logits(pre.model, _hf_load(tmp_path))

  back = checkpoint.load_pretrained(tmp_path)
  assert back.config == pre.config
  _assert_same_params(back.model, pre.model)
  assert len(back.tokenizer) == len(pre.tokenizer)


@pytest.mark.parametrize('case', list(HF_CASES))
def test_reexport_of_transformers_model(tmp_path, case):
  """transformers -> ours -> our export -> transformers: the same model as the original."""
  hf = hf_reference(case, tmp_path / 'hf')
  ours = checkpoint.load_pretrained(tmp_path / 'hf')
  checkpoint.save_pretrained(ours, tmp_path / 'export')
  again = _hf_load(tmp_path / 'export')
  tokens, mask, positions = padded_batch([T, 5], T, left=True, seed=2)
  diff = max_abs_diff(
      hf_logits(hf, tokens, mask, positions), hf_logits(again, tokens, mask, positions), mask
  )
  assert diff <= ATOL, f'max |logits - original logits| = {diff}'
  assert checkpoint.load_pretrained(tmp_path / 'export').config == ours.config


def test_sharded_export(tmp_path):
  pre = checkpoint.load_pretrained('random:tiny')
  checkpoint.save_pretrained(pre, tmp_path, max_shard_bytes=100_000)
  index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
  assert len(set(index['weight_map'].values())) > 1
  assert not (tmp_path / 'model.safetensors').exists()
  _assert_same_params(checkpoint.load_pretrained(tmp_path).model, pre.model)
  _assert_same_logits(pre.model, _hf_load(tmp_path))


def test_scalar_head_export_keeps_the_head(tmp_path):
  pre = checkpoint.load_pretrained('random:tiny', scalar_head=True, seed=1)
  randomize(pre.model, pre.config, seed=1)
  checkpoint.save_pretrained(pre, tmp_path)
  assert (tmp_path / checkpoint.SCORE_HEAD_FILE).exists()

  back = checkpoint.load_pretrained(tmp_path, scalar_head=True)
  _assert_same_params(back.model, pre.model)  # trunk, head and head_bias
  mesh = sharding.make_mesh((1, 1, -1))
  placed = checkpoint.load_pretrained(tmp_path, scalar_head=True, mesh=mesh)
  _assert_same_params(placed.model, pre.model)
  assert placed.model.head.get_value().sharding.mesh.shape == mesh.shape
  tokens, mask, positions = padded_batch([T, 5], T, left=True, seed=2)
  args = jnp.asarray(tokens), jnp.full((2,), T - 1), jnp.asarray(positions), jnp.asarray(mask)
  np.testing.assert_array_equal(np.asarray(back.model(*args)), np.asarray(pre.model(*args)))
  assert float(jnp.abs(pre.model.head_bias[...])) > 0  # the bias was really carried over

  # The trunk alone is an ordinary causal LM; a fresh head when the file is absent.
  _assert_same_params(checkpoint.load_pretrained(tmp_path).model, pre.model.trunk)
  os.remove(tmp_path / checkpoint.SCORE_HEAD_FILE)
  fresh = checkpoint.load_pretrained(tmp_path, scalar_head=True)
  _assert_same_params(fresh.model.trunk, pre.model.trunk)
  assert float(fresh.model.head_bias[...]) == 0.0


def test_bfloat16_load_is_close_to_float32(tmp_path):
  hf = hf_reference('gemma2', tmp_path)
  f32 = checkpoint.load_pretrained(tmp_path)
  bf16 = checkpoint.load_pretrained(tmp_path, dtype='bfloat16')
  assert bf16.config.dtype == bf16.config.param_dtype == 'bfloat16'
  dtypes = {v.dtype for v in checkpoint.flat_params(bf16.model).values()}
  assert dtypes == {np.dtype(jnp.bfloat16)}
  tokens, mask, positions = padded_batch([T, 5], T, left=True, seed=2)
  low = our_logits(bf16.model, tokens, mask, positions)
  high = our_logits(f32.model, tokens, mask, positions)
  assert low.dtype == np.float32 and np.isfinite(low).all()
  scale = np.abs(hf_logits(hf, tokens, mask, positions)[mask]).max()
  assert max_abs_diff(low, high, mask) <= 0.05 * scale
  # Same next-token choice almost everywhere.
  assert (low.argmax(-1) == high.argmax(-1))[mask].mean() >= 0.9


# ---- the real SmolLM2 GGUF against transformers' GGUF loader ---------------------------------


def test_smollm2_gguf_matches_transformers(smollm2, monkeypatch):
  gguf = pytest.importorskip('gguf')
  # Speed only: transformers parses the file twice (config, then tensors) and rebuilds gguf's
  # pure tensor-name map once per tensor, ~20 s in all; read-only results can be shared.
  monkeypatch.setattr(gguf, 'GGUFReader', functools.lru_cache(gguf.GGUFReader))
  monkeypatch.setattr(gguf, 'get_tensor_name_map', functools.lru_cache(gguf.get_tensor_name_map))
  path = checkpoint.smollm2_path()
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path),
      gguf_file=os.path.basename(path),
      attn_implementation='eager',
      dtype=torch.float32,
  ).eval()

  prompts = [
      'Hi',
      'The capital of France is',
      'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n    if n < 2:\n'
      '        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\nprint(',
  ]
  rows = [smollm2.tokenizer(p)['input_ids'] for p in prompts]
  lengths = [len(r) for r in rows]
  assert len(set(lengths)) == len(rows) and max(lengths) > 32
  # Ours in one right-padded batch; theirs one prompt at a time, unpadded.
  tokens = np.full((len(rows), max(lengths)), smollm2.config.pad_token_id or 0, np.int32)
  mask = np.zeros(tokens.shape, bool)
  for b, r in enumerate(rows):
    tokens[b, : len(r)], mask[b, : len(r)] = r, True
  ours = our_logits(smollm2.model, tokens, mask)
  diffs = []
  for b, r in enumerate(rows):
    theirs = hf_logits(hf, [r])[0]
    diffs.append(max_abs_diff(ours[b, : len(r)], theirs))
    assert diffs[-1] <= 1e-3, prompts[b]
    assert (ours[b, : len(r)].argmax(-1) == theirs.argmax(-1)).all()
  print(
      'SmolLM2 GGUF logits vs transformers, max abs diff per prompt:', [f'{d:.1e}' for d in diffs]
  )


# ---- bad input: one line, naming the problem ---------------------------------------------------


def test_missing_path(tmp_path):
  _one_line_error('does not exist', checkpoint.load_pretrained, str(tmp_path / 'nowhere'))
  _one_line_error("unknown random preset 'huge'", checkpoint.load_pretrained, 'random:huge')


def test_directory_without_config(tmp_path):
  _one_line_error('no config.json', checkpoint.load_pretrained, tmp_path)


def test_unsupported_model_type(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'bert', 'vocab_size': 320}))
  msg = _one_line_error("unsupported model_type 'bert'", checkpoint.load_pretrained, tmp_path)
  for family in hf_format.HF_MODEL_TYPES:
    assert family in msg


def test_unsupported_variants(tmp_path):
  hf_reference('llama', tmp_path, attention_bias=True)
  _one_line_error(
      'llama with attention_bias is not supported', checkpoint.load_pretrained, tmp_path
  )
  config = json.loads((tmp_path / 'config.json').read_text())
  config.update(attention_bias=False, hidden_act='relu')
  (tmp_path / 'config.json').write_text(json.dumps(config))
  _one_line_error("unsupported activation 'relu'", checkpoint.load_pretrained, tmp_path)


def test_smollm2_gguf_tokenizer_matches_transformers(smollm2):
  """Our GGUF tokenizer (built without torch) encodes, decodes and templates like transformers',
  except where whitespace precedes a digit (there it follows SmolLM2's own pre-tokenizer)."""
  path = checkpoint.smollm2_path()
  ref = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path)
  )
  ours = smollm2.tokenizer
  texts = [
      'Hello, world!',
      '  leading spaces and\ttabs\n\nnewlines',
      'In 2023 there were 12345 cases',
      '<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n',
      "It's we'll they've",
      'Ünïcödé — “quotes” 日本語 🙂',
      '\n\nHuman: How do I pick a lock?\n\nAssistant:',
  ]
  for text in texts:
    assert ours.encode(text) == ref.encode(text), text
    assert ours.decode(ours.encode(text)) == text
  assert ours.convert_ids_to_tokens(ours.encode('1234')) == [
      '1',
      '2',
      '3',
      '4',
  ]  # 'smollm' splits digits
  # Digits are split off before the byte-level split (SmolLM2's tokenizer.json, llama.cpp);
  # transformers' GGUF loader drops that step, which shows where whitespace precedes a digit.
  assert ours.convert_ids_to_tokens(ours.encode(':\n\n1.')) == [':', 'ĊĊ', '1', '.']
  assert ref.convert_ids_to_tokens(ref.encode(':\n\n1.')) == [':', 'Ċ', 'Ċ', '1', '.']
  assert (ours.bos_token, ours.eos_token, ours.pad_token) == (
      ref.bos_token,
      ref.eos_token,
      ref.pad_token,
  )
  chat = [{'role': 'user', 'content': 'hi'}]
  assert ours.apply_chat_template(
      chat, tokenize=False, add_generation_prompt=True
  ) == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_gguf_with_unsupported_quantization(tmp_path):
  gguf = pytest.importorskip('gguf')
  qtype = gguf.GGMLQuantizationType.Q8_1  # llama.cpp-internal; gguf cannot dequantize it
  assert qtype not in gguf.quants._type_traits
  block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
  path = str(tmp_path / 'q8_1.gguf')
  writer = gguf.GGUFWriter(path, 'llama')
  writer.add_vocab_size(320)
  writer.add_context_length(256)
  writer.add_embedding_length(64)
  writer.add_block_count(1)
  writer.add_feed_forward_length(128)
  writer.add_head_count(8)
  writer.add_tensor('output_norm.weight', np.ones(64, np.float32))
  writer.add_tensor(
      'token_embd.weight', np.zeros((320, 64 // block * nbytes), np.uint8), raw_dtype=qtype
  )
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  _one_line_error(
      'tensor token_embd.weight uses GGUF quantization type Q8_1', checkpoint.load_pretrained, path
  )

  garbage = tmp_path / 'garbage.gguf'
  garbage.write_bytes(b'GGUF' + b'\xff' * 60)
  _one_line_error('not a readable GGUF file', checkpoint.load_pretrained, str(garbage))


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  path = tmp_path_factory.mktemp('exported')
  checkpoint.save_pretrained(checkpoint.load_pretrained('random:tiny'), path)
  return path


def _copy_dir(src, dst):
  dst.mkdir()
  for f in src.iterdir():
    (dst / f.name).write_bytes(f.read_bytes())
  return dst


def test_truncated_or_corrupt_safetensors(tmp_path, exported):
  d = _copy_dir(exported, tmp_path / 'truncated')
  st = d / 'model.safetensors'
  st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
  _one_line_error('truncated safetensors file', checkpoint.load_pretrained, d)

  st.write_bytes(b'\x01\x00')
  _one_line_error(r'truncated safetensors file \(no header\)', checkpoint.load_pretrained, d)

  garbage = b'{"not json' + b' ' * 6
  st.write_bytes(len(garbage).to_bytes(8, 'little') + garbage)
  _one_line_error('corrupt safetensors header', checkpoint.load_pretrained, d)

  st.write_bytes((10**12).to_bytes(8, 'little') + b'{}')
  _one_line_error(r'corrupt safetensors header \(claims', checkpoint.load_pretrained, d)


def test_missing_or_misshapen_tensor(tmp_path, exported):
  d = _copy_dir(exported, tmp_path / 'missing')
  tensors = hf_format.SafetensorsFile(d / 'model.safetensors')
  arrays = {k: np.array(tensors.get(k)) for k in tensors.keys()}
  del tensors
  name = 'model.layers.1.mlp.up_proj.weight'
  hf_format.write_safetensors(
      d / 'model.safetensors', {k: v for k, v in arrays.items() if k != name}
  )
  _one_line_error(f'missing tensor {name}', checkpoint.load_pretrained, d)

  arrays[name] = arrays[name][:, :-1]
  hf_format.write_safetensors(d / 'model.safetensors', arrays)
  _one_line_error(
      r'layers\.1\.mlp\.up has shape \(63, 128\), expected \(64, 128\)',
      checkpoint.load_pretrained,
      d,
  )


def test_tokenizer_larger_than_model_vocabulary(tmp_path):
  hf_reference('llama', tmp_path, vocab_size=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  n = len(checkpoint.byte_tokenizer())
  _one_line_error(
      f'tokenizer has {n} tokens but the model vocabulary has 256 rows',
      checkpoint.load_pretrained,
      tmp_path,
  )
  _one_line_error(
      'model vocabulary has 200 rows',
      checkpoint.load_pretrained,
      'random:tiny',
      model_overrides={'vocab_size': 200},
  )
