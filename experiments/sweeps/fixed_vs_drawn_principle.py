"""One fixed principle for every AI-feedback label vs one drawn per label (paper section 4.1:
the comparison it reports; `principles_per_label.py` varies how many are averaged instead).
Shares critique_revision and sft; reruns feedback and everything after.
"""

from experiments.sweep import PIPELINE_METRICS

BASE = 'tiny'


def points():
  return [
      {'name': 'drawn', 'feedback.fixed_principle': -1},
      {'name': 'fixed', 'feedback.fixed_principle': 0},
  ]


METRICS = {
    'pm_eval_accuracy': 'preference:eval_accuracy',
    'pm_eval_ece': 'preference:eval_ece',
    'feedback_mean_p_a': 'feedback:mean_p_a',
    **PIPELINE_METRICS,
}
