"""Tests for Bradley-Terry Elo fits and bootstrap intervals in cai_jax/method/elo.py."""

import math

import numpy as np
import pytest

from cai_jax.method import elo

ELO_LOG3 = 400 * math.log10(3)  # 190.8485: the Elo gap at which the stronger model wins 3/4


def test_two_models_three_of_four():
  comparisons = [('A', 'B', 1)] * 3 + [('A', 'B', 0)]
  fit = elo.fit_elo(comparisons, ['A', 'B'], anchor='B', prior=0.0)
  assert fit['A'] == pytest.approx(ELO_LOG3, abs=1e-6)
  assert fit['B'] == 0.0
  # The tiny default prior barely moves it; without an anchor the Elo is mean zero.
  fit = elo.fit_elo(comparisons, ['A', 'B'])
  assert fit['A'] - fit['B'] == pytest.approx(ELO_LOG3, abs=0.01)
  assert fit['A'] + fit['B'] == pytest.approx(0.0, abs=1e-9)
  # Same data with the pair written the other way round, and as one soft outcome.
  flipped = elo.fit_elo([('B', 'A', 0)] * 3 + [('B', 'A', 1)], ['A', 'B'], anchor='B')
  assert flipped['A'] == pytest.approx(ELO_LOG3, abs=0.01)
  soft = elo.fit_elo([('A', 'B', 0.75)], ['A', 'B'], anchor='B', prior=0.0)
  assert soft['A'] == pytest.approx(ELO_LOG3, abs=1e-6)


def test_scale_and_base():
  # In natural-log units (scale 1, base e) the gap is ln 3.
  fit = elo.fit_elo([('A', 'B', 0.75)], ['A', 'B'], anchor='B', scale=1.0, base=math.e, prior=0.0)
  assert fit['A'] == pytest.approx(math.log(3), abs=1e-8)


def test_three_models_consistent_win_rates():
  # A beats B 3/4, B beats C 3/4, A beats C 9/10: consistent with gaps of ln 3 each, since
  # sigmoid(2 ln 3) = 9 / (9 + 1).
  comparisons = (
      [('A', 'B', 1)] * 3
      + [('A', 'B', 0)]
      + [('B', 'C', 1)] * 3
      + [('C', 'B', 1)]
      + [('A', 'C', 1)] * 9
      + [('A', 'C', 0)]
  )
  fit = elo.fit_elo(comparisons, ['A', 'B', 'C'], anchor='C')
  assert fit['B'] == pytest.approx(ELO_LOG3, abs=0.05)
  assert fit['A'] == pytest.approx(2 * ELO_LOG3, abs=0.05)
  assert fit['C'] == 0.0


def test_clean_sweep_is_finite_and_unseen_model_at_mean():
  fit = elo.fit_elo([('A', 'B', 1)] * 4, ['A', 'B', 'C'])
  assert all(math.isfinite(v) for v in fit.values())
  assert fit['A'] > 1000 and fit['B'] < -1000
  assert fit['C'] == pytest.approx(0.0, abs=1e-9)


def test_unknown_model_and_bad_outcome_raise():
  with pytest.raises(KeyError):
    elo.fit_elo([('A', 'Z', 1)], ['A', 'B'])
  with pytest.raises(ValueError):
    elo.fit_elo([('A', 'B', 2)], ['A', 'B'])


def test_win_rate_matrix():
  comparisons = [('A', 'B', 1), ('A', 'B', 0.5), ('B', 'A', 1), ('B', 'C', 1)]
  rates = elo.win_rate_matrix(comparisons, ['A', 'B', 'C'])
  # A vs B: A scores 1 + 0.5 + 0 over 3 games.
  assert rates[0, 1] == pytest.approx(0.5)
  assert rates[1, 0] == pytest.approx(0.5)
  assert rates[1, 2] == 1.0 and rates[2, 1] == 0.0
  assert np.isnan(rates[0, 2]) and np.isnan(rates[0, 0])


