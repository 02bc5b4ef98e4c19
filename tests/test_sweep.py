"""experiments/sweep.py: points, overrides, the shipped sweep files, and a small real sweep whose
points share a stage through the fingerprint-keyed stage cache."""

import csv
import json
import tempfile
from pathlib import Path

import pytest

from cai_jax.method import constitution as C
from experiments import sweep

pytestmark = pytest.mark.slow  # subprocess runs of the pipeline: minutes in all

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / 'experiments' / 'sweeps').glob('*.py'))
# critique_revision at its smallest: one prompt, tiny generations, no helpful mix.
SMALL = [
    'critique_revision.num_prompts=1',
    'critique_revision.max_new_tokens=2',
    'critique_revision.critique_max_new_tokens=2',
    'critique_revision.helpful_ratio=0.0',
    'critique_revision.write_tfds=False',
]


@pytest.fixture(autouse=True)
def _jax_cache(monkeypatch):
  # Points are subprocesses; share compiled executables with them (and tests/test_evaluate.py).
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv(
      'JAX_COMPILATION_CACHE_DIR', str(Path(tempfile.gettempdir()) / 'cai_jax_test_jax_cache')
  )


def _module(text, tmp_path, name='s'):
  path = tmp_path / f'{name}.py'
  path.write_text(text)
  return sweep._load_module(path, f'_test_{name}')


def test_points_from_axes_and_from_points(tmp_path):
  s = _module("AXES = {'seed': [0, 1], 'ppo.kl.coef': [0.0, 0.1]}\n", tmp_path)
  points = sweep.sweep_points(s)
  assert [n for n, _ in points] == [
      'seed=0,coef=0.0',
      'seed=0,coef=0.1',
      'seed=1,coef=0.0',
      'seed=1,coef=0.1',
  ]
  assert points[1][1] == {'seed': 0, 'ppo.kl.coef': 0.1}
  s = _module("def points():\n  return [{'name': 'a', 'seed': 1}, {'seed': 2}]\n", tmp_path, 'p')
  points = sweep.sweep_points(s)
  assert points == [('a', {'seed': 1}), ('seed=2', {'seed': 2})]
  assert sweep.select_points(points, '1,a') == [points[1], points[0]]
  with pytest.raises(sweep.SweepError, match="no point 'b'; points: 0:a, 1:seed=2"):
    sweep.select_points(points, 'b')


def test_overrides_follow_field_types():
  config = sweep.load_config('tiny')
  sweep.set_field(config, 'ppo.kl.coef', '0.2')  # --set values arrive as strings
  sweep.set_field(config, 'critique_revision.write_tfds', 'false')
  sweep.set_field(config, 'mesh.shape', '(1, 1, 1)')
  sweep.set_field(config, 'constitution', 'default')
  assert (
      config.ppo.kl.coef,
      config.critique_revision.write_tfds,
      config.mesh.shape,
      config.constitution,
  ) == (0.2, False, (1, 1, 1), 'default')
  with pytest.raises(sweep.SweepError, match="unknown config field 'ppo.kl.beta'"):
    sweep.set_field(config, 'ppo.kl.beta', 1.0)
  with pytest.raises(sweep.SweepError, match='critique_revision.n_rounds'):
    sweep.set_field(config, 'critique_revision.n_rounds', 1.5)
  assert [sweep.cli_value(v) for v in ('a b', True, 0.1, (1, -1, 1), [2])] == [
      'a b',
      'True',
      '0.1',
      '(1, -1, 1)',
      '(2,)',
  ]


