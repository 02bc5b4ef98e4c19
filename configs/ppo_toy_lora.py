"""ppo_toy with LoRA: PPO of SmolLM2-135M-Instruct's rank-8 adapters against the synthetic reward.

  python -m cai_jax.main --config configs/ppo_toy_lora.py --workdir /tmp/ppo_toy_lora

Why not the tiny model: LoRA trains no norm and no embedding, and the random tiny model's logits
are the final-normed hidden state (norm sqrt(64)) against embeddings of std 0.02, so no adapter
can lift one token's probability above about 1% (its logits stay within about +-1.3). SmolLM2's
trained embeddings leave room. The reward is the share of the 8 response tokens that are ' the'
(SmolLM2 says it about 3% of the time here). Measured 2026-12-07 on a 2-core CPU shared with
other work (30 steps, 2,086 s): `score_mean` 0.032 over the first 10 steps -> 0.461 over the last
10 (first quarter 0.021 -> last quarter 0.547), KL to the reference finite throughout (at most
27.1 nats per response, 18.4 at the end: the regime of the full fine-tuning toy, ~30); the last
samples read "Get the the the the the the the".
"""

from configs import ppo_toy


def get_config():
  c = ppo_toy.get_config()
  c.ppo.policy_source = 'smollm2-135m'  # the policy and, with its adapters off, the reference
  c.model.lora.rank = 8  # adapters on every projection (model.lora.targets), float32
  c.model.lora.alpha = 16.0  # scale alpha / rank = 2
  c.ppo.synthetic_text = ' the'  # one SmolLM2 token, said ~3% of the time before training
  c.ppo.steps = 30  # PPO steps (one rollout batch of 16 prompts each)
  c.ppo.policy_optimizer.learning_rate = 1e-3  # adapters start at zero: a large step moves them
  return c
