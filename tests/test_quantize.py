"""int8 frozen models (cai_jax/models/quantize.py): per-channel weight-only int8 whose scales
factor out of each matmul, loaded from float checkpoints, exported back to float, chosen for
frozen models (and a LoRA run's base) by `model.frozen_quantization`."""

import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cai_jax import bookkeeping
from cai_jax.models import checkpoint, quantize
from cai_jax.models.checkpoint import flat_params
from configs import tiny as tiny_config
from helpers_stages import tiny_main_cmd

REPO = Path(__file__).resolve().parents[1]


def _tokens(vocab, b=2, t=11, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def _saved(tmp_path, family):
  base = checkpoint.load_pretrained(f'random:tiny-{family}')
  out = str(tmp_path / f'base-{family}')
  checkpoint.save_pretrained(base, out)
  return out, base


def test_int8_keeps_every_weight_within_half_a_step_of_its_channel_scale():
  w = np.random.default_rng(0).normal(0, 0.02, (16, 3, 8)).astype(np.float32)
  w[:, 1, 2] = 0.0  # an all-zero channel keeps scale 1 and exact zeros
  q, s = quantize.int8(w, 'q')  # q [D, N, H]: one scale per (N, H) output channel
  assert q.dtype == np.int8 and s.shape == (3, 8) and s.dtype == np.float32
  assert np.abs(q).max() == 127 and s[1, 2] == 1.0 and not q[:, 1, 2].any()
  assert np.all(np.abs(q * s - w) <= s / 2 + 1e-9)
  e = np.random.default_rng(1).normal(0, 1, (10, 4)).astype(np.float32)
  qe, se = quantize.int8(e, 'embed')  # the embedding [V, D]: one scale per row
  assert se.shape == (10,) and np.all(np.abs(qe * se[:, None] - e) <= se[:, None] / 2 + 1e-7)
  np.testing.assert_array_equal(np.asarray(quantize.int8(jnp.asarray(w), 'q')[0]), q)


@pytest.mark.parametrize('family', ['llama', 'gemma2', 'qwen2', 'gpt2'])
def test_an_int8_model_computes_exactly_what_its_dequantized_weights_do(tmp_path, family):
  """Scales applied after each matmul (x Q) s give the logits of the float model whose weights
  are Q s (float32, to rounding), both loaded from the same checkpoint; the export writes those
  weights back as floats, so it reloads as that model."""
  source, base = _saved(tmp_path, family)
  int8 = checkpoint.load_pretrained(source, model_overrides={'quantization': 'int8'})
  params = nnx.state(int8.model, nnx.Param)
  dtypes = {str(k[-1]): v.dtype for k, v in flat_params(int8.model).items()}
  assert dtypes['embed'] == np.int8 and dtypes['embed_scale'] == np.float32
  assert quantize.is_quantized(int8.model) and len(jax.tree.leaves(params)) > 0
  export = tmp_path / 'export'
  checkpoint.save_pretrained(int8, str(export))
  assert 'quantization' not in json.loads((export / 'config.json').read_text())
  dequantized = checkpoint.load_pretrained(str(export))
  assert not quantize.is_quantized(dequantized.model)
  tokens = _tokens(base.config.vocab_size)
  want = np.asarray(dequantized.model(tokens)[0])
  got = np.asarray(int8.model(tokens)[0])
  assert float(np.max(np.abs(got - want))) < 2e-6
  error = float(np.max(np.abs(got - np.asarray(base.model(tokens)[0]))))
  assert 1e-4 < error < 0.05  # it is quantized, and only by int8's rounding


def test_frozen_quantization_reaches_frozen_models_and_a_lora_base_only(tmp_path):
  source, _ = _saved(tmp_path, 'llama')
  config = tiny_config.get_config()
  config.model.source = source
  config.model.frozen_quantization = 'int8'
  ctx = bookkeeping.Context(config, tmp_path / 'work')
  assert quantize.is_quantized(ctx.load(source, frozen=True).model)
  trained = ctx.load(source, cache=False).model
  assert not quantize.is_quantized(trained)  # full fine-tuning trains float32 weights
  config.model.lora.rank = 4
  ctx = bookkeeping.Context(config, tmp_path / 'work')
  adapted = ctx.load(source, cache=False).model
  assert quantize.is_quantized(adapted)  # the frozen base under the adapters
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(adapted, nnx.LoRAParam)))


def test_a_bad_frozen_quantization_is_one_line_before_the_workdir_is_touched(tmp_path):
  workdir = tmp_path / 'w'
  cmd = tiny_main_cmd(workdir, '--config.model.frozen_quantization=int4')
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and not workdir.exists()
  assert "model.frozen_quantization='int4' is not a scheme we run; valid: '' (off), int8" in (
      proc.stderr + proc.stdout
  )
