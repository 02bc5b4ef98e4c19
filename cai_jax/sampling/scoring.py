"""Scoring: log-probs of given continuations after given prompts (`score`), and of several
options after one prompt that runs once into a KV cache (`score_options`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax.method import conversation
from cai_jax.models import decoder as model_lib
from cai_jax.sampling import common
from cai_jax.sampling import prefix as prefix_lib

_SCORE_CHUNK = 128  # positions per LM-head chunk in `score` (bounds the [B, T, V] logits)


@dataclasses.dataclass
class ScoreOutput:
  total: np.ndarray  # [B] sum of the continuation's log-probs
  per_token: list[np.ndarray]  # log-prob of each continuation token


def _score_fn(graphdef, params, tokens, mask, n_cont):
  """log p(tokens[:, t] | tokens[:, :t]) for the last n_cont positions [B, n_cont]."""
  common.compile_counts['score'] += 1
  model = nnx.merge(graphdef, params)
  positions = common.prompt_positions(mask)
  hidden, _ = model.hidden(tokens, positions, mask)
  hidden = hidden[:, -n_cont - 1 : -1]  # predicts tokens[:, -n_cont:]
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
    raise ValueError(
        f'row {row}: prompt + {what} = {prompt_len + len(c)} tokens, '
        f'more than the model context of {cfg.max_positions}'
    )
  return c


def score(
    model, prompt_tokens: Sequence[Sequence[int]], continuation_tokens: Sequence[Sequence[int]]
) -> ScoreOutput:
  """Log-probs of each continuation after its prompt; rows of any lengths in one forward pass."""
  cfg = model.cfg
  if len(prompt_tokens) != len(continuation_tokens):
    raise ValueError(f'{len(prompt_tokens)} prompts but {len(continuation_tokens)} continuations')
  prompts, _ = common.prepare_prompts(prompt_tokens, cfg.vocab_size, cfg.max_positions, 'error')
  conts = [
      _continuation(c, i, len(prompts[i]), cfg, 'continuation')
      for i, c in enumerate(continuation_tokens)
  ]
  if not prompts:
    return ScoreOutput(np.zeros((0,), np.float32), [])
  n_cont = common.length_bucket(max(max(len(c) for c in conts), 1), 8)
  if n_cont > _SCORE_CHUNK:
    n_cont = -(-n_cont // _SCORE_CHUNK) * _SCORE_CHUNK
  rows = [p + c for p, c in zip(prompts, conts)]
  # Continuations end at the last slot; at least n_cont + 1 slots so every target has a context.
  t = common.length_bucket(max(max(len(r) for r in rows), n_cont + 1))
  b = common.batch_bucket(len(rows))
  pad_id = conversation.pad_id(None, cfg)
  tokens, mask = common.left_pad(rows, b, t, pad_id)
  graphdef, params = nnx.split(model)
  lp = np.asarray(
      jax.device_get(
          common.jitted(_score_fn, graphdef, static_argnums=(3,))(
              params, common.put_batch(tokens), common.put_batch(mask), n_cont
          )
      )
  )
  per_token = [lp[i, n_cont - len(c) :].astype(np.float32) for i, c in enumerate(conts)]
  return ScoreOutput(np.array([x.sum() for x in per_token], np.float32), per_token)


def _score_options_fn(graphdef, params, tokens, mask, options, cache, prefix=None, prefix_len=0):
  """Per-token log-probs [B, O, C] of each option options[:, o] (right-padded) after its prompt
  (tokens [B, P], left-padded): the prompt runs once into `cache` (zeros, P + C slots) that
  every option then reads. With a shared `prefix` of `prefix_len` tokens, `tokens` are what
  follows it in each row, and the prompt and options read its one copy too."""
  common.compile_counts['score_options'] += 1
  model = nnx.merge(graphdef, params)
  b, p = tokens.shape
  n_opt, c = options.shape[1], options.shape[2]
  positions = common.prompt_positions(mask) + jnp.reshape(prefix_len, (-1, 1))  # [B] or scalar
  hidden, cache = common.run_prompt(model, tokens, positions, mask, cache, prefix)
  first = jax.nn.log_softmax(model.logits_from_hidden(hidden[:, -1:])[:, 0], axis=-1)  # [B, V]
  key_mask = jnp.concatenate([mask, jnp.ones((b, c), bool)], axis=1)
  cont_positions = positions[:, -1:] + 1 + jnp.arange(c - 1, dtype=jnp.int32)[None]
  out = []
  for o in range(n_opt):
    toks = options[:, o]
    lp = [jnp.take_along_axis(first, toks[:, :1], axis=-1)]
    if c > 1:  # option token t is predicted from the cache + option tokens before it
      h, _ = model.hidden(toks[:, :-1], cont_positions, key_mask, cache, p, prefix)
      logits = jax.nn.log_softmax(model.logits_from_hidden(h), axis=-1)
      lp.append(jnp.take_along_axis(logits, toks[:, 1:, None], axis=-1)[..., 0])
    out.append(jnp.concatenate(lp, axis=1))
  return jnp.stack(out, axis=1)


def score_options(
    model,
    prompt_tokens: Sequence[Sequence[int]],
    options: Sequence[Sequence[Sequence[int]]],
    *,
    prefix_cache: prefix_lib.PrefixCache | None = None,
) -> np.ndarray:
  """Total log-prob [N, O] of each of a row's O continuations after its prompt.

  Equals `score` on every (prompt, option) pair, at the cost of one pass over each prompt: the
  prompt fills a KV cache once and each option is a short pass that reads it (the (A)/(B)
  labels of AI feedback score two options after one long prompt). With `prefix_cache`, the
  prompts' shared prefix (few-shots) runs once too (sampling/prefix.py).
  """
  cfg = model.cfg
  if len(prompt_tokens) != len(options):
    raise ValueError(f'{len(prompt_tokens)} prompts but {len(options)} option lists')
  if not prompt_tokens:
    return np.zeros((0, 0), np.float32)
  prompts, _ = common.prepare_prompts(prompt_tokens, cfg.vocab_size, cfg.max_positions, 'error')
  n_opt = len(options[0])
  conts = []
  for i, row in enumerate(options):
    if len(row) != n_opt or not n_opt:
      raise ValueError(f'row {i} has {len(row)} options; every row needs the same number (>= 1)')
    row = [_continuation(c, i, len(prompts[i]), cfg, 'option') for c in row]
    if not all(row):
      raise ValueError(f'row {i} has an empty option')
    conts.append(row)
  c = common.length_bucket(max(len(x) for row in conts for x in row), 4)
  b = common.batch_bucket(len(prompts))
  rest, prefix_len, prefix = prefix_lib.split(prompts, prefix_cache, model)
  prefix_len = np.full((b,), prefix_len, np.int32)
  if prefix is None:  # no prefix the whole batch shares: perhaps groups of rows share one
    rest, lens, prefix = prefix_lib.split_groups(prompts, prefix_cache, model, b)
    prefix_len[: len(lens)] = lens
  t = common.length_bucket(max(len(x) for x in rest))
  pad_id = conversation.pad_id(None, cfg)
  tokens, mask = common.left_pad(rest, b, t, pad_id)
  opts = np.full((b, n_opt, c), pad_id, np.int32)
  for i, row in enumerate(conts):
    for o, x in enumerate(row):
      opts[i, o, : len(x)] = x
  graphdef, params = nnx.split(model)
  lp = np.asarray(
      jax.device_get(
          common.jitted(_score_options_fn, graphdef)(
              params,
              common.put_batch(tokens),
              common.put_batch(mask),
              common.put_batch(opts),
              model_lib.init_cache(cfg, b, t + c),
              prefix,
              common.put_batch(prefix_len),
          )
      )
  )
  return np.array(
      [
          [lp[i, o, : len(x)].astype(np.float32).sum() for o, x in enumerate(row)]
          for i, row in enumerate(conts)
      ],
      np.float32,
  )
