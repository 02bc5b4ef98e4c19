"""The pipeline's stages, one module per step of the paper (Bai et al. 2022, figure 1).

Each module is a short story of its step: `run(ctx, stage_dir)`, `check_config(config)`, and what
it reads: `READS` (upstream stages), `MODELS` (the given models it loads), `OPTIONAL` (stages it
reads when they finished), `inputs(config)` (the files it hashes into its fingerprint). The table
that orders them is `cai_jax/pipeline.py`. A stage never imports another stage: what two stages
share lives in `cai_jax/method/` or `cai_jax/evaluation/`.
"""
