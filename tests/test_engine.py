"""The continuous-batching engine (cai_jax/sampling/engine.py) on tiny random models."""

import numpy as np
import pytest

from cai_jax import sampling
from cai_jax.models import checkpoint
from cai_jax.models import decoder as model_lib
from cai_jax.sampling import engine as engine_lib

import helpers

# Small pages, chunks and blocks, so that tiny prompts span several of each; fewer slots than
# requests, so that slots are refilled.
SMALL = engine_lib.EngineConfig(
    max_slots=3, page_size=4, prefill_chunk=8, prefill_rows=2, decode_chunk=5, block=16,
    kv_budget_mib=1.0,
)  # fmt: skip


def _model(family):
  cfg = model_lib.ModelConfig.tiny(family)
  return helpers.randomize(model_lib.create(cfg, seed=0), cfg, std=0.2, seed=1)


def _prompts(n=7, seed=0, lo=3, hi=40):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 250, int(k)).tolist() for k in rng.integers(lo, hi, n)]


@pytest.fixture(scope='module', params=['llama', 'gemma2', 'qwen2'])
def family_model(request):
  return _model(request.param)


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_engine_matches_the_static_sampler(family_model, temperature):
  """Same tokens as `generate` (row i's keys are key_id i's), log-probs within 1e-5: Gemma 2's
  sliding window and soft-caps, Qwen 2's biases, GQA, slots refilled mid-run."""
  prompts = _prompts()
  ref = sampling.generate(
      family_model, prompts, max_new_tokens=12, temperature=temperature, stop_tokens=[], seed=5
  )
  engine = engine_lib.Engine(family_model, SMALL)
  out = engine.generate(
      [engine_lib.Request(p, 12, seed=5, key_id=i) for i, p in enumerate(prompts)],
      temperature=temperature,
  )
  for i, o in enumerate(out):
    assert o.index == i and o.finish_reason == 'length'
    assert o.tokens == ref.tokens[i]
    np.testing.assert_allclose(o.logprobs, ref.logprobs[i], atol=1e-5)
  assert engine.stats['requests'] == len(prompts)
  assert 0 < engine.utilization() <= 1


@pytest.mark.parametrize('temperature', [0.0, 1.0])
def test_a_request_is_the_same_alone_and_in_any_batch(temperature):
  """Bitwise: its slot, the other requests, the page-table width and the prefill lane it gets do
  not change a request's tokens or log-probs."""
  model = _model('gemma2')
  prompts = _prompts(6, seed=1, hi=60)
  lengths = [3, 20, 7, 30, 5, 11]
  requests = [
      engine_lib.Request(p, n, seed=9, key_id=100 + i)
      for i, (p, n) in enumerate(zip(prompts, lengths))
  ]
  engine = engine_lib.Engine(model, SMALL)
  together = engine.generate(requests, temperature=temperature)
  for r, t in zip(requests, together):
    alone = engine_lib.Engine(model, SMALL).generate([r], temperature=temperature)[0]
    assert alone.tokens == t.tokens
    np.testing.assert_array_equal(alone.logprobs, t.logprobs)
  reversed_ = engine.generate(requests[::-1], temperature=temperature)[::-1]
  for a, b in zip(reversed_, together):
    assert a.tokens == b.tokens
    np.testing.assert_array_equal(a.logprobs, b.logprobs)


