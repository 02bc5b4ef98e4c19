"""Multi-process training on localhost: 2 processes x 2 CPU devices (gloo collectives) take the
same sharded SFT steps as 1 process x 4 devices, each process feeding only its own rows."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess runs of the pipeline: minutes in all

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'tests' / 'scripts' / 'distributed_step.py'
TIMEOUT = 240  # seconds; a hung collective fails the test instead of hanging the suite


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _env():
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else [])
  )
  # Quick compiles for a tiny model; every run below uses the same flags.
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
  return env


def _result(output: str) -> dict:
  lines = [line for line in output.splitlines() if line.startswith('{')]
  assert lines, output[-3000:]
  return json.loads(lines[-1])


def test_two_processes_match_one_process(tmp_path):
  port = _free_port()
  logs = [open(tmp_path / f'process{i}.log', 'w+') for i in range(2)]
  procs = [
      subprocess.Popen(
          [sys.executable, str(SCRIPT), '2', str(i), str(port), '2'],
          cwd=ROOT,
          env=_env(),
          stdout=logs[i],
          stderr=subprocess.STDOUT,
      )
      for i in range(2)
  ]
  try:
    single = subprocess.run(
        [sys.executable, str(SCRIPT), '1', '0', '0', '4'],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    for p in procs:
      p.wait(timeout=TIMEOUT)
  except subprocess.TimeoutExpired:
    pytest.fail('a process did not finish in time (hung collective?)')
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  one, two = _result(single.stdout), _result(outputs[0])
  assert (one['processes'], two['processes']) == (1, 2)
  assert two['losses'] == pytest.approx(one['losses'], abs=1e-5)
  assert two['grad_norms'] == pytest.approx(one['grad_norms'], abs=1e-5)
  # The trained parameters, gathered for export, agree too.
  assert two['embed_sum'] == pytest.approx(one['embed_sum'], abs=1e-4)
