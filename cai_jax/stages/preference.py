"""Stage `preference`: the preference model (PM) learns the AI-feedback labels; it then scores
conversations as the reward of PPO and of the evaluation.

Each comparison is two conversations that share their context. The PM (LM trunk + scalar head)
reads one scalar at each conversation's last token (an appended EOS) and is trained with the
cross-entropy between sigmoid(r_a - r_b) and the soft label p_a = P(a is better): the feedback
model's normalized (A)/(B) probabilities are the targets (Bai et al. 2022, section 4.1).

The paper's PM learns two kinds of comparisons: AI *harmlessness* labels on red-team prompts
and human *helpfulness* labels (HH-RLHF). A PM of harmlessness alone would reward evasion on the
helpful prompts PPO also optimizes. Here the helpfulness pairs are HH-RLHF's human comparisons
when `preference.helpful_mix.path` names them, else the feedback stage's AI labels under
helpfulness principles -- a substitute, said so in the stage's summary (`helpfulness_source`).
`preference.helpfulness_fraction` caps their share; held-out metrics are reported per kind.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
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
from cai_jax.method import conversation, data, labels
from cai_jax.method.conversation import ASSISTANT, HUMAN, Turn
from cai_jax.models import checkpoint
from cai_jax.models.decoder import ScalarHeadModel
from cai_jax.training import train_lib
from cai_jax.utils import records as records_lib
from cai_jax.utils import sharding

LABEL_TYPES = ('soft', 'hard')
HARMLESSNESS, HELPFULNESS = 'harmlessness', 'helpfulness'  # the kinds of comparisons
KINDS = (HARMLESSNESS, HELPFULNESS)
INIT_ROLES = ('pretrained', 'helpful', 'sft')  # model roles preference.init_from may name


class PreferenceDataError(bookkeeping.StageError):
  """Comparisons that cannot be trained on (none at all, a malformed record)."""


# ---- comparisons -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Conversations `a` and `b` (same context, different last reply); p_a = P(a is better)."""

  a: tuple[Turn, ...]
  b: tuple[Turn, ...]
  p_a: float
  id: str = ''
  weight: float = 1.0  # loss weight (helpfulness pairs may count more or less than harmlessness)
  kind: str = HARMLESSNESS  # harmlessness | helpfulness: eval metrics are reported per kind
  label_source: str = 'ai_feedback'  # who labeled it: 'ai_feedback' | 'hh_rlhf' (human)


def response_conversation(record: dict, response: str) -> tuple[Turn, ...]:
  """A prompt record's conversation (`data.prompt_turns`: the turns before a multi-turn prompt,
  then its request) answered by `response`: what the PM reads, in training and as a reward."""
  return tuple(data.prompt_turns(record)) + ((ASSISTANT, response),)


def feedback_comparisons(
    records: Sequence[dict], where: str = 'feedback samples', helpfulness_weight: float = 1.0
) -> list[Comparison]:
  """Comparisons from the feedback stage's samples: {id, prompt, response_a, response_b, p_a,
  kind}; a record without `kind` is a harmlessness pair (red-team prompt)."""
  out = []
  for i, r in enumerate(records):
    missing = [k for k in ('prompt', 'response_a', 'response_b', 'p_a') if k not in r]
    if missing:
      raise PreferenceDataError(f'{where}: record {i} lacks {", ".join(missing)}')
    p_a = float(r['p_a'])
    if not 0.0 <= p_a <= 1.0:
      raise PreferenceDataError(f'{where}: record {i} has p_a={p_a}, outside [0, 1]')
    kind = r.get('kind', HARMLESSNESS)
    if kind not in KINDS:
      raise PreferenceDataError(f'{where}: record {i} has kind={kind!r}, not one of {KINDS}')
    out.append(
        Comparison(
            response_conversation(r, r['response_a']),
            response_conversation(r, r['response_b']),
            p_a,
            str(r.get('id', i)),
            helpfulness_weight if kind == HELPFULNESS else 1.0,
            kind,
        )
    )
  return out


