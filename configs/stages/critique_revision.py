"""Stage `critique_revision` (SL-CAI data, paper section 3): responses, critiques, revisions.

Each red-team prompt gets the helpful model's response, then `n_rounds` rounds of critique and
revision under a freshly sampled principle; helpful prompts get plain responses (the helpful
mix of the SL data). See cai_jax/stages/critique_revision.py.

Every variant shows all critique few-shots, as the paper does: each adds ~300 tokens to every
critique and revision prompt, but they are the same text everywhere, so the sampler prefills them
once per stage and every row reads that one copy (cai_jax/sampling/prefix.py). The demo also
samples cooler than the paper's T = 1, at which the 135M model mostly rambles. Its 6 helpful
prompts get 2 samples each, as in the paper: one sampler call of 6 short responses per sample.
"""

import ml_collections


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_prompts = dict(tiny=6, demo=8, full=-1)[
      variant
  ]  # red-team prompts: the first N of the train split; -1 = all
  c.n_rounds = dict(tiny=2, demo=2, full=4)[
      variant
  ]  # critique/revision rounds per prompt, each a fresh principle (paper: 4)
  # Critique before each revision (paper); False = critique-free revision (paper figure 7): the
  # revision request right after the response, few-shots and earlier rounds without critiques
  c.critique = True
  # Critique/revision principles drawn from: the constitution's first N (paper figure 6 varies
  # the number of principles); -1 = all of them (16 in ours and the paper's)
  c.num_principles = -1
  # Critique few-shots before each prompt; -1 = all there are. The preamble they make is the same
  # in every critique and revision prompt: it is prefilled once per stage (config.sampling).
  c.num_few_shots = -1
  c.max_new_tokens = dict(tiny=16, demo=32, full=256)[
      variant
  ]  # longest response, revision or helpful response (tokens)
  c.critique_max_new_tokens = dict(tiny=16, demo=32, full=192)[variant]  # longest critique (tokens)
  c.temperature = 0.7 if variant == 'demo' else 1.0  # sampling temperature; 0 = greedy
  c.top_k = 0  # sample among the k most likely tokens; 0 = no top-k cut
  c.top_p = 0.9 if variant == 'demo' else 1.0  # nucleus sampling mass; 1.0 = no cut
  c.batch_size = dict(tiny=6, demo=8, full=64)[variant]  # sequences per sampler call
  c.chunk_size = dict(tiny=6, demo=8, full=256)[
      variant
  ]  # prompts per resumable unit (appended to samples.jsonl when done)
  # Helpful prompts per red-team prompt, the first N of the helpful train split (paper: 135,296
  # helpful / 182,831 red-team prompts ~ 0.74); a short split gives what it has, with a warning.
  c.helpful_ratio = 0.5 if variant == 'tiny' else 0.75
  c.helpful_samples_per_prompt = (
      2  # responses sampled per helpful prompt, each its own seed (paper: 2)
  )
  c.write_tfds = True  # also publish the samples as TFDS array_record under STAGE_DIR/tfds
  return c
