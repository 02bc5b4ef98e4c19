"""Model roles: which model each stage loads, the fingerprints that follow the role sources, and
the clear errors for renamed role names and unloadable sources."""

import json
from pathlib import Path

import pytest

from cai_jax import bookkeeping, pipeline, validate
from configs import tiny
from tests import test_critique_revision as cr


def _tiny(**model):
  c = tiny.get_config()
  c.model.update(model)
  return c


def test_source_fills_both_roles_and_the_roles_line_says_so():
  c = _tiny()
  ctx = pipeline.context(c, Path('/w'))
  assert ctx.model_source('pretrained') == ctx.model_source('helpful') == 'random:tiny'
  assert bookkeeping.roles_line(c.model) == 'helpful = pretrained: random:tiny'
  assert ctx.model_source('sft') == '/w/sft/export'
  assert ctx.model_source('preference') == '/w/preference/export'
  assert ctx.model_source('ppo') == '/w/ppo/export'
  c = _tiny(helpful_source='random:tiny-gemma2')
  assert bookkeeping.roles_line(c.model) == 'pretrained: random:tiny; helpful: random:tiny-gemma2'
  assert bookkeeping.role_field(c.model, 'helpful') == 'model.helpful_source'
  assert bookkeeping.role_field(c.model, 'pretrained') == 'model.source'


def test_old_role_names_are_one_clear_line_each(tmp_path):
  c = _tiny()
  c.stages = 'critique_revision,sft,feedback,preference,ppo,evaluate'
  c.evaluate.models = 'helpful,sl_cai,rl_cai'
  c.evaluate.judge_model = 'rl_cai'
  c.preference.init_from = 'sl_cai'
  c.ppo.reward = 'pm'
  c.ppo.value.init = 'pm'
  problems = validate.problems(c, tmp_path / 'w')
  assert problems == [
      "config.evaluate.models='helpful,sl_cai,rl_cai': 'sl_cai' is now 'sft', 'rl_cai' is now "
      "'ppo' (model roles are named after the stages that make them)",
      "config.evaluate.judge_model='rl_cai': 'rl_cai' is now 'ppo' (model roles are named after "
      'the stages that make them)',
      "config.preference.init_from='sl_cai': 'sl_cai' is now 'sft' (model roles are named after "
      'the stages that make them)',
      "config.ppo.reward='pm': 'pm' is now 'preference' (model roles are named after the stages "
      'that make them)',
      "config.ppo.value.init='pm': 'pm' is now 'preference' (model roles are named after the "
      'stages that make them)',
  ]
  with pytest.raises(bookkeeping.StageError, match="model role 'pm' is now called 'preference'"):
    pipeline.context(c, tmp_path).model_source('pm')
  c = _tiny()
  c.stages = 'critique_revision,sft,feedback,preference,ppo,evaluate'
  assert validate.problems(c, tmp_path / 'w') == []  # the new names (and the defaults) pass


def test_a_missing_source_names_its_role(tmp_path):
  c = _tiny(pretrained_source=str(tmp_path / 'nope'))
  c.stages = 'sft'
  expected = (
      'config.model.pretrained_source (the pretrained model: SFT init, feedback, PM init) '
      f"'{tmp_path}/nope' cannot be loaded: no such file or directory (expected an HF "
      "directory, a .gguf file, 'smollm2-135m' or 'random:<preset>')"
  )
  assert validate.problems(c, tmp_path / 'w') == [expected]
  c = _tiny(source=str(tmp_path / 'nope'))  # the shorthand: one line for both roles
  c.stages = 'sft'
  [problem] = validate.problems(c, tmp_path / 'w')
  assert problem.startswith(
      'config.model.source (the pretrained and helpful model: SFT init, '
      'feedback, PM init; initial responses, critiques, revisions, helpful '
      f"samples) '{tmp_path}/nope' cannot be loaded: no such file"
  )
  c = _tiny(helpful_source='random:huge')  # found only by loading it
  with pytest.raises(bookkeeping.StageError) as e:
    pipeline.context(c, tmp_path).load_role('helpful')
  assert str(e.value) == (
      'config.model.helpful_source (the helpful model: initial responses, critiques, revisions, '
      "helpful samples) 'random:huge' cannot be loaded: unknown random preset 'huge'"
  )


def test_fingerprints_follow_the_role_sources_each_stage_loads():
  def fingerprints(**model):
    ctx = pipeline.context(_tiny(**model), Path('/w'))
    return {name: ctx.fingerprint(name) for name in pipeline.ORDER}

  base = fingerprints()
  # Spelling both roles out is the same config as the shorthand.
  assert fingerprints(pretrained_source='random:tiny', helpful_source='random:tiny') == base
  helpful = fingerprints(helpful_source='random:tiny-gemma2')
  pretrained = fingerprints(pretrained_source='random:tiny-gemma2')
  changed = lambda fps: {n for n in pipeline.ORDER if fps[n] != base[n]}  # noqa: E731
  # A new helpful model redoes its samples and everything downstream; the feedback evaluation,
  # the harmfulness model and the generated prompts (pretrained model only) stand.
  assert changed(helpful) == set(pipeline.ORDER) - {
      'evaluate_feedback', 'harmfulness', 'prompt_generation'
  }  # fmt: skip
  # A new pretrained model keeps the helpful model's critique_revision samples.
  assert changed(pretrained) == set(pipeline.ORDER) - {'critique_revision'}


def test_each_stage_loads_the_model_of_its_role(tmp_path):
  """pretrained = random:tiny (llama), helpful = random:tiny-gemma2: critique_revision samples
  with the helpful model, sft fine-tunes the pretrained one."""
  red, helpful = tmp_path / 'red_team_attempts.jsonl', tmp_path / 'helpful.jsonl'
  red.write_text(
      ''.join(
          json.dumps({'transcript': f'\n\nHuman: {p}\n\nAssistant: No.'}) + '\n' for p in cr.REDTEAM
      )
  )
  helpful.write_text(
      ''.join(
          json.dumps({'chosen': f'\n\nHuman: {p}\n\nAssistant: Ok.'}) + '\n' for p in cr.HELPFUL
      )
  )
  prompt_files = (red, helpful)
  make_config, run_stage = cr.make_config, cr.run_stage
  extra = {'stages': 'critique_revision,sft', 'sft.num_steps': 2, 'sft.checkpoint_every': 0}
  both = make_config(prompt_files, **extra, **{'model.helpful_source': 'random:tiny-gemma2'})
  run_stage(both, tmp_path / 'both')
  helpful_only = make_config(prompt_files, **{'model.source': 'random:tiny-gemma2'})
  run_stage(helpful_only, tmp_path / 'helpful')
  pretrained_only = make_config(prompt_files)
  run_stage(pretrained_only, tmp_path / 'pretrained')

  samples = lambda w: (w / 'critique_revision' / 'samples.jsonl').read_text()  # noqa: E731
  assert samples(tmp_path / 'both') == samples(tmp_path / 'helpful')
  assert samples(tmp_path / 'both') != samples(tmp_path / 'pretrained')
  export = json.loads((tmp_path / 'both' / 'sft' / 'export' / 'config.json').read_text())
  assert export['model_type'] == 'llama'  # the pretrained model, not the helpful gemma2
  for stage in ('critique_revision', 'sft'):
    done = json.loads((tmp_path / 'both' / stage / 'DONE.json').read_text())
    assert done['summary']['models'] == 'pretrained: random:tiny; helpful: random:tiny-gemma2'
