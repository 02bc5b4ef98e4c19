"""The absolute harmfulness model (paper section 4.5): regression on red-team ratings (0-4)."""

import json

import numpy as np
import pytest

from cai_jax import pipeline, validate
from cai_jax.method import preference_model as pm_lib
from cai_jax.stages import harmfulness
from cai_jax.utils import sharding
from test_preference import WORDS, numpy_tiny_source

# The synthetic rating is a deterministic function of the assistant's reply: which of these words
# it contains (0 = the harmless one).
MARKERS = ('kind', 'rude', 'mean', 'vile', 'evil')


def red_team_records(n, seed=0):
  """red_team_attempts-style records: `transcript` (Human/Assistant) and `rating` 0-4."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    rating = int(rng.integers(len(MARKERS)))
    reply = f'{rng.choice(WORDS)} {MARKERS[rating]} {rng.choice(WORDS)}'
    transcript = f'\n\nHuman: {" ".join(rng.choice(WORDS, 2))}\n\nAssistant: {reply}'
    out.append({'transcript': transcript, 'rating': rating, 'min_harmlessness_score_transcript': 0})
  return out


def _run(config, workdir):
  with sharding.use_mesh(sharding.make_mesh(config.mesh.shape), config.logical_axis_rules):
    ctx = pipeline.context(config, workdir)
    pipeline.run(ctx)
    summary = json.loads((workdir / 'harmfulness' / 'DONE.json').read_text())['summary']
    return ctx, summary


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  from configs import tiny

  root = tmp_path_factory.mktemp('harmfulness')
  c = tiny.get_config()
  c.model.source = numpy_tiny_source(root / 'tiny')
  c.stages = 'harmfulness'
  path = root / 'red_team_attempts.jsonl'
  path.write_text(json.dumps(red_team_records(320)))  # the released file is one JSON list
  c.harmfulness.path = str(path)
  c.harmfulness.eval_fraction = 0.2
  c.harmfulness.epochs = 4.0
  return c


def test_regressor_learns_a_synthetic_rating(config, tmp_path):
  ctx, summary = _run(config, tmp_path)
  assert summary['available'] and summary['train'] + summary['held_out'] == 320
  assert summary['eval_n'] == summary['held_out'] > 40
  assert summary['eval_spearman'] > 0.8, summary
  assert summary['eval_mse'] < 1.0, summary  # the ratings' variance is 2
  with sharding.use_mesh(sharding.make_mesh(config.mesh.shape), config.logical_axis_rules):
    model = ctx.load_role('harmfulness', scalar_head=True, frozen=True)
    pred = pm_lib.score_conversations(
        model, [('sun sky', f'cat {m} dog') for m in MARKERS], fmt=config.conversation_format
    )
  assert harmfulness.spearman(pred, range(len(MARKERS))) > 0.8, pred


def test_without_the_file_the_stage_says_why(config, tmp_path):
  c = config.copy_and_resolve_references()
  c.harmfulness.path = ''
  _, summary = _run(c, tmp_path)
  assert summary == {'available': False, 'why': harmfulness.NO_FILE}
  assert not (tmp_path / 'harmfulness' / 'export').exists()


def test_bad_ratings_are_one_line_naming_the_record(config, tmp_path):
  path = tmp_path / 'bad.jsonl'
  records = red_team_records(3)
  records[1]['rating'] = 7
  path.write_text(''.join(json.dumps(r) + '\n' for r in records))
  with pytest.raises(harmfulness.RatingsError, match=r'bad.jsonl: record 1 has rating 7'):
    harmfulness.read_ratings(str(path))
  c = config.copy_and_resolve_references()
  c.harmfulness.path = str(tmp_path / 'missing.jsonl')
  assert validate.problems(c, tmp_path / 'w') == [
      f"config.harmfulness: path '{tmp_path / 'missing.jsonl'}' is not a file"
  ]


def test_spearman_golden():
  assert harmfulness.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert harmfulness.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  # Ties take their average rank: x ranks (0, 1.5, 1.5, 3), y ranks (0, 1, 2, 3).
  # cov = (-1.5)(-1.5) + 0 + 0 + (1.5)(1.5) = 4.5; var_x = 2.25 + 0 + 0 + 2.25 = 4.5, var_y = 5
  assert harmfulness.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / np.sqrt(4.5 * 5))
