"""The pre-flight check: the whole config, before anything in the workdir is written or deleted.

A value a stage would reject hours into a run (or after `force` has deleted finished work) is
found here first, with every other problem, as one list of one-line errors. Generic range rules
cover the fields that share a meaning across stages (batch sizes, learning rates, fractions);
each stage module's `check_config(config)` adds what only that stage knows.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import os
from pathlib import Path

import jax
import ml_collections

from cai_jax import bookkeeping, pipeline
from cai_jax.method import constitution, conversation
from cai_jax.models import attention, checkpoint, lora, quantize
from cai_jax.models.decoder import DTYPES, ModelConfig, REMAT_POLICIES

_MODEL_KEYWORDS = ('smollm2-135m',)


def _int_at_least(low):
  return (
      lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low,
      f'an integer >= {low}',
  )


def _number(low=-math.inf, high=math.inf, low_open=False, high_open=False):
  def ok(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      return False
    return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

  lo, hi = '(' if low_open else '[', ')' if high_open else ']'
  return ok, f'a finite number in {lo}{low}, {high}{hi}'


def _one_of(*values):
  return (lambda v: v in values), f'one of {", ".join(map(repr, values))}'


# (dotted-field pattern, (predicate, expectation)); the first matching pattern decides.
RULES = (
    ('*.guard.*', _number(0)),  # divergence bounds (train_lib.Guard); 0 = off
    ('*.optimizer.learning_rate', _number(0, low_open=True)),
    ('*_optimizer.learning_rate', _number(0, low_open=True)),
    ('*.warmup_steps', _int_at_least(0)),
    ('*.b1', _number(0, 1, high_open=True)),
    ('*.b2', _number(0, 1, high_open=True)),
    ('*.eps', _number(0, low_open=True)),
    ('*.grad_clip', _number(0)),
    ('*.weight_decay', _number(0)),
    ('*.end_lr_fraction', _number(0, 1)),
    ('*.schedule', _one_of('cosine', 'linear', 'constant')),
    ('*batch_size', _int_at_least(1)),
    ('*.chunk_size', _int_at_least(1)),
    ('evaluate.rl_curve_max_new_tokens', _int_at_least(0)),  # 0 = evaluate.max_new_tokens
    ('*max_new_tokens', _int_at_least(1)),
    ('*.max_to_keep', _int_at_least(1)),
    ('*.checkpoint_every', _int_at_least(0)),
    ('*.eval_every', _int_at_least(0)),
    ('*.log_every', _int_at_least(1)),
    ('*.min_bucket', _int_at_least(1)),
    ('*.min_prompt_bucket', _int_at_least(1)),
    ('*.ece_bins', _int_at_least(1)),
    ('sft.loss_chunk', _int_at_least(0)),
    ('sft.epochs', _number(0, low_open=True)),
    ('preference.epochs', _number(0, low_open=True)),
    ('preference.max_len', _int_at_least(2)),
    ('ppo.pm_max_len', _int_at_least(2)),
    ('*.eval_fraction', _number(0, 1, high_open=True)),
    ('*.helpful_fraction', _number(0, 1)),
    ('data.test_fraction', _number(0, 1, high_open=True)),
    ('*.temperature', _number(0)),
    ('*.cot_temperature', _number(0)),
    ('*.top_p', _number(0, 1, low_open=True)),
    ('*.top_k', _int_at_least(0)),
    ('ppo.kl.coef', _number(0)),
    ('ppo.clip_eps', _number(0, low_open=True)),
    ('ppo.value_clip_eps', _number(0)),
    ('ppo.gamma', _number(0, 1)),
    ('ppo.lam', _number(0, 1)),
    ('ppo.kl.estimator', _one_of('k1', 'k3', 'abs', 'mse')),
    ('evaluate.ci', _number(0, 1, low_open=True, high_open=True)),
    ('evaluate.n_bootstrap', _int_at_least(0)),
    ('model.max_len', _int_at_least(2)),
    ('sampling.prefix_reuse', (lambda v: isinstance(v, bool), 'True or False')),
    ('sampling.prefix_cache_tokens', _int_at_least(0)),
    ('sampling.min_prefix_tokens', _int_at_least(1)),
    ('sampling.prefix_block', _int_at_least(1)),
    ('sampling.engine', (lambda v: isinstance(v, bool), 'True or False')),
    ('sampling.engine_slots', _int_at_least(1)),
    ('sampling.engine_page_size', _int_at_least(1)),
    ('sampling.engine_prefill_chunk', _int_at_least(1)),
    ('sampling.engine_kv_budget_mib', _number(0, low_open=True)),
    ('sampling.engine_kv_dtype', _one_of('', 'bfloat16', 'float32', 'int8')),
)


def _leaves(d: ml_collections.ConfigDict, prefix: str = ''):
  for k, v in d.items():
    if isinstance(v, ml_collections.ConfigDict):
      yield from _leaves(v, f'{prefix}{k}.')
    else:
      yield f'{prefix}{k}', v


def _rule_problems(config, sections) -> list[str]:
  problems = []
  for section in sections:
    if section not in config:
      continue
    node = config[section]
    leaves = (
        _leaves(node, f'{section}.')
        if isinstance(node, ml_collections.ConfigDict)
        else [(section, node)]
    )
    for name, value in leaves:
      for pattern, (ok, expected) in RULES:
        if fnmatch.fnmatchcase(name, pattern):
          if not ok(value):
            problems.append(f'config.{name}={value!r}: expected {expected}')
          break
  return problems


def _source_problem(field: str, source: str, what: str = '') -> str | None:
  """A model source is a keyword, 'random:<preset>', a .gguf file or an HF directory."""
  if not source or source in _MODEL_KEYWORDS or source.startswith('random:'):
    return None
  if not os.path.exists(os.path.expanduser(source)):
    named = (
        f'config.{field} ({what}) {source!r} cannot be loaded'
        if what
        else (f'config.{field}={source!r}')
    )
    return (
        f'{named}: no such file or directory (expected an HF directory, a .gguf file, '
        "'smollm2-135m' or 'random:<preset>')"
    )
  return None


def _role_problems(model_config) -> list[str]:
  """The given models' sources, each error naming the role it is for (once per config field)."""
  by_field = {}
  for role in bookkeeping.GIVEN_ROLES:
    field = bookkeeping.role_field(model_config, role)
    by_field.setdefault(field, []).append(role)
  out = []
  for field, roles in by_field.items():
    what = (
        bookkeeping.MODEL_ROLES[roles[0]]
        if len(roles) == 1
        else 'the pretrained and helpful model: '
        + '; '.join(bookkeeping.MODEL_ROLES[r].split(': ', 1)[1] for r in roles)
    )
    out.append(_source_problem(field, bookkeeping.role_source(model_config, roles[0]), what))
  return [p for p in out if p]


