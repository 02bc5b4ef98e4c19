"""The whole pipeline through the entry point on configs/tiny.py: killed with SIGKILL at several
points (inside critique_revision, sft, ppo and evaluate; prefix reuse on, as tiny's default) and
rerun with the same command each time, it ends with the same final artifacts as an uninterrupted
run."""

import hashlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers_stages import tiny_main_cmd

pytestmark = pytest.mark.slow  # subprocess runs of the pipeline: minutes in all

REPO = Path(__file__).resolve().parents[1]
# Smaller than tiny's defaults where it only saves time; every stage still runs.
OVERRIDES = [
    '--config.critique_revision.num_prompts=6',
    '--config.critique_revision.chunk_size=2',
    '--config.sft.checkpoint_every=1',
    '--config.ppo.checkpoint_every=1',
]


def main_cmd(workdir: Path) -> list[str]:
  return tiny_main_cmd(workdir, *OVERRIDES)


def run_to_end(workdir: Path) -> None:
  proc = subprocess.run(main_cmd(workdir), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _lines(path: Path) -> int:
  return path.read_text().count('\n') if path.exists() else 0


# Kill points, in pipeline order: each a predicate on the workdir that holds mid-stage.
KILL_POINTS = {
    'critique_revision': lambda w: _lines(w / 'critique_revision' / 'samples.jsonl') >= 1,
    'sft': lambda w: _lines(w / 'sft' / 'metrics.jsonl') >= 2,
    'ppo': lambda w: _lines(w / 'ppo' / 'metrics.jsonl') >= 2,
    # evaluate writes each model's responses as a whole file: killed after the second.
    'evaluate': lambda w: len(list((w / 'evaluate').glob('responses_*.jsonl'))) >= 2,
}


def run_and_kill(workdir: Path, stage: str) -> None:
  proc = subprocess.Popen(
      main_cmd(workdir), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:
    if KILL_POINTS[stage](workdir):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f'the run got past {stage} before it could be killed'
  assert not (workdir / stage / 'DONE.json').exists()


def _strip_timings(x):
  """A JSON value without wall-clock fields and workdir paths, which no two runs share."""
  if isinstance(x, dict):
    return {
        k: _strip_timings(v)
        for k, v in x.items()
        if 'seconds' not in k and k not in ('timings', 'sources', 'source')
    }
  if isinstance(x, list):
    return [_strip_timings(v) for v in x]
  return x


def artifacts(workdir: Path) -> dict:
  """What a user keeps from a run: generated data, model exports, metrics, the evaluation."""
  out = {}
  evaluated = sorted(str(p.relative_to(workdir)) for p in (workdir / 'evaluate').glob('*.jsonl'))
  assert 'evaluate/responses_ppo.jsonl' in evaluated and 'evaluate/judge_redteam.jsonl' in evaluated
  for rel in (
      'critique_revision/samples.jsonl',
      'critique_revision/helpful.jsonl',
      'feedback/samples.jsonl',
      *evaluated,
  ):
    out[rel] = [
        _strip_timings(json.loads(line)) for line in (workdir / rel).read_text().splitlines()
    ]
  for stage in ('sft', 'preference', 'ppo'):
    for f in sorted((workdir / stage / 'export').glob('*.safetensors')):
      out[f'{stage}/export/{f.name}'] = hashlib.sha256(f.read_bytes()).hexdigest()
  for stage in ('sft', 'ppo'):
    rows = [
        json.loads(line) for line in (workdir / stage / 'metrics.jsonl').read_text().splitlines()
    ]
    out[f'{stage}/metrics.jsonl'] = [_strip_timings(r) for r in rows]
  out['evaluate/summary.json'] = _strip_timings(
      json.loads((workdir / 'evaluate' / 'summary.json').read_text())
  )
  return out


def test_kill_9_anywhere_then_rerun_gives_the_same_final_artifacts(tmp_path):
  reference, interrupted = tmp_path / 'reference', tmp_path / 'interrupted'
  run_to_end(reference)
  for stage in KILL_POINTS:
    run_and_kill(interrupted, stage)
  run_to_end(interrupted)

  expected, got = artifacts(reference), artifacts(interrupted)
  assert got.keys() == expected.keys()
  for key in expected:
    assert got[key] == expected[key], key
  assert (interrupted / 'evaluate' / 'report.md').exists()
  # Each metrics file has one row per step: the reruns neither lost nor repeated a step.
  for stage in ('sft', 'ppo'):
    steps = [r['step'] for r in got[f'{stage}/metrics.jsonl']]
    assert steps == list(range(1, len(steps) + 1)), (stage, steps)
