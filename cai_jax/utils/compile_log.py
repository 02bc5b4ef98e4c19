"""Which programs a process compiles: each jitted function's name and argument shapes, read from
jax's own compile log, so that `python -m cai_jax.aot` can be checked against what a pipeline run
actually compiles (tests/test_aot.py).

A program is keyed by jax's module name (`jit(_prefill)`, `jit(step)`) and its flattened
argument types (`float32[64,512]`). Only functions defined in this package count: jax's own
(eager `jnp` operations, `jax.random` on the host) are not the stages' programs.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import logging
from pathlib import Path

import jax

_LOGGER = 'jax._src.interpreters.pxla'
_QUIET = ('jax._src.dispatch',)  # with jax_log_compiles it logs every trace at WARNING
_MESSAGE = 'Compiling %s with global shapes and types'


@functools.cache
def package_functions() -> frozenset[str]:
  """Names of the functions (and lambdas) defined in cai_jax's source."""
  names = {'<lambda>'}
  for path in Path(__file__).resolve().parents[1].rglob('*.py'):  # the cai_jax package
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        names.add(node.name)
  return frozenset(names)


def aval_text(aval) -> str:
  """'float32[64,512]' (shape and dtype only: weak types and shardings are not the program's
  size)."""
  return f'{aval.dtype}[{",".join(str(d) for d in aval.shape)}]'


class _Recorder(logging.Handler):

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.programs: list[tuple[str, tuple[str, ...]]] = []

  def emit(self, record):
    if not isinstance(record.msg, str) or not record.msg.startswith(_MESSAGE):
      return
    name, avals = str(record.args[0]), record.args[1]
    if not (name.startswith('jit(') and name[4:-1] in package_functions()):
      return
    self.programs.append((name, tuple(aval_text(a) for a in avals)))


@contextlib.contextmanager
def record():
  """Yields the list that every (name, argument types) lowered meanwhile is appended to (also by
  `.lower()`, which is how cai_jax.aot builds its programs)."""
  recorder, silent = _Recorder(), logging.NullHandler()
  loggers = [logging.getLogger(n) for n in (_LOGGER, *_QUIET)]
  saved = [(x.level, x.propagate) for x in loggers]
  old_flag = jax.config.jax_log_compiles
  # jax logs each lowering at WARNING with jax_log_compiles; kept off the console here.
  jax.config.update('jax_log_compiles', True)
  for x, handler in zip(loggers, [recorder] + [silent] * len(_QUIET)):
    x.addHandler(handler)
    x.setLevel(logging.WARNING)
    x.propagate = False
  try:
    yield recorder.programs
  finally:
    for x, handler, (level, propagate) in zip(loggers, [recorder] + [silent] * len(_QUIET), saved):
      x.removeHandler(handler)
      x.setLevel(level)
      x.propagate = propagate
    jax.config.update('jax_log_compiles', old_flag)


def covers(big: tuple[str, ...], small: tuple[str, ...]) -> bool:
  """Whether argument types `big` hold `small`: the same dtypes and ranks, every dimension at
  least as large (a larger bucket of the same program)."""
  if len(big) != len(small):
    return False
  for b, s in zip(big, small):
    b_dtype, b_shape = b[:-1].split('[')
    s_dtype, s_shape = s[:-1].split('[')
    b_dims = [int(d) for d in b_shape.split(',') if d]
    s_dims = [int(d) for d in s_shape.split(',') if d]
    if b_dtype != s_dtype or len(b_dims) != len(s_dims):
      return False
    if any(x < y for x, y in zip(b_dims, s_dims)):
      return False
  return True


def missing(compiled, checked) -> list[tuple[str, tuple[str, ...]]]:
  """The programs in `compiled` that no program of the same name in `checked` covers."""
  by_name: dict[str, list] = {}
  for name, avals in checked:
    by_name.setdefault(name, []).append(avals)
  out = []
  for name, avals in dict.fromkeys(compiled):
    if not any(covers(big, avals) for big in by_name.get(name, [])):
      out.append((name, avals))
  return out
