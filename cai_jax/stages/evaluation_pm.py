"""Stage `evaluation_pm`: the Goodhart gauge, a preference model trained on comparisons the RL PM
never saw.

PPO maximizes the RL PM's reward, so that reward stops measuring harmlessness as training goes on
(Goodhart's law; Bai et al. 2022, section 4.3, watch the RL PM score climb while the models' Elo
under human judges turns over). The paper evaluates with PMs trained on human feedback; here the
evaluation PM is trained, with the RL PM's own recipe (`preference_model.train_pm`), on

* the feedback stage's 'evaluation' split: AI-labeled comparisons on prompts the preference stage
  never trains on (`feedback.evaluation_fraction`), and
* HH-RLHF human comparisons when the user gives them (`evaluation_pm.human_path`: helpful-base
  or -online; `human_harmless_path`: harmless-base) -- the analog of the paper's human-feedback PMs.

Scores from the two PMs side by side (the evaluate stage) show the reward hacking: a policy whose
RL-PM score rises while its evaluation-PM score does not has learned the RL PM, not the task.
The export (`WORKDIR/evaluation_pm/export`, model role 'evaluation_pm') loads like the PM's.
"""

from __future__ import annotations

from pathlib import Path

from cai_jax import bookkeeping
from cai_jax.method import comparisons as comparisons_lib
from cai_jax.method import preference_model as pm_lib
from cai_jax.method import stage_inputs
from cai_jax.method.comparisons import HARMLESSNESS, HELPFULNESS, PreferenceDataError
from cai_jax.utils import records as records_lib

STAGE = 'evaluation_pm'


def human_files(cfg) -> list[tuple[str, str]]:
  """(path, kind) of the HH-RLHF comparison files the config names."""
  return [
      (path, kind)
      for path, kind in ((cfg.human_path, HELPFULNESS), (cfg.human_harmless_path, HARMLESSNESS))
      if path
  ]


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ('feedback',)  # the 'evaluation' split of the AI labels
MODELS = ('pretrained',)  # the PM's initialization


def upstream_unused(config, upstream: str) -> bool:
  """An evaluation PM of human comparisons alone (`use_ai_labels=False`) needs no feedback."""
  return (
      'evaluation_pm' in config
      and upstream == 'feedback'
      and not config.evaluation_pm.use_ai_labels
  )


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution, the prompt sources and the
  HH-RLHF human comparisons it trains on."""
  return stage_inputs.files(config, 'evaluation_pm.human_path', 'evaluation_pm.human_harmless_path')


def check_config(config) -> None:
  """Fails, before the workdir is touched, on an evaluation PM without data or a bad file."""
  cfg = config[STAGE]
  problems = []
  if not cfg.use_ai_labels and not human_files(cfg):
    problems.append('no comparisons: set use_ai_labels=True or human_path / human_harmless_path')
  if cfg.use_ai_labels and config.feedback.get('evaluation_fraction', 0.0) <= 0:
    problems.append(
        'use_ai_labels=True needs feedback.evaluation_fraction > 0 (the prompts the RL PM never '
        f'sees), got {config.feedback.get("evaluation_fraction", 0.0)}'
    )
  if not 0.0 <= cfg.eval_fraction < 1.0:
    problems.append(f'eval_fraction must be in [0, 1), got {cfg.eval_fraction}')
  if cfg.label_type not in comparisons_lib.LABEL_TYPES:
    problems.append(
        f'label_type must be one of {comparisons_lib.LABEL_TYPES}, got {cfg.label_type!r}'
    )
  if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
    problems.append(
        f'batch_size and eval_batch_size must be positive, got {cfg.batch_size}, '
        f'{cfg.eval_batch_size}'
    )
  for path, _ in human_files(cfg):
    if not Path(path).expanduser().is_file():
      problems.append(f'{path} is not a file')
  if problems:
    raise bookkeeping.StageError(f'config.{STAGE}: ' + '; '.join(problems))
  for path, kind in human_files(cfg):  # a malformed line fails here, with its number
    comparisons_lib.helpful_comparisons(path, max_pairs=cfg.human_max_pairs, kind=kind)


def load_comparisons(ctx: bookkeeping.Context) -> tuple[list[comparisons_lib.Comparison], dict]:
  """The evaluation PM's comparisons and their counts by source and kind."""
  cfg = ctx.config[STAGE]
  comparisons, counts, sources = [], {}, []
  if cfg.use_ai_labels:
    path, _, labelled = comparisons_lib.labelled_feedback(ctx, STAGE)
    held = comparisons_lib.in_split(labelled, records_lib.EVALUATION_SPLIT)
    pairs = comparisons_lib.distinct(comparisons_lib.feedback_comparisons(held, str(path)))
    for kind in comparisons_lib.KINDS:
      counts[f'ai_{kind}'] = sum(c.kind == kind for c in pairs)
    comparisons += pairs
    sources.append(
        "AI labels on the feedback stage's evaluation split (prompts the RL PM never saw)"
    )
  for path, kind in human_files(cfg):
    human = comparisons_lib.helpful_comparisons(path, max_pairs=cfg.human_max_pairs, kind=kind)
    counts[f'human_{kind}'] = len(human)
    comparisons += human
    sources.append(f'HH-RLHF human {kind} comparisons from {path}')
  if not comparisons:
    raise PreferenceDataError(
        f"{STAGE}: no comparisons: the feedback stage's evaluation split has no labelled pair "
        'with distinct responses (raise feedback.evaluation_fraction or feedback.num_prompts) '
        f'and no human file is given ({STAGE}.human_path)'
    )
  for kind in comparisons_lib.KINDS:
    counts[f'pairs_{kind}'] = sum(c.kind == kind for c in comparisons)
  counts['sources'] = '; '.join(sources)
  return comparisons, counts


def run(ctx: bookkeeping.Context, stage_dir: Path) -> dict:
  check_config(ctx.config)
  cfg = ctx.config[STAGE]
  pm_lib.check_batch(cfg, STAGE)
  comparisons, counts = load_comparisons(ctx)
  return pm_lib.train_pm(
      ctx, stage_dir, comparisons, counts, cfg, stage=STAGE, source=ctx.model_source('pretrained')
  )
