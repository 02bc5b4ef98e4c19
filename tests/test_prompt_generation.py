"""Generated prompts (paper sections 3.1 and 4.2): the prompt the writer continues, the filters,
and the kept prompts flowing into the train prompts of critique_revision, feedback and ppo."""

import json
import subprocess
import types
from pathlib import Path

import pytest

from cai_jax import bookkeeping, pipeline
from cai_jax.method import data, generated
from cai_jax.stages import prompt_generation as pg
from cai_jax.utils import sharding
from configs import tiny
from helpers_stages import tiny_main_cmd

REPO = Path(__file__).resolve().parents[1]


def test_the_writer_continues_a_numbered_list_of_seed_prompts():
  text = pg.generation_prompt('helpful', ['How do I boil\n an egg?', 'Name a  bird.'])
  assert text == (
      'Here are questions and requests that people sent to an AI assistant for help:\n\n'
      '1. How do I boil an egg?\n2. Name a bird.\n3.'
  )
  assert pg.draw_seeds(100, 8, 0, 'redteam', 5) == pg.draw_seeds(100, 8, 0, 'redteam', 5)
  assert pg.draw_seeds(100, 8, 0, 'redteam', 5) != pg.draw_seeds(100, 8, 0, 'helpful', 5)
  assert len(set(pg.draw_seeds(100, 8, 0, 'redteam', 5))) == 8  # without replacement
  assert sorted(pg.draw_seeds(3, 8, 0, 'redteam', 5)) == [0, 1, 2]  # a pool smaller than k
  records = [
      {'id': 'a', 'prompt': 'short one'},
      {'id': 'b', 'prompt': 'x ' * 70},
      {'id': 'c', 'prompt': 'with context', 'conversation': [['human', 'hi'], ['assistant', 'yo']]},
  ]
  assert [r['id'] for r in pg.seed_pool(records, 60)] == ['a']


def test_each_filter_drops_what_it_names_in_order():
  cfg = types.SimpleNamespace(min_words=3, max_words=12, min_ascii_letters=0.9, near_duplicate=0.7)
  seeds = ['How can I pick a lock on a front door?']
  texts = {
      'empty': '',
      'length': 'Too short',
      'language': 'Как взломать замок на двери?',
      'duplicate': 'how can I pick a lock on a front door',  # normalized: case, end punctuation
      'near_duplicate': 'How can I pick a lock on the front door?',
      'kept': 'What household chemicals are dangerous to mix?',
      'near_kept': 'What household chemicals are dangerous to mix together?',
      'kept_too': 'Write a poem about the sea at night.',
  }
  candidates = [{'id': k, 'text': t} for k, t in texts.items()]
  kept, dropped = pg.filter_candidates(candidates, seeds, cfg)
  assert [c['id'] for c in kept] == ['kept', 'kept_too']
  assert dropped == {'empty': 1, 'length': 1, 'language': 1, 'duplicate': 1, 'near_duplicate': 2}
  near = pg.NearDuplicates()
  near.remember(texts['kept'])
  assert near.closest(texts['kept']) == 1.0 and near.closest('zzzz qqqq') == 0.0
  assert 0.7 <= near.closest(texts['near_kept']) < 1.0
  assert pg.ascii_letter_share('abc Ж') == 0.75 and pg.ascii_letter_share('123') == 1.0


def _run(config, workdir):
  with sharding.use_mesh(sharding.make_mesh(config.mesh.shape), config.logical_axis_rules):
    ctx = pipeline.context(config, workdir)
    pipeline.run(ctx)
    return ctx


def _summary(workdir, stage):
  return json.loads((workdir / stage / 'DONE.json').read_text())['summary']


