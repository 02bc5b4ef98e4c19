"""The preference model (PM): an LM trunk with a scalar head read at a conversation's last token,
trained on comparisons with the cross-entropy between sigmoid(r_a - r_b) and the label p_a
(Bai et al. 2022, section 4.1), and scoring conversations as the reward of PPO and of the
evaluation. `train_pm` is the one PM trainer: the preference stage's and the evaluation PM's;
the harmfulness model reuses its encoding, packing and scoring."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax import bookkeeping
from cai_jax.method import conversation, labels
from cai_jax.method.comparisons import (
    Comparison,
    KINDS,
    PreferenceDataError,
    as_turns,
    split_held_out,
    training_label,
)
from cai_jax.method.conversation import Turn
from cai_jax.models import checkpoint
from cai_jax.models.decoder import ScalarHeadModel
from cai_jax.training import loop
from cai_jax.training import metrics as metrics_lib
from cai_jax.training import train_lib
from cai_jax.utils import sharding


def encode(turns: Sequence[Turn], tokenizer, fmt: str, max_len: int) -> list[int]:
  """Token ids of the rendered conversation plus EOS, whose position the PM reads.

  Too-long conversations lose their *start* (but keep the BOS): the reward must see the reply's
  end. The whole conversation is one text here, so its prompt part equals the sampler's prompt
  ids wherever the tokenizer merges nothing across the prompt/reply boundary.
  """
  text = conversation.render(list(turns), fmt, tokenizer, add_generation_prompt=False)
  ids, _ = conversation.encode(tokenizer, text)
  eos = tokenizer.eos_token_id
  if eos is None:
    raise PreferenceDataError('the PM tokenizer has no EOS token to read the reward at')
  ids.append(eos)
  return conversation.keep_last(ids, max_len, tokenizer)


def pack(
    rows: Sequence[Sequence[int]], length: int, pad_id: int, n_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded tokens [N, length] and each row's last-token index [N] (empty rows: 0)."""
  n_rows = len(rows) if n_rows is None else n_rows
  tokens = np.full((n_rows, length), pad_id, np.int32)
  read_index = np.zeros((n_rows,), np.int32)
  for i, ids in enumerate(rows):
    tokens[i, : len(ids)] = ids
    read_index[i] = max(len(ids) - 1, 0)
  return tokens, read_index


def _check_vocab(ids: Sequence[Sequence[int]], pm: checkpoint.Pretrained) -> None:
  top = max((max(r) for r in ids if r), default=-1)
  if top >= pm.config.vocab_size:
    raise checkpoint.CheckpointError(
        f'{pm.source or "the PM"}: token id {top} is outside its vocabulary of {pm.config.vocab_size}; '
        'the tokenizer does not belong to this model'
    )


def preference_loss(r_a, r_b, p_a, weight=None):
  """Weighted mean cross-entropy between sigmoid(r_a - r_b) and the label p_a.

  -[p log sigmoid(d) + (1 - p) log sigmoid(-d)] with d = r_a - r_b, written with softplus so
  large |d| stays finite. Returns (loss, aux) with accuracy against the argmax label (pairs
  labelled exactly 0.5 have no argmax and are left out of it).
  """
  d = (r_a - r_b).astype(jnp.float32)
  p_a = jnp.asarray(p_a, jnp.float32)
  weight = jnp.ones_like(d) if weight is None else jnp.asarray(weight, jnp.float32)
  per_pair = p_a * jax.nn.softplus(-d) + (1.0 - p_a) * jax.nn.softplus(d)
  loss = jnp.sum(weight * per_pair) / jnp.maximum(jnp.sum(weight), 1e-9)
  decided = (weight > 0) & (p_a != 0.5)
  correct = jnp.where(p_a > 0.5, d > 0, d < 0)
  accuracy = jnp.sum(decided * correct) / jnp.maximum(jnp.sum(decided), 1)
  gap = jnp.sum(weight * jnp.abs(d)) / jnp.maximum(jnp.sum(weight), 1e-9)
  return loss, {'accuracy': accuracy, 'reward_gap': gap}


def pair_loss(model: ScalarHeadModel, batch: dict):
  """Loss of a batch of B pairs run as 2B sequences (rows [a_0..a_B-1, b_0..b_B-1]) in one forward."""
  rewards = model(batch['tokens'], batch['read_index'])
  r_a, r_b = jnp.split(rewards, 2)
  return preference_loss(r_a, r_b, batch['p_a'], batch['weight'])


