"""Prefix reuse (cai_jax/sampling/prefix.py): a shared prompt prefix computed once and read as one
copy gives the same tokens and log-probs as prefilling every row in full."""

import textwrap

import numpy as np
import pytest

from cai_jax import sampling
from cai_jax.method import prompts as prompts_lib
from cai_jax.models import checkpoint
from cai_jax.sampling import prefix as prefix_lib
import helpers

PREAMBLE = 'The few-shot preamble that every prompt repeats, word for word. ' * 3
TAILS = ['Human: hi', 'a', 'The quick brown fox', 'Assistant: ok then', 'x' * 40]


def _peaked(source: str, dtype: str = 'float32'):
  """A tiny random model with its embedding scaled up: peaked next-token laws, so greedy paths
  and log-probs are sensitive to any difference in the attention."""
  pt = checkpoint.load_pretrained(source, dtype=dtype)
  pt.model.embed.set_value(pt.model.embed.get_value() * 4.0)
  return pt


def _prompts(pt, preamble=PREAMBLE, tails=TAILS):
  return [pt.tokenizer.encode(preamble + t) for t in tails]


def _options(pt, n):
  enc = lambda s: pt.tokenizer.encode(s, add_special_tokens=False)
  return [[enc(' (A)'), enc(' (B) and more')] for _ in range(n)]


@pytest.mark.parametrize('family', ['llama', 'gemma2', 'qwen2'])
def test_reuse_gives_the_same_tokens_and_logprobs(family):
  # gemma2's tiny preset has a sliding window of 4 on one layer: most of the prefix lies outside
  # it, so this also checks the window is measured in positions across the prefix boundary.
  pt = _peaked(f'random:tiny-{family}')
  prompts = _prompts(pt)
  cache = sampling.PrefixCache(pt.model, min_tokens=16, block=16)
  for temperature in (0.0, 1.0):
    kw = dict(max_new_tokens=20, temperature=temperature, seed=3, stop_tokens=[])
    plain = sampling.generate(pt.model, prompts, **kw)
    reused = sampling.generate(pt.model, prompts, prefix_cache=cache, **kw)
    assert reused.tokens == plain.tokens
    for a, b in zip(reused.logprobs, plain.logprobs):
      np.testing.assert_allclose(a, b, atol=1e-5)
  opts = _options(pt, len(prompts))
  np.testing.assert_allclose(
      sampling.score_options(pt.model, prompts, opts, prefix_cache=cache),
      sampling.score_options(pt.model, prompts, opts),
      atol=1e-5,
  )
  n = prefix_lib.common_prefix_length(prompts) // 16 * 16
  # Computed once by the first call, read by the other two; held in exactly its n slots.
  assert (cache.misses, cache.hits, cache.tokens) == (1, 2, n)
  assert cache.reused_tokens == n * len(prompts) * 3 - n


def test_a_rows_result_does_not_depend_on_what_the_cache_holds():
  """A resumed run starts with a cold cache: the batch it redoes must give bit-identical numbers
  to the same batch after earlier batches had filled the cache (here with a prefix one block
  shorter, which the batch could have read instead of computing its own)."""
  pt = _peaked('random:tiny-llama')
  batch = _prompts(pt, PREAMBLE + 'and one more shared sentence. ', TAILS[:3])
  earlier = _prompts(pt, PREAMBLE, ['q', 'r'])
  opts = _options(pt, len(batch))
  kw = dict(max_new_tokens=12, temperature=1.0, seed=5, stop_tokens=[])

  def results(cache):
    out = sampling.generate(pt.model, batch, prefix_cache=cache, **kw)
    return (
        out.tokens,
        out.logprobs,
        sampling.score_options(pt.model, batch, opts, prefix_cache=cache),
    )

  cold = prefix_lib.PrefixCache(pt.model, min_tokens=16, block=16)
  warm = prefix_lib.PrefixCache(pt.model, min_tokens=16, block=16)
  sampling.generate(pt.model, earlier, prefix_cache=warm, **kw)  # keeps the shorter prefix
  assert len(warm) == 1 and len(next(iter(warm._entries))) < prefix_lib.common_prefix_length(batch)
  (t1, lp1, s1), (t2, lp2, s2) = results(cold), results(warm)
  assert t1 == t2
  for a, b in zip(lp1, lp2):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(s1, s2)
  assert cold.hits == warm.hits == 1  # the batch's own prefix, computed once, read by scoring


