"""What a stage is handed (`Context`: the config, the workdir, the mesh, the model roles and their
loading) and the bookkeeping that makes the pipeline resumable.

The bookkeeping knows no stage: the stage table (`cai_jax/pipeline.py`, handed to the Context as
`table`) says, for each stage, what it reads (upstream stages, given models, optional stages) and
which files it hashes (its `inputs(config)`). Each stage writes under
`WORKDIR/<stage>/`. On start it records the fingerprint of the config fields it depends on (`fingerprint.json`); on success it writes `DONE.json`. A rerun reuses a
finished stage, resumes an unfinished one, and refuses to mix outputs of different configs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import ml_collections

from cai_jax.models import checkpoint
from cai_jax.utils.errors import StageError  # also bookkeeping.StageError, as the stages say

GLOBAL_FIELDS = ('seed', 'model', 'constitution', 'conversation_format', 'data')


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
  return [
      f'{k}: {a.get(k, "<absent>")!r} -> {b.get(k, "<absent>")!r}'
      for k in sorted(set(a) | set(b))
      if a.get(k, '<absent>') != b.get(k, '<absent>')
  ]


@dataclasses.dataclass
class Context:
  """What a stage gets: the config, the workdir, the mesh and cached model loading."""

  config: ml_collections.ConfigDict
  workdir: Path
  mesh: Any = None
  _models: dict = dataclasses.field(default_factory=dict)
  # Stages to take as finished with this config without looking (a sweep predicting the
  # fingerprints of a run before it happens: experiments/sweep.py).
  assume_done: frozenset = frozenset()
  # The stage table, {name: entry} (pipeline.STAGES; `pipeline.context` fills it). An entry has
  # `reads`, `models`, `optional`, `unused(config, upstream)`, `inputs(config)` (the files the
  # stage hashes: {what: a path, or a list of paths hashed together}) and
  # `fingerprint_fields(config)` (config outside the stage's section that it depends on).
  table: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def stage_dir(self, name: str) -> Path:
    return self.workdir / name

  def is_done(self, name: str) -> bool:
    return (self.stage_dir(name) / 'DONE.json').exists()

  def require(self, name: str, needed_by: str) -> Path:
    """The finished output dir of `name`, made by this config; else an error naming what to run."""
    if not self.is_done(name):
      raise StageError(
          f"stage '{needed_by}' needs the output of stage '{name}', which has not finished "
          f'in {self.workdir}: run --config.stages={name} first (same config and workdir)'
      )
    if not reusable(self, name):
      recorded = json.loads((self.stage_dir(name) / 'fingerprint.json').read_text())
      diffs = diff_fields(recorded['fields'], self.stage_config_fingerprint(name))
      raise StageError(
          f"stage '{needed_by}' needs stage '{name}', whose output in {self.workdir} was "
          f"made by a different config or inputs ({'; '.join(diffs[:4])}): run "
          f'--config.stages={name} (or --config.force={name}) first'
      )
    return self.stage_dir(name)

  def optional(self, name: str) -> tuple[Path | None, str]:
    """(the output dir of optional upstream stage `name`, '') when it finished in this workdir
    with this config; else (None, why not)."""
    if name in self.assume_done:
      return self.stage_dir(name), ''
    if not self.is_done(name):
      return None, f'the {name} stage did not run in this workdir'  # no path: summaries compare
    if name in self.table and not reusable(self, name):
      return None, (
          f'the {name} stage in this workdir was made by a different config: rerun '
          f'--config.stages={name}'
      )
    return self.stage_dir(name), ''

  def model_source(self, role: str) -> str:
    """Where the model playing `role` (one of MODEL_ROLES) lives: a config source for the two
    given models, the stage's export for the trained ones."""
    if role in RENAMED_ROLES:
      raise StageError(
          f'model role {role!r} is now called {RENAMED_ROLES[role]!r} (model roles '
          'are named after the stages that make them)'
      )
    if role in GIVEN_ROLES:
      return role_source(self.config.model, role)
    if role not in MODEL_ROLES:
      raise StageError(f'unknown model role {role!r}; valid: {", ".join(MODEL_ROLES)}')
    return str(self.stage_dir(role) / 'export')

  def load_role(self, role: str, **kwargs):
    """`load` of the model playing `role`; a source that cannot be loaded is one line naming the
    role and the config field that chose it."""
    source = self.model_source(role)
    try:
      return self.load(source, **kwargs)
    except checkpoint.CheckpointError as e:
      raise StageError(
          f'{role_description(self.config.model, role)} {source!r} cannot be ' f'loaded: {e}'
      ) from None

  def load(
      self, source: str, *, scalar_head: bool = False, cache: bool = True, frozen: bool = False
  ):
    """load_pretrained with the config's dtypes, memoized per (source, head, dtype) for the stage.

    A model that a stage trains keeps its parameters in `model.param_dtype` (float32 master
    weights); a `frozen` one (sampled or scored from, never updated) in `model.frozen_param_dtype`.
    `cache=False` keeps no reference: a trained model's parameters are copied into the train
    state, and the loaded copy must not stay in HBM beside it. The cache is emptied after each
    stage, so a stage holds only the models it loaded.
    """
    m = self.config.model
    overrides = load_fields(m, frozen=frozen)
    param_dtype = overrides.pop('param_dtype')
    key = (source, scalar_head, param_dtype) + tuple(
        overrides[k] for k in ('lora_rank', 'quantization') if k in overrides
    )
    if key in self._models:
      return self._models[key]
    pretrained = checkpoint.load_pretrained(
        source,
        dtype=m.dtype,
        param_dtype=param_dtype,
        seed=self.config.seed,
        scalar_head=scalar_head,
        model_overrides=overrides,
    )
    if cache:
      self._models[key] = pretrained
    return pretrained

  def stage_config_fingerprint(self, name: str) -> dict:
    c = self.config
    stage = self.table[name]
    fields = {k: _plain(c[k]) for k in GLOBAL_FIELDS if k in c}
    if 'model' in fields:  # the given models' sources, resolved, for the stages that load them
      for field in ('source', *(f'{r}_source' for r in GIVEN_ROLES)):
        fields['model'].pop(field, None)
      fields['model'].update({f'{r}_source': role_source(c.model, r) for r in stage.models})
      if not lora_rank(c.model):  # LoRA off: the workdirs of runs from before the field match
        fields['model'].pop('lora', None)
      if not c.model.get('frozen_quantization', ''):  # so do those from before int8
        fields['model'].pop('frozen_quantization', None)
    if name in c:
      fields[name] = _plain(c[name])
      if isinstance(fields[name], dict):  # a guard that did not fire changed nothing: loosening
        fields[name].pop('guard', None)  # it resumes a stopped run instead of redoing it
    fields.update({k: _plain(v) for k, v in stage.fingerprint_fields(c).items()})
    fields['inputs'] = input_fingerprints(stage.inputs(c))
    fields['upstream'] = {u: self.fingerprint(u) for u in stage.reads if not stage.unused(c, u)}
    present = optional_upstream(self, name)
    if present:  # absent when none ran: the fingerprints of workdirs without them stay as they were
      fields['optional'] = present
    return fields

  def fingerprint(self, name: str) -> str:
    blob = json.dumps(self.stage_config_fingerprint(name), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- the models of the pipeline, named after what makes them -----------------------------------

# Two models are given. The paper fine-tunes a *pretrained* LM on the revisions, labels the
# comparisons with a pretrained LM and trains the PM from one; a *helpful* (RLHF) model writes the
# initial responses, critiques and revisions. The others are the exports of the stages that
# train them (two of them, evaluation_pm and harmfulness, only evaluate).
MODEL_ROLES = {
    'pretrained': 'the pretrained model: SFT init, feedback, PM init',
    'helpful': 'the helpful model: initial responses, critiques, revisions, helpful samples',
    'sft': "the SL-CAI model, the sft stage's export",
    'preference': "the preference model, the preference stage's export",
    'ppo': "the RL-CAI model, the ppo stage's export",
    'dpo': "the DPO model (SL-CAI trained on the AI labels directly), the dpo stage's export",
    'evaluation_pm': "the evaluation PM (comparisons the RL PM never saw), the evaluation_pm stage's export",
    'harmfulness': "the absolute harmfulness model (red-team ratings 0-4), the harmfulness stage's export",
}
GIVEN_ROLES = ('pretrained', 'helpful')
RENAMED_ROLES = {'sl_cai': 'sft', 'pm': 'preference', 'rl_cai': 'ppo'}  # the old names


def role_source(model_config, role: str) -> str:
  """`model.<role>_source`, or `model.source` (the one-field shorthand) when that is ''."""
  return model_config.get(f'{role}_source', '') or model_config.source


def role_field(model_config, role: str) -> str:
  """The config field that chose the source of a given role."""
  return f'model.{role}_source' if model_config.get(f'{role}_source', '') else 'model.source'


def role_description(model_config, role: str) -> str:
  """E.g. "config.model.source (the pretrained model: SFT init, feedback, PM init)"."""
  if role in GIVEN_ROLES:
    return f'config.{role_field(model_config, role)} ({MODEL_ROLES[role]})'
  return MODEL_ROLES[role]


def roles_line(model_config) -> str:
  """Which model plays which given role: 'helpful = pretrained: X' or
  'pretrained: X; helpful: Y'."""
  pretrained, helpful = (role_source(model_config, r) for r in GIVEN_ROLES)
  if pretrained == helpful:
    return f'helpful = pretrained: {pretrained}'
  return f'pretrained: {pretrained}; helpful: {helpful}'


def lora_rank(model_config) -> int:
  """The LoRA rank of the trained models (0: every weight is trained)."""
  return int(model_config.get('lora', {}).get('rank', 0))


def lora_fields(model_config) -> dict:
  """The ModelConfig fields of `model.lora` (for a trained model; {} with LoRA off)."""
  if not lora_rank(model_config):
    return {}
  c = model_config.lora
  return dict(
      lora_rank=int(c.rank),
      lora_alpha=float(c.alpha),
      lora_targets=tuple(c.targets),
      lora_dropout=float(c.get('dropout', 0.0)),
  )


def load_fields(model_config, *, frozen: bool) -> dict:
  """The ModelConfig fields of a model as `Context.load` builds it (and `cai_jax.aot` compiles
  it): remat, attention and param_dtype; for a LoRA run's trained model, fresh adapters on a base
  held like a frozen model; for a frozen model or that base, `model.frozen_quantization`."""
  m = model_config
  fields = {'remat': m.get('remat', 'none'), 'attention': m.get('attention', 'auto')}
  held_frozen = frozen or bool(lora_rank(m))  # a LoRA run trains adapters on a frozen base
  fields['param_dtype'] = frozen_param_dtype(m) if held_frozen else m.param_dtype
  if not frozen:
    fields.update(lora_fields(m))
  if held_frozen and m.get('frozen_quantization', ''):
    fields['quantization'] = m.frozen_quantization
  return fields


def frozen_param_dtype(model_config) -> str:
  """The parameter dtype of frozen models: `model.frozen_param_dtype`, or `param_dtype` if ''."""
  return model_config.get('frozen_param_dtype', '') or model_config.param_dtype


# ---- input files: their contents are part of a stage's fingerprint ----------------------------

_HASHED: dict[tuple, str] = {}


def _file_digest(path: Path) -> str:
  """sha256 of a file's bytes (memoized on path, size and mtime); a directory hashes its files."""
  path = Path(path).expanduser()
  if path.is_dir():
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob('*') if p.is_file()):
      h.update(f'{f.relative_to(path)}:{_file_digest(f)}\n'.encode())
    return h.hexdigest()[:16]
  st = path.stat()
  key = (str(path.absolute()), st.st_size, st.st_mtime_ns)
  if key not in _HASHED:
    h = hashlib.sha256()
    with path.open('rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        h.update(block)
    _HASHED[key] = h.hexdigest()[:16]
  return _HASHED[key]


def input_fingerprints(inputs: Mapping[str, Path | Sequence[Path]]) -> dict[str, str]:
  """{what: content hash} of the files a stage reads besides upstream outputs (its
  `inputs(config)`: the constitution, the prompt sources, comparison and helpfulness files; a list
  of paths hashes as one). An edit to any of them changes the stage's fingerprint, so the stage
  and what follows it are redone."""
  out = {}
  for what, paths in inputs.items():
    if isinstance(paths, (list, tuple)):
      out[what] = hashlib.sha256(''.join(_file_digest(f) for f in paths).encode()).hexdigest()[:16]
    else:
      out[what] = _file_digest(paths)
  return out


def optional_upstream(ctx: Context, name: str) -> dict[str, str]:
  """{stage: the fingerprint its DONE.json records} of `name`'s optional upstream stages that
  `ctx.optional` finds usable: a later run of one of them changes `name`'s fingerprint, so
  `name` is redone with it."""
  out = {}
  for u in ctx.table[name].optional:
    d, _ = ctx.optional(u)
    if d is not None:  # finished with this config, so its fingerprint is the one it recorded
      out[u] = ctx.fingerprint(u)
  return out


def reusable(ctx: Context, name: str) -> bool:
  """Whether `name` finished in this workdir with the fingerprint this config gives it."""
  d = ctx.stage_dir(name)
  if not (d / 'DONE.json').exists() or not (d / 'fingerprint.json').exists():
    return False
  return json.loads((d / 'fingerprint.json').read_text())['fingerprint'] == ctx.fingerprint(name)


def _only_inputs_changed(diffs: list[str]) -> bool:
  return all(d.startswith(('inputs.', 'upstream.', 'optional.')) for d in diffs)


def claim(ctx: Context, name: str) -> None:
  """Makes `name`'s dir ours to run in (a finished one with our fingerprint is reused before
  this is called); an unfinished one with our fingerprint is resumed; refuses foreign outputs.

  A stage whose config is unchanged but whose input files (or upstream outputs) changed is redone:
  its old outputs move to the trash. A stage dir holding only a fingerprint (a run that was
  refused before it produced anything) is claimed anew.
  """
  d = ctx.stage_dir(name)
  fields = ctx.stage_config_fingerprint(name)
  fp = ctx.fingerprint(name)
  fp_file = d / 'fingerprint.json'
  if fp_file.exists():
    old = json.loads(fp_file.read_text())
    if old['fingerprint'] == fp:
      return
    diffs = diff_fields(old['fields'], fields)
    if _only_inputs_changed(diffs) or [p.name for p in d.iterdir()] == ['fingerprint.json']:
      logging.warning(
          'stage %s: %s; redoing it (old outputs in %s)',
          name,
          '; '.join(diffs[:8]) or 'nothing produced yet',
          ctx.workdir / TRASH,
      )
      if jax.process_index() == 0:
        move_to_trash(ctx.workdir, name)
      barrier(f'trash-{name}')
    else:
      raise StageError(
          f"{d} was made by a different config ({'; '.join(diffs[:8])}); "
          f'use another --workdir or --config.force={name}'
      )
  if d.exists() and any(d.iterdir()):
    raise StageError(f'{d} exists without a fingerprint; move it away or use --config.force={name}')
  if jax.process_index() == 0:
    d.mkdir(parents=True, exist_ok=True)
    _atomic_write(fp_file, json.dumps({'fingerprint': fp, 'fields': fields}, indent=1, default=str))


def mark_done(ctx: Context, name: str, seconds: float, summary: dict) -> None:
  """Writes `name`'s DONE.json: its fingerprint, wall time and summary (process 0)."""
  if jax.process_index() == 0:
    _atomic_write(
        ctx.stage_dir(name) / 'DONE.json',
        json.dumps(
            {'fingerprint': ctx.fingerprint(name), 'seconds': seconds, 'summary': summary},
            indent=1,
            default=str,
        ),
    )


def _atomic_write(path: Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + f'.tmp{os.getpid()}')
  tmp.write_text(text)
  os.replace(tmp, path)


# ---- one run per workdir -------------------------------------------------------------------------

LOCK_FILE = 'LOCK'


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by someone else
    return True
  return True


@contextlib.contextmanager
def workdir_lock(workdir: Path):
  """Holds WORKDIR/LOCK (pid, host, start time) while a run uses the workdir.

  A second run refuses with the holder's pid and host. A lock whose process is gone (kill -9, a
  crash) on this host is stale and taken over. Multi-host runs lock on process 0 only.
  """
  if jax.process_index() != 0:
    yield
    return
  path = Path(workdir) / LOCK_FILE
  me = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'started': time.strftime('%Y-%m-%d %H:%M:%S'),
  }
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        holder = json.loads(path.read_text())
      except (OSError, ValueError):  # being written, or torn by a crash
        time.sleep(0.2)
        holder = None
      if holder is None or (holder.get('host') == me['host'] and not _pid_alive(holder['pid'])):
        logging.warning('taking over the stale lock %s (%s)', path, holder or 'unreadable')
        path.unlink(missing_ok=True)
        continue
      raise StageError(
          f"{workdir} is in use by pid {holder['pid']} on {holder['host']} (since "
          f"{holder.get('started')}; {path}): wait for that run to end, or delete "
          'the lock file if that process is gone'
      ) from None
    with os.fdopen(fd, 'w') as f:
      f.write(json.dumps(me))
    break
  else:
    raise StageError(f'could not take the lock {path}; another run keeps replacing it')
  try:
    yield
  finally:
    try:
      if json.loads(path.read_text()).get('pid') == me['pid']:
        path.unlink()
    except (OSError, ValueError):
      pass


# ---- the trash: what `force` and changed inputs replace, kept until the redo has finished -------

TRASH = '.trash'


def move_to_trash(workdir: Path, name: str) -> Path | None:
  src = workdir / name
  if not src.exists():
    return None
  dst = workdir / TRASH / f'{name}-{time.strftime("%Y%m%d-%H%M%S")}-{os.getpid()}'
  dst.parent.mkdir(parents=True, exist_ok=True)
  os.replace(src, dst)
  return dst


def barrier(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(tag)
