"""Runs `python -m cai_jax.main ARGS...` and kill -9s itself halfway through writing chunk N.

  python tests/scripts/fb_kill_run.py N --config configs/tiny.py --workdir W ...
  python tests/scripts/fb_kill_run.py write:N ...  # right after the Nth whole JSONL file
                                                    # (records.write_jsonl: evaluate's outputs)

Used by tests/test_feedback.py: the process dies by SIGKILL (no cleanup, no atexit) after the
first N - 1 chunks were appended and fsynced and half of chunk N's text reached the file, which
is the worst case a resumed run must repair (a torn last line).
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from absl import app  # noqa: E402

from cai_jax import main  # noqa: E402
from cai_jax.utils import records  # noqa: E402


def _append_then_die(kill_at: int):
  calls = [0]
  append = records._append

  def wrapped(f, chunk_records):
    calls[0] += 1
    if calls[0] < kill_at:
      return append(f, chunk_records)
    text = records.dumps(chunk_records)
    f.write(text[: len(text) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

  return wrapped


def _write_then_die(kill_after: int):
  calls = [0]
  write = records.write_jsonl

  def wrapped(path, chunk_records):
    write(path, chunk_records)
    calls[0] += 1
    if calls[0] >= kill_after:
      os.kill(os.getpid(), signal.SIGKILL)

  return wrapped


if __name__ == '__main__':
  if sys.argv[1].startswith('write:'):
    records.write_jsonl = _write_then_die(int(sys.argv[1].split(':')[1]))
  else:
    records._append = _append_then_die(int(sys.argv[1]))
  app.run(main.main, argv=[sys.argv[0]] + sys.argv[2:])
