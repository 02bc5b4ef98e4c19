"""Tests for cai_jax.sampling on tiny random models (byte tokenizer, vocab 320)."""

import textwrap

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cai_jax import sampling
from cai_jax.models import checkpoint

import helpers

PROMPTS = ['Human: hi', 'a', 'The quick brown fox', 'Assistant: ok then']


@pytest.fixture(scope='module')
def tiny():
  return checkpoint.load_pretrained('random:tiny')


@pytest.fixture(scope='module')
def peaked():
  """The tiny model with its (tied) embedding scaled up: a peaked but not one-hot next-token law."""
  pt = checkpoint.load_pretrained('random:tiny')
  pt.model.embed.set_value(pt.model.embed.get_value() * 4.0)
  return pt


def encode(pt, texts):
  return [pt.tokenizer.encode(t) for t in texts]


@functools.cache
def _forward(graphdef):
  return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0])


def forward(model, seqs, length=64):
  """Logits [R, length, V] of right-padded rows (causal: the padding changes nothing before it)."""
  tokens = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, : len(s)] = s
  graphdef, params = nnx.split(model)
  return np.asarray(_forward(graphdef)(params, jnp.asarray(tokens)))


def teacher_forced_logits(model, prompt, new):
  return forward(model, [prompt + new])[0, len(prompt) - 1 : len(prompt) + len(new) - 1]


def next_token_probs(model, prompt):
  return np.asarray(jax.nn.softmax(forward(model, [prompt])[0, len(prompt) - 1]))


def test_greedy_is_argmax_and_logprobs_match_score(tiny):
  prompts = encode(tiny, PROMPTS)
  out = sampling.generate(
      tiny.model, prompts, max_new_tokens=12, stop_tokens=[], tokenizer=tiny.tokenizer
  )
  assert out.finish_reason == ['length'] * 4 and all(len(t) == 12 for t in out.tokens)
  for p, new, lp in zip(prompts, out.tokens, out.logprobs):
    logits = teacher_forced_logits(tiny.model, p, new)
    np.testing.assert_array_equal(logits.argmax(-1), new)
    expected = jax.nn.log_softmax(logits)[np.arange(len(new)), new]
    np.testing.assert_allclose(lp, expected, atol=1e-5)
  # score() on the generated continuations, all rows (different lengths) in one batch.
  scored = sampling.score(tiny.model, prompts, out.tokens)
  for lp, per in zip(out.logprobs, scored.per_token):
    np.testing.assert_allclose(per, lp, atol=1e-5)
  np.testing.assert_allclose(scored.total, [lp.sum() for lp in out.logprobs], atol=1e-4)
  assert out.texts == [tiny.tokenizer.decode(t) for t in out.tokens]


def test_score_batched_equals_one_at_a_time(tiny):
  prompts = encode(tiny, PROMPTS)
  conts = encode(tiny, [' yes', ' no thanks', '!', ' a much longer continuation here'])
  together = sampling.score(tiny.model, prompts, conts)
  for i in range(4):
    alone = sampling.score(tiny.model, prompts[i : i + 1], conts[i : i + 1])
    np.testing.assert_allclose(together.per_token[i], alone.per_token[0], atol=1e-5)
    np.testing.assert_allclose(
        together.per_token[i],
        jax.nn.log_softmax(teacher_forced_logits(tiny.model, prompts[i], conts[i]))[
            np.arange(len(conts[i])), conts[i]
        ],
        atol=1e-5,
    )


def test_score_options_equals_score_per_option(tiny):
  """One prompt pass + cached option passes = a full pass per (prompt, option)."""
  prompts = encode(tiny, PROMPTS)
  options = [
      encode(tiny, [' (A)', ' (B)']),
      encode(tiny, [' yes', ' no thanks at all']),
      encode(tiny, ['!', '?']),
      encode(tiny, [' a much longer continuation here', ' b']),
  ]
  totals = sampling.score_options(tiny.model, prompts, options)
  assert totals.shape == (4, 2)
  for o in range(2):
    ref = sampling.score(tiny.model, prompts, [row[o] for row in options]).total
    np.testing.assert_allclose(totals[:, o], ref, atol=1e-4)
  with pytest.raises(ValueError, match='same number'):
    sampling.score_options(tiny.model, prompts[:2], [options[0], options[1][:1]])
  with pytest.raises(ValueError, match='empty option'):
    sampling.score_options(tiny.model, prompts[:1], [[options[0][0], []]])


