"""The absolute harmfulness model (paper section 4.5; cai_jax/stages/harmfulness.py): a scalar-head
model regressed on the 0-4 `rating` of HH-RLHF's red-team attempts. Without `path` the stage
finishes at once as unavailable (its summary says why), e.g.
  --config.harmfulness.path=red_team_attempts.jsonl.gz
"""

import ml_collections

from configs.stages import optimizer


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  max_len = dict(tiny=128, demo=256, full=1024)[variant]
  c = ml_collections.ConfigDict()
  c.path = (
      ''  # HH-RLHF red_team_attempts.jsonl(.gz) (fields 'transcript', 'rating'); '' = unavailable
  )
  c.max_records = dict(tiny=-1, demo=2000, full=-1)[
      variant
  ]  # most rated transcripts read (its first N); -1 = all
  c.eval_fraction = (
      0.1  # share of transcripts held out for MSE and Spearman (seeded per-transcript coin)
  )
  c.eval_every = 0  # held-out metrics every N steps; 0 = only at the end
  c.max_len = max_len  # tokens per transcript incl. EOS (the start is cut); capped by model.max_len
  c.min_bucket = dict(tiny=32, demo=max_len, full=128)[variant]  # shortest padded length
  c.batch_size = dict(tiny=16, demo=4, full=64)[variant]  # transcripts per step (global)
  c.eval_batch_size = dict(tiny=32, demo=8, full=128)[variant]  # transcripts per scoring pass
  c.epochs = 1.0  # passes over the training transcripts when num_steps is -1
  c.num_steps = dict(tiny=-1, demo=50, full=-1)[
      variant
  ]  # total optimizer steps; -1 = epochs decide
  c.checkpoint_every = dict(tiny=0, demo=0, full=200)[
      variant
  ]  # orbax checkpoint every N steps; 0 = none
  c.max_to_keep = 2  # orbax max_to_keep
  c.log_every = 1  # train metrics (metrics.jsonl, TensorBoard) every N steps
  c.optimizer = optimizer.adamw(
      dict(tiny=1e-3, demo=2e-5, full=1e-5)[variant],
      warmup_steps=dict(tiny=5, demo=5, full=50)[variant],
      warmup_fraction=0.1 if variant == 'full' else 1.0,  # full: a short run still peaks
      schedule='cosine',
      end_lr_fraction=0.1,
      weight_decay=0.0 if variant == 'tiny' else 0.01,
  )
  return c