def test_shared_prefix_pages_are_computed_once_and_change_nothing():
  model = _model('llama')
  preamble = _prompts(1, seed=2, lo=30, hi=31)[0]  # 3 full chunks of 8, and 6 tokens
  tails = _prompts(5, seed=3, lo=2, hi=12)
  requests = [engine_lib.Request(preamble + t, 8, key_id=i) for i, t in enumerate(tails)]
  engine = engine_lib.Engine(model, SMALL)
  shared = engine.generate(requests)
  # Every request after the first reads the three full chunks the first one published.
  assert engine.stats['prompt_tokens_shared'] == 3 * 8 * (len(requests) - 1)
  first = engine.stats['prompt_tokens_shared']
  again = engine.generate(requests)
  # Now each reads every full chunk of its prompt from the cache (its own tail's included),
  # all but the one holding its last token.
  cached = sum((len(r.tokens) - 1) // 8 for r in requests)
  assert engine.stats['prompt_tokens_shared'] - first == 8 * cached
  for r, s, a in zip(requests, shared, again):
    alone = engine_lib.Engine(model, SMALL).generate([r])[0]
    assert s.tokens == a.tokens == alone.tokens
    np.testing.assert_array_equal(s.logprobs, alone.logprobs)
    np.testing.assert_array_equal(a.logprobs, alone.logprobs)


def test_a_small_page_pool_makes_requests_wait_not_fail():
  model = _model('qwen2')
  prompts = _prompts(6, seed=4, lo=20, hi=40)
  requests = [engine_lib.Request(p, 16, key_id=i) for i, p in enumerate(prompts)]
  big = engine_lib.Engine(model, SMALL).generate(requests)
  page = engine_lib.page_bytes(model.cfg, SMALL.page_size)
  # 30 pages: room for about two of these requests (14-15 pages each) at a time.
  small_cfg = engine_lib.EngineConfig(**{**SMALL.__dict__, 'kv_budget_mib': 30 * page / 2**20})
  small = engine_lib.Engine(model, small_cfg)
  assert small.n_pages == 30
  out = small.generate(requests)
  assert [o.tokens for o in out] == [o.tokens for o in big]


def test_stop_tokens_and_stop_strings_per_request():
  pt = checkpoint.load_pretrained('random:tiny')
  tok = pt.tokenizer
  prompts = [tok.encode(t) for t in ['Human: hi', 'a', 'The quick brown fox', 'Assistant: ok']]
  free = sampling.generate(
      pt.model, prompts, max_new_tokens=16, temperature=1.0, stop_tokens=[], seed=3
  )
  stop_token = free.tokens[1][5]
  stop_text = tok.decode(free.tokens[0][4:6])
  engine = engine_lib.Engine(pt.model, SMALL, tokenizer=tok)
  requests = [
      engine_lib.Request(prompts[0], 16, stop_strings=[stop_text], seed=3, key_id=0),
      engine_lib.Request(prompts[1], 16, stop_tokens=[stop_token], seed=3, key_id=1),
      engine_lib.Request(prompts[2], 16, seed=3, key_id=2),
      engine_lib.Request(prompts[3], 1, seed=3, key_id=3),
  ]
  out = engine.generate(requests, temperature=1.0)
  full0 = tok.decode(free.tokens[0])
  assert out[0].finish_reason == 'stop' and out[0].text == full0[: full0.index(stop_text)]
  assert out[0].tokens == free.tokens[0][: len(out[0].tokens)]
  cut = free.tokens[1].index(stop_token) + 1
  assert (out[1].tokens, out[1].finish_reason) == (free.tokens[1][:cut], 'stop')
  assert (out[2].tokens, out[2].finish_reason) == (free.tokens[2], 'length')
  assert (out[3].tokens, out[3].finish_reason) == (free.tokens[3][:1], 'length')


def test_bad_requests_and_sizes_are_one_line_errors():
  model = _model('llama')
  engine = engine_lib.Engine(model, SMALL)
  with pytest.raises(ValueError, match='max_new_tokens must be a positive integer'):
    engine.generate([engine_lib.Request([5, 6], 0)])
  with pytest.raises(
      ValueError, match=r'needs 75 pages of 4 slots; the pool holds 4 \(raise kv_budget_mib\)'
  ):
    tiny_pool = engine_lib.EngineConfig(**{**SMALL.__dict__, 'kv_budget_mib': 0.01})
    engine_lib.Engine(model, tiny_pool).generate([engine_lib.Request(list(range(3, 200)), 100)])
  with pytest.raises(ValueError, match='stop_strings need the engine to have a tokenizer'):
    engine.generate([engine_lib.Request([5, 6], 3, stop_strings=['x'])])
  with pytest.raises(ValueError, match='token ids outside'):
    engine.generate([engine_lib.Request([5, 99999], 3)])
  with pytest.raises(ValueError, match='prefill_chunk=10 is not a multiple of page_size=4'):
    engine_lib.EngineConfig(page_size=4, prefill_chunk=10)
  with pytest.raises(
      ValueError, match="kv_dtype='int4'; valid: None, 'float32', 'bfloat16', 'int8'"
  ):
    engine_lib.EngineConfig(kv_dtype='int4')
  with pytest.raises(ValueError, match='at least 2 are needed'):
    engine_lib.Engine(model, engine_lib.EngineConfig(kv_budget_mib=1e-6))


def test_generate_responses_with_an_engine_gives_the_static_replies():
  """The stages' entry point: the format's stop strings, the model's end token, row i's keys."""
  pt = checkpoint.load_pretrained('random:tiny')
  convs = [[('human', t)] for t in ['hi there', 'What is 2 + 2?', 'Tell me a story', 'ok']]
  kw = dict(fmt='transcript', max_new_tokens=24, temperature=1.0, seed=7)
  static = sampling.generate_responses(pt, convs, batch_size=2, **kw)
  engine = engine_lib.Engine(pt.model, SMALL, tokenizer=pt.tokenizer)
  ours = sampling.generate_responses(pt, convs, engine=engine, **kw)
  for a, b in zip(static, ours):
    assert (a.text, a.tokens, a.finish_reason) == (b.text, b.tokens, b.finish_reason)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize('family', ['llama', 'gemma2'])
def test_int8_pages_hold_a_quarter_of_the_bytes_and_stay_close(family):
  """int8 keys and values with a float32 scale per token and head: (H + 4) / 4H of float32's
  bytes. Against the float32 pages, greedy: the same first token everywhere, and up to the first
  token where the two differ (both saw the same context) log-probs within 0.1. These tiny random
  models are near-flat (tiny Llama's top token has p ~ 0.1), so they part early; SmolLM2's
  figures are experiments/benchmarks/engine.py's."""
  model = _model(family)
  cfg = model.cfg
  assert engine_lib.page_bytes(cfg, 4, 'int8') * 4 * cfg.head_dim == engine_lib.page_bytes(
      cfg, 4, 'float32'
  ) * (cfg.head_dim + 4)
  prompts = _prompts(5, seed=6, lo=10, hi=40)
  requests = [engine_lib.Request(p, 16, key_id=i) for i, p in enumerate(prompts)]
  full = engine_lib.Engine(model, SMALL).generate(requests)
  int8_cfg = engine_lib.EngineConfig(**{**SMALL.__dict__, 'kv_dtype': 'int8'})
  small = engine_lib.Engine(model, int8_cfg).generate(requests)
  for f, s in zip(full, small):
    n = next((i for i, (a, b) in enumerate(zip(f.tokens, s.tokens)) if a != b), len(f.tokens))
    assert n >= 1
    np.testing.assert_allclose(s.logprobs[:n], f.logprobs[:n], atol=0.1)
    assert not np.array_equal(s.logprobs[:n], f.logprobs[:n])  # it did read int8 pages