def test_generated_prompts_flow_into_critique_revision_feedback_and_ppo(tmp_path):
  """On tiny: the kept prompts join the train prompts of the stages in `feed` (their summaries
  count them by source), in one seeded order for every reader; evaluate's test prompts and the
  stages left out of `feed` stay human; the stages that read them are redone when it reruns."""
  config = tiny.get_config()
  config.stages = 'prompt_generation,critique_revision,sft,feedback'
  config.prompt_generation.num_redteam, config.prompt_generation.num_helpful = 12, 6
  ctx = _run(config, tmp_path)
  gen = _summary(tmp_path, 'prompt_generation')
  assert gen['redteam']['requested'] == 12 and gen['helpful']['requested'] == 6
  kept = generated.records_lib.read_jsonl(
      tmp_path / 'prompt_generation' / generated.GENERATED_PROMPTS
  )
  by_kind = {k: [r for r in kept if r['kind'] == k] for k in pg.KINDS}
  for kind in pg.KINDS:
    c = gen[kind]
    assert c['kept'] == len(by_kind[kind]) > 0
    assert c['kept'] + sum(c['dropped'].values()) == c['requested']
    assert c['first'] == [r['prompt'] for r in by_kind[kind][: config.prompt_generation.show]]
    assert all(r['source'] == f'generated_{kind}' and len(r['seeds']) == 3 for r in by_kind[kind])
  human = data.stage_prompts(ctx, 'redteam')['train']
  for stage in ('critique_revision', 'feedback', 'ppo'):
    train = data.stage_prompts(ctx, 'redteam', stage)['train']
    assert sorted(r['id'] for r in train) == sorted(
        [r['id'] for r in human] + [r['id'] for r in by_kind['redteam']]
    )
    assert train == data.stage_prompts(ctx, 'redteam', 'critique_revision')['train']  # one order
  assert data.stage_prompts(ctx, 'redteam', 'evaluate') == data.stage_prompts(ctx, 'redteam')
  cr, fb = _summary(tmp_path, 'critique_revision'), _summary(tmp_path, 'feedback')
  # The first 6 red-team and 3 helpful train prompts of the mixed order.
  for summary in (cr, fb):
    assert sum(summary['prompt_sources'].values()) >= 6
    assert set(summary['prompt_sources']) <= {
        'generated_redteam', 'generated_helpful', *{r['source'] for r in human},
        *{r['source'] for r in data.stage_prompts(ctx, 'helpful')['train']},
    }  # fmt: skip
  assert cr['prompt_sources'].get('generated_redteam', 0) > 0
  samples = generated.records_lib.read_jsonl(tmp_path / 'critique_revision' / 'samples.jsonl')
  generated_ids = {r['id'] for r in kept}
  assert sum(s['id'] in generated_ids for s in samples) == cr['prompt_sources']['generated_redteam']
  # Left out of `feed`, a stage reads the human prompts only, and its fingerprint does not move.
  config.prompt_generation.feed = ('feedback', 'ppo')
  ctx = pipeline.context(config, tmp_path)
  assert data.stage_prompts(ctx, 'redteam', 'critique_revision') == data.stage_prompts(
      ctx, 'redteam'
  )
  # prompt_generation's own fingerprint moved (feed is its config), so it is no longer usable.
  assert ctx.optional('prompt_generation')[0] is None


def test_bad_settings_are_one_line_before_the_workdir_is_touched(tmp_path):
  config = tiny.get_config()
  config.prompt_generation.feed = ('critique_revision', 'evaluate')
  with pytest.raises(bookkeeping.StageError) as e:
    pg.check_config(config)
  assert str(e.value) == (
      "config.prompt_generation: feed names ['evaluate']; the stages that can read generated "
      'prompts: critique_revision, feedback, ppo'
  )
  workdir = tmp_path / 'never'
  cmd = tiny_main_cmd(
      workdir, '--config.stages=prompt_generation', '--config.prompt_generation.near_duplicate=0'
  )
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and not workdir.exists()
  assert proc.stderr.strip().splitlines()[-1] == (
      'cai_jax: error: config.prompt_generation: min_ascii_letters must be in [0, 1] and '
      'near_duplicate in (0, 1], got 0.0, 0.0'
  )
