"""Batched generation and scoring: the engine every CAI stage samples and scores with.

`generate` left-pads prompts into bucketed shapes, runs one jitted prefill and a jitted
`lax.while_loop` decode (state donated, params passed as arguments), and stops each row on its
own at a stop token, a stop string or `max_new_tokens`. `score` gives log-probs of given
continuations. `generate_batched` feeds long prompt lists through in batches with a progress
bar; `generate_responses` takes conversations or rendered prompts and returns stripped replies,
so stages never see padding or buckets.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cai_jax import conversation
from cai_jax import model as model_lib
from cai_jax import sharding

# Every trace of a jitted sampling function bumps its counter: tests assert that a second call
# whose shapes fall in the same buckets compiles nothing.
compile_counts: collections.Counter = collections.Counter()

STOP_CHUNK = 16  # decode steps between host checks for stop strings
_MIN_LEN_BUCKET = 16
_STOP_ID_SLOTS = 8  # stop-token ids are padded to a multiple of this (one compile for most uses)
_TOP_P_CANDIDATES = 64  # top-p looks at this many best tokens first; a full sort only if needed
_SCORE_CHUNK = 128  # positions per LM-head chunk in `score` (bounds the [B, T, V] logits)

# ---- buckets --------------------------------------------------------------------------------


def length_bucket(n: int, minimum: int = _MIN_LEN_BUCKET) -> int:
  """Smallest of minimum, 2^k or 3 * 2^k that holds n (at most a third is padding)."""
  b = minimum
  while b < n:
    b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
  return b


def batch_bucket(n: int) -> int:
  """A power of two, and a multiple of the mesh's data x fsdp size so rows shard evenly."""
  b = 1
  while b < n:
    b *= 2
  shards = sharding.batch_axis_size()
  return max(b, shards) if shards & (shards - 1) == 0 else -(-b // shards) * shards


# ---- outputs --------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerateOutput:
  tokens: list[list[int]]  # new tokens per row, cut after the stop token / stop string
  logprobs: list[np.ndarray]  # log p(token) under the raw (pre-temperature) logits, per token
  finish_reason: list[str]  # 'stop' or 'length'
  texts: list[str] | None = None  # decoded, stop string / stop token removed (with a tokenizer)
  num_truncated: list[int] | None = None  # prompt tokens dropped on the left per row


@dataclasses.dataclass
class ScoreOutput:
  total: np.ndarray  # [B] sum of the continuation's log-probs
  per_token: list[np.ndarray]  # log-prob of each continuation token


@dataclasses.dataclass
class Response:
  text: str
  tokens: list[int]
  logprobs: np.ndarray
  finish_reason: str
  prompt_tokens: list[int]


@dataclasses.dataclass(frozen=True)
class _Strategy:
  """The static part of a sampling configuration (part of the compile key)."""
  greedy: bool
  top_k: int | None
  top_p: bool


@flax.struct.dataclass
class DecodeState:
  tokens: jax.Array  # [B, N] int32 generated tokens; pad after a row is done
  logprobs: jax.Array  # [B, N] float32
  cache: Any  # list of {'k', 'v'} [B, K, P + N, H]
  key_mask: jax.Array  # [B, P + N] bool: valid cache slots
  last: jax.Array  # [B] int32: newest token, fed at the next step
  prompt_lens: jax.Array  # [B] int32
  lengths: jax.Array  # [B] int32: tokens generated per row (a stop token counts)
  done: jax.Array  # [B] bool
  row_keys: jax.Array  # [B] PRNG keys, one per row (fold_in(seed, row_id))
  step: jax.Array  # int32: tokens generated so far by the batch


# ---- token choice ---------------------------------------------------------------------------


def _nucleus(vals, lse, top_p):
  """Masks sorted-descending logits `vals` outside the smallest set with prob mass >= top_p."""
  probs = jnp.exp(vals - lse[:, None])
  before = jnp.cumsum(probs, axis=-1) - probs
  keep = (before < top_p) | (jnp.arange(vals.shape[-1]) == 0)  # always the top token
  return jnp.where(keep, vals, -jnp.inf), before[:, -1] + probs[:, -1]


def choose_tokens(logits, keys, temperature, top_p, strategy: _Strategy):
  """Next tokens [B] and their log-probs under the raw logits.

  logits [B, V] float32, keys [B] (one per row, already folded with the step).
  Order as in transformers: temperature, then top-k, then top-p.
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  if strategy.greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:
    x = logits / temperature
    categorical = jax.vmap(jax.random.categorical)
    if strategy.top_k is not None:
      vals, idx = jax.lax.top_k(x, min(strategy.top_k, x.shape[-1]))
      if strategy.top_p:
        vals, _ = _nucleus(vals, jax.nn.logsumexp(vals, axis=-1), top_p)
      tokens = jnp.take_along_axis(idx, categorical(keys, vals)[:, None], axis=-1)[:, 0]
    elif strategy.top_p:
      lse = jax.nn.logsumexp(x, axis=-1)

      def among(k):
        vals, idx = jax.lax.top_k(x, k)
        vals, mass = _nucleus(vals, lse, top_p)
        return vals, idx, mass

      def full_sort():
        vals, idx, _ = among(x.shape[-1])
        return jnp.take_along_axis(idx, categorical(keys, vals)[:, None], axis=-1)[:, 0]

      n = min(_TOP_P_CANDIDATES, x.shape[-1])
      vals, idx, mass = among(n)
      fast = jnp.take_along_axis(idx, categorical(keys, vals)[:, None], axis=-1)[:, 0]
      # The candidates hold every row's nucleus (common): exact without sorting the vocabulary.
      fits = jnp.all(mass >= top_p) | (n == x.shape[-1])
      tokens = jax.lax.cond(fits, lambda: fast, full_sort)
    else:
      tokens = categorical(keys, x)
    tokens = tokens.astype(jnp.int32)
  return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


def _step_keys(row_keys, step):
  return jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)


# ---- jitted prefill and decode --------------------------------------------------------------


def _compiler_options():
  # XLA:CPU's YNN fusions run the small decode matmuls at about half the speed of its default
  # dot emitter on AVX2 machines (see experiments/benchmarks/sampling.py).
  if jax.default_backend() == 'cpu':
    return {'xla_cpu_experimental_ynn_fusion_type': ''}
  return None


_JIT_CACHE: dict = {}


def _jitted(kind: str, graphdef, strategy: _Strategy | None = None):
  """One jitted function per (kind, model structure, strategy, mesh, rules); jax caches shapes."""
  key = (kind, graphdef, strategy, sharding.current_mesh(), sharding._rules)
  fn = _JIT_CACHE.get(key)
  if fn is None:
    if kind == 'prefill':
      fn = jax.jit(functools.partial(_prefill, graphdef, strategy), donate_argnums=(3,),
                   compiler_options=_compiler_options())
    elif kind == 'decode':
      fn = jax.jit(functools.partial(_decode, graphdef, strategy), donate_argnums=(1,),
                   compiler_options=_compiler_options())
    elif kind == 'score_options':
      fn = jax.jit(functools.partial(_score_options_fn, graphdef),
                   compiler_options=_compiler_options())
    else:
      fn = jax.jit(functools.partial(_score_fn, graphdef), static_argnums=(3,),
                   compiler_options=_compiler_options())
    _JIT_CACHE[key] = fn
  return fn


def _batch_constrain(x):
  return sharding.constrain(x, ('batch',) + (None,) * (x.ndim - 1))


def _is_stop(tokens, stop_ids):
  return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def _prompt_positions(mask):
  """Positions of left-padded prompts [B, P]: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def _run_prompt(model, tokens, positions, mask, cache):
  """Hidden states of the prompts [B, P] and `cache` with them in its first P slots.

  Attends over the P prompt slots only, then writes them into the full-length cache.
  """
  hidden, prefix = model.hidden(tokens, positions, mask,
                                model_lib.cache_prefix(cache, tokens.shape[1]), 0)
  return hidden, model_lib.cache_write_prefix(cache, prefix)


def _prefill(graphdef, strategy, params, tokens, prompt_mask, cache, row_ids, seed, temperature,
             top_p, max_new, stop_ids, pad_rows):
  """Runs the prompt [B, P] through the model, fills the cache and picks the first token."""
  compile_counts['prefill'] += 1
  model = nnx.merge(graphdef, params)
  b, p = tokens.shape
  n = model_lib.cache_length(cache) - p
  positions = _prompt_positions(prompt_mask)
  hidden, cache = _run_prompt(model, tokens, positions, prompt_mask, cache)
  logits = model.logits_from_hidden(hidden[:, -1:])[:, 0]
  base = jax.random.key(seed)
  row_keys = jax.vmap(jax.random.fold_in, (None, 0))(base, row_ids)
  first, first_lp = choose_tokens(logits, _step_keys(row_keys, 0), temperature, top_p, strategy)
  pad = jnp.zeros((b, n), jnp.int32)
  done = pad_rows | _is_stop(first, stop_ids) | (max_new <= 1)
  key_mask = jnp.concatenate([prompt_mask, jnp.zeros((b, n), bool)], axis=1)
  return DecodeState(
      tokens=_batch_constrain(pad.at[:, 0].set(first)),
      logprobs=_batch_constrain(jnp.zeros((b, n), jnp.float32).at[:, 0].set(first_lp)),
      cache=cache, key_mask=_batch_constrain(key_mask), last=first,
      prompt_lens=prompt_mask.sum(axis=1).astype(jnp.int32),
      lengths=jnp.where(pad_rows, 0, 1).astype(jnp.int32), done=done, row_keys=row_keys,
      step=jnp.asarray(1, jnp.int32))


def _decode(graphdef, strategy, params, state: DecodeState, until, temperature, top_p, max_new,
            stop_ids, pad_id):
  """Decodes until step `until`, the buffer's end, or every row is done."""
  compile_counts['decode'] += 1
  model = nnx.merge(graphdef, params)
  n = state.tokens.shape[1]
  p = state.key_mask.shape[1] - n
  until = jnp.minimum(until, n)

  def cond(s: DecodeState):
    return (s.step < until) & ~jnp.all(s.done)

  def body(s: DecodeState):
    slot = p + s.step - 1  # where the newest token goes
    key_mask = jax.lax.dynamic_update_slice_in_dim(
        s.key_mask, jnp.ones((s.key_mask.shape[0], 1), bool), slot, 1)
    positions = (s.prompt_lens + s.step - 1)[:, None]
    logits, cache = model(s.last[:, None], positions, key_mask, s.cache, slot)
    tok, lp = choose_tokens(logits[:, 0], _step_keys(s.row_keys, s.step), temperature, top_p,
                            strategy)
    tok = jnp.where(s.done, pad_id, tok)
    lp = jnp.where(s.done, 0.0, lp)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.step, 1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(s.logprobs, lp[:, None], s.step, 1)
    lengths = jnp.where(s.done, s.lengths, s.step + 1)
    done = s.done | _is_stop(tok, stop_ids) | (s.step + 1 >= max_new)
    return s.replace(tokens=tokens, logprobs=logprobs, cache=cache, key_mask=key_mask, last=tok,
                     lengths=lengths, done=done, step=s.step + 1)

  return jax.lax.while_loop(cond, body, state)


# ---- input checks ---------------------------------------------------------------------------


def _prepare_prompts(prompt_tokens, vocab_size, limit, truncate):
  if truncate not in ('error', 'left'):
    raise ValueError(f"truncate must be 'error' or 'left', got {truncate!r}")
  prompts, dropped = [], []
  for i, p in enumerate(prompt_tokens):
    p = [int(t) for t in np.asarray(p, dtype=np.int64).reshape(-1)]
    if not p:
      raise ValueError(f'prompt {i} is empty; every prompt needs at least one token')
    bad = [t for t in p if not 0 <= t < vocab_size]
    if bad:
      raise ValueError(f'prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}')
    if len(p) > limit:
      if truncate == 'error':
        raise ValueError(f'prompt {i} has {len(p)} tokens, more than the limit of {limit} '
                         "(max_prompt_len / model context minus max_new_tokens); pass "
                         "truncate='left' to drop its oldest tokens")
      logging.warning('prompt %d: dropped its first %d of %d tokens (limit %d)', i,
                      len(p) - limit, len(p), limit)
      dropped.append(len(p) - limit)
      p = p[-limit:]
    else:
      dropped.append(0)
    prompts.append(p)
  return prompts, dropped


def _left_pad(rows, batch, length, pad_id):
  tokens = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), bool)
  for i, r in enumerate(rows):
    tokens[i, length - len(r):] = r
    mask[i, length - len(r):] = True
  mask[len(rows):, -1] = True  # batch-padding rows see one (pad) token: no empty softmax
  return tokens, mask


