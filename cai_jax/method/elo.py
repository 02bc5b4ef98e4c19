"""Elo from pairwise comparisons: maximum-likelihood Bradley-Terry fit, win-rate matrix, and
bootstrap confidence intervals -- by prompt (cluster bootstrap) when the comparisons carry their
prompt: the model pairs compared on one prompt share its difficulty, so they are resampled
together rather than as if independent."""

import warnings

import numpy as np


def _encode(comparisons, models):
  """Comparisons (model_i, model_j, outcome) -> index arrays i, j and outcome array o."""
  index = {m: k for k, m in enumerate(models)}
  i = np.array([index[a] for a, _, _ in comparisons], np.int64)
  j = np.array([index[b] for _, b, _ in comparisons], np.int64)
  o = np.array([float(w) for _, _, w in comparisons], np.float64)
  if np.any((o < 0) | (o > 1)):
    raise ValueError('outcomes must be probabilities that model_i wins, in [0, 1]')
  return i, j, o


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _fit_strengths(i, j, o, n_models, prior, max_iter=100, tol=1e-10):
  """Maximizes sum o log s(t_i - t_j) + (1 - o) log s(t_j - t_i) - prior/2 |t|^2 (s = sigmoid).

  Damped Newton: the objective is concave and, with prior > 0, strictly so; the L2 prior
  keeps strengths finite when a model wins every comparison.
  """

  def objective(t):
    d = t[i] - t[j]
    return np.sum(o * _log_sigmoid(d) + (1 - o) * _log_sigmoid(-d)) - 0.5 * prior * t @ t

  t = np.zeros(n_models)
  value = objective(t)
  for _ in range(max_iter):
    p = np.exp(_log_sigmoid(t[i] - t[j]))
    residual = o - p
    grad = np.bincount(i, residual, n_models) - np.bincount(j, residual, n_models) - prior * t
    w = p * (1 - p)
    hess = np.diag(np.bincount(i, w, n_models) + np.bincount(j, w, n_models) + prior)
    np.add.at(hess, (i, j), -w)
    np.add.at(hess, (j, i), -w)
    # hess is the negated Hessian. lstsq rather than solve: with prior = 0 it is singular
    # along the shared offset of all strengths, which the likelihood does not see.
    step = np.linalg.lstsq(hess, grad, rcond=None)[0]
    # Halve the step until the objective does not decrease: plain Newton can overshoot on
    # the flat tails of the logistic when one model dominates.
    for _ in range(30):
      new_t = t + step
      new_value = objective(new_t)
      if new_value >= value:
        break
      step = step / 2
    else:
      break  # no ascent left at float precision: converged
    t, value = new_t, new_value
    if np.max(np.abs(step)) < tol:
      break
  return t


def _to_elo(strengths, models, anchor, scale, base):
  elo = strengths * scale / np.log(base)  # natural-log strengths -> Elo units
  elo = elo - (elo[models.index(anchor)] if anchor is not None else np.mean(elo))
  return elo


def fit_elo(comparisons, models, anchor=None, scale=400.0, base=10.0, prior=1e-6):
  """Maximum-likelihood Bradley-Terry Elo, P(i beats j) = 1 / (1 + base^((E_j - E_i) / scale)).

  Args:
    comparisons: iterable of (model_i, model_j, outcome), outcome = P(i wins) or the score of
      i: 1, 0, 0.5 for a tie, or soft.
    models: names of all models; ones without comparisons sit at the prior mean.
    anchor: model pinned to Elo 0; None gives mean-zero Elo.
    prior: L2 precision on the natural-log strengths, tiny so it only matters when the MLE
      is infinite (one model won everything).

  Returns:
    dict model -> Elo.
  """
  models = list(models)
  i, j, o = _encode(comparisons, models)
  elo = _to_elo(_fit_strengths(i, j, o, len(models), prior), models, anchor, scale, base)
  return {m: float(e) for m, e in zip(models, elo)}