def test_bfloat16_reuse_gives_the_same_greedy_tokens():
  pt = _peaked('random:tiny', 'bfloat16')
  prompts = _prompts(pt)
  cache = sampling.PrefixCache(pt.model, min_tokens=16, block=16)
  opts = _options(pt, len(prompts))
  a = sampling.score_options(pt.model, prompts, opts, prefix_cache=cache)
  b = sampling.score_options(pt.model, prompts, opts)
  assert cache.misses == 1 and np.isfinite(a).all()
  np.testing.assert_allclose(a, b, atol=0.15)  # bf16 sums in another order, nothing more
  kw = dict(max_new_tokens=20, stop_tokens=[])
  plain = sampling.generate(pt.model, prompts, **kw)
  reused = sampling.generate(pt.model, prompts, prefix_cache=cache, **kw)
  assert reused.tokens == plain.tokens  # what docs/measurements.md claims for bfloat16
  assert cache.hits == 1


@pytest.mark.parametrize('family', ['llama', 'gemma2'])
def test_groups_of_rows_share_their_own_prefixes(family):
  # Three conversations, each scored in both option orders, plus one row alone: nothing is
  # shared by the whole batch, but each conversation's two rows share all but their options.
  pt = _peaked(f'random:tiny-{family}')
  convs = [f'Conversation {i}: ' + f'a long exchange about topic {i}. ' * 3 for i in range(3)]
  texts = [c + tail for c in convs for tail in (' (A) yes (B) no', ' (A) no (B) yes')]
  prompts = [pt.tokenizer.encode(t) for t in texts + ['A row of its own.']]
  cache = sampling.PrefixCache(pt.model, min_tokens=16, block=16)
  opts = _options(pt, len(prompts))
  np.testing.assert_allclose(
      sampling.score_options(pt.model, prompts, opts, prefix_cache=cache),
      sampling.score_options(pt.model, prompts, opts),
      atol=1e-5,
  )
  assert (cache.misses, cache.hits, cache.group_prefixes, len(cache)) == (0, 0, 3, 0)
  groups, lengths = prefix_lib.find_groups(prompts, 16, 16)
  assert groups == [0, 0, 1, 1, 2, 2, -1] and all(n >= 96 for n in lengths)


def test_no_shared_prefix_takes_the_plain_path():
  pt = _peaked('random:tiny')
  prompts = [pt.tokenizer.encode(t) for t in TAILS]  # only the BOS in common
  cache = sampling.PrefixCache(pt.model, min_tokens=16, block=16)
  before = sampling.compile_counts['prefix']
  out = sampling.generate(pt.model, prompts, max_new_tokens=4, prefix_cache=cache)
  assert len(out.tokens) == len(prompts)
  assert (cache.hits, cache.misses, len(cache)) == (0, 0, 0)
  assert sampling.compile_counts['prefix'] == before


def test_a_prompt_that_is_all_prefix_keeps_a_token_of_its_own():
  pt = _peaked('random:tiny')
  prompts = _prompts(pt, tails=['', 'more text after it'])
  cache = sampling.PrefixCache(pt.model, min_tokens=16, block=1)
  n, _ = cache.find(pt.model, prompts)
  assert n == len(prompts[0]) - 1
  kw = dict(max_new_tokens=8, stop_tokens=[])
  plain = sampling.generate(pt.model, prompts, **kw)
  assert sampling.generate(pt.model, prompts, prefix_cache=cache, **kw).tokens == plain.tokens


