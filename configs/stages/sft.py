"""Supervised fine-tuning of the pretrained model on the revisions (SL-CAI, paper section 3).

Read by `cai_jax.sft.run`. The paper fine-tunes for one epoch on the revisions of every round mixed
with helpful samples; the small variants take a fixed number of steps instead (the demo's 8 are
what its 2 epochs took when it trained on final revisions only: 'all' doubles its examples at 2
rounds, and a fixed step count keeps its time).
"""

import ml_collections

from configs.stages import guard, optimizer


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  batch_size = dict(tiny=8, demo=4, full=128)[variant]
  epochs = dict(tiny=1.0, demo=2.0, full=1.0)[variant]
  num_steps = dict(tiny=30, demo=8, full=-1)[variant]
  lr = dict(tiny=0.003, demo=1e-05, full=2e-05)[variant]
  warmup = dict(tiny=3, demo=1, full=50)[variant]
  every = dict(tiny=10, demo=5, full=200)[variant]
  c = ml_collections.ConfigDict()
  # Revisions trained on: 'all' = every round's (paper), one example per round; 'final' = the last.
  c.revisions = 'all'
  # SL-CAI-n (paper's ablation): train on the revisions of rounds 1..n, "up to and including the
  # n-th" as the paper (0 = the initial responses, never revised); -1 = `revisions` decides
  c.revision_round = -1
  c.revision_round_only = False  # True: SL-CAI-n trains on round n's revisions alone
  # Targets cut at the sampler's token limit: 'no_eos' = trained without the end-of-turn marker
  # (the model never ended them), 'drop' = left out, 'eos' = trained as if ended (the old way).
  c.truncated = 'no_eos'
  # Helpful examples per revision example (of every round with 'all') in the mix (a seeded draw,
  # repeated if short); -1 = every helpful sample, as critique_revision made them.
  c.helpful_ratio = -1.0
  c.eval_fraction = (
      0.2 if variant != 'full' else 0.02
  )  # share held out for the eval loss (per-id coin)
  # Shortest padded length; longer rows pad to powers of two (at most model.max_len).
  c.min_bucket = {'tiny': 32, 'demo': 128, 'full': 128}[variant]

  c.batch_size = batch_size  # sequences per step, over all processes; divisible by data x fsdp
  c.epochs = epochs  # passes over the training examples (fractional allowed) if num_steps is -1
  c.num_steps = num_steps  # total optimizer steps; -1 = epochs decide
  c.eval_every = every  # held-out eval loss every N steps (and at the end); 0 = only at the end
  c.checkpoint_every = every  # orbax checkpoint every N steps and at the end (resume); 0 = none
  c.max_to_keep = 2  # orbax max_to_keep
  c.guard = guard.guard(variant)  # divergence bounds (configs/stages/guard.py)
  c.log_every = 1  # train metrics (metrics.jsonl, TensorBoard) every N steps; eval rows always
  # Positions per chunk of the fused float32 cross-entropy; 0 = whole logits, then the loss.
  # tiny: 0, because on fake multi-device CPU meshes the chunk scan's per-chunk all-reduces
  # deadlocked XLA:CPU (devices reached two all-reduces in different orders).
  c.loss_chunk = {'tiny': 0, 'demo': 64, 'full': 256}[variant]

  c.optimizer = optimizer.adamw(
      lr,
      warmup_steps=warmup,
      warmup_fraction=0.1 if variant == 'full' else 1.0,  # full: a short run still peaks
      schedule='cosine',
      end_lr_fraction=0.1,
      weight_decay=0.0 if variant == 'tiny' else 0.01,
  )
  return c