# Fields whose values name model roles (or, for ppo, the preference model): an old name is one
# clear line naming the new one.
_ROLE_FIELDS = (
    'evaluate.models',
    'evaluate.judge_source',
    'evaluate.judge_model',
    'evaluate.elo_anchor',
    'preference.init_from',
    'ppo.reward',
    'ppo.value.init',
)


def _renamed_role_problems(config) -> list[str]:
  out = []
  for field in _ROLE_FIELDS:
    section, *keys = field.split('.')
    if section not in config:
      continue
    value = config[section]
    for k in keys:
      value = value[k]
    old = [v.strip() for v in str(value).split(',') if v.strip() in bookkeeping.RENAMED_ROLES]
    if old:
      renames = ', '.join(f'{o!r} is now {bookkeeping.RENAMED_ROLES[o]!r}' for o in old)
      out.append(
          f'config.{field}={value!r}: {renames} (model roles are named after the stages '
          'that make them)'
      )
  return out


def _path_problems(config, names: list[str]) -> list[str]:
  problems = _role_problems(config.model)
  sources = []
  if 'feedback' in names or 'evaluate_feedback' in names:
    sources.append(('feedback.model_source', config.feedback.model_source))
  if 'ppo' in names:
    sources.append(('ppo.policy_source', config.ppo.policy_source))
    if config.ppo.value.init not in ('preference', 'policy', *bookkeeping.RENAMED_ROLES):
      sources.append(('ppo.value.init', config.ppo.value.init))
  for field in ('judge_source', 'judge_model'):
    if 'evaluate' in names and config.evaluate[field] not in (
        *bookkeeping.MODEL_ROLES,
        *bookkeeping.RENAMED_ROLES,
    ):
      sources.append((f'evaluate.{field}', config.evaluate[field]))
  if 'preference' in names and config.preference.init_from not in (
      *bookkeeping.MODEL_ROLES,
      *bookkeeping.RENAMED_ROLES,
  ):
    sources.append(('preference.init_from', config.preference.init_from))
  problems += [p for p in (_source_problem(f, s) for f, s in sources) if p]
  files = list(_leaves(config.data, 'data.')) if 'data' in config else []
  if 'preference' in names:
    files.append(('preference.helpful_mix.path', config.preference.helpful_mix.path))
  for name, value in files:
    if (name.endswith('.path') or '.paths.' in name) and isinstance(value, str) and value:
      for path in value.split(','):
        if not os.path.exists(os.path.expanduser(path.strip())):
          problems.append(f'config.{name}: no such file or directory {path.strip()!r}')
  return problems