@pytest.mark.parametrize('path', SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweeps_resolve(path, tmp_path, capsys):
  assert sweep.run_sweep(path, workdir_root=tmp_path, dry_run=True) == []
  out = capsys.readouterr().out
  assert sum(line.startswith('[') for line in out.splitlines()) >= 2, out  # two or more points
  assert 'python' in out and '-m cai_jax.main' in out


def test_kl_sweep_shares_everything_before_ppo():
  s = sweep._load_module(REPO / 'experiments/sweeps/kl_beta.py', '_kl')
  fps = []
  for _, point in sweep.sweep_points(s):
    config = sweep.load_config(s.BASE)
    for k, v in point.items():
      sweep.set_field(config, k, v)
    fps.append(sweep.stage_fingerprints(config))
  for stage in ('critique_revision', 'sft', 'feedback', 'preference'):
    assert len({f[stage] for f in fps}) == 1, stage
  assert len({f['ppo'] for f in fps}) == len(fps) and len({f['evaluate'] for f in fps}) == len(fps)


def test_revision_sweep_runs_and_reuses_stages(tmp_path):
  root = tmp_path / 'sweeps'
  args = ['--workdir_root', str(root), '--stages', 'critique_revision']
  for item in SMALL:
    args += ['--set', item]
  # The shipped number-of-revisions sweep, first two points (1 and 2 rounds), critique_revision only.
  assert (
      sweep.main([str(REPO / 'experiments/sweeps/n_revisions.py'), '--points', '0,1', *args]) == 0
  )
  rows = json.loads((root / 'n_revisions' / 'results.json').read_text())
  assert [(r['point'], r['ran'], r['reused']) for r in rows] == [
      ('n_rounds=1', ['critique_revision'], []),
      ('n_rounds=2', ['critique_revision'], []),
  ]
  assert [r['metrics']['empty_revisions'] is not None for r in rows] == [True, True]
  with open(root / 'n_revisions' / 'results.csv') as f:
    table = list(csv.DictReader(f))
  assert [t['critique_revision.n_rounds'] for t in table] == ['1', '2']
  md = (root / 'n_revisions' / 'results.md').read_text()
  assert '| n_rounds=1 | 1 |' in md and '![empty_revisions](empty_revisions.png)' in md
  assert (root / 'n_revisions' / 'empty_revisions.png').exists()

  # Another sweep whose points differ from the first run's 1-round point only downstream of
  # critique_revision (an sft field): both take the finished stage from the cache.
  cached = root / 'n_revisions' / 'n_rounds=1' / 'critique_revision'
  samples = cached.resolve() / 'samples.jsonl'
  mtime = samples.stat().st_mtime_ns
  (tmp_path / 'sft_lr.py').write_text(
      "BASE = 'tiny'\nOVERRIDES = {'critique_revision.n_rounds': 1}\n"
      "AXES = {'sft.optimizer.learning_rate': [0.01, 0.02]}\n"
      "METRICS = {'rounds': 'critique_revision:rounds'}\n"
  )
  assert sweep.main([str(tmp_path / 'sft_lr.py'), *args]) == 0
  rows = json.loads((root / 'sft_lr' / 'results.json').read_text())
  assert [(r['ran'], r['reused'], r['metrics']['rounds']) for r in rows] == [
      ([], ['critique_revision'], 1),
      ([], ['critique_revision'], 1),
  ]
  for r in rows:
    assert (Path(r['workdir']) / 'critique_revision').resolve() == cached.resolve()
  assert samples.stat().st_mtime_ns == mtime  # not recomputed
  assert len(list((root / '_stages').glob('critique_revision-*'))) == 2


def test_number_of_principles_sweep_draws_from_the_first_n(tmp_path):
  """Paper figure 6 on tiny: each point's critiques and revisions use only the constitution's
  first N critique/revision principles (N = 1, 2 of the default constitution's 16)."""
  root = tmp_path / 'sweeps'
  args = ['--workdir_root', str(root), '--stages', 'critique_revision', '--points', '0,1']
  # The default constitution's few-shots outgrow the tiny model's 512 tokens: none are shown.
  for item in SMALL + ['critique_revision.n_rounds=3', 'critique_revision.num_few_shots=0']:
    args += ['--set', item]
  assert sweep.main([str(REPO / 'experiments/sweeps/n_principles.py'), *args]) == 0
  rows = json.loads((root / 'n_principles' / 'results.json').read_text())
  names = [p.name for p in C.load_constitution('default').critique_revision]
  for row, n in zip(rows, (1, 2)):
    samples = [json.loads(line) for line in (Path(row['workdir']) / 'critique_revision' /
                                              'samples.jsonl').read_text().splitlines()]  # fmt: skip
    used = {r['principle'] for s in samples for r in s['rounds']}
    assert used and used <= set(names[:n]), (n, used)


def test_results_keep_rows_of_earlier_runs(tmp_path):
  row = lambda name, v: {
      'point': name,
      'base': 'tiny',
      'overrides': {'seed': v},
      'status': 'ok',  # noqa: E731
      'ran': [],
      'reused': [],
      'seconds': 1.0,
      'metrics': {'m': {'mean': v, 'stderr': 0.1}},
  }
  sweep.write_results(tmp_path, 's', [row('b', 1)], ['seed'], ['m'])
  rows = sweep.merge_rows(tmp_path, [row('a', 0), row('b', 2)], ['a', 'b', 'c'])
  assert [(r['point'], r['overrides']['seed']) for r in rows] == [('a', 0), ('b', 2)]
  sweep.write_results(tmp_path, 's', rows, ['seed'], ['m'])
  md = (tmp_path / 'results.md').read_text()
  assert '| a | 0 | 0 ± 0.1 | ok |' in md and '![m](m.png)' in md
  assert (tmp_path / 'm.png').exists()


def test_ablation_sweeps_sl_cai_n_and_critique_free(tmp_path):
  """The paper's ablations on tiny, SFT-deep: SL-CAI-n at n = 0 and 2 shares one critique_revision
  run, and the critique-free sweep's critique point takes that same run from the cache."""
  root = tmp_path / 'sweeps'
  args = ['--workdir_root', str(root)]
  for item in SMALL + ['critique_revision.n_rounds=2', 'sft.num_steps=2', 'sft.checkpoint_every=0']:
    args += ['--set', item]
  sl = [str(REPO / 'experiments/sweeps/sl_cai_n.py'), '--points', '0,2', '--stages']
  assert sweep.main([*sl, 'critique_revision,sft', *args]) == 0
  rows = json.loads((root / 'sl_cai_n' / 'results.json').read_text())
  assert [(r['point'], r['ran'], r['reused']) for r in rows] == [
      ('revision_round=0', ['critique_revision', 'sft'], []),
      ('revision_round=2', ['sft'], ['critique_revision']),
  ]
  assert [r['metrics']['sft_examples'] for r in rows] == [
      {'initial_response': 1},
      {'revision_round_1': 1, 'revision_round_2': 1},  # up to and including the 2nd, as the paper
  ]
  md = (root / 'sl_cai_n' / 'results.md').read_text()
  assert '| revision_round=2 | 2 |' in md
  assert 'Not produced by the stages run: sft_harmlessness_eval_pm' in md

  free = [str(REPO / 'experiments/sweeps/critique_free.py'), '--stages', 'critique_revision']
  assert sweep.main([*free, *args]) == 0
  rows = json.loads((root / 'critique_free' / 'results.json').read_text())
  assert [(r['point'], r['ran'], r['reused']) for r in rows] == [
      ('critique=True', [], ['critique_revision']),
      ('critique=False', ['critique_revision'], []),
  ]
  with_critique, without = (
      [json.loads(x) for x in (Path(r['workdir']) / 'critique_revision' / 'samples.jsonl').open()]
      for r in rows
  )
  assert all(r['critique'] is not None for s in with_critique for r in s['rounds'])
  assert all(r['critique'] is None for s in without for r in s['rounds'])
  assert all(len(s['rounds']) == 2 and not s['finish_reasons']['critique'] for s in without)
  assert '| critique=False | False |' in (root / 'critique_free' / 'results.md').read_text()


def test_ppo_vs_dpo_sweep_runs_on_tiny(tmp_path):
  """The shipped PPO-vs-DPO sweep, its first point, end to end: both KLs and the DPO model's Elo
  and PM score beside RL-CAI's in the results."""
  root = tmp_path / 'sweeps'
  args = ['--workdir_root', str(root), '--points', '0']
  for item in [*SMALL, 'sft.num_steps=4', 'evaluate.n_bootstrap=10']:
    args += ['--set', item]
  assert sweep.main([str(REPO / 'experiments/sweeps/ppo_vs_dpo.py'), *args]) == 0
  (row,) = json.loads((root / 'ppo_vs_dpo' / 'results.json').read_text())
  assert row['status'] == 'ok' and row['overrides'] == {'dpo.beta': 0.5, 'ppo.kl.coef': 0.2}
  m = row['metrics']
  # Each cell is the number its stage wrote in the point's own workdir, not merely present.
  point = Path(row['workdir'])
  done = lambda stage: json.loads((point / stage / 'DONE.json').read_text())['summary']
  evaluated = json.loads((point / 'evaluate' / 'summary.json').read_text())
  assert set(evaluated['models']) == {'helpful', 'sft', 'ppo', 'dpo'}  # DPO judged beside RL-CAI
  assert m['ppo_kl'] == done('ppo')['kl_last'] and m['dpo_kl'] == done('dpo')['eval_kl']
  assert m['dpo_kl'] >= 0 and m['ppo_kl'] >= 0
  assert m['dpo_eval_accuracy'] == done('dpo')['eval_accuracy']
  for method in ('ppo', 'dpo'):
    assert m[f'{method}_harmlessness_elo'] == evaluated['harmlessness']['elo'][method]
  assert m['dpo_pm_score'] == evaluated['metrics']['dpo']['harmlessness_pm']
  assert m['dpo_refusal_rate'] == evaluated['metrics']['dpo']['refusal_rate_redteam']
  # The table: one row, the point's overrides and both KLs beside each method's Elo.
  lines = (root / 'ppo_vs_dpo' / 'results.md').read_text().splitlines()
  header = next(l for l in lines if l.startswith('| point |'))
  cells = lambda line: [c.strip() for c in line.strip('|').split('|')]
  (table_row,) = [l for l in lines if l.startswith(f'| {row["point"]} |')]
  cell = dict(zip(cells(header), cells(table_row)))
  assert (cell['dpo.beta'], cell['ppo.kl.coef']) == ('0.5', '0.2')
  for key in ('ppo_kl', 'dpo_kl', 'dpo_harmlessness_elo', 'ppo_harmlessness_elo', 'dpo_pm_score'):
    assert cell[key] == sweep.format_value(m[key]), key
  assert cell['status'] == 'ok'
