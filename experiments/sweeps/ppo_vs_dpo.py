"""PPO against the preference model vs DPO on the same soft AI labels, at matched KL to SL-CAI.

Each point trains both from the SL-CAI model: PPO with KL coefficient `ppo.kl.coef`, DPO with
`dpo.beta` (both are the strength of the pull toward the reference: larger = nearer SL-CAI),
and evaluates the four models together (helpful, SL-CAI, RL-CAI, DPO). critique_revision, sft,
feedback and preference are shared by every point; ppo, dpo and evaluate rerun per point.

How points are matched: neither knob sets the KL directly, so the sweep reports both KLs in the
same units -- KL(policy || SL-CAI) per response, the k3 estimate summed over the tokens of
responses the policy sampled at temperature 1 (`ppo_kl`: the last PPO rollout, on training
prompts; `dpo_kl`: held-out prompts after training) -- beside each model's Elo and PM score.
Read the table (or the plots, one curve per method against its own KL) by pairing a PPO row and
a DPO row of (about) equal KL; the points step both knobs together so that the KLs overlap.
Elo is anchored at the helpful model, and the PM is shared, so both compare across points.
"""

from experiments.sweep import PIPELINE_METRICS

BASE = 'tiny'
STAGES = 'critique_revision,sft,feedback,preference,ppo,dpo,evaluate'


def points():
  # (dpo.beta, ppo.kl.coef) from the strongest pull toward SL-CAI (small KL) to the weakest.
  pairs = [(0.5, 0.2), (0.1, 0.05), (0.02, 0.01)]
  return [{'dpo.beta': b, 'ppo.kl.coef': k} for b, k in pairs]


_EVAL = 'evaluate/summary.json:'
METRICS = {
    'ppo_kl': 'ppo:kl_last',
    'dpo_kl': 'dpo:eval_kl',
    'dpo_eval_accuracy': 'dpo:eval_accuracy',  # implicit-reward accuracy on held-out pairs
    'dpo_harmlessness_elo': _EVAL + 'harmlessness.elo.dpo',
    'dpo_helpfulness_elo': _EVAL + 'helpfulness.elo.dpo',
    'dpo_pm_score': _EVAL + 'metrics.dpo.harmlessness_pm',
    'dpo_refusal_rate': _EVAL + 'metrics.dpo.refusal_rate_redteam',
    **PIPELINE_METRICS,
}
