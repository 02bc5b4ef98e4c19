"""The tiny pipeline with `model.attention=auto` against `dense`: same losses, same samples.

Runs `python -m cai_jax.main --config configs/tiny.py` twice in fresh workdirs (auto first, then
dense; on a CPU `auto` runs blockwise attention for passes of 256 queries or more, dense below),
then prints, per training stage, the largest difference between the two runs' loss columns at
the same step, whether each generated-data file is byte-identical, and the pipelines' wall
seconds (timed in turn in one run, on one machine: only their ratio is a figure).

  python experiments/benchmarks/attention_pipeline.py [--workdir=DIR] [overrides...]

Extra arguments are passed to both runs as config overrides (e.g. --config.model.dtype=bfloat16).
Ends with exactly:
  max |auto - dense| loss: X.XXe-XX
  dense / auto pipeline seconds: X.XX
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from cai_jax.training.metrics import read_metrics  # noqa: E402

TRAINING = ('sft', 'preference', 'ppo', 'dpo', 'evaluation_pm', 'harmfulness')
GENERATED = (
    'critique_revision/samples.jsonl',
    'critique_revision/helpful.jsonl',
    'feedback/samples.jsonl',
)


def run(workdir: Path, attention: str, overrides: list[str]) -> float:
  cmd = [
      sys.executable,
      '-m',
      'cai_jax.main',
      '--config',
      str(REPO / 'configs' / 'tiny.py'),
      '--workdir',
      str(workdir),
      f'--config.model.attention={attention}',
      *overrides,
  ]
  start = time.perf_counter()
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
  if proc.returncode != 0:
    sys.exit(f'attention={attention} failed:\n{proc.stderr[-3000:]}')
  return time.perf_counter() - start


def main(argv: list[str]) -> None:
  workdir = next((a.split('=', 1)[1] for a in argv if a.startswith('--workdir=')), None)
  overrides = [a for a in argv if not a.startswith('--workdir=')]
  root = Path(workdir or tempfile.mkdtemp(prefix='attention_pipeline_'))
  seconds = {a: run(root / a, a, overrides) for a in ('auto', 'dense')}
  worst = 0.0
  for stage in TRAINING:
    path_a, path_d = (
        root / 'auto' / stage / 'metrics.jsonl',
        root / 'dense' / stage / 'metrics.jsonl',
    )
    if not path_a.exists():
      continue
    ra, rd = read_metrics(path_a), read_metrics(path_d)
    assert len(ra) == len(rd), (stage, len(ra), len(rd))
    keys = sorted(k for k in ra[0] if 'loss' in k)
    diff = max(abs(a[k] - d[k]) for a, d in zip(ra, rd) for k in keys)
    worst = max(worst, diff)
    print(f'{stage}: {len(ra)} steps, {", ".join(keys)}: max |auto - dense| {diff:.2e}')
  for rel in GENERATED:
    same = (root / 'auto' / rel).read_bytes() == (root / 'dense' / rel).read_bytes()
    print(f'{rel}: {"identical" if same else "DIFFERENT"}')
  print(f'seconds: auto {seconds["auto"]:.1f}, dense {seconds["dense"]:.1f} ({root})')
  print(f'max |auto - dense| loss: {worst:.2e}')
  print(f'dense / auto pipeline seconds: {seconds["dense"] / seconds["auto"]:.2f}')


if __name__ == '__main__':
  main(sys.argv[1:])
