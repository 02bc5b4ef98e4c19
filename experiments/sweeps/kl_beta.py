"""KL coefficient beta of PPO (the penalty toward the SL-CAI policy). Shares critique_revision,
sft, feedback and preference (run once); reruns ppo and evaluate per point.
"""

from experiments.sweep import PIPELINE_METRICS

BASE = 'tiny'
AXES = {'ppo.kl.coef': [0.0, 0.01, 0.05, 0.2]}
METRICS = dict(PIPELINE_METRICS)
METRICS.update(
    {
        'ppo_final_kl': 'ppo:kl_last',
        'ppo_score_last10': 'ppo:score_mean_last10',
    }
)
