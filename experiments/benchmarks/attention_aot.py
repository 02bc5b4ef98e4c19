"""One training attention (forward + backward) AOT-compiled for a TPU topology by each
implementation of cai_jax/models/attention.py: the temporaries libtpu plans for it, without a TPU.

Gemma 2 2B's attention (8 query heads in 4 KV groups, head dim 256, logit soft-cap 50), causal
with left padding, bfloat16, the batch split over the topology's chips by the default rules
(batch over data x fsdp): what the SFT and PM steps run per layer.

  python experiments/benchmarks/attention_aot.py [--topology v5e:2x4] [--batch 32] [--seq 2048]
"""

import os

os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from cai_jax.models import attention  # noqa: E402
from cai_jax.utils import sharding  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--topology', default='v5e:2x4')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=2048)
  parser.add_argument('--impls', default='dense,blockwise,splash')
  args = parser.parse_args()
  devices = topologies.get_topology_desc(topology_name=args.topology, platform='tpu').devices
  mesh = sharding.make_mesh((-1, 1, 1), devices)
  b, t, kh, g, h = args.batch, args.seq, 4, 2, 256
  rows = NamedSharding(mesh, P(('data', 'fsdp')))
  shapes = dict(
      q=jax.ShapeDtypeStruct((b, t, kh, g, h), jnp.bfloat16, sharding=rows),
      k=jax.ShapeDtypeStruct((b, kh, t, h), jnp.bfloat16, sharding=rows),
      v=jax.ShapeDtypeStruct((b, kh, t, h), jnp.bfloat16, sharding=rows),
      key_mask=jax.ShapeDtypeStruct((b, t), jnp.bool_, sharding=rows),
  )
  print(f'{args.topology}: batch {b} over {len(devices)} chips, {t} tokens, Gemma 2 2B heads, bf16')
  print(f'{"attention":>10} {"temporaries MiB":>16} {"compile s":>10}')
  for impl in args.impls.split(','):

    def loss(q, k, v, key_mask, impl=impl):
      mask = attention.own_slots_mask(t, key_mask, 0, None)
      out = attention.attend(impl, q, k, v, mask, softcap=50.0)
      return jnp.sum(out.astype(jnp.float32) ** 2)

    with sharding.use_mesh(mesh):
      t0 = time.time()
      compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*shapes.values()).compile()
      seconds = time.time() - t0
    temp = compiled.memory_analysis().temp_size_in_bytes
    print(f'{impl:>10} {temp / 2**20:>16.1f} {seconds:>10.1f}', flush=True)


if __name__ == '__main__':
  main()
