"""PPO's classic sanity check: a tiny random model learns to emit one chosen token more often.

  python -m cai_jax.main --config configs/ppo_toy.py --workdir /tmp/ppo_toy

Only the `ppo` stage runs: the policy (and the frozen KL reference) is the random tiny model
itself (`ppo.policy_source`, so no sft stage), and the reward is synthetic (the share of the 8
response tokens that are 'e'; no preference model). A random model says 'e' about once in 320
tokens; the mean score (`score_mean` in metrics.jsonl) climbs from ~0.01 to ~0.8 over the 60
steps and levels off there, while the KL to the reference (`kl`, nats per response) levels off
near 30: the KL penalty is what keeps the policy from collapsing onto 'e' completely.
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.stages = 'ppo'  # the PPO stage alone
  c.ppo.policy_source = (
      'random:tiny'  # the random tiny model is the initial policy and the reference
  )
  c.ppo.reward = 'synthetic'  # count of synthetic_text's token in the response / max_new_tokens
  c.ppo.synthetic_text = 'e'  # the token the policy is rewarded for
  c.ppo.truncation_mode = 'none'  # almost every random response runs to max_new_tokens; no penalty
  c.ppo.value.init = 'policy'  # value net: the random trunk and a new head (there is no PM)
  c.ppo.steps = 60  # PPO steps (one rollout batch each)
  c.ppo.batch_size = 16  # prompts per rollout
  c.ppo.max_new_tokens = 8  # response length (and the synthetic reward's denominator)
  c.ppo.max_prompt_tokens = 64  # byte-level prompts keep their last 64 bytes
  c.ppo.min_prompt_bucket = 64  # one padded prompt length: every step reuses one compilation
  c.ppo.kl.coef = 0.02  # beta, small enough that the reward (1/8 per 'e') can move the policy
  c.ppo.epochs = 4  # passes over each rollout batch
  c.ppo.minibatches = 2  # updates per pass
  c.ppo.policy_optimizer.learning_rate = 3e-3  # a tiny model takes a large step
  c.ppo.value_optimizer.learning_rate = 3e-3  # value function learning rate
  c.ppo.sample_every = 10  # samples.jsonl every 10 steps
  c.ppo.checkpoint_every = 10  # orbax checkpoint every 10 steps
  return c
