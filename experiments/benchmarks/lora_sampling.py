"""Sampling from a LoRA policy: adapters applied in the forward vs merged into the weights once.

PPO samples its rollouts from the policy it trains. With LoRA the sampler can run the adapted
model as it is (each targeted projection adds two small einsums, `(x A) B`) or fold the adapters
into the weights once per rollout phase (`W + alpha/rank A B`, one pass over the targeted
weights) and sample from a plain model. This measures both on SmolLM2-135M: rank --rank
adapters on all seven projections (random, as after training), --prompts HarmBench prompts under
the chat template, greedy, --max_new_tokens new tokens each (no stops: every row decodes them
all), each sampler warmed once. Prints tokens/s of each, the merge's seconds, and the greedy
tokens' agreement (the merged weights are the same function up to float32 rounding).

  python experiments/benchmarks/lora_sampling.py [--rank=16] [--prompts=16] [--max_new_tokens=64]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

from absl import app, flags

_RANK = flags.DEFINE_integer('rank', 16, 'adapter rank')
_PROMPTS = flags.DEFINE_integer('prompts', 16, 'HarmBench prompts (one batch)')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 64, 'new tokens per prompt')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'timed runs of each (the best is reported)')


def main(_):
  import jax
  from flax import nnx

  from cai_jax import sampling
  from cai_jax.method import conversation, data
  from cai_jax.models import checkpoint, lora

  targets = tuple(lora.PROJECTIONS)
  adapted = checkpoint.load_pretrained(
      'smollm2-135m',
      model_overrides=dict(
          lora_rank=_RANK.value, lora_alpha=2.0 * _RANK.value, lora_targets=targets
      ),
  )
  # Random adapters (a trained one, as far as the forward can tell).
  state = nnx.state(adapted.model, nnx.LoRAParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(0), len(leaves))
  nnx.update(
      adapted.model,
      jax.tree.unflatten(
          tree, [x + 0.02 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
      ),
  )
  tok = adapted.tokenizer
  prompts = [
      tok.encode(conversation.render([('human', getattr(p, 'text', p))], 'chat_template', tok),
                 add_special_tokens=False)
      for p in data.load_source('harmbench')[: _PROMPTS.value]
  ]  # fmt: skip

  def merge():
    cfg = adapted.config
    flat = lora.merged_params(checkpoint.flat_params(adapted.model), cfg.lora_alpha / cfg.lora_rank)
    plain = cfg.replace(lora_rank=0, lora_targets=())
    getters = {k: (lambda v=v: v) for k, v in flat.items()}
    return checkpoint.build_from_tensors(plain, getters, 'merged')

  t = time.perf_counter()
  merged = merge()
  merge_seconds = time.perf_counter() - t

  def run(model):
    out = sampling.generate(model, prompts, max_new_tokens=_MAX_NEW.value, stop_tokens=[])
    return out

  results = {}
  for name, model in (('adapters in the forward', adapted.model), ('merged once', merged)):
    run(model)  # warm: compiles
    best = float('inf')
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      out = run(model)
      best = min(best, time.perf_counter() - t)
    results[name] = (out, best)
  n = len(prompts) * _MAX_NEW.value
  print(
      f'SmolLM2-135M, LoRA rank {_RANK.value} on {" ".join(targets)}, {len(prompts)} prompts x '
      f'{_MAX_NEW.value} new tokens, greedy, {jax.devices()[0].platform}, best of {_REPEATS.value}'
  )
  for name, (_, seconds) in results.items():
    print(f'{name}: {seconds:.2f} s, {n / seconds:.0f} tokens/s')
  a, b = (results[k][0].tokens for k in results)
  same = sum(x == y for x, y in zip(a, b))
  print(f'merge (host, numpy): {merge_seconds:.2f} s; greedy rows identical: {same} of {len(a)}')
  ratio = results['adapters in the forward'][1] / results['merged once'][1]
  print(f'merged-once speedup vs adapters in the forward: {ratio:.2f}')


if __name__ == '__main__':
  app.run(main)
