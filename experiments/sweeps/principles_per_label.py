"""Principles per AI-feedback label: one sampled principle vs an ensemble (paper section 4.1
ensembles over 16). Shares critique_revision and sft; reruns feedback and everything after.

The ensemble size is capped by the constitution (`tiny` has 2 principles, `default` 16); the
points draw with replacement so 4 also works on `tiny`.
"""

from experiments.sweep import PIPELINE_METRICS

BASE = 'tiny'


def points():
  return [
      {'name': 'single', 'feedback.num_principles': 1},
      {'name': 'ensemble4', 'feedback.num_principles': 4, 'feedback.principle_replace': True},
  ]


METRICS = {
    'pm_eval_accuracy': 'preference:eval_accuracy',
    'pm_eval_ece': 'preference:eval_ece',
    **PIPELINE_METRICS,
}
