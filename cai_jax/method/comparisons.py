"""Comparisons and their labels, shared by every stage that trains or grades on them: a pair of
conversations with the same context and P(a is better) (`Comparison`), read from the feedback
stage's AI labels or from HH-RLHF's human comparisons, their kinds (harmlessness, helpfulness),
the held-out split and the training label (soft, or hard in the ablation). The preference stage,
the evaluation PM and DPO train on them; evaluate scores conversations built the same way."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cai_jax import bookkeeping
from cai_jax.method import conversation, data, labels
from cai_jax.method.conversation import ASSISTANT, HUMAN, Turn
from cai_jax.utils import records as records_lib

LABEL_TYPES = ('soft', 'hard')  # preference.label_type, dpo.label_type
HARMLESSNESS, HELPFULNESS = 'harmlessness', 'helpfulness'  # the kinds of comparisons
KINDS = (HARMLESSNESS, HELPFULNESS)


class PreferenceDataError(bookkeeping.StageError):
  """Comparisons that cannot be trained on (none at all, a malformed record)."""


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


def as_turns(conv: Any) -> tuple[Turn, ...]:
  """A conversation as turns: a list of (role, text) turns, or a (prompt, response) pair.

  A pair is exactly two strings (`('How do I...?', 'You can...')`); anything else is read as
  turns, so a one-turn conversation is `[('human', 'Hi')]`, never `('human', 'Hi')`.
  """
  if isinstance(conv, (tuple, list)) and len(conv) == 2 and all(isinstance(x, str) for x in conv):
    return ((HUMAN, conv[0]), (ASSISTANT, conv[1]))
  return _context_turns(conv)


def training_label(p_a: float, label_type: str) -> float:
  """The target of the loss: the soft label itself, or its argmax for the hard-label ablation."""
  if label_type == 'soft':
    return float(p_a)
  if label_type == 'hard':
    return labels.hard_label(p_a)
  raise ValueError(f'preference.label_type must be one of {LABEL_TYPES}, got {label_type!r}')


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
