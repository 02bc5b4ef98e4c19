"""Stage `harmfulness`: the paper's absolute harmfulness score (Bai et al. 2022, section 4.5).

Elo and PM scores are relative: they rank models against each other. The paper also scores each
response on an absolute scale with a model trained on HH-RLHF's red-team attempts, whose red
teamers rated each conversation 0-4 (`rating`: 0 = the AI did not do what they tried to make it
do, 4 = it did). Here a scalar-head model (the pretrained LM's trunk and a fresh head, as the PM)
learns that rating by regression -- mean squared error on the rating, read at the EOS after the
whole `transcript` -- and is exported like the PM (`WORKDIR/harmfulness/export`, model role
'harmfulness'), so evaluate can report each model's mean predicted harmfulness.

The ratings are a file the user gives (`harmfulness.path`: HH-RLHF's red_team_attempts.jsonl(.gz),
38,961 rated transcripts). Without it the stage finishes at once with {'available': False, 'why':
...} and no export, and the report says why the score is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax import bookkeeping
from cai_jax.method import conversation, data
from cai_jax.method import preference_model as pm_lib
from cai_jax.method import stage_inputs
from cai_jax.method.conversation import ASSISTANT, Turn
from cai_jax.models import checkpoint
from cai_jax.models.decoder import ScalarHeadModel
from cai_jax.training import loop
from cai_jax.training import train_lib

STAGE = 'harmfulness'
MAX_RATING = 4.0  # the red team's scale: 0 (no harm elicited) .. 4 (what they sought)
NO_FILE = 'harmfulness.path is empty: give HH-RLHF red_team_attempts.jsonl(.gz) to train the harmfulness model'


class RatingsError(bookkeeping.StageError):
  """A ratings file that cannot be read or trained on."""


@dataclasses.dataclass(frozen=True)
class Rated:
  """A red-team conversation and its harmfulness rating (0-4)."""

  turns: tuple[Turn, ...]
  rating: float
  id: str


def read_ratings(path: str, max_records: int = -1) -> list[Rated]:
  """Rated transcripts of a red_team_attempts file (a JSON list, or JSONL; .gz or not): each
  record's `transcript` ("\\n\\nHuman: ... \\n\\nAssistant: ...") and `rating` (0-4). A record
  without them, or a transcript that does not end in an Assistant turn, is an error naming it."""
  try:
    records = data.read_json_records(Path(path).expanduser())
  except (OSError, UnicodeDecodeError, EOFError, ValueError) as e:
    raise RatingsError(f'{path}: cannot read the red-team ratings: {e}') from None
  out = []
  for i, r in enumerate(records):
    if 0 <= max_records <= len(out):
      break
    where = f'{path}: record {i}'
    if not isinstance(r, dict) or not isinstance(r.get('transcript'), str):
      raise RatingsError(f'{where} has no "transcript" string')
    rating = r.get('rating')
    if isinstance(rating, bool) or not isinstance(rating, (int, float)):
      raise RatingsError(f'{where} has no numeric "rating" (0-4), got {rating!r}')
    if not 0 <= rating <= MAX_RATING:
      raise RatingsError(f'{where} has rating {rating}, outside [0, {MAX_RATING:g}]')
    turns = tuple(conversation.parse_transcript(r['transcript']))
    if not turns or turns[-1][0] != ASSISTANT:
      raise RatingsError(f'{where}: the transcript does not end in an Assistant turn')
    out.append(Rated(turns, float(rating), str(r.get('id', i))))
  if not out:
    raise RatingsError(f'{path}: no rated transcripts')
  return out


def split_held_out(rated: Sequence[Rated], fraction: float, seed: int) -> tuple[list, list]:
  """(train, held_out) by a seeded coin per transcript (its id and text), stable as data grows."""

  def coin(r: Rated) -> float:
    key = f'{seed}:{STAGE}:{r.id}:{r.turns[-1][1]}'
    return int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) / 2.0**64

  held = [coin(r) < fraction for r in rated]
  return [r for r, h in zip(rated, held) if not h], [r for r, h in zip(rated, held) if h]


def regression_loss(model: ScalarHeadModel, batch: dict):
  """Weighted mean squared error between the prediction at each row's last token and its rating;
  filler rows weigh 0. Returns (loss, aux) with the mean absolute error."""
  pred = model(batch['tokens'], batch['read_index']).astype(jnp.float32)
  w = batch['weight']
  err = pred - batch['rating']
  n = jnp.maximum(jnp.sum(w), 1e-9)
  return jnp.sum(w * err**2) / n, {'mae': jnp.sum(w * jnp.abs(err)) / n}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (ties get their average rank); nan when either is constant."""

  def ranks(v):
    v = np.asarray(v, np.float64)
    order = np.argsort(v, kind='stable')
    r = np.empty(len(v))
    r[order] = np.arange(len(v))
    for value in np.unique(v):  # average rank within ties
      tie = v == value
      r[tie] = r[tie].mean()
    return r

  rx, ry = ranks(x), ranks(y)
  if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
    return float('nan')
  return float(np.corrcoef(rx, ry)[0, 1])


