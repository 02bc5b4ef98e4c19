"""Per-device parameter (and AdamW state) bytes of SmolLM2-135M under fsdp=8 vs fsdp=1.

Nothing is allocated: the model and its optimizer state are abstract (jax.eval_shape) and laid
out by the logical-axis rules on 8 fake CPU devices.

  python experiments/benchmarks/param_bytes.py
"""

import os
import sys

os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from cai_jax.models.decoder import Decoder, ModelConfig  # noqa: E402
from cai_jax.training import train_lib  # noqa: E402
from cai_jax.utils import sharding  # noqa: E402


def abstract_bytes(mesh_shape, cfg: ModelConfig) -> dict[str, int]:
  mesh = sharding.make_mesh(mesh_shape)
  with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
    params = jax.eval_shape(lambda: nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    tx = optax.adamw(1e-4)
    opt = jax.eval_shape(tx.init, params)
    place = lambda tree: jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        tree,
        train_lib.shardings_of(tree),
    )
    return {
        'params': sharding.per_device_bytes(place(params))['max'],
        'params+adam': sharding.per_device_bytes(place((params, opt)))['max'],
    }


def main():
  cfg = ModelConfig.smollm2_135m()
  total = cfg.num_params() * jnp.dtype(cfg.param_dtype).itemsize
  print(
      f'SmolLM2-135M: {cfg.num_params() / 1e6:.1f}M params, {total / 2**20:.1f} MiB in {cfg.param_dtype}'
  )
  rows = {}
  for name, shape in (('fsdp=1', (8, 1, 1)), ('fsdp=8', (1, 8, 1))):
    rows[name] = abstract_bytes(shape, cfg)
    print(
        f'{name:7s} mesh {shape}: per-device params {rows[name]["params"] / 2**20:8.2f} MiB, '
        f'params + AdamW state {rows[name]["params+adam"] / 2**20:8.2f} MiB'
    )
  ratio = rows['fsdp=1']['params'] / rows['fsdp=8']['params']
  print(f'per-device parameter bytes fsdp=1 / fsdp=8: {ratio:.2f}x')


if __name__ == '__main__':
  main()
