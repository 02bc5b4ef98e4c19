"""Sampling throughput: cai_jax.sampling.generate vs transformers `generate` on SmolLM2-135M.

Same prompts, same machine, same run; both produce exactly --new_tokens tokens per row (no stop
tokens for cai_jax, min_new_tokens for transformers). Prints tokens/s, the ratio, the fraction of
the measured matmul FLOP/s roofline and the decode memory bandwidth achieved. Last line:
`sampling speedup vs transformers at B=16: X.XX` (float32, or the first dtype run).

Timed runs alternate between the two so background load hits both alike; the best is kept.
Every engine runs once untimed first (XLA compiles; transformers' first-call costs).

With --breakdown, each batch size also gets one line splitting a decode step into the LM head,
the MLPs, the attention projections and the decode attention, each timed alone (see
`decode_pieces`).

  python experiments/benchmarks/sampling.py --batch_sizes=1,16,64 --dtypes=float32,bfloat16
      [--breakdown]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

from absl import app, flags

_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['1', '16', '64'], 'batch sizes to time')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'model dtypes to time')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'tokens generated per row')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'timed runs per setting (best is kept)')
_SKIP_HF = flags.DEFINE_bool('skip_transformers', False, 'time cai_jax only')
_BREAKDOWN = flags.DEFINE_bool(
    'breakdown', False, "also time the decode step's pieces at each batch size (see decode_pieces)"
)

QUESTIONS = [
    'What is the capital of France?',
    'Write a haiku about the sea.',
    'How do I make a cup of tea? Explain step by step.',
    'Hi!',
    'Why is the sky blue? My teacher never explained it properly.',
    'List three prime numbers.',
    'Tell me a joke about computers.',
    'What should I cook for dinner tonight?',
]


def _best(fn, repeats):
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def matmul_flops(dtype, n=2048, repeats=5):
  """Measured dense matmul FLOP/s of this machine's default JAX device (the roofline)."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  return 2 * n**3 / _best(lambda: jax.block_until_ready(f(a, a)), repeats)


def _transformers_generate(hf, prompts, n_new, device):
  """A closure running transformers' batched greedy generate (left padding) for exactly n_new."""
  import torch

  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  attn = torch.zeros((len(prompts), width), dtype=torch.long)
  for i, p in enumerate(prompts):
    ids[i, width - len(p) :] = torch.tensor(p)
    attn[i, width - len(p) :] = 1
  ids, attn = ids.to(device), attn.to(device)

  def run():
    with torch.no_grad():
      out = hf.generate(
          input_ids=ids,
          attention_mask=attn,
          max_new_tokens=n_new,
          min_new_tokens=n_new,
          do_sample=False,
          pad_token_id=0,
      )
    assert out.shape[1] == width + n_new

  return run


