"""Shared test helpers: tiny random transformers models as ground truth, and batches with padding.

Nothing here downloads: every reference model is built from a config, given large random
weights (so a wrong mapping or a missing term shows in the logits), and saved as safetensors
next to our byte tokenizer, which is what `checkpoint.load_pretrained` reads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax.models import checkpoint

VOCAB = 320  # the byte tokenizer has 259 tokens; the tiny models have 320 rows
PAD = 256  # the byte tokenizer's <|endoftext|>

# One tiny shape for every family: d_model 64, 8 query heads over 4 KV heads of width 8.
_ROPE_FAMILY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=8,
    max_position_embeddings=256,
    bos_token_id=257,
    eos_token_id=258,
    pad_token_id=PAD,
)

HF_CASES = {
    'llama': ('llama', dict(rms_norm_eps=1e-5, tie_word_embeddings=True)),
    'llama-untied': ('llama', dict(rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # Low and high frequency factors chosen so head_dim 8's four frequencies hit every branch
    # of the Llama-3 rule (wavelengths 6.3 < 16, 16 < 62.8 < 64, 628 and 6283 > 64).
    'llama3-rope': (
        'llama',
        dict(
            rope_parameters=dict(
                rope_type='llama3',
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            )
        ),
    ),
    'mistral': (
        'mistral',
        dict(sliding_window=4, rope_parameters=dict(rope_type='default', rope_theta=1e6)),
    ),
    'qwen2': ('qwen2', dict(tie_word_embeddings=False)),
    # Layer 0 global, layer 1 sliding (Qwen2's max_window_layers rule).
    'qwen2-sliding': (
        'qwen2',
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    # Small caps so soft-capping is far from the identity; query scale 16**-0.5, not 8**-0.5;
    # layers alternate sliding (window 4) and global.
    'gemma2': (
        'gemma2',
        dict(
            num_hidden_layers=3,
            query_pre_attn_scalar=16,
            sliding_window=4,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0,
            hidden_activation='gelu_pytorch_tanh',
        ),
    ),
    'gpt2': (
        'gpt2',
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=8,
            n_positions=256,
            activation_function='gelu_new',
            bos_token_id=257,
            eos_token_id=258,
        ),
    ),
}


def hf_reference(case: str, out_dir, *, std: float = 0.2, seed: int = 0, **overrides):
  """A tiny random transformers model for `case` (a key of HF_CASES), saved to `out_dir`.

  Every weight is redrawn from N(0, std) (norm scales around 1, Gemma's around 0) so that
  biases, norms and scalings all matter. Returns the eval-mode torch model (float32, eager
  attention) whose logits are the ground truth.
  """
  import torch
  import transformers

  model_type, kw = HF_CASES[case]
  kw = {**(_ROPE_FAMILY if model_type != 'gpt2' else {}), **kw, **overrides}
  config = transformers.AutoConfig.for_model(model_type, **kw)
  config._attn_implementation = 'eager'  # exact softmax, the same maths as ours
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation='eager', dtype=torch.float32
  )
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, std)
      is_norm = 'norm' in name or '.ln_' in name
      if p.ndim == 1 and is_norm and name.endswith('weight') and model_type != 'gemma2':
        p.add_(1.0)
  model.eval()
  model.save_pretrained(out_dir, safe_serialization=True)
  checkpoint.byte_tokenizer().save_pretrained(out_dir)
  return model


def hf_logits(model, tokens, mask=None, positions=None) -> np.ndarray:
  import torch

  kw = {}
  if mask is not None:
    kw['attention_mask'] = torch.tensor(np.asarray(mask, np.int64))
  if positions is not None:
    kw['position_ids'] = torch.tensor(np.asarray(positions, np.int64))
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens, np.int64)), **kw).logits.float().numpy()


def our_logits(model, tokens, mask=None, positions=None) -> np.ndarray:
  logits, _ = model(
      jnp.asarray(tokens, jnp.int32),
      positions=None if positions is None else jnp.asarray(positions, jnp.int32),
      key_mask=None if mask is None else jnp.asarray(mask, bool),
  )
  return np.asarray(logits)


def padded_batch(lengths, total: int, *, left: bool, seed: int = 0, high: int = 256):
  """Random tokens [B, total] with PAD outside each row's `length` real tokens.

  Returns (tokens, mask, positions); positions = cumsum(mask) - 1 (clipped at 0), which is
  plain arange for right padding and the per-row offset that left padding needs.
  """
  rng = np.random.RandomState(seed)
  tokens = np.full((len(lengths), total), PAD, np.int32)
  mask = np.zeros((len(lengths), total), bool)
  for b, n in enumerate(lengths):
    cols = slice(total - n, total) if left else slice(0, n)
    tokens[b, cols] = rng.randint(0, high, n)
    mask[b, cols] = True
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0).astype(np.int32)
  return tokens, mask, positions


def randomize(model, cfg, *, std: float = 0.2, seed: int = 0):
  """Redraws every parameter of our NNX model (norm scales around 1, or 0 with Gemma's offset)."""
  rng = np.random.RandomState(seed)
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  new = []
  for path, var in leaves:
    value = var.get_value()
    x = std * rng.standard_normal(value.shape).astype(np.float32)
    if getattr(path[-1], 'key', None) == 'scale' and not cfg.norm_offset:
      x += 1.0
    new.append(var.replace(jnp.asarray(x, value.dtype)))
  nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
  return model


def max_abs_diff(a, b, mask=None) -> float:
  d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
  if mask is not None:
    d = d[np.asarray(mask, bool)]
  return float(d.max())


def run_on_eight_devices(script: str) -> dict:
  """Runs `script` in a fresh Python that sees 8 CPU devices (XLA_FLAGS must be set before jax is
  imported, so not in this process) and returns the JSON object its last line prints."""
  import json
  import os
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(
      os.environ,
      XLA_FLAGS='--xla_force_host_platform_device_count=8',
      JAX_PLATFORMS='cpu',
      PYTHONPATH=root + os.pathsep + os.environ.get('PYTHONPATH', ''),
  )
  proc = subprocess.run(
      [sys.executable, '-c', script], env=env, cwd=root, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])