def test_temperature_one_matches_softmax(peaked):
  prompt = encode(peaked, ['Human: hi'])[0]
  probs = next_token_probs(peaked.model, prompt)
  n = 4096
  out = sampling.generate(
      peaked.model, [prompt] * n, max_new_tokens=1, temperature=1.0, stop_tokens=[], seed=3
  )
  first = np.array([t[0] for t in out.tokens])
  empirical = np.bincount(first, minlength=len(probs)) / n
  # Total variation over the 8 likeliest tokens + the rest (sampling noise here is ~0.015).
  top = np.argsort(probs)[::-1][:8]
  cats = lambda p: np.append(p[top], 1.0 - p[top].sum())
  tv = 0.5 * np.abs(cats(empirical) - cats(probs)).sum()
  print(f'total variation (top-8 + rest) over {n} rows: {tv:.4f}')
  assert tv < 0.05
  assert len(set(first.tolist())) > 8  # really sampling, not argmax
  # Logprobs are of the raw distribution (temperature 1 here, so equal to log(probs)).
  np.testing.assert_allclose(
      [lp[0] for lp in out.logprobs[:64]], np.log(probs[first[:64]]), atol=1e-5
  )


def allowed_sets(logits, top_k=None, top_p=None, temperature=1.0):
  """Per position, the tokens that top-k / top-p sampling may emit."""
  sets = []
  for row in logits / temperature:
    order = np.argsort(row)[::-1]
    if top_k is not None:
      order = order[:top_k]
    p = np.exp(row[order] - row[order].max())
    p /= p.sum()
    if top_p is not None:
      before = np.cumsum(p) - p
      order = order[(before < top_p + 1e-6)]  # tolerance: float ties at the boundary
    sets.append(set(order.tolist()))
  return sets


@pytest.mark.parametrize('top_k,top_p', [(5, None), (None, 0.5), (None, 0.9), (8, 0.6)])
def test_top_k_top_p_stay_in_allowed_set(peaked, top_k, top_p):
  # top_p=0.9 needs more than the 64 fast-path candidates: the full-sort branch runs.
  prompts = encode(peaked, PROMPTS) * 8
  out = sampling.generate(
      peaked.model,
      prompts,
      max_new_tokens=10,
      temperature=1.0,
      top_k=top_k,
      top_p=top_p,
      stop_tokens=[],
      seed=1,
  )
  seen = set()
  for p, new in zip(prompts, out.tokens):
    sets = allowed_sets(teacher_forced_logits(peaked.model, p, new), top_k, top_p)
    for t, allowed in zip(new, sets):
      assert t in allowed, (t, sorted(allowed))
      seen.add(t)
  assert len(seen) > 1


def test_seeds_and_batch_composition(peaked):
  prompts = encode(peaked, PROMPTS)
  kw = dict(max_new_tokens=16, temperature=1.0, stop_tokens=[])
  a = sampling.generate(peaked.model, prompts, seed=7, **kw)
  b = sampling.generate(peaked.model, prompts, seed=7, **kw)
  c = sampling.generate(peaked.model, prompts, seed=8, **kw)
  assert a.tokens == b.tokens
  assert a.tokens != c.tokens
  # A row keeps its sample when the rest of the batch changes (row ids carry the key).
  d = sampling.generate(peaked.model, [prompts[2], prompts[0]], row_ids=[2, 0], seed=7, **kw)
  assert d.tokens == [a.tokens[2], a.tokens[0]]


def test_stop_tokens_per_row(tiny):
  prompts = encode(tiny, PROMPTS)
  free = sampling.generate(
      tiny.model, prompts, max_new_tokens=16, temperature=1.0, stop_tokens=[], seed=5
  )
  stop = free.tokens[0][3]
  out = sampling.generate(
      tiny.model, prompts, max_new_tokens=16, temperature=1.0, stop_tokens=[stop], seed=5
  )
  for full, got, lp, reason in zip(free.tokens, out.tokens, out.logprobs, out.finish_reason):
    if stop in full:
      cut = full.index(stop) + 1
      assert (got, reason) == (full[:cut], 'stop')
    else:
      assert (got, reason) == (full, 'length')
    assert len(lp) == len(got)
  assert out.finish_reason[0] == 'stop' and len(out.tokens[0]) <= 4


