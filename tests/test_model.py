"""Parity of cai_jax/models/decoder.py with transformers (PyTorch, float32, eager attention).

Each family is a tiny random transformers model built from a config here (no download), saved
as safetensors, read back with `checkpoint.load_pretrained`, and compared logit by logit:
unpadded, right-padded with an attention mask, left-padded with positions = cumsum(mask) - 1,
and at shifted positions. Sequences (12) are longer than the sliding windows (4).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.models import checkpoint, decoder as model_lib
from cai_jax.utils import sharding
from helpers import HF_CASES, hf_logits, hf_reference, max_abs_diff, our_logits, padded_batch

torch = pytest.importorskip('torch')

ATOL = 1e-4  # float32 logits; we see ~7e-6 on logits of magnitude ~6
T = 12  # > sliding window 4, so the window cuts in


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """case -> (transformers model, its directory, our Pretrained read from that directory)."""
  built = {}

  def get(case):
    if case not in built:
      path = tmp_path_factory.mktemp(case)
      hf = hf_reference(case, path)
      built[case] = hf, path, checkpoint.load_pretrained(path)
    return built[case]

  return get


@pytest.mark.parametrize('case', list(HF_CASES))
def test_logits_match_transformers(reference, case):
  hf, _, ours = reference(case)
  assert ours.config.family == HF_CASES[case][0]
  tokens, _, _ = padded_batch([T, T], T, left=False, seed=1)
  assert max_abs_diff(our_logits(ours.model, tokens), hf_logits(hf, tokens)) <= ATOL

  # Right padding (training): plain positions, pads masked out as keys; valid rows compared.
  tokens, mask, _ = padded_batch([T, 7], T, left=False, seed=2)
  diff = max_abs_diff(our_logits(ours.model, tokens, mask), hf_logits(hf, tokens, mask), mask)
  assert diff <= ATOL

  # Left padding (sampling, scoring): positions = cumsum(mask) - 1 for both.
  tokens, mask, positions = padded_batch([T, 5], T, left=True, seed=3)
  diff = max_abs_diff(
      our_logits(ours.model, tokens, mask, positions), hf_logits(hf, tokens, mask, positions), mask
  )
  assert diff <= ATOL

  # Far positions: RoPE scaling and learned positions well away from 0.
  tokens, _, _ = padded_batch([T, T], T, left=False, seed=4)
  positions = np.broadcast_to(np.arange(T) + 90, tokens.shape)
  diff = max_abs_diff(
      our_logits(ours.model, tokens, positions=positions),
      hf_logits(hf, tokens, positions=positions),
  )
  assert diff <= ATOL


# Each switch, turned off, moves the logits far from transformers': the parity above has teeth.
KNOBS = [
    ('llama3-rope', dict(rope_scaling=None)),
    ('mistral', dict(sliding_window=None)),
    ('qwen2-sliding', dict(layer_types=None)),  # every layer sliding instead of only layer 1
    ('gemma2', dict(sliding_window=None)),
    ('gemma2', dict(attn_softcap=None)),
    ('gemma2', dict(final_softcap=None)),
    ('gemma2', dict(query_scale=None)),
    ('gemma2', dict(embed_scale=False)),
]


@pytest.mark.parametrize('case,override', KNOBS, ids=[f'{c}-{next(iter(o))}' for c, o in KNOBS])
def test_each_switch_matters(reference, case, override):
  hf, path, _ = reference(case)
  wrong = checkpoint.load_pretrained(path, model_overrides=override)
  tokens, _, _ = padded_batch([T, T], T, left=False, seed=1)
  positions = np.broadcast_to(np.arange(T) + 90, tokens.shape)
  diff = max_abs_diff(
      our_logits(wrong.model, tokens, positions=positions),
      hf_logits(hf, tokens, positions=positions),
  )
  assert diff > 100 * ATOL, f'{override} changes the logits by only {diff}'


@pytest.mark.parametrize('case', ['gemma2', 'gpt2'])
def test_cached_decoding_matches_full_forward(reference, case):
  """Prefill 8 slots, then decode 4 tokens one at a time: logits equal the one-shot forward."""
  _, _, ours = reference(case)
  tokens, mask, positions = padded_batch([T, 6], T, left=True, seed=5)
  full = our_logits(ours.model, tokens, mask, positions)

  cache = model_lib.init_cache(ours.config, batch=2, length=T)
  key_mask = jnp.asarray(mask)
  steps = [(0, 8)] + [(t, t + 1) for t in range(8, T)]
  for start, end in steps:
    logits, cache = ours.model(
        jnp.asarray(tokens[:, start:end]),
        positions=jnp.asarray(positions[:, start:end]),
        key_mask=key_mask,
        cache=cache,
        cache_index=start,
    )
    np.testing.assert_allclose(
        np.asarray(logits) * mask[:, start:end, None],
        full[:, start:end] * mask[:, start:end, None],
        atol=1e-5,
    )


def test_config_errors_are_one_line():
  cases = [
      (dict(family='bert'), 'unknown model family'),
      (dict(n_heads=8, n_kv_heads=3), 'not a multiple'),
      (dict(n_layers=2, layer_types=('full_attention',)), 'layer_types has 1 entries'),
  ]
  for kw, expected in cases:
    with pytest.raises(ValueError, match=expected) as err:
      model_lib.ModelConfig.tiny(**kw)
    assert '\n' not in str(err.value)
  cfg = model_lib.ModelConfig.tiny(rope_scaling=(('rope_type', 'yarn'), ('factor', 2.0)))
  with pytest.raises(ValueError, match="unsupported rope_type 'yarn'"):
    model_lib.rope_inv_freq(cfg)


def test_mesh_shape_errors():
  assert sharding.resolve_mesh_shape((1, -1, 2), 8) == (1, 4, 2)
  bad = [
      ((1, 2, 2), 'has 4 slots but there are 8 devices'),
      ((-1, -1, 2), 'has 2 entries of -1'),
      ((0, -1, 2), 'non-positive'),
      ((1, -2, 2), 'non-positive'),
      ((-1, 3, 1), 'not divisible by 3'),
      ((8, 1), 'must have 3 entries'),
  ]
  for shape, expected in bad:
    with pytest.raises(sharding.ShardingError, match=expected) as err:
      sharding.resolve_mesh_shape(shape, 8)
    assert '\n' not in str(err.value)


def test_logical_axis_rules_unknown_mesh_axis():
  with pytest.raises(sharding.ShardingError, match="'mlp' maps to unknown mesh axis 'model'"):
    sharding.validate_rules([('embed', 'fsdp'), ('mlp', 'model')])
  with pytest.raises(sharding.ShardingError, match="unknown mesh axis 'pipe'"):
    sharding.validate_rules([('batch', ('data', 'pipe'))])
  assert sharding.validate_rules(sharding.DEFAULT_RULES) == sharding.DEFAULT_RULES
