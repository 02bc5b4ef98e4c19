"""Feedback prompt variant: plain multiple choice, chain of thought (CoT), CoT with the labels
clamped to 40-60% (paper section 4.1, figure 8). Shares critique_revision and sft.
"""

from experiments.sweep import PIPELINE_METRICS

BASE = 'tiny'


def points():
  return [
      {'name': 'plain', 'feedback.cot': False, 'feedback.clamp': False},
      {'name': 'cot', 'feedback.cot': True, 'feedback.clamp': False},
      {'name': 'cot_clamp', 'feedback.cot': True, 'feedback.clamp': True},
  ]


METRICS = {
    'pm_eval_accuracy': 'preference:eval_accuracy',
    'pm_eval_ece': 'preference:eval_ece',
    **PIPELINE_METRICS,
}
