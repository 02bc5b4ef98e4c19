"""Generated prompts as the stages read them (paper sections 3.1 and 4.2).

The `prompt_generation` stage (cai_jax/stages/prompt_generation.py) writes the prompts it kept to
`GENERATED_PROMPTS` in its directory; `data.stage_prompts(ctx, kind, stage)` hands them to the
stages that `prompt_generation.feed` names, mixed into their human train prompts
(`with_generated`). Evaluation keeps the held-out human prompts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cai_jax.utils import records as records_lib

GENERATED_PROMPTS = 'prompts.jsonl'  # the kept prompts, in the prompt_generation stage's dir
# The stages whose train prompts can include them (evaluate keeps the held-out human prompts).
READERS = ('critique_revision', 'feedback', 'ppo')


def source(kind: str) -> str:
  """The `source` of a generated prompt of `kind` ('generated_redteam', 'generated_helpful')."""
  return f'generated_{kind}'


def source_counts(records: Sequence[dict]) -> dict[str, int]:
  """{source: how many of `records`} (a stage's summary says where its prompts came from)."""
  counts: dict[str, int] = {}
  for r in records:
    counts[r.get('source', '')] = counts.get(r.get('source', ''), 0) + 1
  return counts


def _order_key(text: str) -> int:
  return int(hashlib.sha1(text.encode('utf-8')).hexdigest()[:16], 16)


def with_generated(ctx, kind: str, stage: str, train: list[dict]) -> list[dict]:
  """`train` and, when `stage` is in `prompt_generation.feed` and that stage finished in this
  workdir with this config, its generated `kind` prompts (not already among them), in an order
  fixed by the data seed and the ids alone, so every reading stage sees one order (feedback's
  `prompt_offset` keeps its meaning)."""
  cfg = ctx.config.get('prompt_generation')
  if cfg is None or stage not in cfg.feed:
    return train
  d, _ = ctx.optional('prompt_generation')
  if d is None:
    return train
  have = {r['id'] for r in train}
  # As the human prompt records: id, prompt, source (the kind and the seeds stay in the file; a
  # stage's own records have a `kind` of their own).
  extra = [
      {k: r[k] for k in ('id', 'prompt', 'source')}
      for r in records_lib.read_jsonl(d / GENERATED_PROMPTS)
      if r['kind'] == kind and r['id'] not in have
  ]
  if not extra:
    return train
  seed = ctx.config.seed + ctx.config.data.seed_offset
  return sorted(train + extra, key=lambda r: _order_key(f'{seed}:{kind}:{r["id"]}'))
