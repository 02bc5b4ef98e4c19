"""The one error of the pipeline's own making, below everything that raises it."""


class StageError(RuntimeError):
  """A pipeline-level problem (bad stage name, missing upstream, mixed configs)."""
