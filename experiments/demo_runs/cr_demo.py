"""Runs stage critique_revision of the demo config (SmolLM2-135M on CPU) and shows its output.

  python experiments/demo_runs/cr_demo.py [WORKDIR] [--config.field=value ...]

Prints the wall and CPU time of the run, the stage summary and the first two records of
samples.jsonl. WORKDIR defaults to /tmp/demo_cr and is wiped first, so the timing is that of
a fresh run (compilation included).
"""

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv):
  workdir = Path(argv[0]) if argv and not argv[0].startswith('--') else Path('/tmp/demo_cr')
  overrides = [a for a in argv if a.startswith('--')]
  shutil.rmtree(workdir, ignore_errors=True)
  t0 = time.time()
  subprocess.run(
      [
          sys.executable,
          '-m',
          'cai_jax.main',
          '--config',
          'configs/demo.py',
          '--workdir',
          str(workdir),
          '--config.stages=critique_revision',
          *overrides,
      ],
      cwd=REPO,
      check=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  wall = time.time() - t0
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  stage_dir = workdir / 'critique_revision'
  done = json.loads((stage_dir / 'DONE.json').read_text())
  cpu = usage.ru_utime + usage.ru_stime
  print(
      f'\nwall {wall:.1f}s (stage {done["seconds"]:.1f}s), CPU {cpu:.1f}s, '
      f'load average {os.getloadavg()[0]:.1f}'
  )
  print(json.dumps(done['summary'], indent=1))
  for line in (stage_dir / 'samples.jsonl').read_text().splitlines()[:2]:
    print(json.dumps(json.loads(line), indent=1, ensure_ascii=False))


if __name__ == '__main__':
  main(sys.argv[1:])
