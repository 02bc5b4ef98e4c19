"""The optimizer block every trained model's config carries (read by `train_lib.make_optimizer`):
AdamW with linear warmup to a peak learning rate, then a decay schedule."""

import ml_collections


def adamw(
    learning_rate: float,
    *,
    warmup_steps: int,
    schedule: str,
    warmup_fraction: float = 1.0,
    end_lr_fraction: float,
    weight_decay: float,
) -> ml_collections.ConfigDict:
  o = ml_collections.ConfigDict()
  o.learning_rate = learning_rate  # peak learning rate
  o.warmup_steps = warmup_steps  # linear warmup, in optimizer updates, up to the peak
  # The warmup's cap as a share of the run's updates (rounded up): a short run of a config made
  # for long ones still reaches its peak. 1.0 = warmup_steps as given (a warning if that is the
  # whole run).
  o.warmup_fraction = warmup_fraction
  o.schedule = schedule  # after warmup: 'cosine' | 'linear' decay, or 'constant' (the paper's SL)
  o.end_lr_fraction = (
      end_lr_fraction  # learning rate at the last update, as a fraction of the peak (cosine/linear)
  )
  o.weight_decay = weight_decay  # AdamW decoupled weight decay (matrices only)
  o.b1 = 0.9  # Adam beta1
  o.b2 = 0.95  # Adam beta2
  o.eps = 1e-8  # Adam epsilon
  o.grad_clip = 1.0  # clip this model's global gradient norm to this; 0 = no clipping
  return o
