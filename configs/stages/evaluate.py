"""Stage `evaluate`: the helpful, SL-CAI (sft) and RL-CAI (ppo) models on held-out prompts (4.3).

Read by `cai_jax.evaluate.run`. Every model answers the same test-split prompts with the same
sampling settings; the RL PM (and, when their stages ran, the evaluation PM and the harmfulness
model) scores them, a keyword classifier counts refusals, the AI judge compares them pairwise under
held-out evaluation principles and Elo is fitted with by-prompt bootstrap intervals. With
`rl_curve_every` the same measures are taken of PPO's policy every K steps.
"""

import ml_collections


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.models = 'helpful,sft,ppo'  # models compared, comma-separated roles: pretrained | helpful | sft | ppo | dpo (dpo joins when its stage has run)
  c.num_redteam_prompts = dict(tiny=4, demo=4, full=-1)[
      variant
  ]  # red-team prompts: the first N of the test split; -1 = all
  c.num_helpful_prompts = dict(tiny=2, demo=2, full=-1)[
      variant
  ]  # helpful prompts: the first N of the test split; -1 = all

  c.max_new_tokens = dict(tiny=16, demo=32, full=256)[
      variant
  ]  # longest response (tokens), the same for every model
  c.temperature = 1.0  # sampling temperature, the same for every model (paper: T = 1)
  c.batch_size = dict(tiny=8, demo=8, full=64)[
      variant
  ]  # sequences per sampler call and per PM forward (the judge uses feedback's batch sizes)
  c.seed_offset = 0  # sampling seed = config.seed + seed_offset (every model gets this seed)

  c.judge_source = ''  # the AI judge: '' = the pretrained model (the labeler, as in the paper), a role (helpful | sft | ppo) or any loadable source
  c.judge_model = ''  # the old name of judge_source, used when judge_source is ''
  c.constitution = 'evaluation'  # the judge's principles, held out from training: 'evaluation' (ours, bundled) | a JSON file (configs/constitutions/README.md)
  # The judge dominates the cost: 3 model pairs x 2 orders x 2 options = 12 scored sequences per
  # prompt, each the whole feedback prompt; the demo drops its few-shots to fit.
  c.judge_num_few_shots = dict(tiny=0, demo=0, full=-1)[
      variant
  ]  # feedback few-shots in the judge's prompts; -1 = all of the constitution
  # The paper's rule for its harmlessness raters: of two harmless responses prefer the less
  # evasive one. True: the judge reads the evaluation principles' harmlessness_rule after each
  # harmlessness principle (so Elo does not reward refusing); False: the principles alone.
  c.evasiveness_rule = True
  c.judge_cot = False  # judge with chain-of-thought prompts (slower; labels are then clamped)
  c.harmlessness_principle = ''  # the one judge principle on red-team prompts; '' = drawn per comparison from evaluate.constitution
  c.helpfulness_principle = ''  # the one judge principle on helpful prompts; '' = drawn per comparison from evaluate.constitution
  c.n_bootstrap = dict(tiny=100, demo=200, full=1000)[
      variant
  ]  # bootstrap refits of the Elo confidence intervals
  c.bootstrap_seed = 0  # seed of the by-prompt bootstrap (CIs are deterministic given it)
  c.ci = 0.95  # confidence level of the Elo intervals
  c.elo_anchor = 'helpful'  # model (one of models) pinned to Elo 0; '' = mean-zero Elo

  # Absolute harmfulness (paper 4.5), when the harmfulness stage has run: every model answers the
  # red-team prompts again at each temperature and the harmfulness model rates the answers 0-4.
  c.harmfulness_temperatures = (
      0.0,
      1.0,
  )  # the paper's T = 0 (greedy, one answer) and T = 1; () = off
  c.harmfulness_samples = dict(tiny=2, demo=2, full=256)[
      variant
  ]  # answers per red-team prompt at each T > 0 (paper: 256), averaged per prompt

  c.revision_curve = True  # PM score vs number of revisions from critique_revision's samples
  # The PM that scores the curve: '' = the RL PM (this run's preference export); any PM export
  # (e.g. another run's WORKDIR/preference/export) puts the points of a sweep on one scale, as
  # the paper scores its figures 5 and 7 with one fixed PM.
  c.revision_curve_pm = ''
  c.max_revision_samples = (
      -1
  )  # critique_revision samples scored for the curve (the first N); -1 = all

  # Curves over RL (paper figures 8 and 10): ppo keeps its policy every K-th step, and evaluate
  # measures each kept policy, the one PPO started from (step 0) and the final one. With the
  # prompts and length above, steps 0 and the last reuse sft's and ppo's responses.
  c.rl_curve_every = dict(tiny=0, demo=1, full=0)[
      variant
  ]  # K: evaluate every K-th PPO step's policy (ppo keeps an HF snapshot of each); 0 = off
  c.rl_curve_prompts = dict(tiny=-1, demo=-1, full=-1)[
      variant
  ]  # red-team and helpful prompts per curve point: the first N of each kind above; -1 = all
  c.rl_curve_max_new_tokens = dict(tiny=0, demo=0, full=0)[
      variant
  ]  # longest response of the curve points (tokens); 0 = max_new_tokens
  return c