def test_bootstrap_deterministic_and_contains_point_estimate():
  rng = np.random.default_rng(1)
  # True gaps: A - B = B - C = 100 Elo; 60 games per pair.
  true = {'A': 100.0, 'B': 0.0, 'C': -100.0}
  comparisons = []
  for a, b in [('A', 'B'), ('B', 'C'), ('A', 'C')]:
    p = 1 / (1 + 10 ** ((true[b] - true[a]) / 400))
    comparisons += [(a, b, float(w)) for w in rng.random(60) < p]
  models = ['A', 'B', 'C']
  first = elo.bootstrap_elo(comparisons, models, n_bootstrap=200, seed=3, anchor='B')
  again = elo.bootstrap_elo(comparisons, models, n_bootstrap=200, seed=3, anchor='B')
  other = elo.bootstrap_elo(comparisons, models, n_bootstrap=200, seed=4, anchor='B')
  assert first == again
  assert first != other
  point = elo.fit_elo(comparisons, models, anchor='B')
  for m in ['A', 'C']:
    mean, lo, hi = first[m]
    assert lo < point[m] < hi
    assert lo < mean < hi
    assert hi - lo < 300  # 180 games pin the gaps to within a few tens of Elo
  assert first['B'] == (0.0, 0.0, 0.0)  # the anchor never moves
  assert first['A'][0] > first['C'][0]


# Two prompts, three models: on prompt x the judge prefers A to B and to C at 0.9 and ties B with
# C; on prompt y it ties everything. Resampling the two prompts gives only three data sets, {x, x}
# (1/4), {x, y} (1/2) and {y, y} (1/4), and in each B and C are symmetric, so A's Elo over B is
# the logit of its win rate: 0.9, 0.7 and 0.5.
BY_PROMPT = [('A', 'B', 0.9), ('A', 'C', 0.9), ('B', 'C', 0.5)] + [
    ('A', 'B', 0.5),
    ('A', 'C', 0.5),
    ('B', 'C', 0.5),
]
PROMPTS = ['x'] * 3 + ['y'] * 3
HAND_ELO = (400 * math.log10(9), 400 * math.log10(7 / 3), 0.0)  # {x,x}, {x,y}, {y,y}


def test_cluster_bootstrap_resamples_whole_prompts():
  draws = elo.resample_indices(6, PROMPTS, n_bootstrap=400, seed=0)
  kinds = [tuple(sorted(k.tolist())) for k in draws]
  assert set(kinds) == {(0, 0, 1, 1, 2, 2), (0, 1, 2, 3, 4, 5), (3, 3, 4, 4, 5, 5)}
  share = {k: kinds.count(k) / len(kinds) for k in set(kinds)}
  assert share[(0, 1, 2, 3, 4, 5)] == pytest.approx(0.5, abs=0.08)
  # Every refit is one of the three hand-worked Elo values; their spread is the interval.
  boot = elo.bootstrap(
      BY_PROMPT, 'ABC', n_bootstrap=400, seed=0, ci=0.9, anchor='B', clusters=PROMPTS, prior=0.0
  )
  mean, lo, hi = boot['elo']['A']
  assert (lo, hi) == (pytest.approx(HAND_ELO[2], abs=1e-6), pytest.approx(HAND_ELO[0], abs=1e-6))
  expected_mean = sum(share[k] * e for k, e in zip(sorted(share), HAND_ELO))  # xx, xy, yy
  assert mean == pytest.approx(expected_mean, abs=1e-6)
  # Win rate of A over B: 0.9, 0.7 or 0.5 per resample; B and C always tie.
  assert boot['win_rate'][0, 1].tolist() == pytest.approx([0.5, 0.9])
  assert boot['win_rate'][1, 2].tolist() == pytest.approx([0.5, 0.5])
  assert np.isnan(boot['win_rate'][0, 0]).all()
  # Deterministic under a seed; resampling comparisons as if independent mixes prompts and
  # reaches values the by-prompt bootstrap cannot (e.g. A over B from x, A over C from y).
  again = elo.bootstrap(
      BY_PROMPT, 'ABC', n_bootstrap=400, seed=0, ci=0.9, anchor='B', clusters=PROMPTS, prior=0.0
  )
  assert again['elo'] == boot['elo']
  assert np.array_equal(again['win_rate'], boot['win_rate'], equal_nan=True)
  loose = elo.bootstrap(BY_PROMPT, 'ABC', n_bootstrap=400, seed=0, ci=0.9, anchor='B')
  values = [
      elo.fit_elo([BY_PROMPT[i] for i in k], 'ABC', anchor='B')['A']
      for k in elo.resample_indices(6, None, 50, 0)
  ]
  assert not all(min(abs(v - h) for h in HAND_ELO) < 1e-3 for v in values)
  assert loose['elo']['A'] != boot['elo']['A']
  with pytest.raises(ValueError, match='cluster keys'):
    elo.resample_indices(6, PROMPTS[:5])
