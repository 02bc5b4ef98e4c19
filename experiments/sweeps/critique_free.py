"""Critique-free revision (paper figure 7): revising with a critique first (the paper's method)
against revising at once, the revision request right after the response.

Each point reruns the whole pipeline (the SL data differ). `pm_vs_revisions` is the curve of
the point's PM score over revisions 0..n (figure 7's axes); the SL-CAI and RL-CAI scores under
the evaluation PM and the Elo of the fixed AI judge compare across points.
For one fixed PM over every point's curve, as the paper scores it: `--set
evaluate.revision_curve_pm=<a PM export>` (e.g. another run's WORKDIR/preference/export).
"""

from experiments.sweep import PIPELINE_METRICS

BASE = 'tiny'
AXES = {'critique_revision.critique': [True, False]}
_EVAL = 'evaluate/summary.json:'
METRICS = {
    'pm_vs_revisions': _EVAL + 'revision_curve',
    'sft_harmlessness_eval_pm': _EVAL + 'metrics.sft.harmlessness_eval_pm',
    'ppo_harmlessness_eval_pm': _EVAL + 'metrics.ppo.harmlessness_eval_pm',
    'empty_revisions': 'critique_revision:empty_revisions',
    'tokens_generated': 'critique_revision:tokens_generated',
    'sft_eval_loss': 'sft:eval_loss',
    **PIPELINE_METRICS,
}
