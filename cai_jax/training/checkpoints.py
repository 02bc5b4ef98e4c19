"""Orbax checkpoints of a train state, with automatic resume: `Checkpointer` keeps the last ones
of a run under its stage directory and restores the latest on restart."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from cai_jax.training.metrics import raise_background_io_error
from cai_jax.training.train_lib import abstract_state

# ---- checkpoints ----------------------------------------------------------------------------------


class Checkpointer:
  """orbax CheckpointManager with resume: `restore_latest` reads the newest finished checkpoint."""

  def __init__(
      self, directory: str | Path, *, save_every: int, max_to_keep: int, async_save: bool = True
  ):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.save_every = max(1, int(save_every))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max(1, int(max_to_keep)),
        save_interval_steps=max(1, int(save_every)),
        create=True,
        enable_async_checkpointing=async_save,
    )
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, like, shardings=None):
    """The newest checkpoint restored into the layout of `like` (a state or its abstract form), or None."""
    step = self.manager.latest_step()
    if step is None:
      return None
    target = abstract_state(like, shardings)
    return self.manager.restore(step, args=self._ocp.args.StandardRestore(target))

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Saves if `step` is a multiple of `save_every` (or forced); returns whether it saved.

    Every call also surfaces a failure of the previous background save (a full disk) at once,
    rather than at the next save.
    """
    with self._os_errors():
      raise_background_io_error()
      self.manager.check_for_errors()
      if (step % self.save_every and not force) or self.manager.latest_step() == step:
        return False
      return self.manager.save(step, args=self._ocp.args.StandardSave(state), force=force)

  def close(self) -> None:
    with self._os_errors():
      self.manager.wait_until_finished()
      self.manager.close()

  @contextlib.contextmanager
  def _os_errors(self):
    """orbax reports a failed write (a full disk, say) from its background threads as a
    ValueError carrying `os_error_code='N'`; it becomes the OSError it is, naming the directory,
    so the entry point reports it in one line."""
    try:
      yield
    except (ValueError, RuntimeError) as e:
      code = re.search(r"os_error_code='(\d+)'", str(e))
      if code is None:
        raise
      raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(self.directory)) from e
