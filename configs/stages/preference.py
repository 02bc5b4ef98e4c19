"""Preference-model training on the feedback stage's (A)/(B) soft labels (paper section 4.1).

Read by `cai_jax.preference.run`. The PM (LM trunk + scalar head) starts from the pretrained
model, as in the paper; `init_from='sft'` starts from the SL-CAI model instead. The hard-label
ablation: --config.preference.label_type=hard.

The PM learns two kinds of comparisons, as in the paper (human helpfulness + AI harmlessness):
harmlessness pairs are the feedback stage's labels on red-team prompts; helpfulness pairs are
HH-RLHF's human comparisons when `helpful_mix.path` names a file (the faithful choice), else the
feedback stage's AI labels on helpful prompts under helpfulness principles (a documented
substitute; `feedback.num_helpful_prompts`). A helpfulness file holds one JSON object per line:
HH-RLHF's {'chosen', 'rejected'} full transcripts, or {'prompt' (or 'conversation': turns or a
transcript), 'chosen', 'rejected'} with the last replies as strings. Held-out accuracy and loss
are reported per kind (eval_harmlessness_*, eval_helpfulness_*) and over both (eval_*).
"""

import ml_collections

from configs.stages import guard, optimizer


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  # The demo's budget is ~60 s on 2 CPU cores: 4 steps of 2 pairs x 96 tokens after a ~25 s
  # compilation, and no checkpoints (writing SmolLM2's train state costs ~5 s).
  batch_size = dict(tiny=8, demo=2, full=64)[variant]
  epochs = dict(tiny=3.0, demo=1.0, full=1.0)[variant]
  num_steps = dict(tiny=-1, demo=4, full=-1)[variant]
  lr = dict(tiny=0.001, demo=2e-05, full=1e-05)[variant]
  warmup = dict(tiny=2, demo=1, full=50)[variant]
  max_len = dict(tiny=256, demo=96, full=1024)[variant]
  checkpoint_every = dict(tiny=50, demo=0, full=200)[variant]
  c = ml_collections.ConfigDict()
  c.init_from = ''  # PM start: '' = pretrained (model.pretrained_source, paper) | 'helpful' | 'sft' | any loadable source
  c.label_type = 'soft'  # loss target: 'soft' = p_a itself (paper) | 'hard' = labels.hard_label(p_a) (ablation)
  c.eval_fraction = (
      0.1 if variant == 'full' else 0.2
  )  # share of pairs held out for accuracy and calibration (seeded per-pair coin)
  c.eval_every = 0  # held-out accuracy / ECE every N steps; 0 = only at the end
  c.ece_bins = 10  # equal-width bins of the held-out expected calibration error
  c.max_len = max_len  # tokens per rendered conversation incl. EOS (the start is cut); capped by model.max_len
  c.min_bucket = {'tiny': 32, 'demo': max_len, 'full': 128}[
      variant
  ]  # shortest padded length; longer pad to powers of two (demo: one shape, one compile)

  c.batch_size = (
      batch_size  # pairs per step (global); a step runs the 2 x batch_size sequences in one forward
  )
  c.epochs = epochs  # passes over the training pairs (fractional allowed) when num_steps is -1
  c.num_steps = num_steps  # total optimizer steps; -1 = epochs decide
  c.eval_batch_size = max(
      8, 2 * batch_size
  )  # conversations per forward pass when scoring held-out pairs
  c.checkpoint_every = checkpoint_every  # orbax checkpoint every N steps and at the end (resume starts there); 0 = none
  c.max_to_keep = 2  # orbax max_to_keep
  c.guard = guard.guard(variant)  # divergence bounds (configs/stages/guard.py)
  c.log_every = 1  # train metrics (metrics.jsonl, TensorBoard) every N steps; eval rows always

  c.optimizer = optimizer.adamw(
      lr,
      warmup_steps=warmup,
      warmup_fraction=0.1 if variant == 'full' else 1.0,  # full: a short run still peaks
      schedule='cosine',
      end_lr_fraction=0.1,
      weight_decay=0.0 if variant == 'tiny' else 0.01,
  )

  # Largest share of the PM's pairs that are helpfulness pairs: more are subsampled (seeded)
  # before the held-out split; harmlessness pairs are never dropped. 0 = harmlessness only (the
  # ablation); 1 = every pair. Default: the paper's mix, 135,296 human helpfulness of 318,127
  # comparisons (43%); it caps a large HH-RLHF file and leaves the small AI-labeled set whole.
  c.helpfulness_fraction = 0.43

  c.helpful_mix = ml_collections.ConfigDict()
  # HH-RLHF helpful JSONL(.gz) of human comparisons (format above); '' = the feedback stage's
  # AI-labeled substitute
  c.helpful_mix.path = ''
  c.helpful_mix.weight = 1.0  # loss weight of a helpfulness pair (either source); harmlessness: 1
  c.helpful_mix.max_pairs = -1  # most helpfulness pairs read from the file (its first N); -1 = all
  return c