def _context_turns(value: Any) -> tuple[Turn, ...]:
  if isinstance(value, str):  # a transcript, or a bare human request
    turns = conversation.parse_transcript(value)
    return tuple(turns) if turns else ((HUMAN, value),)
  turns = []
  for t in value:
    if isinstance(t, dict):
      role = {'user': HUMAN, 'assistant': ASSISTANT}.get(t['role'], t['role'])
      turns.append((role, t['content']))
    else:
      turns.append((t[0], t[1]))
  return tuple(turns)


def _json_lines(path: str):
  """(line number, record) of a JSONL(.gz) file; a line that is not a JSON object is a
  PreferenceDataError naming the file and the line."""
  opener = gzip.open if str(path).endswith('.gz') else open
  try:
    with opener(Path(path).expanduser(), 'rt', encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise PreferenceDataError(f'{path}: cannot read the helpfulness comparisons: {e}') from None
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise PreferenceDataError(f'{path}:{line_no}: not JSON ({e.msg})') from None
    if not isinstance(record, dict):
      raise PreferenceDataError(
          f'{path}:{line_no}: expected a JSON object, got ' f'{type(record).__name__}'
      )
    yield line_no, record


def helpful_comparisons(
    path: str, *, weight: float = 1.0, max_pairs: int = -1, kind: str = HELPFULNESS
) -> list[Comparison]:
  """Human comparisons (chosen preferred: p_a = 1) from a JSONL(.gz) file: helpfulness ones
  (HH-RLHF helpful-base/online), or, with kind='harmlessness', HH-RLHF's harmless-base.

  Two record forms: HH-RLHF's {'chosen', 'rejected'} full transcripts, or {'prompt' |
  'conversation', 'chosen', 'rejected'} with the last replies as plain strings. A malformed line
  is an error naming it (path:line).
  """
  out = []
  for line_no, r in _json_lines(path):
    if 0 <= max_pairs <= len(out):
      break
    where = f'{path}:{line_no}'
    if not isinstance(r.get('chosen'), str) or not isinstance(r.get('rejected'), str):
      raise PreferenceDataError(f'{where}: needs "chosen" and "rejected" strings')
    context = r.get('conversation', r.get('prompt'))
    if context is not None:
      ctx_turns = _context_turns(context)
      a = ctx_turns + ((ASSISTANT, r['chosen']),)
      b = ctx_turns + ((ASSISTANT, r['rejected']),)
    else:
      a = tuple(conversation.parse_transcript(r['chosen']))
      b = tuple(conversation.parse_transcript(r['rejected']))
      if not a or not b or a[-1][0] != ASSISTANT or b[-1][0] != ASSISTANT:
        raise PreferenceDataError(
            f'{where}: "chosen"/"rejected" are not Human:/Assistant: '
            'transcripts ending in an Assistant turn (give "prompt" for '
            'plain responses)'
        )
    prefix = 'helpful' if kind == HELPFULNESS else kind
    out.append(
        Comparison(
            a, b, 1.0, str(r.get('id', f'{prefix}-{line_no}')), float(weight), kind, 'hh_rlhf'
        )
    )
  return out


def cap_helpfulness(
    comparisons: Sequence[Comparison], fraction: float, seed: int
) -> list[Comparison]:
  """At most `fraction` of the pairs are helpfulness pairs: a seeded subsample of them when there
  are more (a large HH-RLHF file beside a few thousand red-team labels); harmlessness pairs are
  never dropped. fraction 1 keeps all, 0 none (the harmlessness-only ablation)."""
  harmless = [c for c in comparisons if c.kind != HELPFULNESS]
  helpful = [c for c in comparisons if c.kind == HELPFULNESS]
  if fraction >= 1.0:
    return list(comparisons)
  n = math.floor(fraction / (1.0 - fraction) * len(harmless) + 1e-9)
  if len(helpful) > n:
    keep = set(sorted(range(len(helpful)), key=lambda i: _coin(seed, 'cap', helpful[i]))[:n])
    helpful = [c for i, c in enumerate(helpful) if i in keep]
  return harmless + helpful


def _coin(seed: int, salt: str, c: Comparison) -> float:
  """A uniform [0, 1) number of (seed, pair): stable as data grows."""
  key = f'{seed}:{salt}:{c.kind}:{c.id}:{c.a[-1][1]}'
  return int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) / 2.0**64


