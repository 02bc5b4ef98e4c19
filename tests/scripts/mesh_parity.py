"""The tiny model under several meshes of 8 fake CPU devices: logits, SFT losses, grad norms and
every array's layout. Run by tests/test_sharding.py (the device count is fixed at jax import).

  python tests/scripts/mesh_parity.py '(8,1,1)' '(2,2,2)' ...   -> one JSON line on stdout
"""

import ast
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

from cai_jax import bookkeeping, pipeline  # noqa: E402
from cai_jax.models import decoder as model_lib  # noqa: E402
from cai_jax.models.decoder import ModelConfig  # noqa: E402
from cai_jax.stages import sft  # noqa: E402
from cai_jax.training import train_lib  # noqa: E402
from cai_jax.utils import sharding  # noqa: E402
from configs import tiny  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import batches  # noqa: E402


def layout_errors(tree, what, mesh):
  """Every nnx.Variable in `tree` whose array is not laid out as the logical-axis rules say."""
  errors = []
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]
  for path, v in leaves:
    if not isinstance(v, nnx.Variable):
      continue
    x = v.get_value()
    want = sharding.logical_to_spec(sharding.variable_names(v), x.shape)
    got = x.sharding.spec
    pad = lambda s: tuple(s) + (None,) * (x.ndim - len(s))
    if pad(got) != pad(want) or not x.sharding.is_equivalent_to(NamedSharding(mesh, want), x.ndim):
      errors.append(f'{what}{jax.tree_util.keystr(path)}: {got} != {want}')
  return errors


def run_mesh(shape, config):
  mesh = sharding.make_mesh(shape, jax.devices()[: math.prod(shape)])
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model = model_lib.create(
        ModelConfig.tiny(), seed=0
    )  # = load_pretrained('random:tiny'), minus its tokenizer
    data = [sharding.global_batch(b) for b in batches()]
    logits, _ = jax.jit(lambda m, t: m(t))(model, data[0]['tokens'])
    tx, schedule = train_lib.make_optimizer(config.sft.optimizer, 10)
    graphdef, state, shardings = train_lib.init_state(model, tx)
    errors = layout_errors(nnx.state(model), 'params', mesh)
    errors += layout_errors(state.params, 'state.params', mesh)
    errors += layout_errors(state.opt_state, 'opt_state', mesh)
    n_moments = sum(
        isinstance(v, nnx.Variable)
        for v in jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    )
    step = train_lib.make_train_step(graphdef, tx, sft.make_loss_fn(0), shardings, schedule)
    losses, grad_norms = [], []
    for b in data:
      state, m = step(state, b)
      m = train_lib.host_metrics(m)
      losses.append(m['loss'])
      grad_norms.append(m['grad_norm'])
    errors += layout_errors(state.params, 'trained.params', mesh)
    errors += layout_errors(state.opt_state, 'trained.opt_state', mesh)
    spec_names = sorted(
        {
            str(v.get_value().sharding.spec)
            for v in jax.tree.leaves(state.params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        }
    )
    # A global batch that the batch axes do not divide is refused before any work, by name.
    config.sft.batch_size = 6
    try:
      sft.run(pipeline.context(config, Path('/nonexistent')), None)
      batch_error = ''
    except (
        sharding.ShardingError,
        bookkeeping.StageError,
    ) as e:  # StageError: no upstream (batch is fine)
      batch_error = f'{type(e).__name__}: {e}'
    config.sft.batch_size = 8
  return {
      'logits': np.asarray(logits).astype(float).ravel()[::97].tolist(),
      'losses': losses,
      'grad_norms': grad_norms,
      'layout_errors': errors,
      'n_moments': n_moments,
      'specs': spec_names,
      'batch_error': batch_error,
  }


def main():
  config = tiny.get_config()
  out = {}
  for arg in sys.argv[1:]:
    t0 = time.time()
    out[arg] = run_mesh(ast.literal_eval(arg), config)
    print(f'mesh {arg}: {time.time() - t0:.1f} s', file=sys.stderr)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
