"""PPO math for the RL-CAI stage: masked statistics, KL penalties, GAE, clipped losses.

Every function is pure and jittable; `mask` [B, T] (float or bool) marks real response tokens.
"""

from typing import Any

import jax
import jax.numpy as jnp


def _f(mask):
  return jnp.asarray(mask, jnp.float32)


def masked_sum(x, mask, axis=None):
  return jnp.sum(x * _f(mask), axis=axis)


def masked_mean(x, mask, axis=None):
  """Mean of `x` over entries where `mask` is set; 0 where the mask is empty."""
  mask = _f(mask)
  count = jnp.sum(jnp.broadcast_to(mask, jnp.shape(x)), axis=axis)
  # An all-padding row (e.g. an empty response) must give 0, not NaN.
  return masked_sum(x, mask, axis) / jnp.where(count > 0, count, 1.0)


def masked_var(x, mask, axis=None):
  """Population variance of `x` over masked entries."""
  mean = masked_mean(x, mask, axis)
  if axis is not None:
    mean = jnp.expand_dims(mean, axis)
  return masked_mean(jnp.square(x - mean), mask, axis)


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
  """(x - mean) / std over masked entries; padded entries come out as 0.

  Identical values give var 0, so x - mean is 0 and rsqrt(0 + eps) stays finite.
  With shift_mean=False the mean is added back (only the scale changes).
  """
  mean, var = masked_mean(x, mask), masked_var(x, mask)
  whitened = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    whitened = whitened + mean
  return whitened * _f(mask)


def kl_penalty(logp, ref_logp, kind='k1'):
  """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens.

  With r = ref_logp - logp (tokens sampled from the policy):
      'k1'  = -r                 unbiased, but a single sample can be negative;
      'k3'  = exp(r) - 1 - r     unbiased and >= 0 for every sample (Schulman's k3);
      'abs' = |r|;  'mse' = r^2 / 2 (k2, low variance, biased).
  Report KL with 'k3': on a finite batch the k1 mean can come out negative (a few tokens the
  reference prefers outweigh the rest), which reads as a bug and hides real drift (a known
  PPO logging bug); k3 is never negative and has lower variance when the two are close.
  """
  r = ref_logp - logp
  if kind == 'k1':
    return -r
  if kind == 'k3':
    # Clip so a token the policy found ~impossible cannot overflow exp (float32 max ~e^88).
    r = jnp.minimum(r, 20.0)
    return jnp.expm1(r) - r
  if kind == 'abs':
    return jnp.abs(r)
  if kind == 'mse':
    return 0.5 * jnp.square(r)
  raise ValueError(f'unknown KL kind {kind!r}')


def last_token_mask(mask):
  """One-hot [B, T] at the last real token of each row; all-zero rows stay zero."""
  mask = _f(mask)
  t = jnp.arange(mask.shape[-1])
  last = jnp.max(jnp.where(mask > 0, t, -1), axis=-1, keepdims=True)  # -1: empty row
  return (t == last).astype(jnp.float32)


def per_token_rewards(score, logp, ref_logp, mask, kl_coef, kl_kind='k1'):
  """Rewards [B, T]: -kl_coef * KL at each response token, plus the PM score at the last one.

  This is the paper's RL reward r = r_PM - lambda_KL * D_KL(policy || initial policy), with the
  KL spread over tokens so GAE can assign credit per token.
  """
  mask = _f(mask)
  kl = kl_penalty(logp, ref_logp, kl_kind) * mask
  return -kl_coef * kl + score[:, None] * last_token_mask(mask)


def gae(rewards, values, mask, gamma, lam):
  """Generalized advantage estimation as a reverse `lax.scan` over time.

  delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1},
  where V and A past the last real token are 0 (the episode ends there) and padded steps
  (mask 0) get A = returns = 0. Assumes each row's real tokens are contiguous.

  Returns:
      (advantages, returns) [B, T], returns = advantages + values on real tokens.
  """
  mask = _f(mask)
  # float32 throughout so the scan carry keeps one dtype whatever the model emitted.
  rewards = rewards.astype(jnp.float32) * mask
  values = values.astype(jnp.float32) * mask

  def step(carry, xs):
    next_value, next_adv = carry  # already 0 past the end of the episode
    r, v, m = xs
    delta = r + gamma * next_value - v
    adv = (delta + gamma * lam * next_adv) * m
    return (v, adv), adv

  zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
  _, adv = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, mask.T), reverse=True)
  advantages = adv.T
  return advantages, (advantages + values) * mask


