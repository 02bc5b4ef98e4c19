"""The evaluation PM (cai_jax/stages/evaluation_pm.py): a preference model trained on comparisons
the RL PM never saw -- the feedback stage's 'evaluation' split (`feedback.evaluation_fraction`)
and, when given, HH-RLHF human comparisons -- to score the models beside the RL PM (the Goodhart
gauge).

It is trained with the RL PM's recipe: the training fields below are configs/stages/preference.py's
(documented there), so the two PMs differ in their data alone (and the demo's evaluation PM reuses
the PM's compiled train step). Human comparisons, e.g.
  --config.evaluation_pm.human_path=helpful-base/test.jsonl.gz
  --config.evaluation_pm.human_harmless_path=harmless-base/test.jsonl.gz
"""

import ml_collections

from configs.stages import preference


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  c = preference.get_config(variant)  # label_type, eval_fraction, batch_size, optimizer, ...
  for field in ('init_from', 'helpfulness_fraction', 'helpful_mix'):  # the RL PM's data choices
    del c[field]
  c.use_ai_labels = (
      True  # train on the feedback stage's evaluation split (AI labels, unseen prompts)
  )
  c.human_path = ''  # HH-RLHF helpful comparisons JSONL(.gz) ({'chosen', 'rejected'}); '' = none
  c.human_harmless_path = ''  # HH-RLHF harmless-base comparisons JSONL(.gz); '' = none
  c.human_max_pairs = -1  # most comparisons read from each human file (its first N); -1 = all
  return c
