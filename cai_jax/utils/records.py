"""The JSONL records stages hand each other: their schemas, the one reader, and the one resumable
chunk-to-JSONL engine every sampling stage writes through.

Why one engine: a sampling stage may be killed at any moment (kill -9, a preempted host) and must
end, when rerun, with the very bytes an uninterrupted run writes. That needs chunks fixed by the
item order alone, seeds fixed by a chunk's place alone (`chunk_seed`), whole lines appended and
fsynced per chunk, a torn last line cut off on resume, and per-process shards merged in item
order -- the same rules for every stage, so they live here once.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from cai_jax.utils import sharding
from cai_jax.utils.errors import StageError


class RecordsError(StageError):
  """A records file that cannot be read: malformed JSON, or a record without a required key."""


# ----------------------------------------------------------------------------------------------
# Schemas: what each stage writes, and what its readers may rely on.


@dataclasses.dataclass(frozen=True)
class Schema:
  """One stage output file. `keys`: every key the stage writes (its docs list the nesting);
  `required`: the keys downstream readers rely on, checked by `read_jsonl` (hand-made upstream
  files in tests and experiments may carry just these)."""

  stage: str
  file: str
  keys: tuple[str, ...]
  required: tuple[str, ...]

  def path(self, stage_dir: str | os.PathLike) -> Path:
    return Path(stage_dir) / self.file


# critique_revision (cai_jax/stages/critique_revision.py): one record per red-team prompt, in prompt
# order; rounds = [{principle, critique_request, critique, revision_request, revision,
# empty_revision}]; revision = the latest non-empty revision ('' if none); finish_reasons =
# {initial_response: str, critique: [str], revision: [str]}, each 'stop' or 'length' (cut at the
# token limit); conversation = the turns up to and including the prompt, for a prompt that
# continues a multi-turn conversation only (`data.prompt_turns`). Read by sft, evaluate.
REVISIONS = Schema(
    'critique_revision',
    'samples.jsonl',
    (
        'id',
        'source',
        'prompt',
        'conversation',
        'initial_response',
        'rounds',
        'revision',
        'revised',
        'empty_revisions',
        'finish_reasons',
        'tokens',
    ),
    ('prompt', 'initial_response', 'rounds', 'revision'),
)
# critique_revision: the helpful mix, one record per helpful prompt; responses = its
# helpful_samples_per_prompt samples, finish_reasons = one 'stop' or 'length' each; conversation
# as in REVISIONS. Read by sft.
HELPFUL = Schema(
    'critique_revision',
    'helpful.jsonl',
    ('id', 'source', 'prompt', 'conversation', 'responses', 'finish_reasons', 'tokens'),
    ('prompt', 'responses'),
)
# feedback (cai_jax/stages/feedback.py): one labeled pair per red-team (and helpful) prompt; kind =
# 'harmlessness' | 'helpfulness'; p_a = P(response_a is better), null when skipped; details = one
# scoring per principle and order; conversation as in REVISIONS; split = 'train' (the RL PM's) |
# 'evaluation' (held out from the RL PM for the evaluation PM). Read by preference, evaluation_pm.
TRAIN_SPLIT, EVALUATION_SPLIT = 'train', 'evaluation'
FEEDBACK = Schema(
    'feedback',
    'samples.jsonl',
    (
        'id',
        'source',
        'kind',
        'split',
        'prompt',
        'conversation',
        'response_a',
        'response_b',
        'p_a',
        'flags',
        'finish_reasons',
        'details',
    ),
    ('prompt', 'response_a', 'response_b'),
)
# evaluate_feedback (cai_jax/stages/evaluate_feedback.py): one scored comparison per line.
FEEDBACK_EVAL = Schema(
    'evaluate_feedback',
    'records.jsonl',
    ('id', 'correct', 'p_chosen', 'chosen_first', 'scorings'),
    ('id', 'correct', 'p_chosen', 'chosen_first'),
)
# ppo (cai_jax/stages/ppo.py): a few sampled responses per step, appended as training goes;
# conversation as in REVISIONS.
PPO_SAMPLES = Schema(
    'ppo',
    'samples.jsonl',
    (
        'step',
        'id',
        'source',
        'prompt',
        'conversation',
        'response',
        'score',
        'reward',
        'kl',
        'finish_reason',
    ),
    ('step',),
)

SCHEMAS = (REVISIONS, HELPFUL, FEEDBACK, FEEDBACK_EVAL, PPO_SAMPLES)


# ----------------------------------------------------------------------------------------------
# Reading and writing whole files.


def read_jsonl(
    path: str | os.PathLike, schema: Schema | None = None, *, repair: bool = False
) -> list[dict]:
  """Records of a jsonl file ([] if there is none).

  With `repair`, a torn tail (a run killed mid-write: a last line without its newline, or a
  line that does not parse) is cut off the file, so appending can resume after it; without,
  a malformed line is a RecordsError naming file:line. With `schema`, every record must have
  its required keys.
  """
  path = Path(path)
  if not path.exists():
    return []
  raw = path.read_bytes()
  records, good = [], 0
  for line_no, line in enumerate(raw.split(b'\n'), start=1):
    end = good + len(line) + 1
    if repair and end > len(raw):  # the last piece has no newline: an unfinished write
      break
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        if repair:
          break
        raise RecordsError(f'{path}:{line_no}: not JSON ({e})') from None
      if schema is not None:
        missing = [k for k in schema.required if k not in records[-1]]
        if missing:
          raise RecordsError(
              f'{path}:{line_no}: {schema.stage} record lacks ' f'{", ".join(missing)}'
          )
    good = end
  if repair and good < len(raw):
    logging.warning('%s: dropping %d bytes of an unfinished write', path, len(raw) - good)
    os.truncate(path, good)
  return records


def dumps(records: Sequence[dict]) -> str:
  """JSONL text of `records`: one line each, UTF-8 kept as is."""
  return ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in records)


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
  """Whole file at once (tmp + rename): the file either exists complete or not at all."""
  tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
  tmp.write_text(dumps(records), encoding='utf-8')
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Resumable chunked processing into jsonl files (one per process, merged by process 0).


def chunk_seed(seed: int, stream: int, chunk: int, step: int = 0) -> int:
  """The sampling seed of one generation call: a function of its place in the stage only."""
  return int(np.random.SeedSequence([seed, stream, chunk, step]).generate_state(1)[0])


def part_path(
    stage_dir: Path, name: str, process_index: int | None = None, process_count: int | None = None
) -> Path:
  """This process's shard of `name`.jsonl: the file itself when there is one process."""
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  return stage_dir / (f'{name}.jsonl' if pc == 1 else f'{name}.{pi}.jsonl')


