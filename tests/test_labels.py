"""Golden-number tests for the AI-feedback soft-label math in cai_jax/method/labels.py."""

import math

import numpy as np
import pytest

from cai_jax.method import labels


def test_option_probability_normalizes_two_options():
  # log p(A) = ln 0.3, log p(B) = ln 0.1 -> 0.3 / 0.4 = 0.75.
  assert labels.option_probability(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
  assert labels.option_probability(math.log(0.1), math.log(0.3)) == pytest.approx(0.25)
  assert labels.option_probability(-2.0, -2.0) == 0.5


def test_option_probability_is_stable_for_tiny_logprobs():
  # exp(-1e4) underflows to 0, but the difference ln 3 still gives 3/4.
  assert labels.option_probability(-1e4 + math.log(3), -1e4) == pytest.approx(0.75)
  assert labels.option_probability(-1e4, -1e4 + math.log(3)) == pytest.approx(0.25)
  assert labels.option_probability(-1e4, -1.0) == 0.0
  assert labels.option_probability(-1.0, -1e4) == 1.0
  assert labels.option_probability(-math.inf, -math.inf) == 0.5


def test_sum_logprobs_multi_token_option():
  # Option "(A)" tokenized as three tokens with p = 0.5, 0.4, 0.5 -> joint 0.1.
  per_token = [math.log(0.5), math.log(0.4), math.log(0.5)]
  assert labels.sum_logprobs(per_token) == pytest.approx(math.log(0.1))
  assert labels.sum_logprobs(per_token + [-50.0], mask=[1, 1, 1, 0]) == pytest.approx(math.log(0.1))
  # Joint 0.1 vs a single-token option with p 0.3 -> 0.1 / 0.4 = 0.25.
  assert labels.option_probability(labels.sum_logprobs(per_token), math.log(0.3)) == pytest.approx(
      0.25
  )


def test_ensemble_averages_probabilities():
  assert labels.ensemble([0.9, 0.6, 0.3]) == pytest.approx(0.6)
  assert labels.ensemble([0.7]) == pytest.approx(0.7)
  with pytest.raises(ValueError):
    labels.ensemble([])


def test_debias():
  # Order 1: P(A = response1) = 0.8. Order 2: P(A = response2) = 0.4, so P(response1) = 0.6
  # there. Debiased: (0.8 + 0.6) / 2 = 0.7.
  assert labels.debias(0.8, 0.4) == pytest.approx(0.7)
  # A model that always says (A) with 0.9 carries no information -> 0.5.
  assert labels.debias(0.9, 0.9) == pytest.approx(0.5)


def test_clamp():
  assert labels.clamp(0.95) == 0.6
  assert labels.clamp(0.02) == 0.4
  assert labels.clamp(0.55) == 0.55
  assert labels.clamp(0.9, lo=0.2, hi=0.8) == 0.8
  np.testing.assert_allclose(labels.clamp(np.array([0.1, 0.5, 0.7])), [0.4, 0.5, 0.6])


def test_hard_label():
  assert labels.hard_label(0.51) == 1.0
  assert labels.hard_label(0.49) == 0.0
  assert labels.hard_label(0.5) == 0.5


def test_reliability_bins_and_ece_ten_bins():
  probs = [0.1, 0.2, 0.85, 0.95, 0.9]
  outcomes = [0, 1, 1, 1, 0]
  bins = labels.reliability_bins(probs, outcomes, n_bins=10)
  assert len(bins) == 10
  assert bins[1] == pytest.approx((0.1, 0.0, 1))
  assert bins[2] == pytest.approx((0.2, 1.0, 1))
  assert bins[8] == pytest.approx((0.85, 1.0, 1))
  assert bins[9] == pytest.approx((0.925, 0.5, 2))
  assert bins[0][2] == 0 and math.isnan(bins[0][0])
  # (1 * 0.1 + 1 * 0.8 + 1 * 0.15 + 2 * 0.425) / 5 = 1.9 / 5.
  assert labels.expected_calibration_error(probs, outcomes, n_bins=10) == pytest.approx(0.38)


def test_ece_two_bins_and_edges():
  # Bin [0, .5): p .25, outcome 0 -> gap .25. Bin [.5, 1]: mean p .7, frequency 2/3.
  # ECE = (0.25 + 3 * (0.7 - 2/3)) / 4 = 0.35 / 4.
  ece = labels.expected_calibration_error([0.25, 0.75, 0.75, 0.6], [0, 1, 0, 1], n_bins=2)
  assert ece == pytest.approx(0.0875)
  # p = 1 lands in the last bin; a perfectly calibrated set has ECE 0; soft outcomes allowed.
  assert labels.reliability_bins([1.0], [1], n_bins=4)[3] == (1.0, 1.0, 1)
  assert labels.expected_calibration_error([0.5, 0.5], [1, 0]) == 0.0
  assert labels.expected_calibration_error([0.5], [0.5]) == 0.0
  with pytest.raises(ValueError):
    labels.expected_calibration_error([0.5], [1, 0])
