"""Shared prompt text computed once: the prefix a batch of prompts has in common runs through the
model one time, and its keys and values are kept as one copy that every row reads.

Constitutional AI prompts are mostly the same text: every critique and revision prompt opens with
the same few-shot preamble (~1,900 of ~2,000 tokens with the paper's release), so a batch's
longest common token prefix is most of its prefill. `generate` and `score_options` take a
`PrefixCache`; with it they

1. find the batch's longest common prefix, rounded down to `block` tokens (so that batches whose
   common text ends a few tokens apart agree on one prefix) and kept one token short of the
   shortest prompt (each row needs a token of its own to predict from);
2. take that prefix's keys and values from the cache, or compute them once (a batch-1 prefill)
   and keep them, evicting the least recently used entries past `max_tokens`. The split point
   depends on the batch alone, never on what the cache holds, and a kept prefix is bit for bit
   the one a cold cache computes: a row's result is the same warm or cold (resumes);
3. prefill only each row's remainder, at positions that continue the prefix, attending to the
   prefix's single copy and to its own slots in one softmax (`model.Prefix`: the cascade /
   Hydragen decomposition), and decode the same way: a step reads the prefix once for the batch.

`score_options` also finds groups when the batch as a whole shares too little: rows that share a
long prefix among themselves (a feedback label's two option orders; the three model pairs a judge
compares on one conversation) get their group's prefix, computed once per call (`split_groups`).

The result equals the plain path (the softmax over prefix + own slots is the softmax over the
concatenation); the tests hold greedy tokens identical and log-probs within 1e-5 in float32.
A batch with no prefix of at least `min_tokens` takes the plain path.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax.models import decoder as model_lib
from cai_jax.sampling import common
from cai_jax.utils import sharding

# Prefix KV is replicated over the batch axes (one copy for all rows); heads shard as in a cache.
_PREFIX_NAMES = {
    'k': (None, 'kv_heads', 'head_dim', 'length'),
    'v': (None, 'kv_heads', 'length', 'head_dim'),
}


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
  """Length of the longest token prefix all prompts share."""
  if not prompts:
    return 0
  first = np.asarray(prompts[0])
  n = min(len(p) for p in prompts)
  for p in prompts[1:]:
    p = np.asarray(p[:n])
    diff = np.nonzero(p != first[:n])[0]
    n = int(diff[0]) if diff.size else n
    if n == 0:
      break
  return n


def _prefix_fn(graphdef, params, tokens, mask):
  """The keys and values of G right-padded prefixes [G, Sp] at positions 0..Sp-1."""
  common.compile_counts['prefix'] += 1
  model = nnx.merge(graphdef, params)
  g, sp = tokens.shape
  cfg = model.cfg
  shapes = {'k': (g, cfg.n_kv_heads, cfg.head_dim, sp), 'v': (g, cfg.n_kv_heads, sp, cfg.head_dim)}
  cache = [
      {kv: jnp.zeros(shapes[kv], jnp.dtype(cfg.dtype)) for kv in ('k', 'v')}
      for _ in range(cfg.n_layers)
  ]
  positions = jnp.broadcast_to(jnp.arange(sp, dtype=jnp.int32)[None], (g, sp))
  _, cache = model.hidden(tokens, positions, mask, cache, 0)
  return [{kv: sharding.constrain(c[kv], _PREFIX_NAMES[kv]) for kv in ('k', 'v')} for c in cache]


class PrefixCache:
  """Keys and values of shared prompt prefixes for one frozen model, kept across calls.

  Bounded by `max_tokens` (prefix slots held, all entries together; least recently used go
  first). A prefix longer than the bound is computed for its call and not kept.
  """

  def __init__(self, model, *, max_tokens: int = 8192, min_tokens: int = 64, block: int = 64):
    if max_tokens < 0 or min_tokens < 1 or block < 1:
      raise ValueError(
          f'PrefixCache needs max_tokens >= 0, min_tokens >= 1, block >= 1; got {max_tokens}, '
          f'{min_tokens}, {block}'
      )
    self.model = model
    self.max_tokens, self.min_tokens, self.block = max_tokens, min_tokens, block
    self._entries: collections.OrderedDict[tuple[int, ...], model_lib.Prefix] = (
        collections.OrderedDict()
    )
    self.hits = self.misses = 0
    self.group_prefixes = 0  # per-call group prefixes computed (split_groups)
    self.reused_tokens = 0  # prompt tokens not prefilled thanks to a shared prefix

  @classmethod
  def from_config(cls, model, cfg) -> PrefixCache | None:
    """The cache `config.sampling` asks for (None when prefix_reuse is off)."""
    if not cfg.prefix_reuse:
      return None
    return cls(
        model,
        max_tokens=cfg.prefix_cache_tokens,
        min_tokens=cfg.min_prefix_tokens,
        block=cfg.prefix_block,
    )

  @property
  def tokens(self) -> int:
    """Prefix slots held now (each entry's padded length)."""
    return sum(p.length for p in self._entries.values())

  def __len__(self) -> int:
    return len(self._entries)

  def clear(self) -> None:
    self._entries.clear()

  def find(self, model, prompts: Sequence[Sequence[int]]) -> tuple[int, model_lib.Prefix | None]:
    """(n, prefix): the first n tokens of every prompt are `prefix`; (0, None) when the batch
    shares fewer than `min_tokens`."""
    if model is not self.model:
      raise ValueError('this PrefixCache belongs to another model; make one per model')
    n = common_prefix_length(prompts)
    n = min(n, min(len(p) for p in prompts) - 1) // self.block * self.block
    if n < self.min_tokens:
      return 0, None
    head = tuple(int(t) for t in prompts[0][:n])
    # Only this very prefix is reused, never a shorter kept one: the split point is then a pure
    # function of the batch, so a row's numbers do not depend on what earlier calls left in the
    # cache (a run resumed with a cold cache writes the same records as an uninterrupted one).
    if head in self._entries:
      self._entries.move_to_end(head)
      self.hits += 1
      self.reused_tokens += n * len(prompts)
      return n, self._entries[head]
    self.misses += 1
    prefix = compute_prefix(model, head, self.block)
    self.reused_tokens += n * (len(prompts) - 1)
    if prefix.length <= self.max_tokens:
      self._entries[head] = prefix
      while self.tokens > self.max_tokens:
        self._entries.popitem(last=False)
    return n, prefix


def compute_prefix(model, tokens: Sequence[int], multiple: int = 1) -> model_lib.Prefix:
  """A `model.Prefix` of `tokens`, right-padded to a multiple of `multiple` slots (not to a length
  bucket: every decode step reads all of its slots, and a stage has few distinct prefixes)."""
  n = len(tokens)
  sp = -(-n // multiple) * multiple
  padded = np.zeros((1, sp), np.int32)
  padded[0, :n] = tokens
  mask = np.arange(sp) < n
  graphdef, params = nnx.split(model)
  kv = common.jitted(_prefix_fn, graphdef)(params, jnp.asarray(padded), jnp.asarray(mask[None]))
  return model_lib.Prefix(kv, jnp.asarray(mask))


def split(prompts: Sequence[Sequence[int]], cache: PrefixCache | None, model):
  """(remainders, prefix_len, prefix): each prompt without the shared prefix `cache` holds or
  computes for it; (prompts, 0, None) without a cache or a long enough shared prefix."""
  if cache is None or len(prompts) == 0:
    return prompts, 0, None
  n, prefix = cache.find(model, prompts)
  if prefix is None:
    return prompts, 0, None
  return [p[n:] for p in prompts], n, prefix


def find_groups(
    prompts: Sequence[Sequence[int]], min_tokens: int, block: int
) -> tuple[list[int], list[int]]:
  """(group of each row or -1, prefix length of each group): runs of prompts that share at least
  `min_tokens` (in sorted order), each group's prefix cut to a multiple of `block` and one token
  short of its shortest prompt. Single rows form no group: computing a prefix for one row saves
  nothing."""
  order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
  row_group, lengths = [-1] * len(prompts), []
  i = 0
  while i < len(order):
    first, shared, j = prompts[order[i]], len(prompts[order[i]]), i + 1
    while j < len(order):
      n = common_prefix_length([first[:shared], prompts[order[j]]])
      if n < min_tokens:
        break
      shared, j = n, j + 1
    members = order[i:j]
    n = min(shared, min(len(prompts[r]) for r in members) - 1) // block * block
    if len(members) > 1 and n >= min_tokens:
      for r in members:
        row_group[r] = len(lengths)
      lengths.append(n)
    i = j
  return row_group, lengths


def split_groups(prompts: Sequence[Sequence[int]], cache: PrefixCache | None, model, batch: int):
  """(remainders, per-row prefix lengths, prefix with rows): prompts with no prefix shared by the
  whole batch may still come in groups (both option orders of a feedback label, the model pairs
  a judge compares on one conversation); each group's prefix is computed once, in one batched
  prefill, for this call only. `batch` is the padded batch the rows go in. (prompts, [0]*n, None)
  when groups would save under a quarter of the prompt tokens."""
  none = (prompts, [0] * len(prompts), None)
  if cache is None or len(prompts) < 2:
    return none
  row_group, lengths = find_groups(prompts, cache.min_tokens, cache.block)
  saved = sum(lengths[g] for g in row_group if g >= 0) - sum(lengths)
  if saved < sum(len(p) for p in prompts) // 4:
    return none
  cache.group_prefixes += len(lengths)
  cache.reused_tokens += saved
  heads = [prompts[row_group.index(g)][:n] for g, n in enumerate(lengths)]
  sp = -(-max(lengths) // cache.block) * cache.block
  g_pad = common.batch_bucket(len(heads) + 1)  # + the empty group of rows with no prefix
  tokens = np.zeros((g_pad, sp), np.int32)
  mask = np.zeros((g_pad, sp), bool)
  for g, h in enumerate(heads):
    tokens[g, : len(h)], mask[g, : len(h)] = h, True
  graphdef, params = nnx.split(model)
  kv = common.jitted(_prefix_fn, graphdef)(params, jnp.asarray(tokens), jnp.asarray(mask))
  empty = len(heads)  # all-masked: rows outside every group see no prefix slot
  rows = np.full((batch,), empty, np.int32)
  rows[: len(prompts)] = [g if g >= 0 else empty for g in row_group]
  lens = [lengths[g] if g >= 0 else 0 for g in row_group]
  rest = [p[n:] for p, n in zip(prompts, lens)]
  return rest, lens, model_lib.Prefix(kv, jnp.asarray(mask), common.put_batch(rows))