def ppo_policy_loss(logp, old_logp, advantages, mask, clip_eps):
  """Clipped PPO surrogate: mean over tokens of max(-A * ratio, -A * clip(ratio, 1 +- eps)).

  Returns:
      (loss, aux) with aux: clipfrac (fraction of tokens where the clipped term won),
      approx_kl (mean of (ratio - 1) - log ratio, the k3 estimate of KL(old || new)), ratio.
  """
  log_ratio = logp - old_logp
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(unclipped, clipped), mask)
  aux = dict(
      clipfrac=masked_mean((clipped > unclipped).astype(jnp.float32), mask),
      approx_kl=masked_mean(jnp.expm1(log_ratio) - log_ratio, mask),
      ratio=masked_mean(ratio, mask),
  )
  return loss, aux


def ppo_value_loss(values, old_values, returns, mask, clip_eps):
  """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_clipped - R)^2).

  V_clipped keeps the new value within clip_eps of the rollout value, as in the policy loss.
  """
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  unclipped_err = jnp.square(values - returns)
  clipped_err = jnp.square(clipped_values - returns)
  loss = 0.5 * masked_mean(jnp.maximum(unclipped_err, clipped_err), mask)
  aux = dict(
      value_clipfrac=masked_mean((clipped_err > unclipped_err).astype(jnp.float32), mask),
  )
  return loss, aux


def entropy_from_logits(logits, mask):
  """Masked mean over tokens of the entropy of softmax(logits [B, T, V])."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  return masked_mean(entropy, mask)


def explained_variance(values, returns, mask):
  """1 - Var[R - V] / Var[R] over masked tokens; 0 when the returns have no variance."""
  var_returns = masked_var(returns, mask)
  var_residual = masked_var(returns - values, mask)
  safe = jnp.where(var_returns > 0, var_returns, 1.0)
  return jnp.where(var_returns > 0, 1.0 - var_residual / safe, 0.0)


# --- KL coefficient controller (Ziegler et al. 2019, "Fine-Tuning LMs from Human Preferences").
# Host-side and tiny: called once per PPO step with the measured KL. State is a dict of plain
# Python numbers so it can go straight into a JSON / orbax checkpoint.


def kl_controller_init(init_coef, target=None, horizon=None, adaptive=False) -> dict[str, Any]:
  if adaptive and (target is None or horizon is None):
    raise ValueError('an adaptive KL controller needs target and horizon')
  return dict(
      coef=float(init_coef),
      target=None if target is None else float(target),
      horizon=None if horizon is None else float(horizon),
      adaptive=bool(adaptive),
  )


def kl_controller_update(state, current_kl, n_steps) -> dict[str, Any]:
  """Returns the new state; `n_steps` is the number of samples (episodes) since the last update.

  error = clip(KL / target - 1, -0.2, 0.2);  coef *= 1 + error * n_steps / horizon.
  The fixed controller returns the state unchanged.
  """
  if not state['adaptive']:
    return dict(state)
  error = min(max(float(current_kl) / state['target'] - 1.0, -0.2), 0.2)
  coef = state['coef'] * (1.0 + error * n_steps / state['horizon'])
  return dict(state, coef=coef)


# --- Reward (PM score) normalization. Running stats merge batches with Chan et al.'s parallel
# variance formula, so normalization does not depend on how rollouts were batched.


def running_stats_init():
  return dict(count=0.0, mean=0.0, var=1.0)


def running_stats_update(stats, scores):
  """Merges the batch `scores` [B] into the population mean/var in `stats`."""
  scores = jnp.asarray(scores, jnp.float32)
  n_b = scores.size
  mean_b, var_b = jnp.mean(scores), jnp.var(scores)
  n = stats['count'] + n_b
  delta = mean_b - stats['mean']
  mean = stats['mean'] + delta * n_b / n
  m2 = stats['var'] * stats['count'] + var_b * n_b + delta**2 * stats['count'] * n_b / n
  return dict(count=n, mean=mean, var=m2 / n)


def normalize_rewards(scores, running_stats, shift_mean=True, update=True, eps=1e-8):
  """Normalizes PM scores by running mean/std (updated with this batch first when `update`).

  Returns:
      (normalized scores [B], new running stats). Values in the stats may be jnp scalars; use
      `{k: float(v) for k, v in stats.items()}` to serialize.
  """
  if update:
    running_stats = running_stats_update(running_stats, scores)
  centered = scores - running_stats['mean'] if shift_mean else scores
  scaled = centered / jnp.sqrt(running_stats['var'] + eps)
  return scaled, running_stats


def clip_rewards(scores, clip):
  """Clips scores to [-clip, clip]; `clip=None` disables clipping."""
  return scores if clip is None else jnp.clip(scores, -clip, clip)
