"""Supervised fine-tuning of the helpful model on the final revisions (SL-CAI, paper section 3).

Read by `cai_jax.sft.run`. The paper fine-tunes for one epoch on revisions mixed with helpful
samples; the small variants take a fixed number of steps instead.
"""

import ml_collections

from configs.stages import optimizer

# Per variant: (sequences per step, epochs, num_steps, learning rate, warmup, eval/checkpoint interval).
_SIZES = {
    'tiny': (8, 1.0, 30, 3e-3, 3, 10),
    'demo': (4, 2.0, -1, 1e-5, 1, 5),
    'full': (128, 1.0, -1, 2e-5, 50, 200),
}


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  batch_size, epochs, num_steps, lr, warmup, every = _SIZES[variant]
  c = ml_collections.ConfigDict()
  # Helpful examples per revision in the mix (a seeded draw, repeated if short); -1 = all of them.
  c.helpful_ratio = -1.0
  c.eval_fraction = 0.2 if variant != 'full' else 0.02  # share held out for the eval loss (per-id coin)
  # Shortest padded length; longer rows pad to powers of two (at most model.max_len).
  c.min_bucket = {'tiny': 32, 'demo': 128, 'full': 128}[variant]

  c.batch_size = batch_size  # sequences per step, over all processes; divisible by data x fsdp
  c.epochs = epochs  # passes over the training examples (fractional allowed) if num_steps is -1
  c.num_steps = num_steps  # total optimizer steps; -1 = epochs decide
  c.eval_every = every  # held-out eval loss every N steps (and at the end); 0 = only at the end
  c.checkpoint_every = every  # orbax checkpoint every N steps (and at the end); reruns resume
  c.max_to_keep = 2  # orbax max_to_keep
  # Positions per chunk of the fused float32 cross-entropy; 0 = whole logits, then the loss.
  # tiny: 0, because on fake multi-device CPU meshes the chunk scan's per-chunk all-reduces
  # deadlocked XLA:CPU (devices reached two all-reduces in different orders).
  c.loss_chunk = {'tiny': 0, 'demo': 64, 'full': 256}[variant]

  c.optimizer = optimizer.adamw(lr, warmup_steps=warmup, schedule='cosine', end_lr_fraction=0.1,
                                weight_decay=0.0 if variant == 'tiny' else 0.01)
  return c
