"""The pipeline, named once: the stage table (Bai et al. 2022, figure 1) and the loop that runs it.

Each stage is the module of the same name, entered through its `run(ctx, stage_dir)` and checked,
before anything runs, by its `check_config(config)` where it has one. `cai_jax/bookkeeping.py` keeps
the bookkeeping (fingerprints, DONE.json, the trash) that makes the loop resumable.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import jax

from cai_jax import bookkeeping
from cai_jax.bookkeeping import StageError
from cai_jax.stages import (
    critique_revision,
    dpo,
    evaluate,
    evaluate_feedback,
    evaluation_pm,
    feedback,
    harmfulness,
    ppo,
    preference,
    prompt_generation,
    sft,
)


class Stage(NamedTuple):
  """A stage of the table: its module and what the module declares next to its `run`."""

  module: ModuleType  # holds run(ctx, stage_dir), check_config(config), inputs(config), READS...

  @property
  def reads(self) -> tuple[str, ...]:
    """The stages whose outputs it reads."""
    return self.module.READS

  @property
  def models(self) -> tuple[str, ...]:
    """The given models it loads (bookkeeping.GIVEN_ROLES): their sources join its fingerprint."""
    return getattr(self.module, 'MODELS', ())

  @property
  def optional(self) -> tuple[str, ...]:
    """Stages it reads only when they have finished in the workdir (never required; when present,
    their fingerprints join its own: bookkeeping.optional_upstream)."""
    return getattr(self.module, 'OPTIONAL', ())

  def unused(self, config, upstream: str) -> bool:
    """Whether the config makes upstream stage `upstream` unnecessary (the module's
    `upstream_unused`): then it is neither required nor part of the fingerprint."""
    f = getattr(self.module, 'upstream_unused', None)
    return bool(f and f(config, upstream))

  def inputs(self, config) -> dict:
    """The files it hashes into its fingerprint (the module's `inputs(config)`)."""
    return self.module.inputs(config)

  def fingerprint_fields(self, config) -> dict:
    """Config outside its own section that its fingerprint holds (the module's
    `fingerprint_fields(config)`, where it has one)."""
    f = getattr(self.module, 'fingerprint_fields', None)
    return f(config) if f else {}


# The pipeline in order. Optionally first, the pretrained model writes more red-team and helpful
# prompts from a few of the human ones (prompt_generation). SL-CAI: the helpful model critiques and revises its responses to red-team
# prompts; the pretrained model is fine-tuned on the revisions (sft). RL-CAI: the feedback model
# (the pretrained one) labels pairs of the SFT model's responses, a preference model learns the
# labels, and PPO trains the SFT model against it; DPO trains it on the labels directly, for
# comparison. evaluate_feedback measures the labels; evaluate compares the models, also with two
# models no training stage reads (after ppo: redoing them redoes no policy): the evaluation PM and
# the harmfulness model. A model role is named after the stage that makes it ('sft',
# 'preference', 'ppo', 'dpo', ...; see bookkeeping.MODEL_ROLES). What each stage reads is
# declared in its module (READS, MODELS, OPTIONAL, inputs).
STAGES: dict[str, Stage] = {
    m.__name__.rpartition('.')[2]: Stage(m)
    for m in (
        prompt_generation,
        critique_revision,
        sft,
        feedback,
        preference,
        evaluate_feedback,
        ppo,
        dpo,
        evaluation_pm,
        harmfulness,
        evaluate,
    )
}
ORDER = tuple(STAGES)


def parse_stage_list(value: str | tuple | list, what: str = 'config.stages') -> list[str]:
  names = [s.strip() for s in (value.split(',') if isinstance(value, str) else value) if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise StageError(
        f'{what}: unknown stage(s) {", ".join(map(repr, unknown))}; valid stages: '
        f'{", ".join(ORDER)}'
    )
  return sorted(set(names), key=ORDER.index)


def run(ctx: bookkeeping.Context) -> list[tuple[str, str, float]]:
  """Runs config.stages in order; returns (stage, 'ran'|'reused', seconds) rows.

  `config.force` moves the forced stages (and everything after them) to WORKDIR/.trash; they are
  deleted once the whole run has finished, and moved back if it fails.
  """
  names = parse_stage_list(ctx.config.stages)
  forced = parse_stage_list(ctx.config.force, 'config.force') if ctx.config.force else []
  moved = {}
  if forced and jax.process_index() == 0:
    first = min(ORDER.index(f) for f in forced)
    for name in ORDER[first:]:  # the forced stage and everything after it
      moved[name] = bookkeeping.move_to_trash(ctx.workdir, name)
  bookkeeping.barrier('force')
  try:
    rows = _run_stages(ctx, names)
  except BaseException:
    if jax.process_index() == 0:
      for name, trashed in moved.items():  # each forced stage as it was before this run
        shutil.rmtree(ctx.stage_dir(name), ignore_errors=True)
        if trashed is not None:
          os.replace(trashed, ctx.stage_dir(name))
    raise
  if jax.process_index() == 0:
    shutil.rmtree(ctx.workdir / bookkeeping.TRASH, ignore_errors=True)
  return rows


def _run_stages(ctx: bookkeeping.Context, names: list[str]) -> list[tuple[str, str, float]]:
  rows = []
  for name in names:
    t0 = time.time()
    if bookkeeping.reusable(ctx, name):
      rows.append((name, 'reused', 0.0))
      continue
    for u in STAGES[name].reads:  # before the claim: a stage that cannot start writes nothing
      if not upstream_unused(ctx.config, name, u):
        ctx.require(u, name)
    bookkeeping.claim(ctx, name)
    try:
      summary = STAGES[name].module.run(ctx, ctx.stage_dir(name)) or {}
    finally:
      ctx._models.clear()  # the next stage starts with the device memory to itself
    seconds = time.time() - t0
    bookkeeping.mark_done(ctx, name, seconds, summary)
    bookkeeping.barrier(f'done-{name}')
    rows.append((name, 'ran', seconds))
  return rows


def upstream_unused(config, name: str, upstream: str) -> bool:
  """Whether the config makes an upstream stage's output unnecessary for stage `name` (then it is
  neither required nor part of the stage's fingerprint): each stage's `upstream_unused`."""
  return STAGES[name].unused(config, upstream)


def context(config, workdir, mesh=None, **kwargs) -> bookkeeping.Context:
  """The Context the stages are handed, holding this stage table."""
  return bookkeeping.Context(config, Path(workdir), mesh, table=STAGES, **kwargs)


def timing_table(rows, total: float) -> str:
  lines = ['| stage | status | seconds |', '|---|---|---:|']
  lines += [f'| {n} | {s} | {t:.1f} |' for n, s, t in rows]
  lines.append(f'| **total** | | {total:.1f} |')
  return '\n'.join(lines)
