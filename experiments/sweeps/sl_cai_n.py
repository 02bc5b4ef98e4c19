"""SL-CAI-n (the paper's ablation of how many revisions SL trains on): SFT on the revisions "up to
and including the n-th", n = 0..4 (0: the initial responses, never revised; `--set
sft.revision_round_only=True` trains on round n's alone), each SL-CAI model scored by the
evaluation PM.

critique_revision (4 rounds) runs once and every point takes it from the stage cache; sft and
what follows run per point. Each point evaluates the helpful and SL-CAI models only (no PPO).
The evaluation PM of each point learns that point's feedback (comparisons of its own SL-CAI
model's samples); for one judge shared by every point, train it on human comparisons alone
(--set evaluation_pm.use_ai_labels=False --set evaluation_pm.human_path=...): it then reads no
point's feedback, has one fingerprint and runs once.
"""

BASE = 'tiny'
STAGES = 'critique_revision,sft,feedback,preference,evaluation_pm,harmfulness,evaluate'
OVERRIDES = {
    'critique_revision.n_rounds': 4,
    'evaluate.models': 'helpful,sft',
    'evaluate.revision_curve': False,
}
AXES = {'sft.revision_round': [0, 1, 2, 3, 4]}
_EVAL = 'evaluate/summary.json:'
METRICS = {
    'sft_harmlessness_eval_pm': _EVAL + 'metrics.sft.harmlessness_eval_pm',
    'sft_helpfulness_eval_pm': _EVAL + 'metrics.sft.helpfulness_eval_pm',
    'sft_harmfulness': _EVAL + 'metrics.sft.harmfulness',
    'sft_harmlessness_pm': _EVAL + 'metrics.sft.harmlessness_pm',
    'sft_harmlessness_elo': _EVAL + 'harmlessness.elo.sft',
    'sft_refusal_rate': _EVAL + 'metrics.sft.refusal_rate_redteam',
    'sft_examples': 'sft:examples',
    'sft_eval_loss': 'sft:eval_loss',
}