@functools.partial(jax.jit, static_argnums=0)
def _rewards(graphdef, params, tokens, read_index):
  rewards = nnx.merge(graphdef, params)(tokens, read_index)
  return sharding.constrain(rewards, (None,))  # replicated: every host reads all rewards


def _to_device(x: np.ndarray, names: tuple):
  if sharding.current_mesh() is None:
    return jnp.asarray(x)
  sh = sharding.named_sharding(names + (None,) * (x.ndim - len(names)), x.shape)
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def score_rows(
    graphdef,
    params,
    rows: Sequence[Sequence[int]],
    *,
    pad_id: int,
    batch_size: int,
    max_len: int,
    min_bucket: int,
    progress: bool = False,
) -> np.ndarray:
  """Rewards [N] of token rows, longest first so each batch pads to a tight bucket."""
  n_batch = sharding.batch_axis_size()
  batch_size = -(-batch_size // n_batch) * n_batch  # every batch splits evenly over the mesh
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
  out = np.zeros((len(rows),), np.float32)
  starts = range(0, len(order), batch_size)
  bar = metrics_lib.progress(len(starts), desc='score') if progress else None
  for s in starts:
    idx = order[s : s + batch_size]
    length = loop.bucket_length(
        max(len(rows[i]) for i in idx), max(max_len, min_bucket), min_bucket
    )
    tokens, read_index = pack([rows[i][-length:] for i in idx], length, pad_id, batch_size)
    r = _rewards(
        graphdef,
        params,
        _to_device(tokens, ('batch', 'length')),
        _to_device(read_index, ('batch',)),
    )
    out[idx] = np.asarray(jax.device_get(r))[: len(idx)]
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  return out


def score_token_rows(
    pm: checkpoint.Pretrained,
    rows: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    max_len: int | None = None,
    min_bucket: int = 32,
    progress: bool = False,
) -> np.ndarray:
  """Rewards [N] float32 of conversations already tokenized by `encode` (each ending in EOS)."""
  if not isinstance(pm.model, ScalarHeadModel):
    raise TypeError('scoring needs a preference model: load it with scalar_head=True')
  if not rows:
    return np.zeros((0,), np.float32)
  _check_vocab(rows, pm)
  graphdef, params = nnx.split(pm.model)
  return score_rows(
      graphdef,
      params,
      rows,
      pad_id=conversation.pad_id(pm.tokenizer, pm.config),
      batch_size=batch_size,
      max_len=max_len or max(len(r) for r in rows),
      min_bucket=min_bucket,
      progress=progress,
  )


def score_conversations(
    pm: checkpoint.Pretrained,
    conversations: Sequence[Any],
    *,
    fmt: str,
    batch_size: int = 16,
    max_len: int = 1024,
    min_bucket: int = 32,
    progress: bool = False,
) -> np.ndarray:
  """The PM's reward for each conversation, as float32 [N].

  Each conversation is a list of (role, text) turns or a (prompt, response) pair of strings
  (see `as_turns`). It is rendered in `fmt` without a generation prompt, EOS appended, and read
  at the EOS; at most `max_len` tokens (the end) are kept. Batches are bucketed by length.
  """
  rows = [encode(as_turns(c), pm.tokenizer, fmt, max_len) for c in conversations]
  return score_token_rows(
      pm, rows, batch_size=batch_size, max_len=max_len, min_bucket=min_bucket, progress=progress
  )


def pair_metrics(rewards_a, rewards_b, p_a, n_bins: int = 10) -> dict[str, float]:
  """Loss, accuracy against the argmax label, and calibration of sigmoid(r_a - r_b).

  `ece` compares the PM's probability with the argmax outcome (0.5 for a tie); `ece_soft` with
  the soft label itself.
  """
  d = np.asarray(rewards_a, np.float64) - np.asarray(rewards_b, np.float64)
  p = np.asarray(p_a, np.float64)
  prob = 1.0 / (1.0 + np.exp(-d))
  hard = np.array([labels.hard_label(x) for x in p])
  decided = hard != 0.5
  correct = np.where(hard > 0.5, d > 0, d < 0)
  return {
      'loss': float(np.mean(p * np.logaddexp(0.0, -d) + (1.0 - p) * np.logaddexp(0.0, d))),
      'accuracy': float(np.mean(correct[decided])) if decided.any() else float('nan'),
      'ece': labels.expected_calibration_error(prob, hard, n_bins),
      'ece_soft': labels.expected_calibration_error(prob, p, n_bins),
      'mean_abs_gap': float(np.mean(np.abs(d))),
      'pairs': int(len(p)),
  }


def _fmt(x) -> str:
  return 'n/a' if x is None or (isinstance(x, float) and math.isnan(x)) else f'{x:.3f}'


@dataclasses.dataclass(frozen=True)
class EncodedPair:
  """A comparison as token rows: `a` and `b` each end in EOS; `target` is the loss's label."""

  a: tuple[int, ...]
  b: tuple[int, ...]
  p_a: float  # the label as the feedback stage gave it (accuracy and calibration use this)
  target: float  # what the loss fits: p_a, or its hard label in the ablation
  weight: float
  kind: str


def initial_pm(ctx: bookkeeping.Context, source: str) -> checkpoint.Pretrained:
  """The PM before training: the trunk of `source` with a fresh scalar head (or its own head if
  `source` is an exported PM). train_lib copies the parameters, so nothing loaded is modified."""
  if source in (ctx.model_source(r) for r in bookkeeping.GIVEN_ROLES):
    # A given LM with a new head; train_lib copies it into the train state.
    lm = ctx.load(source, cache=False)
    head = ScalarHeadModel(lm.config, rngs=nnx.Rngs(params=ctx.config.seed), trunk=lm.model)
    return checkpoint.Pretrained(sharding.shard_module(head), lm.tokenizer, lm.config, source)
  return ctx.load(source, scalar_head=True, cache=False)


def encode_pairs(
    comparisons: Sequence[Comparison], tokenizer, fmt: str, max_len: int, label_type: str
) -> list[EncodedPair]:
  return [
      EncodedPair(
          tuple(encode(c.a, tokenizer, fmt, max_len)),
          tuple(encode(c.b, tokenizer, fmt, max_len)),
          c.p_a,
          training_label(c.p_a, label_type),
          c.weight,
          c.kind,
      )
      for c in comparisons
  ]


def pack_pairs(
    pairs: Sequence[EncodedPair], rows: Sequence[int], length: int, pad_id: int
) -> dict[str, np.ndarray]:
  """B pairs as 2B right-padded sequences [a_0..a_B-1, b_0..b_B-1]; filler rows (-1) weigh 0."""
  seqs = [pairs[i].a if i >= 0 else () for i in rows] + [pairs[i].b if i >= 0 else () for i in rows]
  tokens, read_index = pack(seqs, length, pad_id)
  return {
      'tokens': tokens,
      'read_index': read_index,
      'p_a': np.array([pairs[i].target if i >= 0 else 0.5 for i in rows], np.float32),
      'weight': np.array([pairs[i].weight if i >= 0 else 0.0 for i in rows], np.float32),
  }


def evaluate_kinds(
    graphdef, params, pairs: Sequence[EncodedPair], cfg, *, pad_id: int, max_len: int
) -> dict[str, float]:
  """Held-out metrics over all pairs ('eval_<metric>') and per kind
  ('eval_harmlessness_<metric>', 'eval_helpfulness_<metric>'), from one scoring pass
  (config.preference: eval_batch_size, min_bucket, ece_bins)."""
  rows = [r for p in pairs for r in (p.a, p.b)]
  rewards = score_rows(
      graphdef,
      params,
      rows,
      pad_id=pad_id,
      batch_size=cfg.eval_batch_size,
      max_len=max_len,
      min_bucket=cfg.min_bucket,
  )
  r_a, r_b = rewards[0::2], rewards[1::2]
  p_a = np.array([p.p_a for p in pairs])
  out = {f'eval_{k}': v for k, v in pair_metrics(r_a, r_b, p_a, cfg.ece_bins).items()}
  for kind in KINDS:
    mine = np.array([p.kind == kind for p in pairs])
    if mine.any():
      metrics = pair_metrics(r_a[mine], r_b[mine], p_a[mine], cfg.ece_bins)
      out.update({f'eval_{kind}_{k}': v for k, v in metrics.items()})
  return out


def check_batch(cfg, what: str) -> None:
  """The batch splits evenly over the mesh and the processes."""
  sharding.check_batch_size(cfg.batch_size, f'{what}.batch_size')
  if cfg.batch_size % jax.process_count():
    raise sharding.ShardingError(
        f'{what}.batch_size {cfg.batch_size} is not divisible by the '
        f'{jax.process_count()} processes'
    )


def train_pm(
    ctx: bookkeeping.Context,
    stage_dir: Path,
    comparisons: Sequence[Comparison],
    counts: dict,
    cfg,
    *,
    stage: str,
    source: str,
) -> dict:
  """Trains a PM from `source` on `comparisons` (held out: cfg.eval_fraction), exports it to
  stage_dir/export and returns the stage's summary (`counts` first).

  The preference stage's PM and the evaluation PM (cai_jax/stages/evaluation_pm.py) are both trained
  here. `cfg` holds the training fields of configs/stages/preference.py (label_type,
  eval_fraction, max_len, min_bucket, batch_size, epochs, num_steps, eval_batch_size, ece_bins,
  optimizer, and loop.fit's rhythm).
  """
  config = ctx.config
  pm = initial_pm(ctx, source)
  tok, fmt = pm.tokenizer, config.conversation_format
  pad_id = conversation.pad_id(tok, pm.config)
  max_len = min(cfg.max_len, config.model.max_len) if cfg.max_len > 0 else config.model.max_len
  train, held_out = split_held_out(comparisons, cfg.eval_fraction, config.seed)
  if not train:
    raise PreferenceDataError(
        f'all {len(comparisons)} pairs are held out '
        f'({stage}.eval_fraction={cfg.eval_fraction}); nothing to train on'
    )
  train = encode_pairs(train, tok, fmt, max_len, cfg.label_type)
  held_out = encode_pairs(held_out, tok, fmt, max_len, cfg.label_type)
  _check_vocab([r for p in train + held_out for r in (p.a, p.b)], pm)
  per_kind = {
      f'{split}_{kind}': sum(p.kind == kind for p in pairs)
      for split, pairs in (('train', train), ('held_out', held_out))
      for kind in KINDS
  }
  counts = dict(counts, train=len(train), held_out=len(held_out), **per_kind)
  logging.info('%s data: %s (init from %s)', stage, counts, source)
  if not held_out:
    logging.warning(
        '%s: no held-out pairs (eval_fraction=%s): no accuracy or calibration',
        stage,
        cfg.eval_fraction,
    )

  lengths = [max(len(p.a), len(p.b)) for p in train]
  plan, steps_per_epoch, total_steps = loop.plan_epochs(cfg, lengths, config.seed, max_len)

  tx, schedule = train_lib.make_optimizer(cfg.optimizer, total_steps, f'{stage}.optimizer')
  graphdef, state, shardings = train_lib.init_state(pm.model, tx)
  model_config = pm.config
  del pm  # the train state holds a copy of its parameters
  train_step = train_lib.make_train_step(
      graphdef, tx, pair_loss, shardings, schedule, seed=config.seed
  )
  evaluate = lambda params: (
      evaluate_kinds(graphdef, params, held_out, cfg, pad_id=pad_id, max_len=max_len)
      if held_out
      else {}
  )
  # checkpoint_every = 0: no checkpoints (the demo saves its seconds; an interrupted run restarts).
  result = loop.fit(
      stage=stage,
      stage_dir=stage_dir,
      state=state,
      shardings=shardings,
      train_step=train_step,
      plan=plan,
      steps_per_epoch=steps_per_epoch,
      make_batch=lambda length, rows: pack_pairs(train, rows, length, pad_id),
      total_steps=total_steps,
      cfg=cfg,
      evaluate=evaluate,
      postfix={'loss': '{loss:.3f}', 'acc': '{accuracy:.2f}'},
  )
  state, metrics, eval_metrics = result.state, result.metrics, result.eval_metrics
  if result.start == total_steps and held_out:  # resumed after the last step: evaluate again
    eval_metrics = evaluate(state.params)

  line = ', '.join(
      f'{kind} pairs {counts.get(f"pairs_{kind}", per_kind[f"train_{kind}"])} (held-out accuracy '
      f'{_fmt(eval_metrics.get(f"eval_{kind}_accuracy"))})'
      for kind in KINDS
  )
  source_line = counts.get('helpfulness_source', counts.get('sources', ''))
  print(f'{stage}: {line}; {source_line}', flush=True)

  model = nnx.merge(graphdef, train_lib.gather_params(state.params))
  export = stage_dir / 'export'
  checkpoint.save_pretrained(checkpoint.Pretrained(model, tok, model_config), str(export))
  return {
      **counts,
      'init_from': source,
      'label_type': cfg.label_type,
      'steps': total_steps,
      'steps_per_epoch': steps_per_epoch,
      'train_seconds': result.seconds,
      'final_loss': metrics.get('loss'),
      'final_accuracy': metrics.get('accuracy'),
      **eval_metrics,
      'export': str(export),
  }
