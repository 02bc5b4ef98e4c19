"""The optimizer block every trained model's config carries (read by `train_lib.make_optimizer`):
AdamW with linear warmup to a peak learning rate, then a decay schedule."""

import ml_collections


def adamw(
    learning_rate: float,
    *,
    warmup_steps: int,
    schedule: str,
    end_lr_fraction: float,
    weight_decay: float,
) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.learning_rate = learning_rate  # peak learning rate
  o.warmup_steps = warmup_steps  # linear warmup, in optimizer updates, up to the peak
  o.schedule = schedule  # decay after warmup: 'cosine' | 'linear' | 'constant'
  o.end_lr_fraction = (
      end_lr_fraction  # learning rate at the last update, as a fraction of the peak (cosine/linear)
  )
  o.weight_decay = weight_decay  # AdamW decoupled weight decay (matrices only)
  o.b1 = 0.9  # Adam beta1
  o.b2 = 0.95  # Adam beta2
  o.eps = 1e-8  # Adam epsilon
  o.grad_clip = 1.0  # clip this model's global gradient norm to this; 0 = no clipping
  return o
