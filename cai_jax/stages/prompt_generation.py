"""Stage `prompt_generation`: new red-team and helpful prompts, written by the pretrained model.

The paper's SL stage trains on 42,496 human red-team prompts *and* 140,335 more that a pretrained
model wrote when shown a few of them; its RL stage adds 491,142 generated red-team and 474,300
generated helpful prompts (Bai et al. 2022, sections 3.1 and 4.2). Here the pretrained model
(`model.pretrained_source`) continues a numbered list: a header saying what the requests are,
`few_shots` seed prompts drawn at random from the human train split of that kind, and the next
number. Its first line is a candidate prompt. The candidates then pass, in this order:

1. empty: nothing but whitespace on the first line;
2. length: fewer than `min_words` or more than `max_words` words;
3. language: under `min_ascii_letters` of its letters in the ASCII alphabet (a plain, dependency-
   free stand-in for an English filter: the seeds are English);
4. duplicate: its normalized text (`data.normalize`) equals a seed's or a kept prompt's;
5. near duplicate: it shares at least `near_duplicate` of its character 3-grams (Jaccard) with a
   seed or a kept prompt.

The kept prompts (`prompts.jsonl`: id, prompt, source 'generated_<kind>', kind, the ids of the
seeds it was shown) join the train split of the stages named in `feed` (default: critique_revision,
feedback, ppo; never evaluate, whose prompts stay the held-out human ones): `data.stage_prompts`
mixes them in by a seeded order. The summary counts every kind's requests, its kept prompts and
each filter's drops, and shows the first kept prompts. Generation is resumable by chunks
(`records.process_in_chunks`, `generated.jsonl`); the filters rerun on the whole set.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from cai_jax import sampling
from cai_jax.bookkeeping import StageError, barrier, roles_line
from cai_jax.method import data, generated, stage_inputs
from cai_jax.utils import records as records_lib

STAGE = 'prompt_generation'
KINDS = ('redteam', 'helpful')
# What each list is, as its header tells the model (our wording).
HEADERS = {
    'redteam': 'Here are requests that people sent to an AI assistant while trying to get it to '
    'help with something harmful, illegal, dangerous or unethical:',
    'helpful': 'Here are questions and requests that people sent to an AI assistant for help:',
}
DROP_REASONS = ('empty', 'length', 'language', 'duplicate', 'near_duplicate')
_STREAMS = {'redteam': 0, 'helpful': 1}  # seed streams of the two kinds
_SHINGLE = 3  # characters per shingle of the near-duplicate filter


# ---- the prompt the model continues ----------------------------------------------------------


def one_line(text: str) -> str:
  """A seed prompt on one line (a numbered list holds one request per line)."""
  return ' '.join(text.split())


def generation_prompt(kind: str, seeds: Sequence[str]) -> str:
  """The header, the seeds numbered 1..k, and "k+1." for the model to continue."""
  items = [f'{i}. {one_line(s)}' for i, s in enumerate(seeds, start=1)]
  return '\n'.join([HEADERS[kind], '', *items, f'{len(seeds) + 1}.'])


def seed_pool(records: Sequence[dict], max_words: int) -> list[dict]:
  """The human prompts that can be shown as seeds: single requests of at most `max_words` words
  (a turn of a longer conversation is shown without its context, so those are left out)."""
  return [
      r for r in records if not r.get('conversation') and 0 < len(r['prompt'].split()) <= max_words
  ]


def draw_seeds(pool_size: int, k: int, seed: int, kind: str, i: int) -> list[int]:
  """Request i's seed indices: k of the pool without replacement, from (seed, kind, i) only."""
  rng = np.random.default_rng([seed, _STREAMS[kind], i])
  return [int(j) for j in rng.choice(pool_size, size=min(k, pool_size), replace=False)]


# ---- the filters ---------------------------------------------------------------------------------


def ascii_letter_share(text: str) -> float:
  """The share of `text`'s letters that are a-z or A-Z (1.0 for a text without letters)."""
  letters = [c for c in text if c.isalpha()]
  return sum(c.isascii() for c in letters) / len(letters) if letters else 1.0