def split_held_out(
    comparisons: Sequence[Comparison], fraction: float, seed: int
) -> tuple[list[Comparison], list[Comparison]]:
  """(train, held_out) by a seeded per-pair coin on the pair's id, stable as data grows.

  Each kind with at least two pairs holds out at least one (its lowest coin) when fraction > 0,
  so a small helpfulness set still gets a held-out accuracy.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f'preference.eval_fraction must be in [0, 1), got {fraction}')
  coins = [_coin(seed, 'split', c) for c in comparisons]
  held = {i for i, u in enumerate(coins) if u < fraction}
  for kind in {c.kind for c in comparisons}:
    mine = [i for i, c in enumerate(comparisons) if c.kind == kind]
    if fraction > 0 and len(mine) >= 2 and not held & set(mine):
      held.add(min(mine, key=coins.__getitem__))
  return (
      [c for i, c in enumerate(comparisons) if i not in held],
      [c for i, c in enumerate(comparisons) if i in held],
  )


# ---- tokens ------------------------------------------------------------------------------------


def as_turns(conv: Any) -> tuple[Turn, ...]:
  """A conversation as turns: a list of (role, text) turns, or a (prompt, response) pair.

  A pair is exactly two strings (`('How do I...?', 'You can...')`); anything else is read as
  turns, so a one-turn conversation is `[('human', 'Hi')]`, never `('human', 'Hi')`.
  """
  if isinstance(conv, (tuple, list)) and len(conv) == 2 and all(isinstance(x, str) for x in conv):
    return ((HUMAN, conv[0]), (ASSISTANT, conv[1]))
  return _context_turns(conv)


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


# ---- loss --------------------------------------------------------------------------------------


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


def training_label(p_a: float, label_type: str) -> float:
  """The target of the loss: the soft label itself, or its argmax for the hard-label ablation."""
  if label_type == 'soft':
    return float(p_a)
  if label_type == 'hard':
    return labels.hard_label(p_a)
  raise ValueError(f'preference.label_type must be one of {LABEL_TYPES}, got {label_type!r}')


def pair_loss(model: ScalarHeadModel, batch: dict):
  """Loss of a batch of B pairs run as 2B sequences (rows [a_0..a_B-1, b_0..b_B-1]) in one forward."""
  rewards = model(batch['tokens'], batch['read_index'])
  r_a, r_b = jnp.split(rewards, 2)
  return preference_loss(r_a, r_b, batch['p_a'], batch['weight'])


# ---- scoring -----------------------------------------------------------------------------------


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
  bar = train_lib.progress(len(starts), desc='score') if progress else None
  for s in starts:
    idx = order[s : s + batch_size]
    length = train_lib.bucket_length(
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


# ---- the stage -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodedPair:
  """A comparison as token rows: `a` and `b` each end in EOS; `target` is the loss's label."""

  a: tuple[int, ...]
  b: tuple[int, ...]
  p_a: float  # the label as the feedback stage gave it (accuracy and calibration use this)
  target: float  # what the loss fits: p_a, or its hard label in the ablation
  weight: float
  kind: str


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ('feedback',)  # the labeled comparisons
MODELS = ('pretrained', 'helpful')  # the PM's initialization (preference.init_from)


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution, the prompt sources and the
  HH-RLHF helpfulness comparisons (`preference.helpful_mix.path`)."""
  return data.stage_inputs(config, 'preference.helpful_mix.path')


def check_config(config) -> None:
  """Fails fast, before any loading, on preference settings that cannot work."""
  cfg = config.preference
  problems = []
  if cfg.label_type not in LABEL_TYPES:
    problems.append(f'label_type must be one of {LABEL_TYPES}, got {cfg.label_type!r}')
  if not 0.0 <= cfg.eval_fraction < 1.0:
    problems.append(f'eval_fraction must be in [0, 1), got {cfg.eval_fraction}')
  if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
    problems.append(
        f'batch_size and eval_batch_size must be positive, got {cfg.batch_size}, {cfg.eval_batch_size}'
    )
  if cfg.helpful_mix.weight < 0:
    problems.append(f'helpful_mix.weight must be >= 0, got {cfg.helpful_mix.weight}')
  if not 0.0 <= cfg.get('helpfulness_fraction', 1.0) <= 1.0:
    problems.append(f'helpfulness_fraction must be in [0, 1], got {cfg.helpfulness_fraction}')
  if problems:
    raise bookkeeping.StageError('preference config: ' + '; '.join(problems))
  if cfg.helpful_mix.path and Path(cfg.helpful_mix.path).expanduser().is_file():
    # Read now, before the workdir is touched: a malformed line fails here with its number.
    helpful_comparisons(cfg.helpful_mix.path, max_pairs=cfg.helpful_mix.max_pairs)


def helpfulness_source(config) -> str:
  """Where the PM's helpfulness pairs come from, in words every report repeats."""
  path = config.preference.helpful_mix.path
  if path:
    return f'helpfulness: HH-RLHF human comparisons from {path}'
  if config.feedback.get('num_helpful_prompts', 0) == 0:
    return 'helpfulness: none (feedback.num_helpful_prompts=0): a harmlessness-only PM'
  return 'helpfulness: AI-labeled substitute (no HH-RLHF path)'