def throughput(name: str, count: Callable[[], int], digits: int = 0) -> Callable[[], dict]:
  """A progress-bar postfix: how fast `count()` grows, per second, from now on."""
  t0, count0 = time.time(), count()
  return lambda: {name: f'{(count() - count0) / max(time.time() - t0, 1e-9):.{digits}f}'}


def _append(f, records: Sequence[dict]) -> None:
  """One chunk's records as whole lines, on disk before the next chunk starts (a kill -9 can
  then tear at most the last line, which `read_jsonl(repair=True)` cuts off)."""
  f.write(dumps(records))
  f.flush()
  os.fsync(f.fileno())


def process_in_chunks(
    items: Sequence[Any],
    path: Path,
    fn: Callable[[list, Callable[[int], int]], list[dict]],
    *,
    chunk_size: int,
    seed: int,
    stream: int,
    desc: str,
    ids: Sequence[str] | None = None,
    unit: str = 'item',
    progress: bool = True,
    postfix: Callable[[], dict] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> dict:
  """Runs fn(chunk, seeds) over this process's chunks, appending its records to `path`.

  Chunk k is items[k * chunk_size:(k + 1) * chunk_size] and seeds(step) is
  chunk_seed(seed, stream, k, step), whichever process runs it; processes take contiguous runs
  of chunks (sharding.shard_for_process). Records carry an 'id' (`ids[i]` is item i's; default
  item['id']). Chunks whose ids are all in `path` already are skipped; a partly written chunk is
  redone in full (same inputs, same seeds) and only its missing records appended. The progress
  bar (process 0) shows `postfix()`. Returns {'resumed': n, 'new': n}.
  """
  ids = [item['id'] for item in items] if ids is None else ids
  pi = jax.process_index() if process_index is None else process_index
  chunks = [
      (k, list(range(i, min(i + chunk_size, len(items)))))
      for k, i in enumerate(range(0, len(items), chunk_size))
  ]
  mine = sharding.shard_for_process(chunks, process_index, process_count)
  done = {r['id'] for r in read_jsonl(path, repair=True)}
  total = sum(len(idx) for _, idx in mine)
  resumed = sum(ids[i] in done for _, idx in mine for i in idx)
  hide = not progress or total == 0 or pi != 0  # one bar, on process 0, when there is work
  bar = tqdm(total=total, initial=resumed, desc=desc, unit=unit, dynamic_ncols=True, disable=hide)
  new = 0
  with open(path, 'a', encoding='utf-8') as f:
    for k, idx in mine:
      missing = [i for i in idx if ids[i] not in done]
      if not missing:
        continue
      results = fn([items[i] for i in idx], lambda step, k=k: chunk_seed(seed, stream, k, step))
      _append(f, [r for r in results if r['id'] not in done])
      done.update(r['id'] for r in results)
      new += len(missing)
      bar.update(len(missing))
      if postfix is not None:
        bar.set_postfix(postfix())
  bar.close()
  return {'resumed': resumed, 'new': new}


def merge_parts(
    stage_dir: Path, name: str, ids: Sequence[str], stage: str, process_count: int | None = None
) -> list[dict]:
  """The records of `name`.jsonl / `name`.<p>.jsonl in `ids` order, every id exactly once;
  written to `name`.jsonl unless that file already holds exactly them."""
  pc = jax.process_count() if process_count is None else process_count
  files = (
      [stage_dir / f'{name}.jsonl']
      if pc == 1
      else [stage_dir / f'{name}.{p}.jsonl' for p in range(pc)]
  )
  by_id, order = {}, []
  for path in files:
    for r in read_jsonl(path):
      order.append(r['id'])
      by_id.setdefault(r['id'], r)
  missing = [i for i in ids if i not in by_id]
  if missing:
    raise StageError(
        f'{stage}: {len(missing)} {name} records missing (e.g. {missing[0]!r}); '
        'rerun the same command to resume'
    )
  merged = [by_id[i] for i in ids]
  if pc > 1 or order != list(ids):
    write_jsonl(stage_dir / f'{name}.jsonl', merged)
  return merged
