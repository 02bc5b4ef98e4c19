"""cai_jax: Constitutional AI (Bai et al. 2022) in JAX/Flax NNX.

`cai_jax.load_pretrained` / `cai_jax.save_pretrained` are the model entry points; the pipeline
runs through `python -m cai_jax.main`. Submodules import lazily so `import cai_jax` stays cheap.
The floor plan (which folder holds what, and which way imports flow) is docs/DESIGN.md.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

__all__ = ['load_pretrained', 'save_pretrained', 'Pretrained']


def __getattr__(name):
  if name in __all__:
    from cai_jax.models import checkpoint  # lazily: `import cai_jax` stays cheap

    return getattr(checkpoint, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


# ---- old module paths, kept for one release ----------------------------------------------------
# Before the folders by role, every module sat in cai_jax/. `import cai_jax.<old>` still works:
# it warns (DeprecationWarning) with the new home and gives a module that reads its names there,
# then in the modules that took over the names it shared with other stages. Nothing in cai_jax
# imports an old path (tests/test_layout.py); cai_jax.stages is now the stages' folder, and the
# names of the old cai_jax/stages.py are read through it from cai_jax.bookkeeping.
MOVED = {
    'model': ('models.decoder',),
    'attention': ('models.attention',),
    'hf_format': ('models.hf_format',),
    'gguf_import': ('models.gguf_import',),
    'checkpoint': ('models.checkpoint',),
    'train_lib': (
        'training.train_lib',
        'training.loop',
        'training.checkpoints',
        'training.metrics',
    ),
    'sharding': ('utils.sharding',),
    'records': ('utils.records',),
    'wheel_data': ('utils.wheel_data',),
    'memory': ('utils.memory',),
    'compile_log': ('utils.compile_log',),
    'constitution': ('method.constitution', 'method.prompts'),
    'conversation': ('method.conversation',),
    'labels': ('method.labels',),
    'rl': ('method.rl',),
    'elo': ('method.elo',),
    'data': ('method.data', 'utils.sharding'),
    'critique_revision': ('stages.critique_revision',),
    'sft': ('stages.sft', 'method.examples'),
    'feedback': ('stages.feedback', 'method.labeler'),
    'evaluate_feedback': ('stages.evaluate_feedback', 'method.labeler', 'evaluation.appendix'),
    'preference': ('stages.preference', 'method.comparisons', 'method.preference_model'),
    'evaluation_pm': ('stages.evaluation_pm',),
    'harmfulness': ('stages.harmfulness',),
    'ppo': ('stages.ppo', 'method.ppo_learner', 'method.snapshots'),
    'dpo': ('stages.dpo',),
    'evaluate': ('stages.evaluate', 'evaluation.scores', 'evaluation.judge', 'evaluation.report'),
}


class _Moved(types.ModuleType):
  """An old module path: its names, read from their new homes in order."""

  def __getattr__(self, name):
    for home in self.__dict__.get('_homes', ()):
      if hasattr(home, name):
        return getattr(home, name)
    raise AttributeError(f'module {self.__name__!r} has no attribute {name!r}')


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Finds `cai_jax.<old>` (after every other finder: a real module always wins)."""

  def find_spec(self, fullname, path=None, target=None):
    if fullname.startswith('cai_jax.') and fullname[len('cai_jax.') :] in MOVED:
      return importlib.util.spec_from_loader(fullname, self)
    return None

  def create_module(self, spec):
    return _Moved(spec.name)

  def exec_module(self, module):
    homes = [f'cai_jax.{m}' for m in MOVED[module.__name__[len('cai_jax.') :]]]
    warnings.warn(
        f'{module.__name__} moved to {homes[0]}'
        + (f' (and {", ".join(homes[1:])})' if homes[1:] else '')
        + '; the old path goes away in the next release',
        DeprecationWarning,
        stacklevel=2,
    )
    module._homes = [importlib.import_module(h) for h in homes]


if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
  # Right after the path finder (a real module always wins), before an editable install's
  # finder, which would otherwise serve an old file of another checkout.
  _at = next(
      (i + 1 for i, f in enumerate(sys.meta_path) if f is importlib.machinery.PathFinder),
      len(sys.meta_path),
  )
  sys.meta_path.insert(_at, _MovedFinder())
