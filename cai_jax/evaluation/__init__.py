"""How the evaluate stage measures the models (Bai et al. 2022, section 4.3, figures 2, 5, 8):
`scores` (PM rewards, harmfulness, refusals, PM score vs revisions), `judge` (the AI judge under
held-out principles, win rates and Elo, what each signal is independent of) and `report` (the
markdown report and its plots). The stage itself, `cai_jax/stages/evaluate.py`, samples the
models' responses and puts these together."""
