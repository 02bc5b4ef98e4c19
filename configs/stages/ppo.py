"""Stage `ppo` (RL-CAI, paper section 4): PPO of the SL-CAI policy against the preference model.

Read by `cai_jax.ppo.run`. Each PPO step samples one rollout batch (red-team + helpful prompts),
scores it with the PM, subtracts beta * KL to the frozen SL-CAI reference per token, and makes
`epochs` x `minibatches` clipped updates of the policy and the value function.
"""

import ml_collections

from configs.stages import guard, optimizer


def _optimizer(lr: float, variant: str) -> ml_collections.ConfigDict:
  return optimizer.adamw(
      lr,
      warmup_steps=0 if variant != 'full' else 20,
      schedule='constant',
      end_lr_fraction=0.0,
      weight_decay=0.0,
  )


def get_config(variant: str = 'demo') -> ml_collections.ConfigDict:
  # The demo takes larger steps than 'full': its 3 steps must move the policy.
  steps = dict(tiny=4, demo=3, full=1000)[variant]
  batch_size = dict(tiny=8, demo=4, full=64)[variant]
  max_new_tokens = dict(tiny=16, demo=24, full=256)[variant]
  epochs = dict(tiny=2, demo=1, full=4)[variant]
  minibatches = dict(tiny=2, demo=1, full=4)[variant]
  policy_lr = dict(tiny=0.0003, demo=2e-05, full=1e-06)[variant]
  value_lr = dict(tiny=0.001, demo=0.0001, full=5e-06)[variant]
  # Longest prompt and shortest padded prompt (tokens). Equal values compile each jitted function
  # once (the tiny model's byte-level prompts; SmolLM2's red-team prompts are 15-51 tokens).
  max_prompt_tokens = dict(tiny=128, demo=48, full=512)[variant]
  min_prompt_bucket = dict(tiny=128, demo=48, full=128)[variant]
  c = ml_collections.ConfigDict()
  c.steps = steps  # PPO steps; each samples one rollout batch and trains on it
  c.batch_size = (
      batch_size  # prompts (= sampled responses) per rollout batch; divisible by data x fsdp
  )
  c.helpful_fraction = 0.5  # share of each rollout batch from the helpful prompts, the rest red-team (the paper trains on both)
  c.policy_source = ''  # initial policy and frozen reference: '' = the sft export (SL-CAI); any loadable source skips the sft stage
  c.max_prompt_tokens = max_prompt_tokens  # longer rendered prompts keep their last tokens (capped by model.max_len - max_new_tokens)
  c.min_prompt_bucket = min_prompt_bucket  # shortest padded prompt length; longer ones pad to sampling.length_bucket sizes
  c.max_new_tokens = max_new_tokens  # response length limit (tokens); every rollout pads to it
  c.temperature = 1.0  # sampling temperature; the trained policy is softmax(logits / temperature)

  c.reward = 'preference'  # 'preference': the PM's score of (prompt, response) | 'synthetic': the toy reward below
  c.pm_batch_size = 16  # conversations per PM forward when scoring rollouts
  c.pm_max_len = (
      512 if variant != 'full' else 1024
  )  # tokens per rendered conversation the PM reads (the end is kept)
  c.synthetic_text = (
      'e'  # synthetic reward: the share of response tokens equal to this text's first token
  )
  c.synthetic_nan_step = (
      -1
  )  # synthetic reward is NaN at this PPO step (1-based; exercises the NaN stop); -1 = never
  c.truncation_penalty = -1.0  # reward change for responses that hit max_new_tokens without a stop
  c.truncation_mode = 'add'  # 'add': score + penalty | 'replace': score = penalty | 'none'
  c.reward_normalize = (
      False  # divide scores by their running std (after subtracting the running mean)
  )
  c.reward_clip = 0.0  # clip (normalized) scores to [-c, c]; 0 = no clipping

  c.kl = ml_collections.ConfigDict()
  c.kl.coef = (
      0.05 if variant != 'full' else 0.001
  )  # beta: weight of the per-token KL penalty (initial value if adaptive)
  c.kl.estimator = (
      'k1'  # per-token KL estimate in the reward: 'k1' (log ratio) | 'k3' | 'abs' | 'mse'
  )
  c.kl.adaptive = False  # adapt beta toward kl.target (Ziegler et al. 2019); False = fixed beta
  c.kl.target = 6.0  # adaptive target: KL(policy || reference) per response, nats (k3 estimate)
  c.kl.horizon = 10000  # adaptive horizon: responses over which beta moves by at most 20%

  c.gamma = 1.0  # GAE discount
  c.lam = 0.95  # GAE lambda
  c.whiten_advantages = True  # normalize advantages to zero mean, unit variance per rollout batch
  c.clip_eps = 0.2  # policy ratio clip range (1 +- clip_eps)
  c.value_clip_eps = 0.2  # value clip range around the rollout's values
  c.value_coef = (
      0.5  # weight of the value loss (with separate trunks it only scales the value gradients)
  )
  c.entropy_coef = 0.0  # entropy bonus weight (0 = none)
  c.epochs = epochs  # passes over each rollout batch
  c.minibatches = minibatches  # optimizer updates per pass; batch_size must divide into them

  c.value = ml_collections.ConfigDict()
  c.value.init = (
      'preference' if variant != 'tiny' else 'policy'
  )  # value net starts from: 'preference' (the PM's trunk and head) | 'policy' (trunk, new head) | a source; unused when shared
  c.value.shared_trunk = (
      variant == 'demo'
  )  # a new value head on the policy's trunk (one network, joint loss) instead of its own net; demo: one 135M net to compile and train on CPU

  c.policy_optimizer = _optimizer(policy_lr, variant)  # AdamW of the policy (and of a shared trunk)
  c.value_optimizer = _optimizer(
      value_lr, variant
  )  # AdamW of the value function (head only when shared)

  c.sample_every = 1 if variant != 'full' else 10  # write rollouts to samples.jsonl every N steps
  c.num_samples = 4  # rollouts (prompt, response, reward) written each time
  c.checkpoint_every = (
      2 if variant != 'full' else 20
  )  # orbax checkpoint every N PPO steps (and at the end)
  c.max_to_keep = 2  # orbax max_to_keep
  c.guard = guard.guard(variant, rl=True)  # divergence bounds (configs/stages/guard.py)
  c.seed_offset = 0  # rollout seed = config.seed + seed_offset (prompt order and sampling)
  return c