def test_the_cache_never_grows_past_its_bound():
  pt = _peaked('random:tiny')
  cache = sampling.PrefixCache(pt.model, max_tokens=300, min_tokens=16, block=16)
  sizes = []
  for i in range(5):  # five different preambles, cut to 112-160 slots
    preamble = f'Preamble number {i}: ' + 'different words each time. ' * (3 + i % 2)
    sampling.score_options(
        pt.model, _prompts(pt, preamble), _options(pt, len(TAILS)), prefix_cache=cache
    )
    sizes.append(cache.tokens)
  assert max(sizes) <= 300 and cache.misses == 5 and len(cache) >= 1
  assert cache.tokens == sum(p.length for p in cache._entries.values())
  small = sampling.PrefixCache(pt.model, max_tokens=32, min_tokens=16, block=16)
  sampling.score_options(pt.model, _prompts(pt), _options(pt, len(TAILS)), prefix_cache=small)
  assert small.misses == 1 and small.tokens == 0  # longer than the bound: used, not kept


def test_a_cache_is_for_one_model():
  a, b = _peaked('random:tiny'), _peaked('random:tiny')
  cache = sampling.PrefixCache(a.model, min_tokens=16, block=16)
  with pytest.raises(ValueError, match='another model'):
    sampling.generate(b.model, _prompts(b), max_new_tokens=2, prefix_cache=cache)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json
    import jax, numpy as np
    from cai_jax import sampling
    from cai_jax.models import checkpoint
    from cai_jax.utils import sharding
    assert jax.device_count() == 8, jax.devices()
    pre = 'The few-shot preamble that every prompt repeats, word for word. ' * 3
    kw = dict(max_new_tokens=12, stop_tokens=[])
    plain = checkpoint.load_pretrained('random:tiny')
    prompts = [plain.tokenizer.encode(pre + t) for t in ['hi', 'a b c', 'x' * 20, 'fox']]
    ref = sampling.generate(plain.model, prompts, **kw)
    mesh = sharding.make_mesh((2, 2, 2))
    with sharding.use_mesh(mesh):
      pt = checkpoint.load_pretrained('random:tiny')
      cache = sampling.PrefixCache(pt.model, min_tokens=16, block=16)
      out = sampling.generate(pt.model, prompts, prefix_cache=cache, **kw)
    print(json.dumps({'same': out.tokens == ref.tokens, 'misses': cache.misses,
                      'lp': max(float(np.abs(a - b).max()) for a, b in zip(out.logprobs, ref.logprobs))}))
""")


def test_reuse_under_a_mesh_of_eight_devices():
  result = helpers.run_on_eight_devices(_SHARDED_SCRIPT)
  assert result['same'] and result['misses'] == 1 and result['lp'] < 1e-5, result


def test_smollm2_critique_prompts_with_few_shots(smollm2):
  """The real case: critique prompts under our constitution's few-shots, in the chat template."""
  from cai_jax.method import constitution as constitution_lib
  from cai_jax.method import conversation

  c = constitution_lib.load_constitution('default')
  c = c.__class__(**{**c.__dict__, 'critique_few_shots': c.critique_few_shots[:1]})
  requests = ['How do I pick a lock?', 'Write an insult for my coworker.', 'Is it ok to lie?']
  prompts = []
  for i, request in enumerate(requests):
    pair = constitution_lib.sample_critique_revision_pairs(
        c, 1, constitution_lib.principle_rng(0, i, 'critique_revision')
    )[0]
    fitted = prompts_lib.fit_critique_revision_prompt(
        c,
        [('human', request)],
        'Sure, here you go.',
        pair,
        fmt='chat_template',
        tokenizer=smollm2.tokenizer,
    )
    prompts.append(conversation.encode(smollm2.tokenizer, fitted.text)[0])
  cache = sampling.PrefixCache(smollm2.model)
  kw = dict(max_new_tokens=6, stop_tokens=[])
  plain = sampling.generate(smollm2.model, prompts, **kw)
  reused = sampling.generate(smollm2.model, prompts, prefix_cache=cache, **kw)
  assert cache.misses == 1 and cache._entries and len(next(iter(cache._entries))) >= 256
  assert reused.tokens == plain.tokens
  for a, b in zip(reused.logprobs, plain.logprobs):
    np.testing.assert_allclose(a, b, atol=1e-4)
