"""The evaluation PM (the Goodhart gauge): trained on the feedback stage's evaluation split, which
the RL PM never sees, and on human comparisons when given."""

import json

import numpy as np
import pytest

from cai_jax import pipeline, validate
from cai_jax.method import preference_model as pm_lib
from cai_jax.stages import feedback, preference
from cai_jax.utils import records as records_lib
from cai_jax.utils import sharding
from helpers_stages import fake_upstream
from test_preference import helpful_records, numpy_tiny_source, synthetic_records

N_PAIRS, N_HUMAN = 96, 16


def _config(root):
  from configs import tiny

  c = tiny.get_config()
  c.model.source = numpy_tiny_source(root / 'tiny')
  c.feedback.evaluation_fraction = 0.5
  for section in (c.preference, c.evaluation_pm):
    section.eval_fraction = 0.25
    section.checkpoint_every = 0
    section.epochs = 3.0
  return c


def _feedback_records(config):
  """Synthetic feedback samples, split as the feedback stage splits its prompts."""
  records = synthetic_records(N_PAIRS)
  return feedback.mark_splits(records, config.feedback.evaluation_fraction, config.seed)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('evaluation_pm')
  config = _config(root)
  (root / 'human.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in helpful_records(N_HUMAN)))
  workdir = root / 'run'
  records = _feedback_records(config)
  fake_upstream(config, workdir, 'feedback', {'samples.jsonl': records})
  return root, config, workdir, records


def test_splits_are_seeded_per_prompt_and_keep_both_sides():
  prompts = [{'id': f'p{i}', 'kind': 'harmlessness'} for i in range(200)] + [
      {'id': 'h0', 'kind': 'helpfulness'},
      {'id': 'h1', 'kind': 'helpfulness'},
  ]
  marked = feedback.mark_splits(prompts, 0.25, seed=0)
  held = {r['id'] for r in marked if r['split'] == records_lib.EVALUATION_SPLIT}
  assert 30 < len(held & {f'p{i}' for i in range(200)}) < 70
  assert len(held & {'h0', 'h1'}) == 1  # a kind of two prompts gives one to each side
  # A prompt's split depends on its id alone: adding prompts moves none of the others.
  more = feedback.mark_splits(prompts + [{'id': 'p999', 'kind': 'harmlessness'}], 0.25, seed=0)
  assert {r['id'] for r in more if r['split'] == 'evaluation'} - {'p999'} == held
  assert not any(r['split'] == 'evaluation' for r in feedback.mark_splits(prompts, 0.0, 0))


def test_preference_never_sees_the_evaluation_split(setup):
  _, config, workdir, records = setup
  held = {r['id'] for r in records if r['split'] == records_lib.EVALUATION_SPLIT}
  assert 0 < len(held) < N_PAIRS
  comparisons, counts = preference.load_comparisons(pipeline.context(config, workdir))
  assert not held & {c.id for c in comparisons}
  assert counts['evaluation_split_excluded'] == len(held)
  assert len(comparisons) == N_PAIRS - len(held)


def test_stage_trains_on_the_evaluation_split_and_human_comparisons(setup):
  root, config, workdir, records = setup
  config = config.copy_and_resolve_references()
  config.stages = 'evaluation_pm'
  config.evaluation_pm.human_path = str(root / 'human.jsonl')
  assert validate.problems(config, workdir) == []
  with sharding.use_mesh(sharding.make_mesh(config.mesh.shape), config.logical_axis_rules):
    ctx = pipeline.context(config, workdir)
    rows = pipeline.run(ctx)
    assert rows[0][:2] == ('evaluation_pm', 'ran')
    summary = json.loads((workdir / 'evaluation_pm' / 'DONE.json').read_text())['summary']
    held = sum(r['split'] == 'evaluation' for r in records)
    assert (summary['ai_harmlessness'], summary['human_helpfulness']) == (held, N_HUMAN)
    assert summary['train'] + summary['held_out'] == held + N_HUMAN
    assert summary['eval_harmlessness_accuracy'] > 0.8, summary
    assert 'HH-RLHF human helpfulness comparisons' in summary['sources']
    # The interface evaluate reads: the role's export, loaded like the RL PM.
    pm = ctx.load_role('evaluation_pm', scalar_head=True, frozen=True)
    good, bad = pm_lib.score_conversations(
        pm, [('sun sky', 'cat banana'), ('sun sky', 'cat dog box')], fmt=config.conversation_format
    )
    assert np.isfinite([good, bad]).all() and good > bad


def test_without_data_the_config_is_refused(setup):
  _, config, workdir, _ = setup
  config = config.copy_and_resolve_references()
  config.stages = 'evaluation_pm'
  config.evaluation_pm.use_ai_labels = False
  assert validate.problems(config, workdir) == [
      'config.evaluation_pm: no comparisons: set use_ai_labels=True or human_path / '
      'human_harmless_path'
  ]
