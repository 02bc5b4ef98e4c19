"""The train loop of the sft, preference and dpo stages (`fit`; PPO has its own, a step being a
rollout): batches bucketed by length and planned per epoch (`plan_epochs`), the jitted step,
evaluation, checkpoints, metrics, and the non-finite and divergence guards."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import numpy as np

from cai_jax.training.checkpoints import Checkpointer
from cai_jax.training.metrics import MetricsWriter, announce, progress
from cai_jax.training.train_lib import Guard, TrainState, check_finite, host_metrics
from cai_jax.utils import sharding

# ---- batches ------------------------------------------------------------------------------------


def bucket_length(n: int, max_len: int, min_bucket: int) -> int:
  """Pads a length to a power of two (at least min_bucket, at most max_len): few compilations."""
  return min(max_len, max(min_bucket, 1 << max(0, n - 1).bit_length()))


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    max_len: int,
    min_bucket: int,
    shuffle: bool = True,
) -> list[tuple[int, list[int]]]:
  """This epoch's batches as (padded length, example indices; -1 = an empty filler row).

  Examples are shuffled by (seed, epoch), grouped by padded length, cut into batches, and the
  batches shuffled again: the order is a pure function of (seed, epoch), so a resumed run that
  knows its step knows its next batch. The number of batches is the same every epoch.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
  buckets: dict[int, list[int]] = {}
  for i in order:
    buckets.setdefault(bucket_length(lengths[i], max_len, min_bucket), []).append(int(i))
  batches = []
  for length in sorted(buckets):
    rows = buckets[length]
    for start in range(0, len(rows), batch_size):
      chunk = rows[start : start + batch_size]
      batches.append((length, chunk + [-1] * (batch_size - len(chunk))))
  if shuffle:
    batches = [batches[i] for i in rng.permutation(len(batches))]
  return batches


def plan_epochs(
    cfg, lengths: Sequence[int], seed: int, max_len: int
) -> tuple[Callable[[int], list[tuple[int, list[int]]]], int, int]:
  """(plan, steps_per_epoch, total_steps) of a trainer's stage config (batch_size, min_bucket,
  num_steps, epochs): plan(epoch) is that epoch's `epoch_batches`; total_steps is num_steps, or
  else enough steps for `epochs` passes (at least one)."""
  plan = lambda epoch: epoch_batches(  # noqa: E731
      lengths, cfg.batch_size, seed, epoch, max_len=max_len, min_bucket=cfg.min_bucket
  )
  steps_per_epoch = len(plan(0))
  total = cfg.num_steps if cfg.num_steps > 0 else max(1, math.ceil(cfg.epochs * steps_per_epoch))
  return plan, steps_per_epoch, total


def local_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """This process's slice of a global batch (multi-host: each process feeds its own rows)."""
  n, p = jax.process_count(), jax.process_index()
  return {k: np.split(v, n)[p] for k, v in batch.items()}


def device_batch(batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """A host batch (the same on every process) as global arrays, rows over ('data', 'fsdp')."""
  return sharding.global_batch(local_rows(batch))


def planned_batches(plan, steps_per_epoch: int, start: int, total_steps: int):
  """(step, length, rows) for steps start .. total_steps - 1, from `plan(epoch)` (a list of
  (length, rows) per step of that epoch), made once per epoch: resuming mid-epoch is free."""
  epoch, batches = -1, []
  for step in range(start, total_steps):
    if step // steps_per_epoch != epoch:
      epoch = step // steps_per_epoch
      batches = plan(epoch)
    length, rows = batches[step % steps_per_epoch]
    yield step, length, rows


# ---- the train loop -----------------------------------------------------------------------------


class Fit(NamedTuple):
  state: TrainState
  metrics: dict  # the last step's host metrics; {} when resumed after the last step
  eval_metrics: dict  # the last evaluation's; {} when none ran
  start: int  # the step the run began at: 0, or the checkpoint it resumed from
  seconds: float  # wall time of the steps run (the wait for the last checkpoint write aside)
  tokens: int  # sum of the steps' 'tokens' metric (0 when the loss reports none)


def fit(
    *,
    stage: str,
    stage_dir: Path,
    state: TrainState,
    shardings,
    train_step,
    plan,
    steps_per_epoch: int,
    make_batch,
    total_steps: int,
    cfg,
    evaluate=None,
    postfix: dict[str, str] | None = None,
) -> Fit:
  """The train loop of the sft and preference stages, written once (big_vision's train.py shape).

  Resumes from the newest checkpoint in stage_dir/checkpoints, then trains on
  `make_batch(length, rows)` (a host batch) of `planned_batches(plan, ...)` up to total_steps.
  A non-finite step, or one past a bound of cfg.guard (`Guard`), stops the run before its
  state is saved. The stage config `cfg` sets the
  rhythm: `evaluate(params) -> dict` runs every cfg.eval_every steps and at the end, into that
  step's row; rows are written every cfg.log_every steps and at every evaluation; checkpoints
  every cfg.checkpoint_every steps and at the end (0 = none), cfg.max_to_keep of them kept.
  postfix: bar label -> format over the step's metrics, e.g. {'loss': '{loss:.3f}'}. However
  the loop ends, the pending checkpoint is finished, so a rerun resumes from it.
  """
  eval_every, log_every = cfg.eval_every, cfg.log_every
  ckpt = (
      Checkpointer(
          Path(stage_dir) / 'checkpoints',
          save_every=cfg.checkpoint_every,
          max_to_keep=cfg.max_to_keep,
      )
      if cfg.checkpoint_every > 0
      else None
  )
  restored = ckpt.restore_latest(state, shardings) if ckpt else None
  if restored is not None:
    state = restored
    announce(f'{stage}: resumed from the checkpoint at step {int(state.step)}')
  start = int(state.step)
  writer = MetricsWriter(stage_dir, resume_step=start)
  guard = Guard(stage, cfg.get('guard'), stage_dir, state.params)
  bar = progress(total_steps, start, stage)
  metrics, eval_metrics, tokens, t0 = {}, {}, 0, time.time()
  try:
    for step, length, rows in planned_batches(plan, steps_per_epoch, start, total_steps):
      state, metrics = train_step(state, device_batch(make_batch(length, rows)))
      metrics = host_metrics(metrics)
      done = step + 1
      check_finite(stage, done, metrics, ckpt)  # the finally below closes ckpt
      guard.check(done, metrics, ckpt)
      tokens += metrics.get('tokens', 0)
      evaluated = done == total_steps or (eval_every and done % eval_every == 0)
      if evaluated and evaluate is not None:
        eval_metrics = evaluate(state.params)
        metrics.update(eval_metrics)
      if evaluated or done % log_every == 0:
        writer.write(done, metrics)
      if ckpt:
        ckpt.save(done, state, force=done == total_steps)
      bar.update(1)
      bar.set_postfix({label: f.format_map(metrics) for label, f in (postfix or {}).items()})
    seconds = time.time() - t0
  finally:
    bar.close()
    if ckpt:
      ckpt.close()  # waits for the pending save
    writer.close()
  return Fit(state, metrics, eval_metrics, start, seconds, tokens)
