"""What a tiny pipeline run compiles, against what `python -m cai_jax.aot` compiles for the same
config (configs/tiny.py at v5e:1x1): every program the run compiles (or a larger bucket of it) is
in aot's program list. aot runs with `--lower_only` here (the names and argument shapes compared
are the lowering's; tests/test_aot.py checks that they are the compiled run's), so the module's
minutes are the pipeline run.

A module of its own (not in tests/test_aot.py) so that its pipeline run goes to another test worker
than test_aot.py's module fixture (pytest -n 2 --dist loadscope).
"""

import json
import subprocess
import sys

import pytest
from test_aot import REPO, run_aot

# ---- what a pipeline run compiles, against what aot compiles ------------------------------------

TINY_CONFIG = 'configs/tiny.py'
# Smaller than tiny's defaults where it only saves time (as tests/test_pipeline.py): every stage
# still runs, and a stage's largest shapes come from its config, not from how many prompts it has.
TINY_OVERRIDES = [
    '--config.critique_revision.num_prompts=6',
    '--config.critique_revision.chunk_size=2',
]
# Programs a tiny run compiles that a real run does not: a 'random:' model's initializer
# (sharding.init_module); real runs load checkpoints.
NOT_IN_A_REAL_RUN = {'jit(init)'}


def record_pipeline(workdir, out):
  """Runs the tiny pipeline (python -m cai_jax.main) recording every program it compiles."""
  code = (
      'import json, runpy, sys\n'
      'from cai_jax.utils import compile_log\n'
      f'sys.argv = ["cai_jax.main", "--config", {TINY_CONFIG!r}, "--workdir", {str(workdir)!r}, '
      f'*{TINY_OVERRIDES!r}]\n'
      'code = 0\n'
      'with compile_log.record() as programs:\n'
      '  try:\n'
      '    runpy.run_module("cai_jax.main", run_name="__main__")\n'
      '  except SystemExit as e:\n'
      '    code = e.code\n'
      f'json.dump(programs, open({str(out)!r}, "w"))\n'
      'sys.exit(code)\n'
  )
  return subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, timeout=1800, cwd=REPO
  )


@pytest.fixture(scope='module')
def tiny_1x1(tmp_path_factory):
  """aot --lower_only on configs/tiny.py itself (its stage sizes, one device: v5e:1x1, as the
  run's CPU)."""
  out = tmp_path_factory.mktemp('aot_tiny') / 'programs.json'
  r = run_aot(
      '--config',
      TINY_CONFIG,
      '--config.model.architecture=tiny',
      '--config.tpu_topology=v5e:1x1',
      '--lower_only',
      f'--json={out}',
      timeout=1800,
  )
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_aot_compiles_every_program_the_tiny_pipeline_compiles(tiny_1x1, tmp_path):
  from cai_jax.utils import compile_log

  out = tmp_path / 'compiled.json'
  r = record_pipeline(tmp_path / 'work', out)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  compiled = [(n, tuple(a)) for n, a in json.loads(out.read_text()) if n not in NOT_IN_A_REAL_RUN]
  names = {n for n, _ in compiled}
  # The run went through the prefix-reuse path and every kind of program.
  for name in ('jit(_prefix_fn)', 'jit(_prefill)', 'jit(_decode)', 'jit(_score_options_fn)'):
    assert name in names, sorted(names)
  assert {'jit(step)', 'jit(_rewards)', 'jit(rollout_fn)', 'jit(_build_state)'} <= names
  _, programs = tiny_1x1
  checked = [(n, tuple(a)) for p in programs for n, a in p['lowered']]
  missing = compile_log.missing(compiled, checked)
  assert not missing, 'aot does not lower (a larger bucket of):\n' + '\n'.join(
      f'{n} ({len(a)} args: {", ".join(x for x in a if "," in x)})' for n, a in missing
  )
