"""cai_jax: Constitutional AI (Bai et al. 2022) in JAX/Flax NNX.

`cai_jax.load_pretrained` / `cai_jax.save_pretrained` are the model entry points; the pipeline
runs through `python -m cai_jax.main`. Submodules import lazily so `import cai_jax` stays cheap.
"""

__all__ = ['load_pretrained', 'save_pretrained', 'Pretrained']


def __getattr__(name):
  if name in __all__:
    from cai_jax.models import checkpoint  # lazily: `import cai_jax` stays cheap

    return getattr(checkpoint, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
