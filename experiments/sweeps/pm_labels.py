"""Soft vs hard preference-model labels: cross-entropy against p(A) itself (paper) or against its
argmax. Shares critique_revision, sft and feedback; reruns preference, ppo and evaluate.
"""

from experiments.sweep import PIPELINE_METRICS

BASE = 'tiny'
AXES = {'preference.label_type': ['soft', 'hard']}
METRICS = {
    'pm_eval_accuracy': 'preference:eval_accuracy',  # all held-out pairs; per kind below
    'pm_eval_harmlessness_accuracy': 'preference:eval_harmlessness_accuracy',
    'pm_eval_helpfulness_accuracy': 'preference:eval_helpfulness_accuracy',
    'pm_eval_ece': 'preference:eval_ece',
    'pm_eval_loss': 'preference:eval_loss',
    **PIPELINE_METRICS,
}
