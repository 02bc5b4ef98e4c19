"""Training throughput of our jitted SFT step vs the same step in PyTorch (transformers).

Both train SmolLM2-135M-Instruct (float32, the same weights) on the same batch with the same
update (loss on target tokens, global-norm clipping, AdamW), on the same machine in the same
run, one after the other (so that peak memory is one model's). Warmup steps (compilation) are
excluded; process CPU time per step is printed too, as a check when other processes load the
machine. MFU-style figure: 6 x params x tokens/s over the matmul FLOP/s
measured in this run.

With --breakdown, each framework's step is also split into its forward pass (the loss alone,
timed by itself), the backward pass (loss and gradients, less the forward) and the rest (clipping
and the optimizer update), with the forward's FLOP/s as a share of the measured matmul rate.

  python experiments/benchmarks/sft.py [--batch 8] [--seq 256] [--steps 4] [--loss_chunk 0]
      [--breakdown]
"""

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402
import numpy as np  # noqa: E402

from cai_jax.models import checkpoint  # noqa: E402
from cai_jax.stages import sft  # noqa: E402
from cai_jax.training import train_lib  # noqa: E402
from cai_jax.utils import sharding, wheel_data  # noqa: E402

# Compiling the 30-layer step takes minutes on a small CPU; keep it for the next run (as the tests do).
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
  jax.config.update('jax_compilation_cache_dir', str(wheel_data.cache_root() / 'jax'))

OPTIMIZER = ml_collections.ConfigDict(
    dict(
        learning_rate=1e-5,
        warmup_steps=0,
        schedule='constant',
        weight_decay=0.01,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=1.0,
    )
)


