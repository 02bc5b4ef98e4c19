"""What a run reports: metrics as JSONL (`metrics.jsonl`) plus TensorBoard scalars
(`MetricsWriter`, resumable), their reader, the progress bar and one-line announcements; and the
OSErrors that kill a background writer thread (a full disk), raised in the main thread."""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
from pathlib import Path
from typing import Any

import jax

# ---- I/O errors in background threads ----------------------------------------------------------

# tensorboardX writes events from a thread: when the disk fills, that thread dies with an
# OSError and the next add_scalar blocks forever on its full queue (a run that hangs). Every
# OSError that kills a background thread is kept here and raised in the main thread instead.
_BACKGROUND_IO_ERRORS: list[OSError] = []
_previous_excepthook = threading.excepthook


def _keep_io_errors(args) -> None:
  if isinstance(args.exc_value, OSError):
    _BACKGROUND_IO_ERRORS.append(args.exc_value)
  _previous_excepthook(args)


threading.excepthook = _keep_io_errors


def raise_background_io_error() -> None:
  """Raises the first OSError that ended a background writer thread, if any."""
  if _BACKGROUND_IO_ERRORS:
    raise _BACKGROUND_IO_ERRORS[0]


# ---- metrics --------------------------------------------------------------------------------------


class MetricsWriter:
  """One JSON object per line in `metrics.jsonl` plus TensorBoard scalars; process 0 writes.

  Resuming at `resume_step` drops the lines (and TensorBoard events) of later steps that the
  interrupted run had written past its last checkpoint, so the log reads as one run.
  """

  def __init__(
      self,
      directory: str | Path,
      *,
      resume_step: int = 0,
      filename: str = 'metrics.jsonl',
      tensorboard: bool = True,
  ):
    self.enabled = jax.process_index() == 0
    self.path = Path(directory) / filename
    self._tb = None
    if not self.enabled:
      return
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if self.path.exists():
      kept = [
          line
          for line in self.path.read_text().splitlines()
          if line.strip() and _line_step(line) <= resume_step
      ]
      self.path.write_text(''.join(line + '\n' for line in kept))
    self._file = self.path.open('a')
    if tensorboard:
      from tensorboardX import SummaryWriter

      self._tb = SummaryWriter(
          str(Path(directory) / 'tb'), purge_step=resume_step + 1 if resume_step else None
      )

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    raise_background_io_error()
    row = {'step': int(step), **metrics}
    self._file.write(json.dumps(row) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None and not _BACKGROUND_IO_ERRORS:  # a dead writer thread never drains
      self._tb.close()


def _line_step(line: str) -> float:
  try:
    return json.loads(line).get('step', math.inf)
  except ValueError:  # a line cut short by a kill
    return math.inf


def read_metrics(path: str | Path) -> list[dict]:
  """The rows of a metrics.jsonl (a line cut short by a kill or still being written is skipped)."""
  path = Path(path)
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except ValueError:
      continue
  return rows


def announce(message: str) -> None:
  """A line worth the console (a resume, say): stderr on process 0, and the log."""
  logging.getLogger('cai_jax').info(message)
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def progress(total: int, initial: int = 0, desc: str = ''):
  """A tqdm bar on process 0 (a silent one elsewhere)."""
  from tqdm.auto import tqdm

  return tqdm(
      total=total,
      initial=initial,
      desc=desc,
      disable=jax.process_index() != 0,
      dynamic_ncols=True,
      mininterval=1.0,
  )
