"""Shared inputs of the subprocess scripts (importing this has no side effects on jax)."""

import numpy as np

STEPS = 3


def batches(batch_size=8, length=32, steps=STEPS, seed=0):
  """Fixed SFT batches of random tokens: a prompt of 5..15 tokens, 5..15 target tokens, padding."""
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(steps):
    tokens = rng.randint(0, 256, (batch_size, length)).astype(np.int32)
    loss_mask = np.zeros_like(tokens)
    for b in range(batch_size):
      p, t = rng.randint(5, 16), rng.randint(5, 16)
      loss_mask[b, p : p + t] = 1
      tokens[b, p + t :] = 256
    out.append({'tokens': tokens, 'loss_mask': loss_mask})
  return out
