"""The paper's appendix evaluations (HarmfulVsEthical, HarmfulnessClassification): the readers
on the shared files and the multiple-choice scoring on a tiny model."""

import collections
import json

import numpy as np
import pytest

from cai_jax import bookkeeping, pipeline, sampling
from cai_jax.evaluation import appendix
from cai_jax.method import conversation
from cai_jax.method.labeler import option_tokens
from cai_jax.models import checkpoint
from cai_jax.utils import sharding

LETTERS = tuple(f' ({c})' for c in 'ABCDEFGHI')


@pytest.fixture(scope='module')
def evals_dir(shared_dir):
  path = shared_dir / 'data/anthropic_cai/evals'
  if not all((path / f'{n}.jsonl').is_file() for n in appendix.APPENDIX_EVALS):
    pytest.skip(f'the appendix evaluations are absent from {path}')
  return path


def test_readers_on_the_shared_files(evals_dir):
  ethical = appendix.read_multiple_choice(evals_dir / 'HarmfulVsEthical.jsonl')
  kinds = appendix.read_multiple_choice(evals_dir / 'HarmfulnessClassification.jsonl')
  assert (len(ethical), len(kinds)) == (254, 287)
  assert {i.options for i in ethical} == {LETTERS[:2]} and {i.options for i in kinds} == {LETTERS}
  assert all(len(i.corrects) == 1 for i in ethical + kinds)
  assert all(i.prompt.rstrip().endswith('The answer is:') for i in ethical + kinds)
  # Both answers occur in each file (a constant guess cannot score 100%).
  assert len(collections.Counter(next(iter(i.corrects)) for i in ethical)) == 2
  assert len(collections.Counter(next(iter(i.corrects)) for i in kinds)) > 5
  assert appendix.appendix_path('HarmfulVsEthical') == evals_dir / 'HarmfulVsEthical.jsonl'


def test_malformed_line_is_named(tmp_path):
  path = tmp_path / 'mc.jsonl'
  path.write_text(
      json.dumps({'prompt': 'Q?', 'corrects': [' (A)'], 'incorrects': [' (B)']})
      + '\n'
      + json.dumps({'prompt': 'Q?', 'corrects': [' (A)'], 'incorrects': [' (A)']})
      + '\n'
  )
  with pytest.raises(bookkeeping.StageError, match=r'mc\.jsonl:2: needs "prompt" and disjoint'):
    appendix.read_multiple_choice(path)
  assert len(appendix.read_multiple_choice(path, limit=1)) == 1


def test_tiny_model_scores_every_option(evals_dir):
  from configs import tiny

  config = tiny.get_config()
  with sharding.use_mesh(sharding.make_mesh(config.mesh.shape), config.logical_axis_rules):
    model = checkpoint.load_pretrained('random:tiny', seed=0)
    items = [
        *appendix.read_multiple_choice(evals_dir / 'HarmfulVsEthical.jsonl', limit=2),
        *appendix.read_multiple_choice(evals_dir / 'HarmfulnessClassification.jsonl', limit=2),
    ]
    records = appendix.score_multiple_choice(model, items, max_len=512, batch_size=4)
    assert [r['id'] for r in records] == [i.id for i in items]
    for item, r in zip(items, records):
      assert tuple(r['option_logprobs']) == item.options
      assert r['answer'] == max(item.options, key=r['option_logprobs'].get)
      assert r['correct'] == float(r['answer'] in item.corrects)
      # The log-prob of one option equals a plain scoring of (the prompt's kept end, the option).
      prompt, conts, _ = option_tokens(model.tokenizer, item.prompt, item.options)
      prompt = conversation.keep_last(prompt, 512 - max(len(c) for c in conts), model.tokenizer)
      total = sampling.score(model.model, [prompt], [conts[-1]]).total[0]
      assert r['option_logprobs'][item.options[-1]] == pytest.approx(float(total), abs=1e-3)


def test_stage_reports_accuracy_per_eval(evals_dir, tmp_path):
  from configs import tiny

  c = tiny.get_config()
  c.stages = 'evaluate_feedback'
  c.evaluate_feedback.limit = 3  # of the HHH comparisons too
  c.evaluate_feedback.evals = ('HarmfulVsEthical', 'HarmfulnessClassification')
  with sharding.use_mesh(sharding.make_mesh(c.mesh.shape), c.logical_axis_rules):
    pipeline.run(pipeline.context(c, tmp_path))
  summary = json.loads((tmp_path / 'evaluate_feedback' / 'DONE.json').read_text())['summary']
  ethical, kinds = (summary['appendix'][n] for n in appendix.APPENDIX_EVALS)
  assert (ethical['n'], ethical['options'], ethical['chance']) == (3, [2], 0.5)
  assert (kinds['n'], kinds['options']) == (3, [9]) and kinds['chance'] == pytest.approx(1 / 9)
  records = (tmp_path / 'evaluate_feedback' / 'appendix_HarmfulVsEthical.jsonl').read_text()
  assert ethical['accuracy'] == np.mean([json.loads(x)['correct'] for x in records.splitlines()])
