"""Accuracy and calibration of the AI-feedback labels (the `feedback` fields) on labeled comparisons.

Default data: the paper's 438 HHH comparisons (../shared/data/anthropic_cai/evals/438HHHEvaluations.jsonl
beside the checkout). See cai_jax/stages/evaluate_feedback.py (`run`).
"""

import ml_collections

APPENDIX = (
    'HarmfulVsEthical',
    'HarmfulnessClassification',
)  # cai_jax.evaluate_feedback.APPENDIX_EVALS


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.comparisons = (
      ''  # JSONL of labeled comparisons; '' = the paper's 438HHHEvaluations.jsonl if present
  )
  c.format = 'hhh_mc'  # 'hhh_mc' (the paper's file: prompt/corrects/incorrects/text_*) | 'generic' ({conversation, chosen, rejected})
  c.hhh_prompt = 'file'  # hhh_mc: 'file' (its own prompt as-is: the paper's zero-shot protocol, Fig. 4) | 'render' (our constitution; needed for CoT/ensembles)
  # The paper's appendix evaluations, scored as-is (zero-shot) beside the comparisons: names of its
  # files beside them ('HarmfulVsEthical', 'HarmfulnessClassification') or paths; () = none
  c.evals = dict(tiny=(), demo=APPENDIX, full=APPENDIX)[variant]
  c.limit = (
      8 if variant == 'tiny' else 0
  )  # evaluate the first N comparisons (and of each eval); 0 = all
  c.on_malformed = (
      'fail'  # a malformed line: 'fail' (error naming the line) | 'skip' (warn, count it)
  )
  c.ece_bins = 10  # equal-width bins of the expected calibration error and the reliability diagram
  c.chunk_size = 4 if variant == 'tiny' else 16  # comparisons per resumable unit of records.jsonl
  return c
