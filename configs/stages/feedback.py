"""AI feedback (paper section 4.1): the SL-CAI model samples two responses per red-team prompt and
the feedback model labels them with p(A) from its (A)/(B) option log-probs. See
cai_jax/stages/feedback.py.

Helpfulness pairs: unless `preference.helpful_mix.path` names HH-RLHF's human helpfulness
comparisons (the paper's data), the stage also samples two responses to `num_helpful_prompts`
helpful train prompts and labels them under the constitution's helpfulness principles -- an
AI-labeled substitute for the paper's human labels, reported as such by the preference stage.

The same fields configure `evaluate_feedback`, which measures the labels' accuracy, e.g.
  --config.feedback.num_principles=4 --config.feedback.debias=True
  --config.feedback.cot=True --config.feedback.clamp=True
"""

import ml_collections


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_prompts = dict(tiny=6, demo=8, full=-1)[
      variant
  ]  # red-team train prompts to label (after prompt_offset); -1 = all
  c.prompt_offset = 0  # skip the first N train prompts (e.g. those critique_revision used)
  # Helpful train prompts whose response pairs are labeled under helpfulness principles (kind
  # 'helpfulness'), when preference.helpful_mix.path is ''; -1 = all, 0 = none (harmlessness only)
  c.num_helpful_prompts = dict(tiny=4, demo=4, full=-1)[variant]
  # Share of the prompts (of each kind, seeded per-prompt coin) labeled as split 'evaluation':
  # never trained on by the RL PM (preference), the evaluation PM's data (the Goodhart gauge)
  c.evaluation_fraction = dict(tiny=0.25, demo=0.25, full=0.1)[variant]
  c.model_source = ''  # feedback model: '' = the pretrained model (model.pretrained_source, paper) or any loadable source
  c.max_new_tokens = dict(tiny=16, demo=48, full=256)[
      variant
  ]  # longest response the SL-CAI model samples (tokens)
  c.temperature = 1.0  # response sampling temperature (paper: T = 1)
  c.top_k = 0  # response sampling: keep the k most likely tokens; 0 = no cut
  c.top_p = 1.0  # response sampling: nucleus mass; 1.0 = no cut
  c.batch_size = dict(tiny=4, demo=8, full=64)[
      variant
  ]  # sequences per sampler call (responses and CoT reasoning)
  c.score_batch_size = dict(tiny=8, demo=4, full=64)[
      variant
  ]  # prompts per scoring call (each scores all its options)
  c.num_few_shots = -1  # feedback few-shots shown (plain or CoT ones); -1 = all of the constitution
  c.num_principles = (
      1  # K: principles sampled per pair whose p(A) are averaged (ensemble); paper: 1 per label
  )
  # -1: a principle drawn per label (paper); k >= 0: the constitution's k-th feedback principle for
  # every harmlessness label (the paper's comparison of one fixed principle with drawn ones)
  c.fixed_principle = -1
  c.principle_replace = (
      False  # draw the K principles with replacement (needed when K > #principles)
  )
  c.debias = False  # score both option orders and average (cancels a preference for position (A))
  c.cot = (
      False  # chain of thought: generate reasoning after "Let's think step-by-step:", then score
  )
  c.cot_max_new_tokens = dict(tiny=16, demo=64, full=256)[variant]  # longest CoT reasoning (tokens)
  c.cot_temperature = (
      0.0  # CoT sampling temperature; 0 = greedy (one deterministic chain per principle)
  )
  # Chains of thought sampled per principle and option order, each scored, their labels averaged
  # (the paper's HHH evaluation: 5 chains at temperature 1, written by a helpful model: set
  # feedback.model_source to it); > 1 needs cot_temperature > 0.
  c.cot_samples = 1
  c.clamp = False  # clip the final label to [clamp_lo, clamp_hi] (paper: with CoT, 40-60%)
  c.clamp_lo = 0.4  # lower clamp bound
  c.clamp_hi = 0.6  # upper clamp bound
  c.empty_response = 'score'  # pair with an empty response: 'score' (flagged, labeled as usual) | 'skip' (flagged, no label)
  c.chunk_size = dict(tiny=4, demo=8, full=256)[
      variant
  ]  # pairs per resumable unit (appended to the samples file when finished)
  c.write_tfds = (
      True  # publish the labeled pairs as a TFDS array_record dataset under STAGE_DIR/tfds
  )
  c.progress = True  # show a tqdm progress bar (process 0)
  return c