def shingles(text: str) -> set[str]:
  """Character 3-grams of the normalized text (the whole text when it is shorter)."""
  t = data.normalize(text)
  return {t[i : i + _SHINGLE] for i in range(max(1, len(t) - _SHINGLE + 1))}


class NearDuplicates:
  """Texts seen so far, indexed by shingle: `closest(text)` is the highest Jaccard similarity
  of `text`'s shingles with any seen text's, found through the shingles they share."""

  def __init__(self):
    self._sets: list[set[str]] = []
    self._index: dict[str, list[int]] = collections.defaultdict(list)

  def remember(self, text: str) -> None:
    s = shingles(text)
    for g in s:
      self._index[g].append(len(self._sets))
    self._sets.append(s)

  def closest(self, text: str) -> float:
    s = shingles(text)
    shared = collections.Counter(j for g in s for j in self._index.get(g, ()))
    return max((n / (len(s) + len(self._sets[j]) - n) for j, n in shared.items()), default=0.0)


def filter_candidates(candidates: Sequence[dict], seeds: Sequence[str], cfg) -> tuple[list, dict]:
  """(kept candidates, {reason: dropped count}) after the five filters of the module docstring,
  in order; a candidate is compared with every seed and every candidate kept before it."""
  exact = {data.normalize(s) for s in seeds}
  near = NearDuplicates()
  for s in seeds:
    near.remember(s)
  kept, dropped = [], dict.fromkeys(DROP_REASONS, 0)
  for c in candidates:
    text = c['text']
    n_words = len(text.split())
    if not text:
      reason = 'empty'
    elif not cfg.min_words <= n_words <= cfg.max_words:
      reason = 'length'
    elif ascii_letter_share(text) < cfg.min_ascii_letters:
      reason = 'language'
    elif data.normalize(text) in exact:
      reason = 'duplicate'
    elif near.closest(text) >= cfg.near_duplicate:
      reason = 'near_duplicate'
    else:
      reason = None
    if reason:
      dropped[reason] += 1
      continue
    kept.append(c)
    exact.add(data.normalize(text))
    near.remember(text)
  return kept, dropped


# ---- the stage -------------------------------------------------------------------------------