def regression_metrics(pred: Sequence[float], rating: Sequence[float]) -> dict[str, float]:
  pred, rating = np.asarray(pred, np.float64), np.asarray(rating, np.float64)
  return {
      'mse': float(np.mean((pred - rating) ** 2)),
      'mae': float(np.mean(np.abs(pred - rating))),
      'spearman': spearman(pred, rating),
      'mean_rating': float(rating.mean()),
      'mean_prediction': float(pred.mean()),
      'n': int(len(rating)),
  }


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ()  # the red-team ratings from a file, no upstream stage
MODELS = ('pretrained',)  # the regressor's initialization


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution, the prompt sources and the
  red-team ratings (`harmfulness.path`)."""
  return stage_inputs.files(config, 'harmfulness.path')


def check_config(config) -> None:
  """Fails, before the workdir is touched, on harmfulness settings that cannot work."""
  cfg = config[STAGE]
  problems = []
  if not 0.0 <= cfg.eval_fraction < 1.0:
    problems.append(f'eval_fraction must be in [0, 1), got {cfg.eval_fraction}')
  if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
    problems.append(
        f'batch_size and eval_batch_size must be positive, got {cfg.batch_size}, '
        f'{cfg.eval_batch_size}'
    )
  if cfg.path and not Path(cfg.path).expanduser().is_file():
    problems.append(f'path {cfg.path!r} is not a file')
  if problems:
    raise bookkeeping.StageError(f'config.{STAGE}: ' + '; '.join(problems))


def run(ctx: bookkeeping.Context, stage_dir: Path) -> dict:
  config, cfg = ctx.config, ctx.config[STAGE]
  check_config(config)
  if not cfg.path:
    print(f'{STAGE}: unavailable: {NO_FILE}', flush=True)
    return {'available': False, 'why': NO_FILE}
  pm_lib.check_batch(cfg, STAGE)
  rated = read_ratings(cfg.path, cfg.max_records)
  train, held_out = split_held_out(rated, cfg.eval_fraction, config.seed)
  if not train:
    raise RatingsError(f'all {len(rated)} transcripts are held out ({STAGE}.eval_fraction)')

  source = ctx.model_source('pretrained')
  model = pm_lib.initial_pm(ctx, source)
  tok, fmt = model.tokenizer, config.conversation_format
  pad_id = conversation.pad_id(tok, model.config)
  max_len = min(cfg.max_len, config.model.max_len) if cfg.max_len > 0 else config.model.max_len
  encode = lambda rs: [pm_lib.encode(r.turns, tok, fmt, max_len) for r in rs]  # noqa: E731
  train_rows, held_rows = encode(train), encode(held_out)
  ratings = np.array([r.rating for r in train], np.float32)

  def make_batch(length: int, rows: list[int]) -> dict[str, np.ndarray]:
    tokens, read_index = pm_lib.pack(
        [train_rows[i] if i >= 0 else () for i in rows], length, pad_id
    )
    return {
        'tokens': tokens,
        'read_index': read_index,
        'rating': np.array([ratings[i] if i >= 0 else 0.0 for i in rows], np.float32),
        'weight': np.array([1.0 if i >= 0 else 0.0 for i in rows], np.float32),
    }

  lengths = [len(r) for r in train_rows]
  plan, steps_per_epoch, total_steps = loop.plan_epochs(cfg, lengths, config.seed, max_len)
  tx, schedule = train_lib.make_optimizer(cfg.optimizer, total_steps, f'{STAGE}.optimizer')
  graphdef, state, shardings = train_lib.init_state(model.model, tx)
  model_config = model.config
  del model  # the train state holds a copy of its parameters

  def evaluate(params) -> dict[str, float]:
    if not held_out:
      return {}
    pred = pm_lib.score_rows(
        graphdef,
        params,
        held_rows,
        pad_id=pad_id,
        batch_size=cfg.eval_batch_size,
        max_len=max_len,
        min_bucket=cfg.min_bucket,
    )
    return {
        f'eval_{k}': v for k, v in regression_metrics(pred, [r.rating for r in held_out]).items()
    }

  result = loop.fit(
      stage=STAGE,
      stage_dir=stage_dir,
      state=state,
      shardings=shardings,
      train_step=train_lib.make_train_step(
          graphdef, tx, regression_loss, shardings, schedule, seed=config.seed
      ),
      plan=plan,
      steps_per_epoch=steps_per_epoch,
      make_batch=make_batch,
      total_steps=total_steps,
      cfg=cfg,
      evaluate=evaluate,
      postfix={'mse': '{loss:.3f}'},
  )
  eval_metrics = result.eval_metrics
  if result.start == total_steps:  # resumed after the last step: evaluate again
    eval_metrics = evaluate(result.state.params)
  export = stage_dir / 'export'
  trained = nnx.merge(graphdef, train_lib.gather_params(result.state.params))
  checkpoint.save_pretrained(checkpoint.Pretrained(trained, tok, model_config), str(export))
  print(
      f'{STAGE}: {len(train)} train / {len(held_out)} held-out transcripts; held-out MSE '
      f'{eval_metrics.get("eval_mse", float("nan")):.3f}, Spearman '
      f'{eval_metrics.get("eval_spearman", float("nan")):.3f}',
      flush=True,
  )
  return {
      'available': True,
      'ratings_file': str(cfg.path),
      'train': len(train),
      'held_out': len(held_out),
      'mean_train_rating': float(ratings.mean()),
      'init_from': source,
      'steps': total_steps,
      'train_seconds': result.seconds,
      'final_loss': result.metrics.get('loss'),
      **eval_metrics,
      'export': str(export),
  }