def make_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens; the first quarter of each row is the prompt, the rest the target."""
  rng = np.random.RandomState(seed)
  tokens = rng.randint(0, vocab, (batch, seq)).astype(np.int32)
  loss_mask = np.zeros_like(tokens)
  loss_mask[:, seq // 4 :] = 1
  return {'tokens': tokens, 'loss_mask': loss_mask}


def matmul_flops(n: int = 2048, reps: int = 5) -> dict[str, float]:
  """FLOP/s of an n x n float32 matmul in XLA and in torch (best of reps)."""
  import torch

  a = jnp.asarray(np.random.RandomState(0).randn(n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best_jax = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
  t = torch.randn(n, n)
  torch.mm(t, t)
  best_torch = min(_timed(lambda: torch.mm(t, t)) for _ in range(reps))
  return {'xla': 2 * n**3 / best_jax, 'torch': 2 * n**3 / best_torch}


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


class JaxTrainer:

  def __init__(self, batch: dict, loss_chunk: int):
    self.mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    with sharding.use_mesh(self.mesh, sharding.DEFAULT_RULES):
      self.pretrained = checkpoint.load_pretrained('smollm2-135m')
      tx, schedule = train_lib.make_optimizer(OPTIMIZER, 1000)
      graphdef, self.state, shardings = train_lib.init_state(self.pretrained.model, tx)
      loss_fn = sft.make_loss_fn(loss_chunk)
      self.step_fn = train_lib.make_train_step(graphdef, tx, loss_fn, shardings, schedule)
      self.batch = sharding.global_batch(batch)
      compute = lambda params, batch: loss_fn(nnx.merge(graphdef, params), batch)[0]
      self.forward_fn = jax.jit(compute)
      self.grad_fn = jax.jit(jax.value_and_grad(compute))

  def step(self) -> float:
    with sharding.use_mesh(self.mesh, sharding.DEFAULT_RULES):
      self.state, metrics = self.step_fn(self.state, self.batch)
      return float(metrics['loss'])  # waits for the step

  def forward(self) -> None:
    with sharding.use_mesh(self.mesh, sharding.DEFAULT_RULES):
      jax.block_until_ready(self.forward_fn(self.state.params, self.batch))

  def forward_backward(self) -> None:
    with sharding.use_mesh(self.mesh, sharding.DEFAULT_RULES):
      jax.block_until_ready(self.grad_fn(self.state.params, self.batch))


class TorchTrainer:

  def __init__(self, batch: dict, hf_dir: str):
    import torch
    import transformers

    self.torch = torch
    self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    self.model.train()
    self.opt = torch.optim.AdamW(
        self.model.parameters(),
        lr=OPTIMIZER.learning_rate,
        betas=(OPTIMIZER.b1, OPTIMIZER.b2),
        eps=OPTIMIZER.eps,
        weight_decay=OPTIMIZER.weight_decay,
    )
    self.input_ids = torch.tensor(batch['tokens'], dtype=torch.long)
    self.labels = torch.where(torch.tensor(batch['loss_mask']) > 0, self.input_ids, -100)

  def step(self) -> float:
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(input_ids=self.input_ids, labels=self.labels).loss
    loss.backward()
    self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), OPTIMIZER.grad_clip)
    self.opt.step()
    return float(loss.detach())

  def forward(self) -> None:
    with self.torch.no_grad():
      self.model(input_ids=self.input_ids, labels=self.labels)

  def forward_backward(self) -> None:
    self.model.zero_grad(set_to_none=True)
    self.model(input_ids=self.input_ids, labels=self.labels).loss.backward()


def breakdown(name: str, trainer, step_s: float, steps: int, flops_per_forward: float, peak: float):
  """Prints the step split into forward, backward and the rest (each warmed once, best of
  `steps`)."""
  best = {}
  for part in ('forward', 'forward_backward'):
    fn = getattr(trainer, part)
    fn()
    best[part] = min(_timed(fn) for _ in range(steps))
  fwd, bwd = best['forward'], best['forward_backward'] - best['forward']
  print(
      f'{name:5s} step breakdown: forward {fwd:.2f} s ({flops_per_forward / fwd / peak:.0%} of the '
      f'measured matmul rate), backward {bwd:.2f} s ({bwd / fwd:.1f}x the forward), '
      f'clipping + optimizer {step_s - best["forward_backward"]:.2f} s'
  )


def measure(name: str, trainer, warmup: int, steps: int) -> dict:
  """Median wall and process-CPU seconds per step after `warmup` untimed steps."""
  t0 = time.perf_counter()
  first = trainer.step()
  for _ in range(warmup - 1):
    trainer.step()
  print(
      f'{name}: first loss {first:.4f}; {warmup} warmup step(s) took {time.perf_counter() - t0:.1f} s',
      flush=True,
  )
  wall, cpu = [], []
  for i in range(steps):
    w, c = time.perf_counter(), time.process_time()
    trainer.step()
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
    print(
        f'{name} step {i}: {wall[-1]:.2f} s wall, {cpu[-1]:.2f} s CPU, load {os.getloadavg()[0]:.1f}',
        flush=True,
    )
  return {'wall': statistics.median(wall), 'cpu': statistics.median(cpu), 'first_loss': first}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=256)
  parser.add_argument('--steps', type=int, default=4, help='timed steps per framework')
  parser.add_argument(
      '--warmup', type=int, default=1, help='untimed steps per framework (compilation)'
  )
  parser.add_argument('--loss_chunk', type=int, default=64, help='sft.loss_chunk of our step')
  parser.add_argument(
      '--breakdown', action='store_true', help='also split each step into forward and backward'
  )
  args = parser.parse_args()

  import torch

  torch.set_num_threads(os.cpu_count())
  batch = make_batch(args.batch, args.seq, 49152)
  tokens = args.batch * args.seq
  print(
      f'SmolLM2-135M float32, batch {args.batch} x {args.seq} = {tokens} tokens/step, '
      f'{os.cpu_count()} CPU threads, jax {jax.__version__} ({jax.devices()[0].platform}), '
      f'torch {torch.__version__}, loss_chunk {args.loss_chunk}, load average {os.getloadavg()[0]:.1f}',
      flush=True,
  )

  # One framework at a time, so the peak memory is the larger of the two, not their sum.
  hf_dir = tempfile.mkdtemp(prefix='sft_bench_')
  ours = JaxTrainer(batch, args.loss_chunk)
  cfg = ours.pretrained.config
  checkpoint.save_pretrained(ours.pretrained, hf_dir)  # the same weights for PyTorch
  results = {'jax': measure('jax', ours, args.warmup, args.steps)}
  if args.breakdown:
    peak = max(matmul_flops().values())
    forward_flops = 2 * cfg.num_params() * tokens
    breakdown('jax', ours, results['jax']['wall'], args.steps, forward_flops, peak)
  del ours
  gc.collect()
  jax.clear_caches()
  theirs = TorchTrainer(batch, hf_dir)
  results['torch'] = measure('torch', theirs, args.warmup, args.steps)
  if args.breakdown:
    breakdown('torch', theirs, results['torch']['wall'], args.steps, forward_flops, peak)
  del theirs
  gc.collect()
  shutil.rmtree(hf_dir, ignore_errors=True)

  assert abs(results['jax']['first_loss'] - results['torch']['first_loss']) < 1e-3, results
  peak = matmul_flops()
  peak_flops = max(peak.values())
  print(
      f'matmul 2048^3 float32: xla {peak["xla"] / 1e9:.1f} GFLOP/s, torch {peak["torch"] / 1e9:.1f} GFLOP/s'
  )
  rate = {}
  for name, r in results.items():
    rate[name] = tokens / r['wall']
    mfu = 6 * cfg.num_params() * rate[name] / peak_flops
    print(
        f'{name:5s}: {r["wall"]:6.2f} s/step wall, {r["cpu"]:6.2f} s/step CPU (medians of {args.steps}), '
        f'{rate[name]:8.1f} tokens/s, MFU {100 * mfu:5.1f}% of the measured matmul rate'
    )
  print(
      f'CPU-time speedup (less sensitive to other processes): '
      f'{results["torch"]["cpu"] / results["jax"]["cpu"]:.2f}'
  )
  print(f'sft speedup vs pytorch: {rate["jax"] / rate["torch"]:.2f}')


if __name__ == '__main__':
  main()
