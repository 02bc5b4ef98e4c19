"""Generation: jitted prefill, a `lax.while_loop` decode over the KV cache, per-row stops, and
the batched and conversation-level helpers every stage samples with.

Why one module of ~660 lines: the jitted programs (`_prefill`, `_decode`), the decode state they
carry and the host loop that buckets, stops and cuts their outputs (`generate`) share one layout
of rows, slots and stop tokens; `generate_batched` and `generate_responses` are thin over it.
Buckets and the jit cache are in `common.py`, scoring in `scoring.py`, prefixes in `prefix.py`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cai_jax.method import conversation
from cai_jax.models import decoder as model_lib
from cai_jax.sampling import prefix as prefix_lib
from cai_jax.sampling.common import (
    MIN_LEN_BUCKET,
    batch_bucket,
    compile_counts,
    jitted,
    left_pad,
    length_bucket,
    prepare_prompts,
    progress_bar,
    prompt_positions,
    put_batch,
    run_prompt,
)
from cai_jax.utils import sharding

STOP_CHUNK = 16  # decode steps between host checks for stop strings
_STOP_ID_SLOTS = 8  # stop-token ids are padded to a multiple of this (one compile for most uses)
_TOP_P_CANDIDATES = 64  # top-p looks at this many best tokens first; a full sort only if needed


# ---- outputs --------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerateOutput:
  tokens: list[list[int]]  # new tokens per row, cut after the stop token / stop string
  logprobs: list[np.ndarray]  # log p(token) under the raw (pre-temperature) logits, per token
  finish_reason: list[str]  # 'stop' or 'length'
  texts: list[str] | None = None  # decoded, stop string / stop token removed (with a tokenizer)
  num_truncated: list[int] | None = None  # prompt tokens dropped on the left per row


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
  cache: Any  # model.init_cache of P + N slots
  key_mask: jax.Array  # [B, P + N] bool: valid cache slots
  last: jax.Array  # [B] int32: newest token, fed at the next step
  prompt_lens: jax.Array  # [B] int32, a shared prefix included (the next position is from it)
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


def sampling_settings(temperature, top_k, top_p):
  """(static strategy, temperature, top_p as traced scalars) of a sampling configuration, after
  checking it: temperature 0 is greedy (top-k and top-p then ignored), top_p 1 is off."""
  if temperature is None or not math.isfinite(temperature) or temperature < 0:
    raise ValueError(f'temperature must be a finite number >= 0, got {temperature!r}')
  if top_k is not None and (int(top_k) != top_k or top_k <= 0):
    raise ValueError(f'top_k must be a positive integer or None, got {top_k!r}')
  if top_p is not None and not 0.0 < top_p <= 1.0:  # NaN fails this too
    raise ValueError(f'top_p must be in (0, 1] or None, got {top_p!r}')
  greedy = temperature == 0.0
  use_top_p = top_p is not None and top_p < 1.0 and not greedy
  strategy = _Strategy(
      greedy=greedy, top_k=None if greedy or top_k is None else int(top_k), top_p=use_top_p
  )
  return strategy, jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p if use_top_p else 1.0)


# ---- jitted prefill and decode --------------------------------------------------------------


def _batch_constrain(x):
  return sharding.constrain(x, ('batch',) + (None,) * (x.ndim - 1))


def _is_stop(tokens, stop_ids):
  return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


class Knobs(NamedTuple):
  """The sampling settings the compiled steps take as traced values, so that changing them does
  not recompile: temperature (> 0), top_p (1.0 = off), max_new tokens, stop_ids (-1 padded)."""

  temperature: jax.Array
  top_p: jax.Array
  max_new: jax.Array
  stop_ids: jax.Array


def _prefill(
    graphdef,
    strategy,
    params,
    tokens,
    prompt_mask,
    cache,
    row_ids,
    seed,
    knobs,
    pad_rows,
    prefix=None,
    prefix_len=0,
):
  """Runs the prompt [B, P] through the model, fills the cache and picks the first token.

  With a shared `prefix` (`model.Prefix` of `prefix_len` tokens), `tokens` are each row's text
  after it: their positions continue the prefix's and they attend to its one copy.
  """
  temperature, top_p, max_new, stop_ids = knobs
  compile_counts['prefill'] += 1
  model = nnx.merge(graphdef, params)
  b, p = tokens.shape
  n = model_lib.cache_length(cache) - p
  positions = prompt_positions(prompt_mask) + prefix_len
  hidden, cache = run_prompt(model, tokens, positions, prompt_mask, cache, prefix)
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
      cache=cache,
      key_mask=_batch_constrain(key_mask),
      last=first,
      prompt_lens=(prompt_mask.sum(axis=1) + prefix_len).astype(jnp.int32),
      lengths=jnp.where(pad_rows, 0, 1).astype(jnp.int32),
      done=done,
      row_keys=row_keys,
      step=jnp.asarray(1, jnp.int32),
  )


def _decode(graphdef, strategy, params, state: DecodeState, until, knobs, pad_id, prefix=None):
  """Decodes until step `until`, the buffer's end, or every row is done (every step reading the
  shared `prefix`, if any, once for the whole batch)."""
  temperature, top_p, max_new, stop_ids = knobs
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
        s.key_mask, jnp.ones((s.key_mask.shape[0], 1), bool), slot, 1
    )
    positions = (s.prompt_lens + s.step - 1)[:, None]
    logits, cache = model(s.last[:, None], positions, key_mask, s.cache, slot, prefix)
    tok, lp = choose_tokens(
        logits[:, 0], _step_keys(s.row_keys, s.step), temperature, top_p, strategy
    )
    tok = jnp.where(s.done, pad_id, tok)
    lp = jnp.where(s.done, 0.0, lp)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], s.step, 1)
    logprobs = jax.lax.dynamic_update_slice_in_dim(s.logprobs, lp[:, None], s.step, 1)
    lengths = jnp.where(s.done, s.lengths, s.step + 1)
    done = s.done | _is_stop(tok, stop_ids) | (s.step + 1 >= max_new)
    return s.replace(
        tokens=tokens,
        logprobs=logprobs,
        cache=cache,
        key_mask=key_mask,
        last=tok,
        lengths=lengths,
        done=done,
        step=s.step + 1,
    )

  return jax.lax.while_loop(cond, body, state)


# ---- stops ----------------------------------------------------------------------------------


def _default_stop_tokens(cfg, tokenizer):
  ids = []
  for eos in (getattr(tokenizer, 'eos_token_id', None), cfg.eos_token_id):
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
    # Not a prompt: a stop string is matched inside generated text, where no BOS ever stands.
    ids = tokenizer.encode(s, add_special_tokens=False)
    unk = getattr(tokenizer, 'unk_token_id', None)
    if not ids or (unk is not None and unk in ids) or s not in tokenizer.decode(ids):
      raise ValueError(
          f'stop string {s!r} cannot be represented by the tokenizer '
          f'(encodes to {ids}); it could never be generated'
      )
    if s in special and len(ids) == 1:
      as_ids.append(int(ids[0]))
    else:
      as_text.append(s)
  return as_ids, as_text


def stops(cfg, tokenizer, stop_tokens, stop_strings) -> tuple[list[int], list[str]]:
  """(stop token ids, stop strings checked on the host): `stop_tokens` (None: the model's and
  tokenizer's end tokens) plus the stop strings that are one special token."""
  stop_ids = list(_default_stop_tokens(cfg, tokenizer) if stop_tokens is None else stop_tokens)
  string_ids, stop_texts = _split_stop_strings(stop_strings, tokenizer)
  return stop_ids + [i for i in string_ids if i not in stop_ids], stop_texts


def find_stop(text: str, stop_strings) -> int:
  """Index of the earliest stop-string match in text, or -1."""
  hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
  return min(hits) if hits else -1


def cut_at_stop_string(tokens, tokenizer, stop_strings):
  """Fewest leading tokens whose text contains a stop string, and that text cut before it."""
  lo, hi = 1, len(tokens)  # decode(tokens[:hi]) contains a stop string
  while lo < hi:
    mid = (lo + hi) // 2
    if find_stop(tokenizer.decode(tokens[:mid]), stop_strings) >= 0:
      hi = mid
    else:
      lo = mid + 1
  text = tokenizer.decode(tokens[:hi])
  return hi, text[: find_stop(text, stop_strings)]


# ---- generate -------------------------------------------------------------------------------


def generate(
    model,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_tokens: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer=None,
    seed: int = 0,
    row_ids: Sequence[int] | None = None,
    max_prompt_len: int | None = None,
    truncate: str = 'error',
    stop_chunk: int = STOP_CHUNK,
    min_prompt_bucket: int = MIN_LEN_BUCKET,
    prefix_cache: prefix_lib.PrefixCache | None = None,
) -> GenerateOutput:
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
    prefix_cache: a `sampling.PrefixCache` of this model: the prompts' shared prefix is computed
      once (or taken from it) and read by every row (sampling/prefix.py); same results.
  """
  cfg: model_lib.ModelConfig = model.cfg
  if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be a positive integer, got {max_new_tokens!r}')
  strategy, temperature_knob, top_p_knob = sampling_settings(temperature, top_k, top_p)
  if max_new_tokens >= cfg.max_positions:
    raise ValueError(
        f'max_new_tokens={max_new_tokens} leaves no room for a prompt in the '
        f'model context of {cfg.max_positions} positions'
    )
  limit = cfg.max_positions - int(max_new_tokens)
  if max_prompt_len is not None:
    if max_prompt_len <= 0:
      raise ValueError(f'max_prompt_len must be positive, got {max_prompt_len}')
    limit = min(limit, int(max_prompt_len))
  prompts, dropped = prepare_prompts(prompt_tokens, cfg.vocab_size, limit, truncate)
  if not prompts:
    return GenerateOutput([], [], [], [] if tokenizer is not None else None, [])
  if row_ids is not None and len(row_ids) != len(prompts):
    raise ValueError(f'row_ids has {len(row_ids)} entries for {len(prompts)} prompts')

  stop_ids, stop_texts = stops(model.cfg, tokenizer, stop_tokens, stop_strings)
  if any(not 0 <= int(i) < cfg.vocab_size for i in stop_ids):
    raise ValueError(f'stop_tokens {stop_ids} must be ids in [0, {cfg.vocab_size})')

  n_rows = len(prompts)
  rest, prefix_len, prefix = prefix_lib.split(prompts, prefix_cache, model)
  b = batch_bucket(n_rows)
  p = length_bucket(max(len(r) for r in rest), min_prompt_bucket)
  n = length_bucket(int(max_new_tokens))
  pad_id = conversation.pad_id(tokenizer, cfg)
  tokens, mask = left_pad(rest, b, p, pad_id)
  ids = (
      np.arange(b, dtype=np.int32)
      if row_ids is None
      else np.concatenate(
          [np.asarray(row_ids, np.int32), np.arange(n_rows, b, dtype=np.int32) + 2**30]
      )
  )
  stop_arr = np.full((-(-max(len(stop_ids), 1) // _STOP_ID_SLOTS) * _STOP_ID_SLOTS,), -1, np.int32)
  stop_arr[: len(stop_ids)] = stop_ids

  graphdef, params = nnx.split(model)
  knobs = Knobs(
      temperature=temperature_knob,
      top_p=top_p_knob,
      max_new=jnp.int32(max_new_tokens),
      stop_ids=jnp.asarray(stop_arr),
  )
  cache = model_lib.init_cache(cfg, b, p + n)
  state = jitted(_prefill, graphdef, strategy, donate_argnums=(3,))(
      params,
      put_batch(tokens),
      put_batch(mask),
      cache,
      put_batch(ids),
      jnp.uint32(seed % 2**32),
      knobs,
      put_batch(np.arange(b) >= n_rows),
      prefix,
      jnp.int32(prefix_len),
  )
  decode = jitted(_decode, graphdef, strategy, donate_argnums=(1,))

  # Rows are final once the host has seen their end (stop token / length on device, or a
  # stop string found in their decoded text).
  final: dict[int, tuple[int, str, str | None]] = {}
  chunk = int(max_new_tokens) if not stop_texts else max(1, int(stop_chunk))
  step = 1
  while True:
    if step < max_new_tokens:
      state = decode(
          params,
          state,
          jnp.int32(step + chunk),
          knobs,
          jnp.int32(pad_id),
          prefix,
      )
    host_tokens, lengths, done, step = jax.device_get(
        (state.tokens, state.lengths, state.done, state.step)
    )
    step = int(step)
    newly_done = np.zeros(b, bool)
    for r in range(n_rows):
      if r in final:
        continue
      row = host_tokens[r, : lengths[r]].tolist()
      if stop_texts and row:
        text = tokenizer.decode(row)
        if find_stop(text, stop_texts) >= 0:
          cut, text = cut_at_stop_string(row, tokenizer, stop_texts)
          final[r] = (cut, 'stop', text)
          newly_done[r] = True
          continue
      if done[r]:
        stopped = bool(row) and row[-1] in stop_ids
        final[r] = (len(row), 'stop' if stopped else 'length', None)
    if len(final) == n_rows or step >= min(n, max_new_tokens):
      break
    if newly_done.any():
      state = state.replace(done=state.done | put_batch(newly_done))

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


def generate_batched(
    model,
    prompt_tokens: Sequence[Sequence[int]],
    *,
    batch_size: int,
    progress: bool = True,
    desc: str = 'sampling',
    **kwargs,
) -> GenerateOutput:
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
  bar = progress_bar(progress, n, desc)
  start, new_tokens = time.time(), 0
  try:
    for lo in range(0, n, batch_size):
      idx = order[lo : lo + batch_size]
      out = generate(model, [prompt_tokens[i] for i in idx], row_ids=idx, **kwargs)
      for j, i in enumerate(idx):
        results[i] = (
            out.tokens[j],
            out.logprobs[j],
            out.finish_reason[j],
            out.texts[j] if has_tok else None,
            out.num_truncated[j],
        )
        new_tokens += len(out.tokens[j])
      if bar is not None:
        bar.update(len(idx))
        bar.set_postfix(tok_s=f'{new_tokens / max(time.time() - start, 1e-9):.1f}')
  finally:
    if bar is not None:
      bar.close()
  cols = list(zip(*results)) if results else [[]] * 5
  return GenerateOutput(
      list(cols[0]), list(cols[1]), list(cols[2]), list(cols[3]) if has_tok else None, list(cols[4])
  )


def _check_prompt(i: int, p) -> None:
  """A reply needs something to reply to: no empty prompt, conversation or last human turn."""
  if isinstance(p, str):
    if not p.strip():
      raise ValueError(f'prompts[{i}] is an empty prompt')
    return
  turns = list(p)
  if not turns:
    raise ValueError(f'prompts[{i}] is an empty conversation')
  for role, text in turns:
    if role not in (conversation.HUMAN, conversation.ASSISTANT) or not isinstance(text, str):
      raise ValueError(
          f'prompts[{i}] has a turn {(role, text)!r}: turns are (role, text) with '
          f"role 'human' or 'assistant'"
      )
  human = [text for role, text in turns if role == conversation.HUMAN]
  if not human or not human[-1].strip():
    raise ValueError(f'prompts[{i}]: its last human turn is empty (or missing)')


def generate_responses(
    pretrained,
    prompts: Sequence[str | Sequence[conversation.Turn]],
    *,
    fmt: str = 'transcript',
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 16,
    seed: int = 0,
    stop_strings: Sequence[str] | None = None,
    max_prompt_len: int | None = None,
    truncate: str = 'left',
    progress: bool = False,
    prefix_cache: prefix_lib.PrefixCache | None = None,
    engine=None,
) -> list[Response]:
  """Assistant replies to conversations (lists of (role, text) turns) or rendered prompts.

  The format's stop strings (e.g. "\\n\\nHuman:") end a reply; transcript replies have their
  leading whitespace stripped (the prompt ends in "Assistant:"). With an `engine`
  (`sampling.engine.Engine` of this model) the replies come from continuous batching instead of
  static batches of `batch_size`; prompt i samples from the same keys either way.
  """
  conversation.check_format(fmt)
  tok = pretrained.tokenizer
  if isinstance(prompts, str):
    raise ValueError('prompts is a string; it takes a list of prompts (or of conversations)')
  for i, p in enumerate(prompts):
    _check_prompt(i, p)
  texts = [p if isinstance(p, str) else conversation.render(p, fmt, tok) for p in prompts]
  encoded = [conversation.encode(tok, t)[0] for t in texts]
  if truncate == 'left':
    # Cut long prompts here, where the tokenizer is known, so they keep their BOS; `generate`
    # would drop the oldest tokens, BOS included.
    limit = pretrained.model.cfg.max_positions - max_new_tokens
    limit = limit if max_prompt_len is None else min(limit, max_prompt_len)
    if engine is not None:  # its page tables end at its max_len
      limit = min(limit, engine.width - max_new_tokens)
    if limit > 0:
      cut = [len(e) - limit for e in encoded if len(e) > limit]
      if cut:  # one line per call: the oldest text (few-shots first) is what goes
        logging.warning(
            '%d of %d prompts lost their oldest tokens (%d to %d of them; limit %d ' 'tokens)',
            len(cut),
            len(encoded),
            min(cut),
            max(cut),
            limit,
        )
      encoded = [conversation.keep_last(e, limit, tok) for e in encoded]
  stops = list(conversation.stop_strings(fmt, tok)) + list(stop_strings or [])
  if engine is not None:
    out = engine.generate_output(
        encoded,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_strings=stops,
        seed=seed,
        progress=progress,
    )
  else:
    out = generate_batched(
        pretrained.model,
        encoded,
        batch_size=batch_size,
        progress=progress,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_strings=stops,
        tokenizer=tok,
        seed=seed,
        max_prompt_len=max_prompt_len,
        truncate=truncate,
        prefix_cache=prefix_cache,
    )
  return [
      Response(
          text=t.lstrip() if fmt == 'transcript' else t,
          tokens=toks,
          logprobs=lp,
          finish_reason=fr,
          prompt_tokens=list(pr[d:]),
      )
      for t, toks, lp, fr, pr, d in zip(
          out.texts, out.tokens, out.logprobs, out.finish_reason, encoded, out.num_truncated
      )
  ]