def _put_batch(x):
  """Places a [B, ...] host array with its batch axis sharded by the mesh rules."""
  if sharding.current_mesh() is None:
    return jnp.asarray(x)
  names = ('batch',) + (None,) * (x.ndim - 1)
  return jax.device_put(x, sharding.named_sharding(names, x.shape))


def _default_stop_tokens(model, tokenizer):
  ids = []
  for eos in (getattr(tokenizer, 'eos_token_id', None), model.cfg.eos_token_id):
    if eos is not None and int(eos) not in ids:
      ids.append(int(eos))
  return ids


def _split_stop_strings(stop_strings, tokenizer):
  """Stop strings that are one special token become stop tokens; the rest are checked on host."""
  as_ids, as_text = [], []
  if not stop_strings:
    return as_ids, as_text
  if tokenizer is None:
    raise ValueError('stop_strings need a tokenizer')
  special = set(getattr(tokenizer, 'all_special_tokens', []) or [])
  special |= set(getattr(tokenizer, 'added_tokens_encoder', {}) or {})
  for s in stop_strings:
    if not isinstance(s, str) or not s:
      raise ValueError(f'stop string {s!r} must be a non-empty string')
    ids = tokenizer.encode(s, add_special_tokens=False)
    unk = getattr(tokenizer, 'unk_token_id', None)
    if not ids or (unk is not None and unk in ids) or s not in tokenizer.decode(ids):
      raise ValueError(f'stop string {s!r} cannot be represented by the tokenizer '
                       f'(encodes to {ids}); it could never be generated')
    if s in special and len(ids) == 1:
      as_ids.append(int(ids[0]))
    else:
      as_text.append(s)
  return as_ids, as_text