def _init_source(ctx: bookkeeping.Context) -> str:
  """'' = the pretrained model (the paper's choice), a role ('pretrained', 'helpful', 'sft': the
  SFT stage's export), else a source."""
  init = ctx.config.preference.init_from or 'pretrained'
  if init == 'sft':
    ctx.require('sft', 'preference (preference.init_from=sft)')
  return ctx.model_source(init) if init in INIT_ROLES else init


def initial_pm(ctx: bookkeeping.Context, source: str) -> checkpoint.Pretrained:
  """The PM before training: the trunk of `source` with a fresh scalar head (or its own head if
  `source` is an exported PM). train_lib copies the parameters, so nothing loaded is modified."""
  if source in (ctx.model_source(r) for r in bookkeeping.GIVEN_ROLES):
    # A given LM with a new head; train_lib copies it into the train state.
    lm = ctx.load(source, cache=False)
    head = ScalarHeadModel(lm.config, rngs=nnx.Rngs(params=ctx.config.seed), trunk=lm.model)
    return checkpoint.Pretrained(sharding.shard_module(head), lm.tokenizer, lm.config, source)
  return ctx.load(source, scalar_head=True, cache=False)


def labelled_feedback(
    ctx: bookkeeping.Context, needed_by: str
) -> tuple[Path, list[dict], list[dict]]:
  """The feedback stage's samples file, all its records, and those with a label (p_a null: the
  feedback stage skipped the pair)."""
  path = records_lib.FEEDBACK.path(ctx.require('feedback', needed_by))
  if not path.exists():
    raise PreferenceDataError(f'{path} is missing: the feedback stage writes it')
  records = records_lib.read_jsonl(path, records_lib.FEEDBACK)
  return path, records, [r for r in records if r.get('p_a') is not None]


