"""The policy snapshots along RL (paper figures 2 and 8: Elo over RL training): PPO keeps its
policy every `evaluate.rl_curve_every` steps as an HF directory (`save_snapshot`), and evaluate
reads them back (`snapshot_path`, `snapshot_steps`) to draw its curves over PPO steps."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import jax

from cai_jax.models import checkpoint
from cai_jax.models.decoder import Decoder

SNAPSHOTS = 'snapshots'


def snapshot_path(stage_dir: Path, step: int) -> Path:
  return Path(stage_dir) / SNAPSHOTS / f'step_{step:06d}'


def snapshot_steps(config) -> list[int]:
  """The PPO steps whose policy is kept: every `evaluate.rl_curve_every`-th, short of the last
  (the export is the last step's policy)."""
  every = config.evaluate.rl_curve_every if 'evaluate' in config else 0
  return list(range(every, config.ppo.steps, every)) if every > 0 else []


def save_snapshot(policy: Decoder, tok, model_config, stage_dir: Path, step: int) -> None:
  """The policy after `step` as an HF directory, written whole (tmp + rename): a resumed run that
  redoes the step replaces it, one that does not finds it complete."""
  out = snapshot_path(stage_dir, step)
  tmp = out.with_name(out.name + '.tmp')
  if jax.process_index() == 0:  # save_pretrained writes on process 0 too
    shutil.rmtree(tmp, ignore_errors=True)
  checkpoint.save_pretrained(checkpoint.Pretrained(policy, tok, model_config, str(out)), str(tmp))
  if jax.process_index() == 0:
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