def _find_stop(text: str, stop_strings) -> int:
  """Index of the earliest stop-string match in text, or -1."""
  hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
  return min(hits) if hits else -1


def _cut_at_stop_string(tokens, tokenizer, stop_strings):
  """Fewest leading tokens whose text contains a stop string, and that text cut before it."""
  lo, hi = 1, len(tokens)  # decode(tokens[:hi]) contains a stop string
  while lo < hi:
    mid = (lo + hi) // 2
    if _find_stop(tokenizer.decode(tokens[:mid]), stop_strings) >= 0:
      hi = mid
    else:
      lo = mid + 1
  text = tokenizer.decode(tokens[:hi])
  return hi, text[:_find_stop(text, stop_strings)]


# ---- generate -------------------------------------------------------------------------------


def generate(model, prompt_tokens: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
             tokenizer=None, seed: int = 0, row_ids: Sequence[int] | None = None,
             max_prompt_len: int | None = None, truncate: str = 'error',
             stop_chunk: int = STOP_CHUNK, min_prompt_bucket: int = _MIN_LEN_BUCKET) -> GenerateOutput:
  """Samples continuations of a batch of token-id prompts of any lengths.

  Args:
    model: a `model.Decoder` (its parameters are passed to the jitted functions as arguments).
    prompt_tokens: one list of token ids per row.
    temperature: 0 is greedy; otherwise softmax(logits / temperature), then top-k and top-p.
    stop_tokens: ids that end a row (kept in the output); None means the tokenizer's and the
      config's eos; [] means none.
    stop_strings: texts that end a row (need `tokenizer`); tokens are cut right after the token
      that completes the string and `.texts` drops the string.
    seed, row_ids: row r draws from fold_in(key(seed), row_ids[r]) (default: its index), so a
      row's sample does not depend on what else is in the batch.
    max_prompt_len, truncate: longer prompts raise ValueError ('error') or lose their oldest
      tokens ('left'); the model context (max_positions - max_new_tokens) is always a limit.
    stop_chunk: decode steps between host checks for stop strings.
    min_prompt_bucket: shortest padded prompt length; a caller whose prompts vary in length step
      after step (PPO rollouts) sets it to their longest to compile prefill and decode once.
  """
  cfg: model_lib.ModelConfig = model.cfg
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be a positive integer, got {max_new_tokens!r}')
  if temperature is None or temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature!r}')
  if top_k is not None and (int(top_k) != top_k or top_k <= 0):
    raise ValueError(f'top_k must be a positive integer or None, got {top_k!r}')
  if top_p is not None and not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1] or None, got {top_p!r}')
  if max_new_tokens >= cfg.max_positions:
    raise ValueError(f'max_new_tokens={max_new_tokens} leaves no room for a prompt in the '
                     f'model context of {cfg.max_positions} positions')
  limit = cfg.max_positions - int(max_new_tokens)
  if max_prompt_len is not None:
    if max_prompt_len <= 0:
      raise ValueError(f'max_prompt_len must be positive, got {max_prompt_len}')
    limit = min(limit, int(max_prompt_len))
  prompts, dropped = _prepare_prompts(prompt_tokens, cfg.vocab_size, limit, truncate)
  if not prompts:
    return GenerateOutput([], [], [], [] if tokenizer is not None else None, [])
  if row_ids is not None and len(row_ids) != len(prompts):
    raise ValueError(f'row_ids has {len(row_ids)} entries for {len(prompts)} prompts')

  stop_ids = list(_default_stop_tokens(model, tokenizer) if stop_tokens is None else stop_tokens)
  string_ids, stop_texts = _split_stop_strings(stop_strings, tokenizer)
  stop_ids += [i for i in string_ids if i not in stop_ids]
  if any(not 0 <= int(i) < cfg.vocab_size for i in stop_ids):
    raise ValueError(f'stop_tokens {stop_ids} must be ids in [0, {cfg.vocab_size})')

  greedy = temperature == 0.0
  use_top_p = top_p is not None and top_p < 1.0 and not greedy
  strategy = _Strategy(greedy=greedy, top_k=None if greedy or top_k is None else int(top_k),
                       top_p=use_top_p)
  n_rows = len(prompts)
  b = batch_bucket(n_rows)
  p = length_bucket(max(len(r) for r in prompts), min_prompt_bucket)
  n = length_bucket(int(max_new_tokens))
  pad_id = int(cfg.pad_token_id if cfg.pad_token_id is not None else
               getattr(tokenizer, 'pad_token_id', None) or 0)
  tokens, mask = _left_pad(prompts, b, p, pad_id)
  ids = np.arange(b, dtype=np.int32) if row_ids is None else np.concatenate(
      [np.asarray(row_ids, np.int32), np.arange(n_rows, b, dtype=np.int32) + 2**30])
  stop_arr = np.full((-(-max(len(stop_ids), 1) // _STOP_ID_SLOTS) * _STOP_ID_SLOTS,), -1, np.int32)
  stop_arr[:len(stop_ids)] = stop_ids

  graphdef, params = nnx.split(model)
  dyn = dict(temperature=jnp.float32(max(temperature, 1e-6)),
             top_p=jnp.float32(top_p if use_top_p else 1.0),
             max_new=jnp.int32(max_new_tokens), stop_ids=jnp.asarray(stop_arr))
  cache = model_lib.init_cache(cfg, b, p + n)
  state = _jitted('prefill', graphdef, strategy)(
      params, _put_batch(tokens), _put_batch(mask), cache,
      _put_batch(ids), jnp.uint32(seed % 2**32), dyn['temperature'], dyn['top_p'],
      dyn['max_new'], dyn['stop_ids'], _put_batch(np.arange(b) >= n_rows))
  decode = _jitted('decode', graphdef, strategy)

  # Rows are final once the host has seen their end (stop token / length on device, or a
  # stop string found in their decoded text).
  final: dict[int, tuple[int, str, str | None]] = {}
  chunk = int(max_new_tokens) if not stop_texts else max(1, int(stop_chunk))
  step = 1
  while True:
    if step < max_new_tokens:
      state = decode(params, state, jnp.int32(step + chunk), dyn['temperature'], dyn['top_p'],
                     dyn['max_new'], dyn['stop_ids'], jnp.int32(pad_id))
    host_tokens, lengths, done, step = jax.device_get(
        (state.tokens, state.lengths, state.done, state.step))
    step = int(step)
    newly_done = np.zeros(b, bool)
    for r in range(n_rows):
      if r in final:
        continue
      row = host_tokens[r, :lengths[r]].tolist()
      if stop_texts and row:
        text = tokenizer.decode(row)
        if _find_stop(text, stop_texts) >= 0:
          cut, text = _cut_at_stop_string(row, tokenizer, stop_texts)
          final[r] = (cut, 'stop', text)
          newly_done[r] = True
          continue
      if done[r]:
        stopped = bool(row) and row[-1] in stop_ids
        final[r] = (len(row), 'stop' if stopped else 'length', None)
    if len(final) == n_rows or step >= min(n, max_new_tokens):
      break
    if newly_done.any():
      state = state.replace(done=state.done | _put_batch(newly_done))

  host_lp = np.asarray(jax.device_get(state.logprobs))
  out = GenerateOutput([], [], [], [] if tokenizer is not None else None, dropped)
  for r in range(n_rows):
    cut, reason, text = final.get(r, (int(lengths[r]), 'length', None))
    row = host_tokens[r, :cut].tolist()
    out.tokens.append(row)
    out.logprobs.append(host_lp[r, :cut].astype(np.float32))
    out.finish_reason.append(reason)
    if tokenizer is not None:
      if text is None:
        text = tokenizer.decode(row[:-1] if reason == 'stop' else row)
      out.texts.append(text)
  return out


# ---- long jobs ------------------------------------------------------------------------------


def generate_batched(model, prompt_tokens: Sequence[Sequence[int]], *, batch_size: int,
                     progress: bool = True, desc: str = 'sampling', **kwargs) -> GenerateOutput:
  """`generate` over many prompts, `batch_size` at a time, sorted by length for tight buckets.

  Row r keeps row id r, so its sample does not depend on batch_size or the sort. Results come
  back in input order. `progress` shows a tqdm bar with prompts/s, tokens/s and the ETA.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  if 'row_ids' in kwargs:
    raise ValueError('generate_batched assigns row ids itself (the input index)')
  n = len(prompt_tokens)
  order = sorted(range(n), key=lambda i: -len(prompt_tokens[i]))
  has_tok = kwargs.get('tokenizer') is not None
  results: list = [None] * n
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=n, desc=desc, unit='prompt', dynamic_ncols=True)
  start, new_tokens = time.time(), 0
  try:
    for lo in range(0, n, batch_size):
      idx = order[lo:lo + batch_size]
      out = generate(model, [prompt_tokens[i] for i in idx], row_ids=idx, **kwargs)
      for j, i in enumerate(idx):
        results[i] = (out.tokens[j], out.logprobs[j], out.finish_reason[j],
                      out.texts[j] if has_tok else None, out.num_truncated[j])
        new_tokens += len(out.tokens[j])
      if bar is not None:
        bar.update(len(idx))
        bar.set_postfix(tok_s=f'{new_tokens / max(time.time() - start, 1e-9):.1f}')
  finally:
    if bar is not None:
      bar.close()
  cols = list(zip(*results)) if results else [[]] * 5
  return GenerateOutput(list(cols[0]), list(cols[1]), list(cols[2]),
                        list(cols[3]) if has_tok else None, list(cols[4]))


def generate_responses(pretrained, prompts: Sequence[str | Sequence[conversation.Turn]], *,
                       fmt: str = 'transcript', max_new_tokens: int, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None,
                       batch_size: int = 16, seed: int = 0,
                       stop_strings: Sequence[str] | None = None,
                       max_prompt_len: int | None = None, truncate: str = 'left',
                       progress: bool = False) -> list[Response]:
  """Assistant replies to conversations (lists of (role, text) turns) or rendered prompts.

  The format's stop strings (e.g. "\\n\\nHuman:") end a reply; transcript replies have their
  leading whitespace stripped (the prompt ends in "Assistant:").
  """
  conversation.check_format(fmt)
  tok = pretrained.tokenizer
  texts = [p if isinstance(p, str) else conversation.render(p, fmt, tok) for p in prompts]
  # A rendered chat template already holds its special tokens.
  encoded = [tok.encode(t, add_special_tokens=fmt == 'transcript') for t in texts]
  stops = list(conversation.stop_strings(fmt, tok)) + list(stop_strings or [])
  out = generate_batched(pretrained.model, encoded, batch_size=batch_size, progress=progress,
                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, stop_strings=stops, tokenizer=tok, seed=seed,
                         max_prompt_len=max_prompt_len, truncate=truncate)
  return [Response(text=t.lstrip() if fmt == 'transcript' else t, tokens=toks, logprobs=lp,
                   finish_reason=fr, prompt_tokens=list(pr[d:]))
          for t, toks, lp, fr, pr, d in zip(out.texts, out.tokens, out.logprobs,
                                            out.finish_reason, encoded, out.num_truncated)]


# ---- score ----------------------------------------------------------------------------------


def _score_fn(graphdef, params, tokens, mask, n_cont):
  """log p(tokens[:, t] | tokens[:, :t]) for the last n_cont positions [B, n_cont]."""
  compile_counts['score'] += 1
  model = nnx.merge(graphdef, params)
  positions = _prompt_positions(mask)
  hidden, _ = model.hidden(tokens, positions, mask)
  hidden = hidden[:, -n_cont - 1:-1]  # predicts tokens[:, -n_cont:]
  targets = tokens[:, -n_cont:]
  chunk = min(n_cont, _SCORE_CHUNK)
  b, _, d = hidden.shape
  hc = hidden.reshape(b, n_cont // chunk, chunk, d).swapaxes(0, 1)
  tc = targets.reshape(b, n_cont // chunk, chunk).swapaxes(0, 1)

  def one(args):
    h, t = args
    logits = model.logits_from_hidden(h)
    picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)

  return jax.lax.map(one, (hc, tc)).swapaxes(0, 1).reshape(b, n_cont)


def _continuation(tokens, row: int, prompt_len: int, cfg, what: str) -> list[int]:
  """A continuation's token ids as ints, checked against the vocabulary and the context."""
  c = [int(t) for t in np.asarray(tokens, dtype=np.int64).reshape(-1)]
  if any(not 0 <= t < cfg.vocab_size for t in c):
    raise ValueError(f'row {row}: a {what} has token ids outside [0, {cfg.vocab_size})')
  if prompt_len + len(c) > cfg.max_positions:
    raise ValueError(f'row {row}: prompt + {what} = {prompt_len + len(c)} tokens, '
                     f'more than the model context of {cfg.max_positions}')
  return c


def score(model, prompt_tokens: Sequence[Sequence[int]],
          continuation_tokens: Sequence[Sequence[int]]) -> ScoreOutput:
  """Log-probs of each continuation after its prompt; rows of any lengths in one forward pass."""
  cfg = model.cfg
  if len(prompt_tokens) != len(continuation_tokens):
    raise ValueError(f'{len(prompt_tokens)} prompts but {len(continuation_tokens)} continuations')
  prompts, _ = _prepare_prompts(prompt_tokens, cfg.vocab_size, cfg.max_positions, 'error')
  conts = [_continuation(c, i, len(prompts[i]), cfg, 'continuation')
           for i, c in enumerate(continuation_tokens)]
  if not prompts:
    return ScoreOutput(np.zeros((0,), np.float32), [])
  n_cont = length_bucket(max(max(len(c) for c in conts), 1), 8)
  if n_cont > _SCORE_CHUNK:
    n_cont = -(-n_cont // _SCORE_CHUNK) * _SCORE_CHUNK
  rows = [p + c for p, c in zip(prompts, conts)]
  # Continuations end at the last slot; at least n_cont + 1 slots so every target has a context.
  t = length_bucket(max(max(len(r) for r in rows), n_cont + 1))
  b = batch_bucket(len(rows))
  pad_id = int(cfg.pad_token_id or 0)
  tokens, mask = _left_pad(rows, b, t, pad_id)
  graphdef, params = nnx.split(model)
  lp = np.asarray(jax.device_get(_jitted('score', graphdef)(
      params, _put_batch(tokens), _put_batch(mask), n_cont)))
  per_token = [lp[i, n_cont - len(c):].astype(np.float32) for i, c in enumerate(conts)]
  return ScoreOutput(np.array([x.sum() for x in per_token], np.float32), per_token)


def _score_options_fn(graphdef, params, tokens, mask, options, cache):
  """Per-token log-probs [B, O, C] of each option options[:, o] (right-padded) after its prompt
  (tokens [B, P], left-padded): the prompt runs once into `cache` (zeros, P + C slots) that
  every option then reads."""
  compile_counts['score_options'] += 1
  model = nnx.merge(graphdef, params)
  b, p = tokens.shape
  n_opt, c = options.shape[1], options.shape[2]
  positions = _prompt_positions(mask)
  hidden, cache = _run_prompt(model, tokens, positions, mask, cache)
  first = jax.nn.log_softmax(model.logits_from_hidden(hidden[:, -1:])[:, 0], axis=-1)  # [B, V]
  key_mask = jnp.concatenate([mask, jnp.ones((b, c), bool)], axis=1)
  cont_positions = positions[:, -1:] + 1 + jnp.arange(c - 1, dtype=jnp.int32)[None]
  out = []
  for o in range(n_opt):
    toks = options[:, o]
    lp = [jnp.take_along_axis(first, toks[:, :1], axis=-1)]
    if c > 1:  # option token t is predicted from the cache + option tokens before it
      h, _ = model.hidden(toks[:, :-1], cont_positions, key_mask, cache, p)
      logits = jax.nn.log_softmax(model.logits_from_hidden(h), axis=-1)
      lp.append(jnp.take_along_axis(logits, toks[:, 1:, None], axis=-1)[..., 0])
    out.append(jnp.concatenate(lp, axis=1))
  return jnp.stack(out, axis=1)


def score_options(model, prompt_tokens: Sequence[Sequence[int]],
                  options: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
  """Total log-prob [N, O] of each of a row's O continuations after its prompt.

  Equals `score` on every (prompt, option) pair, at the cost of one pass over each prompt: the
  prompt fills a KV cache once and each option is a short pass that reads it (the (A)/(B)
  labels of AI feedback score two options after one long prompt).
  """
  cfg = model.cfg
  if len(prompt_tokens) != len(options):
    raise ValueError(f'{len(prompt_tokens)} prompts but {len(options)} option lists')
  if not prompt_tokens:
    return np.zeros((0, 0), np.float32)
  prompts, _ = _prepare_prompts(prompt_tokens, cfg.vocab_size, cfg.max_positions, 'error')
  n_opt = len(options[0])
  conts = []
  for i, row in enumerate(options):
    if len(row) != n_opt or not n_opt:
      raise ValueError(f'row {i} has {len(row)} options; every row needs the same number (>= 1)')
    row = [_continuation(c, i, len(prompts[i]), cfg, 'option') for c in row]
    if not all(row):
      raise ValueError(f'row {i} has an empty option')
    conts.append(row)
  c = length_bucket(max(len(x) for row in conts for x in row), 4)
  t = length_bucket(max(len(x) for x in prompts))
  b = batch_bucket(len(prompts))
  pad_id = int(cfg.pad_token_id or 0)
  tokens, mask = _left_pad(prompts, b, t, pad_id)
  opts = np.full((b, n_opt, c), pad_id, np.int32)
  for i, row in enumerate(conts):
    for o, x in enumerate(row):
      opts[i, o, :len(x)] = x
  graphdef, params = nnx.split(model)
  lp = np.asarray(jax.device_get(_jitted('score_options', graphdef)(
      params, _put_batch(tokens), _put_batch(mask), _put_batch(opts),
      model_lib.init_cache(cfg, b, t + c))))
  return np.array([[lp[i, o, :len(x)].astype(np.float32).sum() for o, x in enumerate(row)]
                   for i, row in enumerate(conts)], np.float32)