def in_split(records: Sequence[dict], split: str) -> list[dict]:
  """The feedback records of one split: 'train' (the RL PM's; records without `split` too) or
  'evaluation' (held out from the RL PM for the evaluation PM)."""
  return [r for r in records if r.get('split', records_lib.TRAIN_SPLIT) == split]


def distinct(pairs: Sequence[Comparison]) -> list[Comparison]:
  """Pairs whose responses differ: identical ones (p_a = 0.5 by construction) give r_a = r_b, no
  signal, only cost."""
  return [c for c in pairs if c.a[-1][1].strip() != c.b[-1][1].strip()]


def load_comparisons(ctx: bookkeeping.Context) -> tuple[list[Comparison], dict]:
  """The harmlessness and helpfulness comparisons (capped by helpfulness_fraction), and counts.

  Only the feedback stage's 'train' split: its 'evaluation' split is the evaluation PM's, which
  must judge with comparisons the RL PM never saw.
  """
  cfg = ctx.config.preference
  path, records, labelled = labelled_feedback(ctx, 'preference')
  train = in_split(labelled, records_lib.TRAIN_SPLIT)
  pairs = feedback_comparisons(train, str(path), helpfulness_weight=cfg.helpful_mix.weight)
  pairs_distinct = distinct(pairs)
  harmless = [c for c in pairs_distinct if c.kind == HARMLESSNESS]
  counts = {
      'unlabelled': len(records) - len(labelled),
      'identical': len(pairs) - len(pairs_distinct),
      'evaluation_split_excluded': len(labelled) - len(train),
  }
  if not harmless:  # a helpfulness mix alone would not teach harmlessness: also an error
    raise PreferenceDataError(
        f'no labelled harmlessness pairs to train the preference model on in '
        f'{path}: {len(records)} records, {counts["unlabelled"]} without a '
        f'p_a label, {counts["identical"]} with identical responses, '
        f'{counts["evaluation_split_excluded"]} in the evaluation split'
    )
  if cfg.helpful_mix.path:  # the paper's: human comparisons; AI-labeled ones are not used
    helpful = helpful_comparisons(
        cfg.helpful_mix.path, weight=cfg.helpful_mix.weight, max_pairs=cfg.helpful_mix.max_pairs
    )
  else:
    helpful = [c for c in pairs_distinct if c.kind == HELPFULNESS]
  comparisons = cap_helpfulness(harmless + helpful, cfg.helpfulness_fraction, ctx.config.seed)
  counts.update(
      pairs_harmlessness=len(harmless),
      pairs_helpfulness=sum(c.kind == HELPFULNESS for c in comparisons),
      helpfulness_dropped=len(helpful) - sum(c.kind == HELPFULNESS for c in comparisons),
      helpfulness_source=helpfulness_source(ctx.config),
  )
  return comparisons, counts


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


def run(ctx: bookkeeping.Context, stage_dir: Path) -> dict:
  check_batch(ctx.config.preference, 'preference')
  check_config(ctx.config)
  comparisons, counts = load_comparisons(ctx)
  return train_pm(
      ctx,
      stage_dir,
      comparisons,
      counts,
      ctx.config.preference,
      stage='preference',
      source=_init_source(ctx),
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
  optimizer, and train_lib.fit's rhythm).
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
  plan, steps_per_epoch, total_steps = train_lib.plan_epochs(cfg, lengths, config.seed, max_len)

  tx, schedule = train_lib.make_optimizer(cfg.optimizer, total_steps)
  graphdef, state, shardings = train_lib.init_state(pm.model, tx)
  model_config = pm.config
  del pm  # the train state holds a copy of its parameters
  train_step = train_lib.make_train_step(graphdef, tx, pair_loss, shardings, schedule)
  evaluate = lambda params: (
      evaluate_kinds(graphdef, params, held_out, cfg, pad_id=pad_id, max_len=max_len)
      if held_out
      else {}
  )
  # checkpoint_every = 0: no checkpoints (the demo saves its seconds; an interrupted run restarts).
  result = train_lib.fit(
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
