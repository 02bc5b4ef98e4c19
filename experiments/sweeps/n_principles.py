"""Number of principles in the constitution (paper figure 6): SL-CAI's critiques and revisions
draw from the constitution's first N critique/revision principles, N = 1, 2, 4, 8, 16.

Each point reruns the whole pipeline from critique_revision (its samples change). The curve of
PM score over revisions (`pm_vs_revisions`) is scored by the RL PM of each point, unless one
fixed PM is given to all of them, as the paper does: `--set
evaluate.revision_curve_pm=<a PM export, e.g. another run's WORKDIR/preference/export>`. The
points use our default constitution (16 principles); on the tiny model its few-shots outgrow
the 512-token context, so add `--set critique_revision.num_few_shots=0` there.
"""

from experiments.sweep import PIPELINE_METRICS

BASE = 'tiny'
OVERRIDES = {'constitution': 'default'}  # 16 critique/revision principles to take the first N of
AXES = {'critique_revision.num_principles': [1, 2, 4, 8, 16]}
METRICS = {
    'pm_vs_revisions': 'evaluate/summary.json:revision_curve',
    'empty_revisions': 'critique_revision:empty_revisions',
    **PIPELINE_METRICS,
}
