"""The pipeline's stages, their artifacts and the bookkeeping that makes them resumable.

Each stage writes under `WORKDIR/<stage>/`. On start it records the fingerprint of the config
fields it depends on (`fingerprint.json`); on success it writes `DONE.json`. A rerun reuses a
finished stage, resumes an unfinished one, and refuses to mix outputs of different configs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

# name -> (module, function, upstream stages whose outputs it reads)
STAGES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    'critique_revision': ('cai_jax.sl_cai', 'run', ()),
    'sft': ('cai_jax.sft', 'run', ('critique_revision',)),
    'feedback': ('cai_jax.feedback', 'run', ('sft',)),
    'evaluate_feedback': ('cai_jax.evaluate_feedback', 'run_evaluate_feedback', ()),
    'preference': ('cai_jax.preference', 'run', ('feedback',)),
    'ppo': ('cai_jax.ppo', 'run', ('sft', 'preference')),
    'evaluate': ('cai_jax.evaluate', 'run', ('critique_revision', 'sft', 'preference', 'ppo')),
}
ORDER = tuple(STAGES)
GLOBAL_FIELDS = ('seed', 'model', 'constitution', 'conversation_format', 'data')


class StageError(RuntimeError):
  """A pipeline-level problem (bad stage name, missing upstream, mixed configs)."""


def parse_stage_list(value: str | tuple | list, what: str = 'config.stages') -> list[str]:
  names = [s.strip() for s in (value.split(',') if isinstance(value, str) else value) if s.strip()]
  unknown = [s for s in names if s not in STAGES]
  if unknown:
    raise StageError(f'{what}: unknown stage(s) {", ".join(map(repr, unknown))}; valid stages: '
                     f'{", ".join(ORDER)}')
  return sorted(set(names), key=ORDER.index)


def _plain(x):
  if isinstance(x, ml_collections.ConfigDict):
    return {k: _plain(v) for k, v in sorted(x.items())}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  return x


def _flatten(d: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def diff_fields(old: dict, new: dict) -> list[str]:
  a, b = _flatten(old), _flatten(new)
  return [f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
          for k in sorted(set(a) | set(b)) if a.get(k, '<absent>') != b.get(k, '<absent>')]


@dataclasses.dataclass
class Context:
  """What a stage gets: the config, the workdir, the mesh and cached model loading."""

  config: ml_collections.ConfigDict
  workdir: Path
  mesh: Any = None
  _models: dict = dataclasses.field(default_factory=dict)

  def stage_dir(self, name: str) -> Path:
    return self.workdir / name

  def is_done(self, name: str) -> bool:
    return (self.stage_dir(name) / 'DONE.json').exists()

  def require(self, name: str, needed_by: str) -> Path:
    """The finished output dir of `name`, or a clear error naming the stage to run first."""
    if not self.is_done(name):
      raise StageError(f"stage '{needed_by}' needs the output of stage '{name}', which has not finished "
                       f"in {self.workdir}: run --config.stages={name} first (same config and workdir)")
    return self.stage_dir(name)

  def model_source(self, role: str) -> str:
    """Where a model of the pipeline lives: helpful (pretrained), sl_cai, pm, rl_cai."""
    if role == 'helpful':
      return self.config.model.source
    stage = {'sl_cai': 'sft', 'pm': 'preference', 'rl_cai': 'ppo'}[role]
    return str(self.stage_dir(stage) / 'export')

  def load(self, source: str, *, scalar_head: bool = False, cache: bool = True,
           frozen: bool = False):
    """load_pretrained with the config's dtypes, memoized per (source, head, dtype) within the run.

    A model that a stage trains keeps its parameters in `model.param_dtype` (float32 master
    weights); a `frozen` one (sampled or scored from, never updated) in `model.frozen_param_dtype`.
    """
    from cai_jax import checkpoint

    m = self.config.model
    param_dtype = frozen_param_dtype(m) if frozen else m.param_dtype
    key = (source, scalar_head, param_dtype)
    if cache and key in self._models:
      return self._models[key]
    pretrained = checkpoint.load_pretrained(source, dtype=m.dtype, param_dtype=param_dtype,
                                            seed=self.config.seed, scalar_head=scalar_head,
                                            model_overrides={'remat': m.get('remat', 'none')})
    if cache:
      self._models[key] = pretrained
    return pretrained

  def stage_config_fingerprint(self, name: str) -> dict:
    c = self.config
    fields = {k: _plain(c[k]) for k in GLOBAL_FIELDS if k in c}
    if name in c:
      fields[name] = _plain(c[name])
    if name == 'evaluate_feedback' and 'feedback' in c:
      fields['feedback'] = _plain(c.feedback)  # evaluates the feedback configuration
    fields['upstream'] = {u: self.fingerprint(u) for u in STAGES[name][2]}
    return fields

  def fingerprint(self, name: str) -> str:
    blob = json.dumps(self.stage_config_fingerprint(name), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_precision(model_config) -> None:
  """Validates the model's dtype and remat fields; warns when trained parameters are bf16.

  A bf16 parameter has 8 bits of mantissa: an AdamW update smaller than 2^-8 of the weight
  rounds away. One step at lr 1e-6 on N(0, 0.02) weights changes ~2% of them, at 2e-5 ~30%:
  a bf16-master run barely trains. Trained models therefore keep float32 master weights and
  compute in `model.dtype`; only frozen models are worth storing in bf16.
  """
  from cai_jax.model import DTYPES, REMAT_POLICIES

  for field in ('dtype', 'param_dtype', 'frozen_param_dtype'):
    value = model_config.get(field, '')
    if (value or field != 'frozen_param_dtype') and value not in DTYPES:
      raise StageError(f'model.{field}={value!r} is not a dtype we run; valid: {", ".join(DTYPES)}')
  remat = model_config.get('remat', 'none')
  if remat not in REMAT_POLICIES:
    raise StageError(f'model.remat={remat!r}; valid: {", ".join(REMAT_POLICIES)}')
  if model_config.param_dtype != 'float32':
    logging.warning(
        'model.param_dtype=%s keeps the TRAINED models\' parameters and AdamW moments in %s: '
        'most small updates round away (one step at lr 1e-6 changes ~2%% of N(0, 0.02) weights) '
        'and training barely moves them. Use model.param_dtype=float32 (master weights; compute '
        'stays in model.dtype) and model.frozen_param_dtype=%s for the frozen models.',
        model_config.param_dtype, model_config.param_dtype, model_config.param_dtype)


def frozen_param_dtype(model_config) -> str:
  """The parameter dtype of frozen models: `model.frozen_param_dtype`, or `param_dtype` if ''."""
  return model_config.get('frozen_param_dtype', '') or model_config.param_dtype


def _check_or_claim(ctx: Context, name: str) -> str:
  """'reuse' for a finished stage with our fingerprint, 'run' otherwise; refuses foreign outputs."""
  d = ctx.stage_dir(name)
  fields = ctx.stage_config_fingerprint(name)
  fp = ctx.fingerprint(name)
  fp_file = d / 'fingerprint.json'
  if fp_file.exists():
    old = json.loads(fp_file.read_text())
    if old['fingerprint'] != fp:
      diffs = diff_fields(old['fields'], fields)
      raise StageError(f"{d} was made by a different config ({'; '.join(diffs[:8]) or 'upstream changed'}); "
                       f'use another --workdir or --config.force={name}')
    return 'reuse' if (d / 'DONE.json').exists() else 'run'
  if d.exists() and any(d.iterdir()):
    raise StageError(f'{d} exists without a fingerprint; move it away or use --config.force={name}')
  if jax.process_index() == 0:
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(fp_file, json.dumps({'fingerprint': fp, 'fields': fields}, indent=1, default=str))
  return 'run'


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + f'.tmp{os.getpid()}')
  tmp.write_text(text)
  os.replace(tmp, path)


def run_pipeline(ctx: Context) -> list[tuple[str, str, float]]:
  """Runs config.stages in order; returns (stage, 'ran'|'reused', seconds) rows."""
  stages = parse_stage_list(ctx.config.stages)
  forced = parse_stage_list(ctx.config.force, 'config.force') if ctx.config.force else []
  if forced and jax.process_index() == 0:
    first = min(ORDER.index(f) for f in forced)
    for name in ORDER[first:]:  # the forced stage and everything after it
      shutil.rmtree(ctx.stage_dir(name), ignore_errors=True)
  _barrier('force')
  rows = []
  for name in stages:
    t0 = time.time()
    if _check_or_claim(ctx, name) == 'reuse':
      rows.append((name, 'reused', 0.0))
      continue
    module, fn, upstream = STAGES[name]
    for u in upstream:
      if not _upstream_unused(ctx.config, name, u):
        ctx.require(u, name)
    summary = getattr(importlib.import_module(module), fn)(ctx, ctx.stage_dir(name)) or {}
    seconds = time.time() - t0
    if jax.process_index() == 0:
      _atomic_write(ctx.stage_dir(name) / 'DONE.json',
                    json.dumps({'fingerprint': ctx.fingerprint(name), 'seconds': seconds,
                                'summary': summary}, indent=1, default=str))
    _barrier(f'done-{name}')
    rows.append((name, 'ran', seconds))
  return rows


def _upstream_unused(config, name: str, upstream: str) -> bool:
  """Whether the config makes an upstream stage's output unnecessary: ppo with a synthetic
  reward needs no PM, and ppo with an explicit `ppo.policy_source` needs no SL-CAI model."""
  if name != 'ppo':
    return False
  return ((upstream == 'preference' and config.ppo.reward == 'synthetic') or
          (upstream == 'sft' and bool(config.ppo.policy_source)))


def _barrier(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)


def timing_table(rows, total: float) -> str:
  lines = ['| stage | status | seconds |', '|---|---|---:|']
  lines += [f'| {n} | {s} | {t:.1f} |' for n, s, t in rows]
  lines.append(f'| **total** | | {total:.1f} |')
  return '\n'.join(lines)