READS = ()  # no upstream stage: the human prompts and the pretrained model
MODELS = ('pretrained',)  # the writer of the new prompts


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution and the prompt sources."""
  return stage_inputs.files(config)


def check_config(config) -> None:
  """Fails, before the workdir is touched, on settings that cannot work."""
  cfg = config[STAGE]
  problems = []
  for field in ('num_redteam', 'num_helpful'):
    if cfg[field] < 0:
      problems.append(f'{field} must be >= 0, got {cfg[field]}')
  if cfg.num_redteam + cfg.num_helpful == 0:
    problems.append('num_redteam and num_helpful are both 0: nothing to generate')
  if cfg.few_shots < 1 or cfg.max_new_tokens < 1 or cfg.chunk_size < 1:
    problems.append(
        f'few_shots, max_new_tokens and chunk_size must be >= 1, got {cfg.few_shots}, '
        f'{cfg.max_new_tokens}, {cfg.chunk_size}'
    )
  if not 1 <= cfg.min_words <= cfg.max_words:
    problems.append(f'need 1 <= min_words <= max_words, got {cfg.min_words}, {cfg.max_words}')
  if not 0.0 <= cfg.min_ascii_letters <= 1.0 or not 0.0 < cfg.near_duplicate <= 1.0:
    problems.append(
        'min_ascii_letters must be in [0, 1] and near_duplicate in (0, 1], got '
        f'{cfg.min_ascii_letters}, {cfg.near_duplicate}'
    )
  unknown = [s for s in cfg.feed if s not in generated.READERS]
  if unknown:
    problems.append(
        f'feed names {unknown}; the stages that can read generated prompts: '
        f'{", ".join(generated.READERS)}'
    )
  if problems:
    raise StageError(f'config.{STAGE}: ' + '; '.join(problems))


def _requests(kind: str, n: int, pool: list[dict], cfg, seed: int) -> list[dict]:
  return [
      {
          'id': f'{kind}-{i:07d}',
          'kind': kind,
          'seeds': [pool[j]['id'] for j in draw_seeds(len(pool), cfg.few_shots, seed, kind, i)],
      }
      for i in range(n)
  ]


def run(ctx, stage_dir: Path) -> dict:
  t0 = time.time()
  config, cfg = ctx.config, ctx.config[STAGE]
  check_config(config)
  seed = config.seed + cfg.seed_offset
  pools, requests = {}, []
  for kind in KINDS:
    n = cfg[f'num_{kind}']
    if not n:
      continue
    pools[kind] = seed_pool(data.stage_prompts(ctx, kind)['train'], cfg.max_words)
    if len(pools[kind]) < 1:
      raise StageError(
          f'{STAGE}: no {kind} train prompts of at most max_words={cfg.max_words} words to show '
          f'as seeds (config.data.{kind}_sources)'
      )
    requests += _requests(kind, n, pools[kind], cfg, seed)
  texts = {r['id']: r['prompt'] for pool in pools.values() for r in pool}

  writer = ctx.load_role('pretrained', frozen=True)
  engine = sampling.Engine.from_config(writer.model, config, writer.tokenizer)
  tokens = [0]

  def write(chunk: list[dict], seeds) -> list[dict]:
    responses = sampling.generate_responses(
        writer,
        [generation_prompt(r['kind'], [texts[s] for s in r['seeds']]) for r in chunk],
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        batch_size=cfg.batch_size,
        seed=seeds(0),
        stop_strings=['\n'],
        engine=engine,
    )
    tokens[0] += sum(len(r.tokens) for r in responses)
    return [
        dict(r, text=resp.text.split('\n')[0].strip(), finish_reason=resp.finish_reason)
        for r, resp in zip(chunk, responses)
    ]

  stage_dir.mkdir(parents=True, exist_ok=True)
  done = records_lib.process_in_chunks(
      requests,
      records_lib.part_path(stage_dir, 'generated'),
      write,
      chunk_size=cfg.chunk_size,
      seed=seed,
      stream=len(_STREAMS),
      desc='prompt generation',
      unit='prompt',
      progress=cfg.progress,
      postfix=records_lib.throughput('tok_s', lambda: tokens[0], 1),
  )
  barrier(f'{STAGE}-generated')
  if jax.process_index() != 0:
    barrier(f'{STAGE}-filtered')
    return {}
  written = records_lib.merge_parts(stage_dir, 'generated', [r['id'] for r in requests], STAGE)
  kept_records, counts = [], {}
  for kind in pools:
    candidates = [g for g in written if g['kind'] == kind]
    kept, dropped = filter_candidates(candidates, [r['prompt'] for r in pools[kind]], cfg)
    source = generated.source(kind)
    kept_records += [
        {
            'id': data.prompt_id(source, g['text']),
            'prompt': g['text'],
            'source': source,
            'kind': kind,
            'seeds': g['seeds'],
        }
        for g in kept
    ]
    counts[kind] = {
        'requested': len(candidates),
        'kept': len(kept),
        'dropped': dropped,
        'truncated': sum(g['finish_reason'] == 'length' for g in candidates),
        'first': [g['text'] for g in kept[: cfg.show]],
    }
  records_lib.write_jsonl(stage_dir / generated.GENERATED_PROMPTS, kept_records)
  barrier(f'{STAGE}-filtered')
  summary = dict(
      models=roles_line(config.model),
      writer=ctx.model_source('pretrained'),
      feed=list(cfg.feed),
      **counts,
      tokens_generated_this_run=tokens[0],
      resumed_requests=done['resumed'],
      seconds=round(time.time() - t0, 2),
  )
  for kind, c in counts.items():
    print(
        f'{STAGE}: {kind}: {c["kept"]} of {c["requested"]} kept; dropped '
        + ', '.join(f'{k} {v}' for k, v in c['dropped'].items()),
        flush=True,
    )
  return summary
