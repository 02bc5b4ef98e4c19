"""Stage `critique_revision` (SL-CAI data, paper section 3): responses, critiques, revisions.

Each red-team prompt gets the helpful model's response, then `n_rounds` rounds of critique and
revision under a freshly sampled principle; helpful prompts get plain responses (the helpful
mix of the SL data). See cai_jax/sl_cai.py.

The demo (SmolLM2-135M on a 2-core CPU, ~1.5 min for this stage) uses no few-shots: each one
adds ~350 tokens to every critique and revision prompt, and prefill dominates the time. It also
samples cooler than the paper's T = 1, at which the 135M model mostly rambles.
"""

import ml_collections

_VARIANTS = {
    # num_prompts, n_rounds, num_few_shots, max_new_tokens, critique_max_new_tokens, batch, chunk
    'tiny': (6, 2, -1, 16, 16, 6, 6),
    'demo': (8, 2, 0, 32, 32, 8, 8),
    'full': (-1, 4, -1, 256, 192, 64, 256),
}


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  (num_prompts, n_rounds, num_few_shots, max_new_tokens, critique_max_new_tokens, batch_size,
   chunk_size) = _VARIANTS[variant]
  c = ml_collections.ConfigDict()
  c.num_prompts = num_prompts  # red-team prompts: the first N of the train split; -1 = all
  c.n_rounds = n_rounds  # critique/revision rounds per prompt, each a fresh principle (paper: 4)
  c.num_few_shots = num_few_shots  # critique few-shots before each prompt; -1 = all there are
  c.max_new_tokens = max_new_tokens  # longest response, revision or helpful response (tokens)
  c.critique_max_new_tokens = critique_max_new_tokens  # longest critique (tokens)
  c.temperature = 0.7 if variant == 'demo' else 1.0  # sampling temperature; 0 = greedy
  c.top_k = 0  # sample among the k most likely tokens; 0 = no top-k cut
  c.top_p = 0.9 if variant == 'demo' else 1.0  # nucleus sampling mass; 1.0 = no cut
  c.batch_size = batch_size  # sequences per sampler call
  c.chunk_size = chunk_size  # prompts per resumable unit (appended to samples.jsonl when done)
  c.helpful_ratio = 0.5 if variant == 'tiny' else 0.75  # helpful per red-team prompt (paper ~0.74)
  c.write_tfds = True  # also publish the samples as TFDS array_record under STAGE_DIR/tfds
  return c