def _workdir_problem(workdir: Path) -> str | None:
  """The workdir, or its nearest existing parent, must be a writable directory."""
  path = Path(workdir).absolute()
  while not path.exists():
    path = path.parent
  if not path.is_dir():
    return f'--workdir {workdir}: {path} is not a directory'
  if not os.access(path, os.W_OK | os.X_OK):
    return f'--workdir {workdir}: {path} is not writable'
  return None


def check_precision(model_config) -> None:
  """Validates the model's dtype and remat fields; warns when trained parameters are bf16.

  A bf16 parameter has 8 bits of mantissa: an AdamW update smaller than 2^-8 of the weight
  rounds away. One step at lr 1e-6 on N(0, 0.02) weights changes ~2% of them, at 2e-5 ~30%:
  a bf16-master run barely trains. Trained models therefore keep float32 master weights and
  compute in `model.dtype`; only frozen models are worth storing in bf16.
  """
  for field in ('dtype', 'param_dtype', 'frozen_param_dtype'):
    value = model_config.get(field, '')
    if (value or field != 'frozen_param_dtype') and value not in DTYPES:
      raise bookkeeping.StageError(
          f'model.{field}={value!r} is not a dtype we run; valid: ' f'{", ".join(DTYPES)}'
      )
  scheme = model_config.get('frozen_quantization', '')
  if scheme not in quantize.SCHEMES:
    raise bookkeeping.StageError(
        f"model.frozen_quantization={scheme!r} is not a scheme we run; valid: '' (off), int8"
    )
  remat = model_config.get('remat', 'none')
  if remat not in REMAT_POLICIES:
    raise bookkeeping.StageError(f'model.remat={remat!r}; valid: {", ".join(REMAT_POLICIES)}')
  if model_config.param_dtype != 'float32' and not bookkeeping.lora_rank(model_config):
    logging.warning(
        "model.param_dtype=%s keeps the TRAINED models' parameters and AdamW moments in %s: "
        'most small updates round away (one step at lr 1e-6 changes ~2%% of N(0, 0.02) weights) '
        'and training barely moves them. Use model.param_dtype=float32 (master weights; compute '
        'stays in model.dtype) and model.frozen_param_dtype=%s for the frozen models.',
        model_config.param_dtype,
        model_config.param_dtype,
        model_config.param_dtype,
    )


