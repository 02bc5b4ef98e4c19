"""The divergence guard every trainer's config carries (read by `train_lib.Guard`): bounds that
stop a run gone off a cliff without a NaN, as the NaN guard does (the step is not saved, the last
good checkpoint stays, nothing is exported). 0 turns a bound off; the defaults never fire on the
shipped configs' healthy runs."""

import ml_collections


def guard(variant: str, *, rl: bool = False) -> ml_collections.ConfigDict:
  g = ml_collections.ConfigDict()
  # Stop when a step's |loss| passes this many times max(1, |the first step's loss|).
  g.loss_jump = 1000.0
  # Stop when the trained parameters' global norm passes this many times max(1, the first step's):
  # a learning rate far too large (1e6) multiplies it by ~1e6 in one update, healthy runs by < 3.
  g.param_norm_jump = 100.0
  if rl:
    # Stop when the policy's KL to the reference (`kl`, nats per response) passes this; a policy
    # ruined by a huge step reads ~ln(vocab) nats per token off its reference.
    g.max_kl = dict(tiny=100.0, demo=150.0, full=1000.0)[variant]
    # Stop when the policy's mean entropy (nats per token) rises this far above the first step's
    # (a policy driven to uniform noise: ln 320 = 5.8 on the tiny byte vocabulary).
    g.entropy_rise = 2.0
  return g
