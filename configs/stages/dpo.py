"""Direct preference optimization of the SL-CAI model on the feedback stage's soft AI labels,
beside PPO (Rafailov et al. 2023; the ablation of paper section 4's RL).

Read by `cai_jax.dpo.run`. The policy and the frozen reference start as the SL-CAI model
(`sft/export`); the loss is the cross-entropy of sigmoid(beta * D) against the soft label p(A),
D the policy-minus-reference log-ratio margin of the two responses. `pairs='revisions'` trains
on Hugging Face's CAI recipe instead (revision chosen over the initial response, label 1).
"""

import ml_collections

from configs.stages import guard, optimizer


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  # The demo's budget is ~30 s on 2 CPU cores: 3 steps of 2 pairs x 96 tokens, no checkpoints.
  batch_size = dict(tiny=4, demo=2, full=32)[variant]
  num_steps = dict(tiny=-1, demo=3, full=-1)[variant]
  lr = dict(tiny=1e-3, demo=1e-5, full=5e-7)[variant]
  warmup = dict(tiny=1, demo=1, full=50)[variant]
  max_len = dict(tiny=256, demo=96, full=1024)[variant]
  c = ml_collections.ConfigDict()
  c.pairs = 'feedback'  # 'feedback' = AI-labeled pairs with soft p(A) | 'revisions' = (revision, initial response), label 1
  c.label_type = (
      'soft'  # loss target: 'soft' = p(A) itself | 'hard' = its argmax (as preference.label_type)
  )
  c.label_smoothing = (
      0.0  # eps in [0, 0.5): target (1 - eps) p + eps (1 - p) (conservative DPO, for hard labels)
  )
  c.beta = 0.1  # DPO beta: implicit reward beta * log(pi / pi_ref); larger keeps the policy nearer SL-CAI
  c.eval_fraction = (
      0.1 if variant == 'full' else 0.2
  )  # share of pairs held out (seeded per-pair coin, as preference)
  c.eval_every = 0  # held-out metrics and KL every N steps; 0 = only at the end
  c.max_len = max_len  # tokens per prompt + response (the prompt sheds old turns first); capped by model.max_len
  c.min_bucket = dict(tiny=32, demo=max_len, full=128)[
      variant
  ]  # shortest padded length; longer pad to powers of two
  c.batch_size = (
      batch_size  # pairs per step (global); a step runs 2 x batch_size sequences in one forward
  )
  c.epochs = (
      3.0 if variant == 'tiny' else 1.0
  )  # passes over the training pairs when num_steps is -1
  c.num_steps = num_steps  # total optimizer steps; -1 = epochs decide
  c.eval_batch_size = max(
      4, batch_size
  )  # pairs per forward when scoring (reference log-probs, held-out pairs)
  c.checkpoint_every = dict(tiny=5, demo=0, full=200)[
      variant
  ]  # orbax checkpoint every N steps and at the end; 0 = none
  c.max_to_keep = 2  # orbax max_to_keep
  c.guard = guard.guard(variant)  # divergence bounds (configs/stages/guard.py)
  c.log_every = 1  # train metrics (metrics.jsonl, TensorBoard) every N steps; eval rows always
  # Positions per chunk of the log-prob pass (logits formed a chunk at a time, recomputed in the
  # backward pass); 0 = whole logits. tiny: 0, as sft.loss_chunk (XLA:CPU fake-mesh deadlock).
  c.loss_chunk = dict(tiny=0, demo=64, full=256)[variant]
  c.kl_prompts = dict(tiny=4, demo=2, full=64)[
      variant
  ]  # held-out prompts the policy samples for eval_kl; 0 = no KL
  c.kl_max_new_tokens = dict(tiny=16, demo=16, full=128)[
      variant
  ]  # longest sampled response for eval_kl
  c.seed_offset = 0  # eval_kl's sampling seed = config.seed + seed_offset
  c.optimizer = optimizer.adamw(
      lr,
      warmup_steps=warmup,
      warmup_fraction=0.1 if variant == 'full' else 1.0,  # full: a short run still peaks
      schedule='cosine',
      end_lr_fraction=0.1,
      weight_decay=0.0,
  )
  return c