def test_stop_strings_per_row(tiny):
  tok = tiny.tokenizer
  prompts = encode(tiny, PROMPTS)
  free = sampling.generate(
      tiny.model,
      prompts,
      max_new_tokens=16,
      temperature=1.0,
      stop_tokens=[],
      seed=11,
      tokenizer=tok,
  )
  # A stop string made of two tokens that row 0 generates (decoding them alone is exact).
  stop = tok.decode(free.tokens[0][4:6])
  out = sampling.generate(
      tiny.model,
      prompts,
      max_new_tokens=16,
      temperature=1.0,
      stop_tokens=[],
      seed=11,
      tokenizer=tok,
      stop_strings=[stop],
      stop_chunk=4,
  )
  for full, text, got, reason in zip(free.tokens, out.texts, out.tokens, out.finish_reason):
    full_text = tok.decode(full)
    if stop in full_text:
      assert reason == 'stop'
      assert text == full_text[: full_text.index(stop)]
      assert stop in tok.decode(got) and stop not in tok.decode(got[:-1])
      assert got == full[: len(got)]
    else:
      assert (reason, got, text) == ('length', full, full_text)
  assert out.finish_reason[0] == 'stop' and len(out.tokens[0]) <= 6


def test_generate_responses_transcript(tiny):
  convs = [[('human', 'Hello there')], 'Human: a rendered prompt\n\nAssistant:']
  responses = sampling.generate_responses(
      tiny, convs, fmt='transcript', max_new_tokens=8, temperature=1.0, batch_size=2, seed=0
  )
  assert len(responses) == 2
  assert responses[0].prompt_tokens == tiny.tokenizer.encode('\n\nHuman: Hello there\n\nAssistant:')
  for r in responses:
    assert r.text == r.text.lstrip()
    assert len(r.logprobs) == len(r.tokens) <= 8
    assert r.finish_reason in ('stop', 'length')


def test_generate_batched_restores_order(peaked):
  prompts = encode(peaked, PROMPTS + ['x' * 30, 'yy'])
  kw = dict(max_new_tokens=8, temperature=1.0, stop_tokens=[], seed=2)
  batched = sampling.generate_batched(peaked.model, prompts, batch_size=4, progress=True, **kw)
  whole = sampling.generate(peaked.model, prompts, **kw)
  assert batched.tokens == whole.tokens
  for a, b in zip(batched.logprobs, whole.logprobs):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_same_buckets_compile_nothing(tiny):
  kw = dict(max_new_tokens=10, stop_tokens=[])
  counts = lambda *kinds: [sampling.compile_counts[k] for k in kinds]
  sampling.generate(tiny.model, encode(tiny, ['Human: hi', 'a', 'short']), **kw)
  before = counts('prefill', 'decode')
  # Other rows, lengths, max_new_tokens and stop tokens, but the same (4, 16, 16) buckets.
  sampling.generate(tiny.model, encode(tiny, ['other', 'prompts of', 'new lengths', 'x']), **kw)
  sampling.generate(tiny.model, encode(tiny, ['z', 'zz']) * 2, max_new_tokens=14, stop_tokens=[3])
  assert counts('prefill', 'decode') == before
  sampling.score(tiny.model, encode(tiny, ['a', 'bc']), encode(tiny, ['d', 'ef']))
  before = counts('score')
  sampling.score(tiny.model, encode(tiny, ['abc', 'x']), encode(tiny, ['de', 'fgh']))
  assert counts('score') == before


def test_bfloat16_model_runs():
  pt = checkpoint.load_pretrained('random:tiny', dtype='bfloat16')
  prompts = encode(pt, PROMPTS)
  out = sampling.generate(pt.model, prompts, max_new_tokens=6, stop_tokens=[])
  assert all(len(t) == 6 for t in out.tokens)
  assert all(np.isfinite(lp).all() and (lp <= 0).all() for lp in out.logprobs)
  scored = sampling.score(pt.model, prompts, out.tokens)
  for a, b in zip(scored.per_token, out.logprobs):
    np.testing.assert_allclose(a, b, atol=0.1)


