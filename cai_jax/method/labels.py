"""Soft-label math for AI feedback: (A)/(B) option probabilities, ensembling over principles,
position debiasing, clamping, and calibration (ECE, reliability bins). float64 numpy throughout.
"""

import numpy as np


def sum_logprobs(per_token, mask=None) -> float:
  """Log-prob of a multi-token option: the sum of its tokens' log-probs (masked if given)."""
  per_token = np.asarray(per_token, np.float64)
  if mask is not None:
    per_token = np.where(np.asarray(mask, bool), per_token, 0.0)
  return float(np.sum(per_token))


def option_probability(logp_a: float, logp_b: float) -> float:
  """p(A) = softmax([logp_a, logp_b])[0], renormalized over the two options only.

  Computed as sigmoid(logp_a - logp_b) so log-probs like -1e4 do not underflow.
  """
  diff = float(logp_a) - float(logp_b)
  if np.isnan(diff):  # both -inf: the model gave neither option any mass
    return 0.5
  # Both branches take exp of a non-positive number, so neither overflows.
  if diff >= 0:
    return float(1.0 / (1.0 + np.exp(-diff)))
  e = np.exp(diff)
  return float(e / (1.0 + e))


def ensemble(probs) -> float:
  """Mean of p(A) over the K sampled principles (the paper averages probabilities)."""
  probs = np.asarray(probs, np.float64)
  if probs.size == 0:
    raise ValueError('ensemble of zero principles')
  return float(np.mean(probs))


def debias(q1: float, q2: float) -> float:
  """Position-debiased P(response1 is preferred) from scoring both orders.

  Order 1 shows (A = response1, B = response2): q1 = P(choose A) = P(response1).
  Order 2 shows (A = response2, B = response1): q2 = P(choose A) = P(response2).
  Returns 0.5 * (q1 + 1 - q2), which cancels any constant preference for position (A).
  """
  return 0.5 * (float(q1) + 1.0 - float(q2))


def clamp(p, lo=0.4, hi=0.6):
  """Clamps a soft label to [lo, hi]; the paper clamps chain-of-thought labels to 40-60%
  because CoT makes the feedback model overconfident."""
  clamped = np.clip(np.asarray(p, np.float64), lo, hi)
  return float(clamped) if clamped.ndim == 0 else clamped


def hard_label(p: float) -> float:
  """1.0 if p > 0.5, 0.0 if p < 0.5, 0.5 on an exact tie."""
  return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


# Calibration uses the binary "p vs outcome" form (sklearn's calibration_curve): p is the
# predicted probability that response A is preferred and the outcome is 1 if it was (0.5 for
# a tie); bins are equal-width over [0, 1]. Unlike the top-label max(p, 1 - p) form this shows
# both halves of the reliability diagram and accepts soft outcomes.


def reliability_bins(probs, outcomes, n_bins=10):
  """Per-bin (mean predicted probability, observed frequency, count) for a reliability diagram.

  Bin i holds p in [i / n_bins, (i + 1) / n_bins); p = 1 goes in the last bin. Empty bins
  are (nan, nan, 0).
  """
  probs = np.asarray(probs, np.float64)
  outcomes = np.asarray(outcomes, np.float64)
  if probs.shape != outcomes.shape:
    raise ValueError(f'probs {probs.shape} and outcomes {outcomes.shape} differ in shape')
  index = np.minimum(np.floor(probs * n_bins).astype(int), n_bins - 1)
  bins = []
  for i in range(n_bins):
    in_bin = index == i
    count = int(np.sum(in_bin))
    if count:
      bins.append((float(np.mean(probs[in_bin])), float(np.mean(outcomes[in_bin])), count))
    else:
      bins.append((float('nan'), float('nan'), 0))
  return bins


def expected_calibration_error(probs, outcomes, n_bins=10) -> float:
  """ECE = sum over bins of (count / N) * |mean predicted probability - observed frequency|."""
  bins = reliability_bins(probs, outcomes, n_bins)
  total = sum(count for _, _, count in bins)
  if total == 0:
    raise ValueError('expected_calibration_error of zero predictions')
  return float(sum(count * abs(conf - freq) for conf, freq, count in bins if count) / total)