def _architecture(model_config, source: str) -> ModelConfig | None:
  """The architecture of the model at `source`: `model.architecture`'s preset when set, else the
  source's config alone (no weights); None when neither says (loading the source then says
  what is wrong with it)."""
  preset = getattr(ModelConfig, model_config.get('architecture', '') or '_', None)
  if callable(preset):
    return preset()
  try:
    return checkpoint.source_config(source) if source else None
  except (checkpoint.CheckpointError, KeyError):
    return None  # an unknown preset or a config.json short of a field


def attention_problem(model_config) -> str | None:
  """`model.attention` this backend cannot run, in one line naming what would; None if it can.
  The soft-cap (which cuDNN lacks) comes from the given models' architectures (only Gemma 2 has
  one, and our GGUF import reads no Gemma 2), so that a Gemma 2 checkpoint is refused before the
  workdir is touched."""
  sources = {bookkeeping.role_source(model_config, r) for r in bookkeeping.GIVEN_ROLES}
  archs = (_architecture(model_config, s) for s in sorted(sources))
  softcap = next(filter(None, (a.attn_softcap for a in archs if a is not None)), None)
  name = model_config.get('attention', 'auto')
  return attention.check(name, jax.default_backend(), softcap)


def lora_problem(model_config) -> str | None:
  """`model.lora` that cannot train the pretrained model's architecture, in one line; None if it
  can (or LoRA is off)."""
  cfg = model_config.get('lora')
  if cfg is None or cfg.rank == 0:
    return None
  if not isinstance(cfg.rank, int) or cfg.rank < 0:
    return f'model.lora.rank={cfg.rank!r}: 0 (off) or a positive rank'
  arch = _architecture(model_config, bookkeeping.role_source(model_config, 'pretrained'))
  family, mlp = (arch.family, arch.mlp) if arch is not None else ('llama', 'gated')
  return lora.check(
      cfg.rank, float(cfg.alpha), tuple(cfg.targets), family, mlp, float(cfg.get('dropout', 0.0))
  )


def problems(config, workdir: Path) -> list[str]:
  """Every problem with running `config.stages` (and `config.force`) in `workdir`; [] if none."""
  out = []
  try:
    names = pipeline.parse_stage_list(config.stages)
    if not names:
      out.append(f'config.stages is empty: name one or more of {", ".join(pipeline.ORDER)}')
    if config.force:
      pipeline.parse_stage_list(config.force, 'config.force')
  except bookkeeping.StageError as e:
    return [str(e)]
  try:
    check_precision(config.model)
  except bookkeeping.StageError as e:
    out.append(str(e))
  for problem in (attention_problem(config.model), lora_problem(config.model)):
    if problem:
      out.append(problem)
  if config.conversation_format not in conversation.FORMATS:
    out.append(
        f'config.conversation_format={config.conversation_format!r}: expected one of '
        f'{", ".join(conversation.FORMATS)}'
    )
  if {'critique_revision', 'feedback', 'evaluate_feedback', 'evaluate'} & set(names):
    try:
      constitution.load_constitution(config.constitution)
    except constitution.ConstitutionError as e:
      out.append(f'config.constitution: {e}')
  out += _rule_problems(config, ['model', 'data', 'sampling', *names])
  out += _renamed_role_problems(config)
  out += _path_problems(config, names)
  problem = _workdir_problem(workdir)
  if problem:
    out.append(problem)
  for name in names:
    check = getattr(pipeline.STAGES[name].module, 'check_config', None)
    if check is None or any(p.startswith(f'config.{name}.') for p in out):
      continue  # the generic rules have named this stage's bad values already
    try:
      check(config)
    except Exception as e:  # noqa: BLE001 -- each stage's own error class; all are reported
      out.append(str(e))
  return out
