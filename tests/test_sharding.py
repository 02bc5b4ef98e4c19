"""Sharding across meshes of 8 fake CPU devices (each in a subprocess: the device count is fixed
when jax starts): equal numbers under every mesh, every array laid out as the rules say, and the
`sft` stage through the entry point surviving a kill -9."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_jax.training import metrics as metrics_lib
from configs import tiny
from helpers_stages import fake_upstream, sl_cai_records, tiny_main_cmd

pytestmark = pytest.mark.slow  # subprocess runs of the pipeline: minutes in all

ROOT = Path(__file__).resolve().parents[1]
MESHES = ('(8,1,1)', '(2,2,2)', '(1,2,4)', '(1,1,1)')
TIMEOUT = 300  # seconds per subprocess


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else [])
  )
  # Quick compiles for a tiny model (every run here uses the same flags), on 8 fake devices.
  env['XLA_FLAGS'] = (
      '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true '
      '--xla_force_host_platform_device_count=8'
  )
  return env


def test_meshes_agree_and_arrays_follow_the_rules():
  out = subprocess.run(
      [sys.executable, str(ROOT / 'tests' / 'scripts' / 'mesh_parity.py'), *MESHES],
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=TIMEOUT,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  ref = results[MESHES[0]]
  for mesh, r in results.items():
    assert not r['layout_errors'], (mesh, r['layout_errors'][:5])
    assert r['n_moments'] == 2 * 2 * 10  # mu and nu of every one of the tiny model's 20 params
    assert r['logits'] == pytest.approx(ref['logits'], abs=1e-5), mesh
    assert r['losses'] == pytest.approx(ref['losses'], abs=1e-5), mesh
    assert r['grad_norms'] == pytest.approx(ref['grad_norms'], abs=1e-5), mesh
  # The layouts really differ: (2,2,2) shards the embedding over tensor x fsdp.
  assert "P('tensor', 'fsdp')" in results['(2,2,2)']['specs']
  # A global batch the batch axes do not divide is refused, naming the numbers.
  assert (
      'sft.batch_size 6 is not divisible by the data x fsdp size 8'
      in results['(8,1,1)']['batch_error']
  )
  assert (
      'sft.batch_size 6 is not divisible by the data x fsdp size 4'
      in results['(2,2,2)']['batch_error']
  )


# ---- the sft stage through the entry point ------------------------------------------------------

STEPS = 24
SFT_FLAGS = (
    '--config.stages=sft',
    f'--config.sft.num_steps={STEPS}',
    '--config.sft.min_bucket=128',
    '--config.sft.checkpoint_every=8',
    '--config.sft.eval_every=12',
)


def _workdir(path: Path) -> Path:
  config = tiny.get_config()
  config.sft.update(num_steps=STEPS, min_bucket=128, checkpoint_every=8, eval_every=12)
  fake_upstream(config, path, 'critique_revision', sl_cai_records())
  return path


def _main(workdir: Path, mesh: str) -> list[str]:
  return tiny_main_cmd(workdir, f'--config.mesh.shape={mesh}', *SFT_FLAGS)


def _checkpoints(workdir: Path) -> list[int]:
  d = workdir / 'sft' / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_entry_point_meshes_agree_and_a_killed_run_resumes(tmp_path):
  a = _workdir(tmp_path / 'a')
  b = tmp_path / 'b'
  shutil.copytree(a, b)
  # Mesh (2,2,2), killed with SIGKILL once it has trained past a finished checkpoint.
  log_b = open(tmp_path / 'b.log', 'w+')
  run_b = subprocess.Popen(
      _main(b, '(2,2,2)'), cwd=ROOT, env=_env(), stdout=log_b, stderr=subprocess.STDOUT
  )
  deadline = time.time() + TIMEOUT
  try:
    while True:
      ckpts = _checkpoints(b)
      steps = [r['step'] for r in metrics_lib.read_metrics(b / 'sft' / 'metrics.jsonl')]
      if ckpts and steps and max(steps) > ckpts[-1]:
        break
      assert run_b.poll() is None, 'the run ended before it could be killed:\n' + _tail(log_b)
      assert time.time() < deadline, 'no checkpoint in time:\n' + _tail(log_b)
      time.sleep(0.02)
    os.kill(run_b.pid, signal.SIGKILL)
    run_b.wait(timeout=30)
  finally:
    if run_b.poll() is None:
      run_b.kill()
  killed_at = max(r['step'] for r in metrics_lib.read_metrics(b / 'sft' / 'metrics.jsonl'))
  assert killed_at < STEPS and not (b / 'sft' / 'DONE.json').exists()

  again = subprocess.run(
      _main(b, '(2,2,2)'), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
  )
  assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-4000:]
  assert 'sft: resumed from the checkpoint at step' in again.stderr, again.stderr[-4000:]
  # One run at a time: XLA:CPU's 8 fake-device threads on 2 cores, starved by a second
  # 8-device process, have been seen reaching two of a step's all-reduces in different orders
  # (a deadlock that XLA aborts after 40 s).
  log_a = open(tmp_path / 'a.log', 'w+')
  run_a = subprocess.run(
      _main(a, '(8,1,1)'),
      cwd=ROOT,
      env=_env(),
      stdout=log_a,
      stderr=subprocess.STDOUT,
      timeout=TIMEOUT,
  )
  assert run_a.returncode == 0, _tail(log_a)

  rows_a = metrics_lib.read_metrics(a / 'sft' / 'metrics.jsonl')
  rows_b = metrics_lib.read_metrics(b / 'sft' / 'metrics.jsonl')
  assert [r['step'] for r in rows_a] == [r['step'] for r in rows_b] == list(range(1, STEPS + 1))
  for ra, rb in zip(rows_a, rows_b):
    assert ('eval_loss' in ra) == ('eval_loss' in rb) == (ra['step'] % 12 == 0), (ra, rb)
    for k in ('loss', 'grad_norm', 'eval_loss'):
      if k in ra:
        assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-5), (k, ra, rb)
  assert rows_a[-1]['loss'] < rows_a[0]['loss']
  assert (b / 'sft' / 'DONE.json').exists() and (b / 'sft' / 'export' / 'config.json').exists()


def _tail(log, n=4000) -> str:
  log.seek(0)
  return log.read()[-n:]