class _NoUnicodeTokenizer:
  """A tokenizer that maps any non-ASCII character to its unknown token."""

  unk_token_id, eos_token_id = 0, 1

  def encode(self, text, add_special_tokens=False):
    return [ord(c) if ord(c) < 128 else 0 for c in text]

  def decode(self, ids):
    return ''.join(chr(i) if i else '?' for i in ids)


def test_bad_inputs_raise(tiny):
  m, ok = tiny.model, encode(tiny, ['hi'])
  with pytest.raises(ValueError, match='prompt 1 is empty'):
    sampling.generate(m, [[1, 2], []], max_new_tokens=4)
  with pytest.raises(ValueError, match='max_new_tokens'):
    sampling.generate(m, ok, max_new_tokens=0)
  with pytest.raises(ValueError, match='temperature'):
    sampling.generate(m, ok, max_new_tokens=4, temperature=-1)
  with pytest.raises(ValueError, match='top_p'):
    sampling.generate(m, ok, max_new_tokens=4, temperature=1, top_p=0.0)
  with pytest.raises(ValueError, match='top_k'):
    sampling.generate(m, ok, max_new_tokens=4, temperature=1, top_k=0)
  with pytest.raises(ValueError, match='outside'):
    sampling.generate(m, [[1, 5000]], max_new_tokens=4)
  with pytest.raises(ValueError, match='more than the limit of 8'):
    sampling.generate(m, [list(range(20))], max_new_tokens=4, max_prompt_len=8)
  with pytest.raises(ValueError, match='model context'):
    sampling.generate(m, ok, max_new_tokens=tiny.config.max_positions)
  with pytest.raises(ValueError, match='cannot be represented'):
    sampling.generate(
        m, ok, max_new_tokens=4, tokenizer=_NoUnicodeTokenizer(), stop_strings=['\u00e9t\u00e9']
    )
  with pytest.raises(ValueError, match='non-empty'):
    sampling.generate(m, ok, max_new_tokens=4, tokenizer=tiny.tokenizer, stop_strings=[''])
  with pytest.raises(ValueError, match='need a tokenizer'):
    sampling.generate(m, ok, max_new_tokens=4, stop_strings=['x'])
  with pytest.raises(ValueError, match='truncate must be'):
    sampling.generate(m, ok, max_new_tokens=4, truncate='right')
  # truncate='left' keeps the newest tokens and reports how many went.
  out = sampling.generate(
      m, [list(range(20)), [5]], max_new_tokens=4, max_prompt_len=8, truncate='left', stop_tokens=[]
  )
  assert out.num_truncated == [12, 0]
  alone = sampling.generate(m, [list(range(12, 20))], max_new_tokens=4, stop_tokens=[])
  assert out.tokens[0] == alone.tokens[0]
  assert sampling.generate(m, [], max_new_tokens=4).tokens == []


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from cai_jax import sampling
    from cai_jax.models import checkpoint
    from cai_jax.utils import sharding
    assert jax.device_count() == 8, jax.devices()
    prompts = [[72, 105], [1, 2, 3, 4, 5], [9] * 11, [40, 41, 42]]
    kw = dict(max_new_tokens=12, stop_tokens=[])
    plain = checkpoint.load_pretrained('random:tiny')
    ref = sampling.generate(plain.model, prompts, **kw)
    mesh = sharding.make_mesh((2, 2, 2))
    with sharding.use_mesh(mesh):
      pt = checkpoint.load_pretrained('random:tiny')
      out = sampling.generate(pt.model, prompts, **kw)
      scored = sampling.score(pt.model, prompts, ref.tokens)
    print(json.dumps({'same': out.tokens == ref.tokens,
                      'lp': max(float(np.abs(a - b).max()) for a, b in zip(out.logprobs, ref.logprobs)),
                      'score': max(float(np.abs(a - b).max()) for a, b in zip(scored.per_token, ref.logprobs))}))
""")


def test_sharded_greedy_equals_unsharded():
  result = helpers.run_on_eight_devices(_SHARDED_SCRIPT)
  assert result['same'], result
  assert result['lp'] < 1e-5 and result['score'] < 1e-5, result
