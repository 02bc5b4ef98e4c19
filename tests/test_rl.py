"""Golden-number tests for the PPO math in cai_jax/method/rl.py (expected values worked by hand)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.method import rl

X = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
MASK = jnp.array([[1, 1, 0], [1, 0, 0]], jnp.float32)  # real entries: 1, 2, 4


def test_masked_mean_and_var():
  np.testing.assert_allclose(rl.masked_mean(X, MASK), 7 / 3, rtol=1e-6)  # (1 + 2 + 4) / 3
  np.testing.assert_allclose(rl.masked_mean(X, MASK, axis=1), [1.5, 4.0], rtol=1e-6)
  # Deviations from 7/3: -4/3, -1/3, 5/3 -> (16 + 1 + 25) / 9 / 3 = 14/9.
  np.testing.assert_allclose(rl.masked_var(X, MASK), 14 / 9, rtol=1e-6)
  np.testing.assert_allclose(rl.masked_var(X, MASK, axis=1), [0.25, 0.0], atol=1e-6)
  # Bool masks work the same; an all-zero mask gives 0, not NaN.
  np.testing.assert_allclose(rl.masked_mean(X, MASK.astype(bool)), 7 / 3, rtol=1e-6)
  assert float(rl.masked_mean(X, jnp.zeros_like(X))) == 0.0


def test_masked_whiten():
  # (x - 7/3) / sqrt(14/9) = (3x - 7) / sqrt(14); padded entries are zeroed.
  s = math.sqrt(14)
  expected = [[-4 / s, -1 / s, 0.0], [5 / s, 0.0, 0.0]]
  np.testing.assert_allclose(rl.masked_whiten(X, MASK), expected, rtol=1e-5, atol=1e-6)
  # shift_mean=False keeps the mean: -4/s + 7/3 etc.
  np.testing.assert_allclose(
      rl.masked_whiten(X, MASK, shift_mean=False),
      [[-4 / s + 7 / 3, -1 / s + 7 / 3, 0.0], [5 / s + 7 / 3, 0.0, 0.0]],
      rtol=1e-5,
  )


def test_masked_whiten_identical_values_is_finite():
  x = jnp.full((2, 4), 0.1)
  out = rl.masked_whiten(x, jnp.ones((2, 4)))
  assert bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out, 0.0, atol=1e-3)


def test_kl_penalty_golden():
  # logp = -1, ref = -2: r = ref - logp = -1.
  logp, ref = jnp.array([-1.0]), jnp.array([-2.0])
  np.testing.assert_allclose(rl.kl_penalty(logp, ref, 'k1'), [1.0])
  np.testing.assert_allclose(rl.kl_penalty(logp, ref, 'k3'), [math.exp(-1)], rtol=1e-6)
  np.testing.assert_allclose(rl.kl_penalty(logp, ref, 'abs'), [1.0])
  np.testing.assert_allclose(rl.kl_penalty(logp, ref, 'mse'), [0.5])
  # Reversed: r = +1, k1 = -1 (negative), k3 = e - 2.
  np.testing.assert_allclose(rl.kl_penalty(ref, logp, 'k1'), [-1.0])
  np.testing.assert_allclose(rl.kl_penalty(ref, logp, 'k3'), [math.e - 2], rtol=1e-6)
  with pytest.raises(ValueError):
    rl.kl_penalty(logp, ref, 'k7')


def test_kl_estimators_on_samples():
  p = np.array([0.5, 0.3, 0.2])  # policy
  q = np.array([0.2, 0.3, 0.5])  # reference
  true_kl = float(np.sum(p * np.log(p / q)))  # = 0.3 ln(2.5) = 0.274887
  np.testing.assert_allclose(true_kl, 0.3 * math.log(2.5))
  x = jax.random.categorical(jax.random.key(0), jnp.log(p), shape=(200_000,))
  logp, ref = jnp.log(p)[x], jnp.log(q)[x]
  k1, k3 = rl.kl_penalty(logp, ref, 'k1'), rl.kl_penalty(logp, ref, 'k3')
  assert float(jnp.min(k1)) < 0  # samples of token 2 give ln(0.2/0.5) < 0
  assert float(jnp.min(k3)) >= 0
  np.testing.assert_allclose(float(jnp.mean(k3)), true_kl, atol=0.01)
  np.testing.assert_allclose(float(jnp.mean(k1)), true_kl, atol=0.01)


def test_kl_k3_does_not_overflow():
  assert bool(jnp.isfinite(rl.kl_penalty(jnp.array([-500.0]), jnp.array([-0.1]), 'k3'))[0])


def test_per_token_rewards():
  score = jnp.array([2.0, 5.0, 7.0])
  logp = jnp.array([[-1.0, -1.0, -1.0]] * 3)
  ref = jnp.array([[-2.0, -1.5, -9.0]] * 3)  # k1 = logp - ref = 1, 0.5, 8
  mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], jnp.float32)
  rewards = rl.per_token_rewards(score, logp, ref, mask, kl_coef=0.1)
  expected = [
      [-0.1, -0.05 + 2.0, 0.0],  # score at the last real token (t=1), pad gets nothing
      [-0.1, -0.05, -0.8 + 5.0],
      [0.0, 0.0, 0.0],  # empty response: no score anywhere
  ]
  np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(rl.last_token_mask(mask), [[0, 1, 0], [0, 0, 1], [0, 0, 0]])


def test_gae_golden():
  gamma, lam = 0.5, 0.5  # gamma * lam = 0.25
  rewards = jnp.array([[1.0, 0.0, 2.0], [0.0, 3.0, 7.0]])
  values = jnp.array([[0.5, 1.0, 1.0], [1.0, 2.0, 5.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]], jnp.float32)
  # Row 0: t2: d = 2 + 0 - 1 = 1, A = 1
  #        t1: d = 0 + 0.5*1 - 1 = -0.5, A = -0.5 + 0.25*1 = -0.25
  #        t0: d = 1 + 0.5*1 - 0.5 = 1, A = 1 + 0.25*(-0.25) = 0.9375
  # Row 1 (t2 padded, its reward 7 and value 5 are ignored):
  #        t1: d = 3 + 0 - 2 = 1, A = 1
  #        t0: d = 0 + 0.5*2 - 1 = 0, A = 0 + 0.25*1 = 0.25
  adv, ret = rl.gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, [[0.9375, -0.25, 1.0], [0.25, 1.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(ret, [[1.4375, 0.75, 2.0], [1.25, 3.0, 0.0]], rtol=1e-6)
  # Jittable, same numbers.
  adv_jit, _ = jax.jit(rl.gae)(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv_jit, adv)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
  rewards = jnp.array([[1.0, 2.0, 3.0, 0.0]])
  values = jnp.array([[0.5, 0.5, 0.5, 9.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  adv, ret = rl.gae(rewards, values, mask, 1.0, 1.0)
  np.testing.assert_allclose(ret, [[6.0, 5.0, 3.0, 0.0]])
  np.testing.assert_allclose(adv, [[5.5, 4.5, 2.5, 0.0]])


def test_ppo_policy_loss_golden():
  h = math.log(1.5)
  hh = math.log(0.5)
  # Tokens: (ratio, A) = (1.5, 1), (0.5, 1), (1.5, -1), (0.5, -1), then one padded token.
  logp = jnp.array([[h, hh, h, hh, 3.0]])
  old = jnp.zeros((1, 5))
  adv = jnp.array([[1.0, 1.0, -1.0, -1.0, 100.0]])
  mask = jnp.array([[1, 1, 1, 1, 0]])
  loss, aux = rl.ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
  # max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5,
  # max(1.5, 1.2) = 1.5, max(0.5, 0.8) = 0.8 (clipped). Mean = 0.6 / 4.
  np.testing.assert_allclose(loss, 0.15, rtol=1e-5)
  np.testing.assert_allclose(aux['clipfrac'], 0.5)
  # (r - 1) - ln r: 0.5 - ln 1.5 = 0.0945349, -0.5 + ln 2 = 0.1931472; mean of two of each.
  np.testing.assert_allclose(aux['approx_kl'], 0.1438410, rtol=1e-5)
  np.testing.assert_allclose(aux['ratio'], 1.0, rtol=1e-6)


def test_ppo_value_loss_golden():
  values = jnp.array([[1.5, 1.1, -1.0, 50.0]])
  old = jnp.array([[1.0, 1.0, 0.0, 0.0]])
  returns = jnp.array([[2.0, 0.0, 0.0, 0.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  loss, aux = rl.ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
  # Token 0: (1.5-2)^2 = 0.25 vs clipped V=1.2: 0.64 -> 0.64 (clipped one wins).
  # Token 1: V=1.1 within the clip range -> 1.21. Token 2: 1 vs clipped -0.2: 0.04 -> 1.
  # 0.5 * (0.64 + 1.21 + 1) / 3 = 0.475.
  np.testing.assert_allclose(loss, 0.475, rtol=1e-5)
  np.testing.assert_allclose(aux['value_clipfrac'], 1 / 3, rtol=1e-6)


def test_entropy_from_logits_golden():
  logits = jnp.array([[[0.0, 0.0], [math.log(3), 0.0], [100.0, -100.0]]])
  mask = jnp.array([[1, 1, 0]])
  # H(1/2, 1/2) = ln 2 = 0.6931472; H(3/4, 1/4) = 0.75 ln(4/3) + 0.25 ln 4 = 0.5623351.
  np.testing.assert_allclose(
      rl.entropy_from_logits(logits, mask), (0.6931472 + 0.5623351) / 2, rtol=1e-6
  )


def test_explained_variance_golden():
  values = jnp.array([[1.0, 2.0, 3.0, 0.0]])
  returns = jnp.array([[1.0, 2.0, 4.0, 10.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  # Var[R] = 14/9, Var[R - V] = Var[0, 0, 1] = 2/9 -> 1 - 1/7.
  np.testing.assert_allclose(rl.explained_variance(values, returns, mask), 6 / 7, rtol=1e-6)
  assert float(rl.explained_variance(values, jnp.ones_like(values), mask)) == 0.0


def test_kl_controller():
  state = rl.kl_controller_init(0.2, target=6.0, horizon=10000, adaptive=True)
  # KL 9: error = clip(9/6 - 1 = 0.5) = 0.2; coef = 0.2 * (1 + 0.2 * 256 / 10000) = 0.201024.
  np.testing.assert_allclose(rl.kl_controller_update(state, 9.0, 256)['coef'], 0.201024)
  # KL 5.4: error = -0.1; coef = 0.2 * (1 - 0.1 * 256 / 10000) = 0.199488.
  new = rl.kl_controller_update(state, jnp.float32(5.4), 256)
  np.testing.assert_allclose(new['coef'], 0.199488, rtol=1e-6)
  assert all(isinstance(v, (float, bool)) for v in new.values())  # JSON-serializable
  assert state['coef'] == 0.2  # pure: the input state is untouched
  fixed = rl.kl_controller_init(0.2)
  assert rl.kl_controller_update(fixed, 100.0, 256)['coef'] == 0.2
  with pytest.raises(ValueError):
    rl.kl_controller_init(0.2, adaptive=True)


def test_normalize_rewards_running_stats():
  stats = rl.running_stats_init()
  # Batch 1: mean 3, var (4 + 1 + 0 + 9) / 4 = 3.5.
  scaled, stats = rl.normalize_rewards(jnp.array([1.0, 2.0, 3.0, 6.0]), stats)
  std = math.sqrt(3.5)
  np.testing.assert_allclose(scaled, [-2 / std, -1 / std, 0.0, 3 / std], rtol=1e-5, atol=1e-6)
  # Batch 2 merged: all six scores [1, 2, 3, 6, 4, 4] have mean 10/3, var 46/18.
  scaled, stats = rl.normalize_rewards(jnp.array([4.0, 4.0]), stats)
  np.testing.assert_allclose(
      [stats['count'], stats['mean'], stats['var']], [6, 10 / 3, 46 / 18], rtol=1e-5
  )
  np.testing.assert_allclose(scaled, [(2 / 3) / math.sqrt(46 / 18)] * 2, rtol=1e-5)
  # Frozen stats, scale only.
  scaled, same = rl.normalize_rewards(jnp.array([2.0]), stats, shift_mean=False, update=False)
  assert same is stats
  np.testing.assert_allclose(scaled, [2 / math.sqrt(46 / 18)], rtol=1e-5)


def test_clip_rewards():
  np.testing.assert_allclose(rl.clip_rewards(jnp.array([-7.0, 0.5, 9.0]), 5.0), [-5.0, 0.5, 5.0])
  np.testing.assert_allclose(rl.clip_rewards(jnp.array([9.0]), None), [9.0])