def win_rate_matrix(comparisons, models):
  """[M, M] matrix of model i's mean score against model j over comparisons in either order.

  Entries with no comparisons (including the diagonal) are NaN.
  """
  models = list(models)
  i, j, o = _encode(comparisons, models)
  return _pair_rates(i, j, o, len(models))


def resample_indices(n: int, clusters=None, n_bootstrap: int = 1000, seed: int = 0):
  """The comparison indices of each bootstrap resample, a pure function of `seed`.

  Without `clusters`, n comparisons are drawn with replacement. With `clusters` (one key per
  comparison, e.g. its prompt id), as many clusters as there are are drawn with replacement and
  each drawn cluster brings all of its comparisons: the cluster (by-prompt) bootstrap.
  """
  rng = np.random.default_rng(seed)
  if clusters is None:
    return [rng.integers(0, n, n) for _ in range(n_bootstrap)]
  if len(clusters) != n:
    raise ValueError(f'{len(clusters)} cluster keys for {n} comparisons')
  keys = list(dict.fromkeys(clusters))  # first-seen order: deterministic, not hash order
  members = [[] for _ in keys]
  where = {k: c for c, k in enumerate(keys)}
  for idx, k in enumerate(clusters):
    members[where[k]].append(idx)
  members = [np.array(m, np.int64) for m in members]
  return [
      np.concatenate([members[c] for c in rng.integers(0, len(keys), len(keys))])
      for _ in range(n_bootstrap)
  ]


def _pair_rates(i, j, o, n_models):
  wins, games = np.zeros((n_models, n_models)), np.zeros((n_models, n_models))
  np.add.at(wins, (i, j), o)
  np.add.at(wins, (j, i), 1 - o)
  np.add.at(games, (i, j), 1)
  np.add.at(games, (j, i), 1)
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(games > 0, wins / games, np.nan)


def bootstrap(
    comparisons,
    models,
    n_bootstrap=1000,
    seed=0,
    ci=0.95,
    anchor=None,
    clusters=None,
    scale=400.0,
    base=10.0,
    prior=1e-6,
):
  """Elo and win rates with percentile bootstrap intervals, refit on each resample.

  Args:
    clusters: one key per comparison (its prompt id): resample whole prompts
      (`resample_indices`); None resamples comparisons as if independent.

  Returns:
    {'elo': model -> (mean, lo, hi), 'win_rate': [M, M, 2] array of (lo, hi) of the row model's
    win rate against the column model (NaN where a pair was never compared)}; deterministic
    given `seed`.
  """
  models = list(models)
  i, j, o = _encode(comparisons, models)
  if len(o) == 0:
    raise ValueError('bootstrap needs at least one comparison')
  n = len(models)
  samples = np.empty((n_bootstrap, n))
  rates = np.empty((n_bootstrap, n, n))
  for b, k in enumerate(resample_indices(len(o), clusters, n_bootstrap, seed)):
    samples[b] = _to_elo(_fit_strengths(i[k], j[k], o[k], n, prior), models, anchor, scale, base)
    rates[b] = _pair_rates(i[k], j[k], o[k], n)
  tail = 100 * (1 - ci) / 2
  lo, hi = np.percentile(samples, [tail, 100 - tail], axis=0)
  mean = samples.mean(axis=0)
  with warnings.catch_warnings():  # a pair absent from a resample (and the diagonal): NaN
    warnings.simplefilter('ignore', RuntimeWarning)
    rate_lo, rate_hi = np.nanpercentile(rates, [tail, 100 - tail], axis=0)
  return {
      'elo': {m: (float(mean[k]), float(lo[k]), float(hi[k])) for k, m in enumerate(models)},
      'win_rate': np.stack([rate_lo, rate_hi], axis=-1),
  }


def bootstrap_elo(comparisons, models, n_bootstrap=1000, seed=0, ci=0.95, anchor=None, **kwargs):
  """Elo with percentile bootstrap intervals (`bootstrap`'s 'elo'): model -> (mean, lo, hi)."""
  return bootstrap(comparisons, models, n_bootstrap, seed, ci, anchor, **kwargs)['elo']
