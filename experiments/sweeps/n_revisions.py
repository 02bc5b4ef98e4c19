"""Number of critique/revision rounds (paper figure 5: PM score vs number of revisions).

Each point reruns the whole pipeline (the SL data changes, so everything after it does too).
`pm_vs_revisions` is the curve of the point's own PM over its revisions 0..n; the Elo metrics
come from the fixed AI judge (the pretrained model) and compare across points.
For one fixed PM over every point's curve, as the paper scores it: `--set
evaluate.revision_curve_pm=<a PM export>` (e.g. another run's WORKDIR/preference/export).
"""

from experiments.sweep import PIPELINE_METRICS

BASE = 'tiny'
AXES = {'critique_revision.n_rounds': [1, 2, 3, 4]}
METRICS = {
    'pm_vs_revisions': 'evaluate/summary.json:revision_curve',
    'empty_revisions': 'critique_revision:empty_revisions',
    'sft_eval_loss': 'sft:eval_loss',
    **PIPELINE_METRICS,
}
