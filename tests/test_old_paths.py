"""Module paths from before the folders by role (`cai_jax.model`, `cai_jax.sft`, ...) still import,
for one release: each warns with its new home and reads its names there."""

import importlib
import sys

import pytest

import cai_jax


@pytest.mark.parametrize('old', sorted(cai_jax.MOVED))
def test_an_old_path_warns_and_reads_its_new_home(old):
  homes = cai_jax.MOVED[old]
  sys.modules.pop(f'cai_jax.{old}', None)
  with pytest.warns(DeprecationWarning, match=rf'cai_jax\.{old} moved to cai_jax\.{homes[0]}'):
    module = importlib.import_module(f'cai_jax.{old}')
  new = importlib.import_module(f'cai_jax.{homes[0]}')
  public = [n for n in vars(new) if not n.startswith('_')]
  assert public and all(getattr(module, n) is getattr(new, n) for n in public)
  with pytest.raises(AttributeError):
    module.no_such_name


def test_names_that_left_a_stage_are_read_where_they_went():
  from cai_jax.method import comparisons, examples, labeler, preference_model
  from cai_jax.training import loop

  for old in ('feedback', 'preference', 'sft', 'train_lib'):
    sys.modules.pop(f'cai_jax.{old}', None)
    vars(cai_jax).pop(old, None)  # the attribute an earlier import set on the package
  with pytest.warns(DeprecationWarning):
    from cai_jax import feedback, preference, sft, train_lib
  assert preference.score_conversations is preference_model.score_conversations
  assert preference.Comparison is comparisons.Comparison
  assert sft.encode is examples.encode
  assert feedback.Labeler is labeler.Labeler
  assert train_lib.fit is loop.fit


def test_the_old_bookkeeping_names_are_read_through_the_stages_folder():
  from cai_jax import bookkeeping, stages

  with pytest.warns(
      DeprecationWarning, match='cai_jax.stages.roles_line moved to cai_jax.bookkeeping'
  ):
    assert stages.roles_line is bookkeeping.roles_line
  with pytest.raises(AttributeError):
    stages.no_such_name