def decode_pieces(cfg, b: int, s_len: int, dtype: str, repeats: int) -> dict[str, tuple]:
  """{piece: (seconds, flops)} of one decode step's pieces for b rows, each its own jitted
  program over all layers (a `lax.scan` over stacked random weights of the model's shapes, one
  token per row): the LM head, the MLPs, the attention projections, and the attention over a
  cache of s_len slots in the model's layout (keys [B, K, H, S], values [B, K, S, H]).

  Micro-benchmarks, not the fused step: they show where a step's time goes and the matmul rate
  at this batch size, and their sum need not equal the measured step.
  """
  import jax
  import jax.numpy as jnp

  dt = jnp.dtype(dtype)
  d, f, v, n_l = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_layers
  n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  keys = iter(jax.random.split(jax.random.key(0), 16))
  rand = lambda *shape: (jax.random.normal(next(keys), shape, jnp.float32) * 0.02).astype(dt)
  x = rand(b, d)

  def over_layers(layer):
    return jax.jit(lambda x, w: jax.lax.scan(lambda c, wl: (layer(c, wl), None), x, w)[0])

  def mlp(c, w):
    gate, up, down = w
    return c + (jax.nn.silu(c @ gate) * (c @ up)) @ down

  def projections(c, w):
    wq, wk, wv, wo = w
    q, kk, vv = c @ wq, c @ wk, c @ wv
    return c + q @ wo + (kk.sum(-1, keepdims=True) + vv.sum(-1, keepdims=True)).astype(c.dtype)

  def attention(q, w):
    k_cache, v_cache = w  # [B, K, H, S], [B, K, S, H]
    logits = jnp.einsum('BKGH,BKHS->BKGS', q, k_cache).astype(jnp.float32) * h**-0.5
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    return jnp.einsum('BKGS,BKSH->BKGH', probs, v_cache)

  pieces = {
      'LM head': (jax.jit(lambda x, e: x @ e.T), x, rand(v, d), 2 * b * d * v),
      'MLPs': (
          over_layers(mlp),
          x,
          (rand(n_l, d, f), rand(n_l, d, f), rand(n_l, f, d)),
          2 * b * 3 * d * f * n_l,
      ),
      'attention projections': (
          over_layers(projections),
          x,
          (rand(n_l, d, n * h), rand(n_l, d, k * h), rand(n_l, d, k * h), rand(n_l, n * h, d)),
          2 * b * d * (2 * n * h + 2 * k * h) * n_l,
      ),
      'decode attention': (
          over_layers(attention),
          rand(b, k, n // k, h),
          (rand(n_l, b, k, h, s_len), rand(n_l, b, k, s_len, h)),
          4 * b * n * h * s_len * n_l,
      ),
  }
  out = {}
  for name, (fn, arg, weights, flops) in pieces.items():
    jax.block_until_ready(fn(arg, weights))  # compile
    out[name] = (_best(lambda: jax.block_until_ready(fn(arg, weights)), repeats), flops)
  return out


def model_flops_per_token(cfg, context: int) -> float:
  """2 x matmul params (LM head included) + attention scores and values over the context."""
  matmul_params = cfg.num_params() - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
  if cfg.positions == 'learned':
    matmul_params -= cfg.max_positions * cfg.d_model
  return 2 * matmul_params + 4 * cfg.n_layers * context * cfg.n_heads * cfg.head_dim


def main(argv):
  del argv
  import jax
  import numpy as np
  import torch
  import transformers

  from cai_jax import sampling
  from cai_jax.method import conversation
  from cai_jax.models import checkpoint

  torch.set_num_threads(os.cpu_count())
  n_new = _NEW_TOKENS.value
  torch_device = 'cuda' if torch.cuda.is_available() else 'cpu'
  print(
      f'jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; '
      f'torch {torch.__version__} on {torch_device} with {torch.get_num_threads()} threads; '
      f'{os.cpu_count()} CPUs'
  )
  headline = None
  for dtype in _DTYPES.value:
    peak = matmul_flops(dtype)
    pt = checkpoint.load_pretrained('smollm2-135m', dtype=dtype)
    cfg, tok = pt.config, pt.tokenizer
    base = [
        tok.encode(
            conversation.render([('human', q)], 'chat_template', tok), add_special_tokens=False
        )
        for q in QUESTIONS
    ]
    hf = None
    if not _SKIP_HF.value:
      path = checkpoint.smollm2_path()
      hf = (
          transformers.AutoModelForCausalLM.from_pretrained(
              os.path.dirname(path), gguf_file=os.path.basename(path), dtype=getattr(torch, dtype)
          )
          .eval()
          .to(torch_device)
      )
    print(
        f'\n== {dtype}: matmul roofline {peak / 1e9:.1f} GFLOP/s; '
        f'{cfg.num_params() / 1e6:.1f}M params'
    )
    for b in map(int, _BATCH_SIZES.value):
      prompts = [base[i % len(base)] for i in range(b)]
      kw = dict(max_new_tokens=n_new, stop_tokens=[])
      ours = lambda k=kw: sampling.generate(pt.model, prompts, **k)
      prefill_only = lambda: sampling.generate(pt.model, prompts, max_new_tokens=1, stop_tokens=[])
      ours()  # compile
      prefill_only()
      t_ours, t_prefill, t_hf = [float('inf')] * 3
      theirs = _transformers_generate(hf, prompts, n_new, torch_device) if hf is not None else None
      if theirs is not None:
        theirs()  # warm up
      for _ in range(_REPEATS.value):
        t_ours = min(t_ours, _best(ours, 1))
        t_prefill = min(t_prefill, _best(prefill_only, 1))
        if theirs is not None:
          t_hf = min(t_hf, _best(theirs, 1))
      ours_tps = b * n_new / t_ours
      step_s = max(t_ours - t_prefill, 1e-9) / (n_new - 1)
      p_len = sampling.length_bucket(max(map(len, prompts)))
      s_len = p_len + sampling.length_bucket(n_new)
      itemsize = np.dtype(cfg.dtype).itemsize if dtype != 'bfloat16' else 2
      param_bytes = cfg.num_params() * itemsize
      cache_bytes = 2 * cfg.n_layers * b * s_len * cfg.n_kv_heads * cfg.head_dim * itemsize
      context = np.mean([len(p) for p in prompts]) + n_new / 2
      flops = model_flops_per_token(cfg, s_len)  # we attend over the whole bucketed cache
      line = (
          f'B={b:3d} cai_jax {ours_tps:8.1f} tok/s ({t_ours:.2f} s, prefill {t_prefill:.2f} s, '
          f'decode step {step_s * 1e3:7.1f} ms, '
          f'{flops * b / step_s / peak:6.1%} of roofline, '
          f'{(param_bytes + cache_bytes) / step_s / 1e9:6.1f} GB/s)'
      )
      if theirs is not None:
        hf_tps = b * n_new / t_hf
        speedup = ours_tps / hf_tps
        line += f' | transformers {hf_tps:8.1f} tok/s | speedup {speedup:5.2f}x'
        hf_flops = model_flops_per_token(cfg, context) * hf_tps / peak
        line += f' ({hf_flops:6.1%} of roofline)'
        if b == 16 and headline is None:
          headline = speedup
      print(line, flush=True)
      if _BREAKDOWN.value:
        pieces = decode_pieces(cfg, b, s_len, dtype, max(_REPEATS.value, 3))
        matmul = [pieces[p] for p in ('LM head', 'MLPs', 'attention projections')]
        print(
            f'  B={b} {dtype} decode step pieces, each alone: '
            + ', '.join(f'{name} {t * 1e3:.1f} ms' for name, (t, _) in pieces.items())
            + f'; matrix products {sum(t for t, _ in matmul) * 1e3:.1f} ms at '
            f'{sum(fl for _, fl in matmul) / sum(t for t, _ in matmul) / 1e9:.1f} GFLOP/s',
            flush=True,
        )
    del hf
  if headline is not None:
    print(f'sampling speedup vs transformers at B=16: {headline:.2f}')


if __name__ == '__main__':
  app.run(main)
