"""The pipeline's stages, one module per step of the paper (Bai et al. 2022, figure 1).

Each module is a short story of its step: `run(ctx, stage_dir)`, `check_config(config)`, and what
it reads: `READS` (upstream stages), `MODELS` (the given models it loads), `OPTIONAL` (stages it
reads when they finished), `inputs(config)` (the files it hashes into its fingerprint). The table
that orders them is `cai_jax/pipeline.py`. A stage never imports another stage: what two stages
share lives in `cai_jax/method/` or `cai_jax/evaluation/`.
"""

# The names of the old cai_jax/stages.py (the bookkeeping, now cai_jax/bookkeeping.py), read
# through this folder for one release with a DeprecationWarning. A Context is now made by
# `pipeline.context(config, workdir)`, which hands it the stage table.
_BOOKKEEPING = (
    'Context',
    'GIVEN_ROLES',
    'GLOBAL_FIELDS',
    'LOCK_FILE',
    'MODEL_ROLES',
    'RENAMED_ROLES',
    'StageError',
    'TRASH',
    'barrier',
    'claim',
    'diff_fields',
    'frozen_param_dtype',
    'input_fingerprints',
    'mark_done',
    'move_to_trash',
    'optional_upstream',
    'reusable',
    'role_description',
    'role_field',
    'role_source',
    'roles_line',
    'workdir_lock',
)


def __getattr__(name):
  if name not in _BOOKKEEPING:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  import warnings

  # On use only, for the old names: the stages themselves import cai_jax.bookkeeping directly.
  from cai_jax import bookkeeping

  warnings.warn(
      f'cai_jax.stages.{name} moved to cai_jax.bookkeeping.{name}; the old path goes away in '
      'the next release',
      DeprecationWarning,
      stacklevel=2,
  )
  return getattr(bookkeeping, name)
