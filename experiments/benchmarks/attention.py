"""Dense vs blockwise attention (cai_jax/models/attention.py) on this machine's backend: what `auto`
picks on CPU.

SmolLM2-135M's attention shape (9 query heads in 3 KV groups, head dim 64, float32), causal with
left padding, at a few (T, S): the forward as prefill and scoring run it (T = S, no cache; and a
cache continuation, T << S), and forward + backward as training runs it. Both implementations
are jitted and warmed, then timed alternately in the same run (median of --repeats), so the
ratio holds on a loaded machine even where the seconds do not; process CPU seconds are printed
as the check.

  python experiments/benchmarks/attention.py [--batch 4] [--repeats 5] [--block 512]
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from cai_jax.models import attention  # noqa: E402

SHAPES = [(256, 256), (512, 512), (1024, 1024), (2048, 2048), (64, 1344)]  # (T, S)


def _inputs(b, t, s, kh=3, g=3, h=64):
  ks = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(ks[0], (b, t, kh, g, h)) * h**-0.5
  k = jax.random.normal(ks[1], (b, kh, s, h))
  v = jax.random.normal(ks[2], (b, kh, s, h))
  key_mask = jnp.arange(s)[None] >= (jnp.arange(b) * 37)[:, None]  # left padding
  return q, k, v, attention.own_slots_mask(t, key_mask, s - t, None)


def _time(fns, args, repeats):
  """Median wall and CPU seconds of each of `fns`, warmed, then run in turn `repeats` times."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm
  wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      w0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall[name].append(time.perf_counter() - w0)
      cpu[name].append(time.process_time() - c0)
  return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--block', type=int, default=attention.BLOCK)
  args = parser.parse_args()
  print(f'backend {jax.default_backend()}, batch {args.batch}, block {args.block}, float32')
  print(f'{"T":>5} {"S":>5} {"pass":>8} {"dense s":>9} {"blockwise s":>12} {"dense/blockwise":>16}')
  for t, s in SHAPES:
    q, k, v, mask = _inputs(args.batch, t, s)
    impls = {
        'dense': lambda q, k, v: attention.dense(q, k, v, mask),
        'blockwise': lambda q, k, v: attention.blockwise(q, k, v, mask, block=args.block),
    }
    passes = {'forward': lambda f: f}
    if t == s:
      passes['fwd+bwd'] = lambda f: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), (0, 1, 2))
    for name, wrap in passes.items():
      fns = {i: jax.jit(wrap(f)) for i, f in impls.items()}
      times = _time(fns, (q, k, v), args.repeats)
      (dw, dc), (bw, bc) = times['dense'], times['blockwise']
      print(
          f'{t:>5} {s:>5} {name:>8} {dw:>9.4f} {bw:>12.4f} {dw / bw:>16.2f}'
          f'   (cpu s {dc:.3f} / {bc:.3f})',
          flush=True,
      )


if __name__ == '__main__':
  main()
