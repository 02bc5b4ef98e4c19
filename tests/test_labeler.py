"""Golden numbers of the feedback labeler's soft labels (`labeler.label_from_logprobs`): the two
options normalized, principles ensembled, both orders debiased, chain-of-thought clamped."""

import math
import types

import pytest

from cai_jax.method.labeler import label_from_logprobs

A, B = ' (A)', ' (B)'
CLAMP = dict(clamp=True, clamp_lo=0.4, clamp_hi=0.6)


def sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def scoring(lp_a, lp_b, order=0, k=0):
  return {'option_logprobs': {A: lp_a, B: lp_b}, 'order': order, 'k': k}


def test_label_normalizes_over_the_two_options():
  assert label_from_logprobs([scoring(-1.0, -2.0)], {}) == pytest.approx(
      0.7310585786300049, abs=1e-12
  )
  # Only the difference matters: tiny absolute probabilities renormalize the same way.
  assert label_from_logprobs([scoring(-1001.0, -1002.0)], {}) == pytest.approx(
      0.7310585786300049, abs=1e-12
  )
  # Order 1 shows response_a as (B): the label is P(B).
  assert label_from_logprobs([scoring(-1.0, -2.0, order=1)], {}) == pytest.approx(
      0.2689414213699951, abs=1e-12
  )


def test_label_ensembles_principles_by_averaging_probabilities():
  p = label_from_logprobs(
      [scoring(-1.0, -2.0, k=0), scoring(-3.0, -3.0, k=1), scoring(-5.0, -1.0, k=2)], {}
  )
  assert p == pytest.approx((0.7310585786300049 + 0.5 + 0.01798620996209156) / 3, abs=1e-12)


def test_label_debiases_over_both_orders():
  # Order 0: q0 = P(A) = sigmoid(1); order 1 (response_b shown as A): q1 = P(A) = sigmoid(-2).
  p = label_from_logprobs([scoring(-1.0, -2.0, order=0), scoring(-3.0, -1.0, order=1)], {})
  assert p == pytest.approx(0.5 * (0.7310585786300049 + 1 - 0.11920292202211755), abs=1e-12)
  assert p == pytest.approx(0.8059278283039437, abs=1e-12)
  # A pure position bias (always +1 nat for (A)) cancels exactly.
  assert label_from_logprobs([scoring(0.0, -1.0, 0), scoring(0.0, -1.0, 1)], {}) == pytest.approx(
      0.5, abs=1e-15
  )


def test_label_debias_then_ensemble_then_clamp():
  recs = [
      scoring(-1.0, -2.0, 0, k=0),
      scoring(-3.0, -1.0, 1, k=0),  # 0.80592782830
      scoring(-2.0, -2.0, 1, k=1),
      scoring(-1.0, -4.0, 0, k=1),
  ]  # 0.5 * (0.95257 + 1 - 0.5)
  k1 = 0.5 * (sigmoid(3.0) + 1 - 0.5)
  assert label_from_logprobs(recs, {}) == pytest.approx((0.8059278283039437 + k1) / 2, abs=1e-12)
  assert label_from_logprobs(recs, CLAMP) == 0.6
  assert label_from_logprobs([scoring(-9.0, -1.0)], CLAMP) == 0.4
  assert label_from_logprobs([scoring(-1.0, -1.1)], CLAMP) == pytest.approx(sigmoid(0.1), abs=1e-12)
  cfg = types.SimpleNamespace(clamp=True, clamp_lo=0.45, clamp_hi=0.55)  # ConfigDict-like
  assert label_from_logprobs([scoring(-1.0, -2.0)], cfg) == 0.55


def test_label_rejects_bad_scorings():
  with pytest.raises(ValueError, match='at least one'):
    label_from_logprobs([], {})
  with pytest.raises(ValueError, match='two scorings'):
    label_from_logprobs([scoring(-1, -2), scoring(-1, -3)], {})
