"""Runs `python -m cai_jax.main ARGS...` and kill -9s itself right after PPO step N's metrics.

  python tests/scripts/ppo_kill_run.py N C --config configs/ppo_toy.py --workdir W ...

Used by tests/test_ppo.py: the process dies by SIGKILL (no cleanup, no atexit) once step N is
logged, after waiting (up to 120 s) for the orbax checkpoint of step C to be finalized in
W/ppo/checkpoints (C = 0: no wait), so the test knows which checkpoint a rerun must resume
from. Steps after C are logged but unsaved when the process dies.
"""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absl import app  # noqa: E402

from cai_jax import main  # noqa: E402
from cai_jax.training import metrics as metrics_lib


def _write_then_die(kill_at: int, checkpoint: Path | None):
  write = metrics_lib.MetricsWriter.write

  def wrapped(self, step, metrics):
    write(self, step, metrics)
    if step >= kill_at:
      deadline = time.time() + 120
      while checkpoint is not None and not checkpoint.is_dir() and time.time() < deadline:
        time.sleep(0.1)
      os.kill(os.getpid(), signal.SIGKILL)

  return wrapped


if __name__ == '__main__':
  kill_at, wait_for, args = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
  workdir = Path(args[args.index('--workdir') + 1])
  checkpoint = workdir / 'ppo' / 'checkpoints' / str(wait_for) if wait_for else None
  metrics_lib.MetricsWriter.write = _write_then_die(kill_at, checkpoint)
  app.run(main.main, argv=[sys.argv[0]] + args)
