"""Stage `preference`: the preference model (PM) learns the AI-feedback labels; it then scores
conversations as the reward of PPO and of the evaluation.

Each comparison is two conversations that share their context. The PM (LM trunk + scalar head)
reads one scalar at each conversation's last token (an appended EOS) and is trained with the
cross-entropy between sigmoid(r_a - r_b) and the soft label p_a = P(a is better): the feedback
model's normalized (A)/(B) probabilities are the targets (Bai et al. 2022, section 4.1).

The paper's PM learns two kinds of comparisons: AI *harmlessness* labels on red-team prompts
and human *helpfulness* labels (HH-RLHF). A PM of harmlessness alone would reward evasion on the
helpful prompts PPO also optimizes. Here the helpfulness pairs are HH-RLHF's human comparisons
when `preference.helpful_mix.path` names them, else the feedback stage's AI labels under
helpfulness principles -- a substitute, said so in the stage's summary (`helpfulness_source`).
`preference.helpfulness_fraction` caps their share; held-out metrics are reported per kind.
"""

from __future__ import annotations

from pathlib import Path

from cai_jax import bookkeeping
from cai_jax.method import stage_inputs
from cai_jax.method.comparisons import (
    Comparison,
    HARMLESSNESS,
    HELPFULNESS,
    LABEL_TYPES,
    PreferenceDataError,
    cap_helpfulness,
    distinct,
    feedback_comparisons,
    helpful_comparisons,
    in_split,
    labelled_feedback,
)
from cai_jax.method.preference_model import check_batch, train_pm
from cai_jax.utils import records as records_lib

INIT_ROLES = ('pretrained', 'helpful', 'sft')  # model roles preference.init_from may name


# ---- the stage -----------------------------------------------------------------------------------


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ('feedback',)  # the labeled comparisons
MODELS = ('pretrained', 'helpful')  # the PM's initialization (preference.init_from)


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution, the prompt sources and the
  HH-RLHF helpfulness comparisons (`preference.helpful_mix.path`)."""
  return stage_inputs.files(config, 'preference.helpful_mix.path')


def check_config(config) -> None:
  """Fails fast, before any loading, on preference settings that cannot work."""
  cfg = config.preference
  problems = []
  if cfg.label_type not in LABEL_TYPES:
    problems.append(f'label_type must be one of {LABEL_TYPES}, got {cfg.label_type!r}')
  if not 0.0 <= cfg.eval_fraction < 1.0:
    problems.append(f'eval_fraction must be in [0, 1), got {cfg.eval_fraction}')
  if cfg.batch_size < 1 or cfg.eval_batch_size < 1:
    problems.append(
        f'batch_size and eval_batch_size must be positive, got {cfg.batch_size}, {cfg.eval_batch_size}'
    )
  if cfg.helpful_mix.weight < 0:
    problems.append(f'helpful_mix.weight must be >= 0, got {cfg.helpful_mix.weight}')
  if not 0.0 <= cfg.get('helpfulness_fraction', 1.0) <= 1.0:
    problems.append(f'helpfulness_fraction must be in [0, 1], got {cfg.helpfulness_fraction}')
  if problems:
    raise bookkeeping.StageError('preference config: ' + '; '.join(problems))
  if cfg.helpful_mix.path and Path(cfg.helpful_mix.path).expanduser().is_file():
    # Read now, before the workdir is touched: a malformed line fails here with its number.
    helpful_comparisons(cfg.helpful_mix.path, max_pairs=cfg.helpful_mix.max_pairs)


def helpfulness_source(config) -> str:
  """Where the PM's helpfulness pairs come from, in words every report repeats."""
  path = config.preference.helpful_mix.path
  if path:
    return f'helpfulness: HH-RLHF human comparisons from {path}'
  if config.feedback.get('num_helpful_prompts', 0) == 0:
    return 'helpfulness: none (feedback.num_helpful_prompts=0): a harmlessness-only PM'
  return 'helpfulness: AI-labeled substitute (no HH-RLHF path)'


def _init_source(ctx: bookkeeping.Context) -> str:
  """'' = the pretrained model (the paper's choice), a role ('pretrained', 'helpful', 'sft': the
  SFT stage's export), else a source."""
  init = ctx.config.preference.init_from or 'pretrained'
  if init == 'sft':
    ctx.require('sft', 'preference (preference.init_from=sft)')
  return ctx.model_source(init) if init in INIT_ROLES else init


def load_comparisons(ctx: bookkeeping.Context) -> tuple[list[Comparison], dict]:
  """The harmlessness and helpfulness comparisons (capped by helpfulness_fraction), and counts.

  Only the feedback stage's 'train' split: its 'evaluation' split is the evaluation PM's, which
  must judge with comparisons the RL PM never saw.
  """
  cfg = ctx.config.preference
  path, records, labelled = labelled_feedback(ctx, 'preference')
  train = in_split(labelled, records_lib.TRAIN_SPLIT)
  pairs = feedback_comparisons(train, str(path), helpfulness_weight=cfg.helpful_mix.weight)
  pairs_distinct = distinct(pairs)
  harmless = [c for c in pairs_distinct if c.kind == HARMLESSNESS]
  counts = {
      'unlabelled': len(records) - len(labelled),
      'identical': len(pairs) - len(pairs_distinct),
      'evaluation_split_excluded': len(labelled) - len(train),
  }
  if not harmless:  # a helpfulness mix alone would not teach harmlessness: also an error
    raise PreferenceDataError(
        f'no labelled harmlessness pairs to train the preference model on in '
        f'{path}: {len(records)} records, {counts["unlabelled"]} without a '
        f'p_a label, {counts["identical"]} with identical responses, '
        f'{counts["evaluation_split_excluded"]} in the evaluation split'
    )
  if cfg.helpful_mix.path:  # the paper's: human comparisons; AI-labeled ones are not used
    helpful = helpful_comparisons(
        cfg.helpful_mix.path, weight=cfg.helpful_mix.weight, max_pairs=cfg.helpful_mix.max_pairs
    )
  else:
    helpful = [c for c in pairs_distinct if c.kind == HELPFULNESS]
  comparisons = cap_helpfulness(harmless + helpful, cfg.helpfulness_fraction, ctx.config.seed)
  counts.update(
      pairs_harmlessness=len(harmless),
      pairs_helpfulness=sum(c.kind == HELPFULNESS for c in comparisons),
      helpfulness_dropped=len(helpful) - sum(c.kind == HELPFULNESS for c in comparisons),
      helpfulness_source=helpfulness_source(ctx.config),
  )
  return comparisons, counts


def run(ctx: bookkeeping.Context, stage_dir: Path) -> dict:
  check_batch(ctx.config.preference, 'preference')
  check_config(ctx.config)
  comparisons, counts = load_comparisons(ctx)
  return train_pm(
      ctx,
      stage_dir,
      comparisons,
      counts,
      ctx.config.preference,
      stage='preference',
      source=_init_source(ctx),
  )
