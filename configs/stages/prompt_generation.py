"""Generated prompts (paper sections 3.1 and 4.2; cai_jax/stages/prompt_generation.py): the
pretrained model continues a numbered list of human prompts with new ones, which are filtered
(length, language, exact and near duplicates) and join the train prompts of the stages in `feed`.
Off unless `prompt_generation` is in `config.stages` (the `full` config's first stage).
"""

import ml_collections


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Prompts to request of each kind (before filtering). The paper's ratio of generated to human
  # red-team prompts is 3.3 (140,335 : 42,496) in SL; full asks ~3x our bundled pools.
  c.num_redteam = dict(tiny=8, demo=32, full=5000)[variant]  # red-team prompts to request
  c.num_helpful = dict(tiny=4, demo=16, full=1000)[variant]  # helpful prompts to request
  c.few_shots = dict(tiny=3, demo=8, full=8)[variant]  # human seed prompts shown per request
  c.max_new_tokens = dict(tiny=16, demo=48, full=64)[variant]  # longest generated line (tokens)
  c.temperature = 1.0  # sampling temperature of the writer (the pretrained model)
  c.batch_size = dict(tiny=8, demo=16, full=64)[variant]  # requests per sampler call
  c.chunk_size = dict(tiny=4, demo=16, full=512)[variant]  # requests per resumable unit
  c.seed_offset = 0  # seeds of the draws and the sampler = config.seed + seed_offset
  # Filters, in order (module docstring): a kept prompt has min_words..max_words words, at least
  # min_ascii_letters of its letters in a-z/A-Z, and is neither a normalized copy of a seed or a
  # kept prompt nor near one (Jaccard of character 3-grams >= near_duplicate).
  c.min_words = dict(tiny=1, demo=3, full=3)[variant]
  c.max_words = 60  # longest kept prompt (words); seeds longer than this are not shown either
  c.min_ascii_letters = dict(tiny=0.0, demo=0.9, full=0.9)[variant]
  c.near_duplicate = 0.7
  # Stages whose train prompts include the kept ones (the paper: SL and RL; never evaluate).
  c.feed = ('critique_revision', 'feedback', 'ppo')
  c.show = 10  # kept prompts of each kind shown in the summary
  c.progress = True  # a tqdm progress bar (process 0)
  return c
