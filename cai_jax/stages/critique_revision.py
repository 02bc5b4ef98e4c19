"""Stage `critique_revision`: the SL-CAI data of the paper (Bai et al. 2022, section 3.1).

For each red-team prompt the helpful model writes a response; then, `n_rounds` times, it
critiques its latest answer under a principle drawn from the constitution and revises it.
With `critique=False` (the paper's critique-free ablation, figure 7) it revises at once: the
revision request follows the response, no critique is written, and the few-shots and earlier
rounds the prompt shows omit theirs (`prompts.render_critique_free_revision_prompt`); such
rounds record ``critique_request`` and ``critique`` as null and one prompt's few_shots and
turns_dropped.
The revisions of every round, with `helpful_samples_per_prompt` plain responses to each helpful
prompt (the "helpful mix"; the paper samples 2), are what the `sft` stage fine-tunes on.

Outputs in the stage directory:

* ``samples.jsonl`` -- one object per red-team prompt, in prompt order::

    {"id", "source", "prompt", "initial_response",
     "conversation",      # only for a multi-turn prompt: its turns, ending with `prompt`
     "rounds": [{"principle", "critique_request", "critique", "revision_request", "revision",
                 "empty_revision",
                 "few_shots": [critique, revision],      # few-shots each prompt kept
                 "turns_dropped": [critique, revision]}, # oldest turns/rounds left out to fit
                ...],
     "revision",          # the final revision: the latest non-empty one ('' if none)
     "revised",           # false when every round's revision came back empty
     "empty_revisions",   # how many rounds' revisions came back empty
     "finish_reasons": {"initial_response": str, "critique": [...], "revision": [...]},
     "tokens"}            # tokens generated for this prompt

  Prompts are fitted to model.max_len less the tokens generated after them
  (`prompts.fit_critique_revision_prompt`): the oldest conversation turns and earlier
  rounds go first, then few-shots from the end; a whole segment, never a cut through text.

  An empty revision (nothing but whitespace before a stop string or the token limit) is
  recorded in its round (``empty_revision: true``) and counted, but never replaces the text it
  was meant to revise: ``revision`` keeps the latest non-empty revision, and the empty round is
  left out of the history later rounds see, so they critique the latest real answer. A prompt
  whose every revision came back empty is unusable: ``revision`` is ``''`` and ``revised`` is
  false (the `sft` stage skips empty revisions).
* ``helpful.jsonl`` -- one object per helpful prompt, in prompt order::

    {"id", "source", "prompt",
     "responses",         # helpful_samples_per_prompt samples, sample k drawn with seed k
     "finish_reasons",    # one per response
     "tokens"}

Every generation's finish reason is kept: 'stop' (it ended itself: EOS or a stop string) or
'length' (cut at its token limit). The summary counts the truncated ones by kind, and the `sft`
stage keeps a truncated revision or response from being trained as if the model had ended it.
* ``tfds/`` -- both as a TFDS array_record dataset ``critique_revision`` with splits
  ``revisions`` and ``helpful`` (``data.read_records_dataset``).

Resuming: prompts are processed in fixed chunks of ``chunk_size`` in a fixed order, each chunk
sampled with a seed derived from (seed, chunk index) and appended to the jsonl (flushed and
fsynced) when finished. A restart drops a torn last line and redoes only the chunks with missing
ids, so a killed run, restarted, ends with the same records as an uninterrupted one.
Multi-process: each process takes its contiguous share of the chunks into
``samples.<process>.jsonl`` / ``helpful.<process>.jsonl``; process 0 merges them in order.
The engine is `records.process_in_chunks`, shared with the feedback stages; the record keys are
`records.REVISIONS` and `records.HELPFUL`.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from absl import logging

from cai_jax import sampling
from cai_jax.bookkeeping import StageError, barrier, roles_line
from cai_jax.method import constitution as constitution_lib
from cai_jax.method import conversation, data, generated
from cai_jax.method import prompts as prompts_lib
from cai_jax.method import stage_inputs
from cai_jax.utils import records as records_lib

STAGE = 'critique_revision'
DATASET = 'critique_revision'  # TFDS dataset name under STAGE_DIR/tfds
_REDTEAM_STREAM, _HELPFUL_STREAM = 0, 1  # seed streams of the two kinds of chunks


# ----------------------------------------------------------------------------------------------
# Sampling one chunk.


@dataclasses.dataclass
class _Sampler:
  """`sampling.generate_responses` with the stage's settings; counts the tokens it generates.

  The format's own stop strings (e.g. "\\n\\nHuman:") always end a generation.
  """

  pretrained: Any
  cfg: Any  # config.critique_revision
  fmt: str  # config.conversation_format
  max_len: int  # config.model.max_len: prompt + new tokens
  prefix_cache: Any = None  # sampling.PrefixCache: the few-shot preamble prefilled once
  engine: Any = None  # sampling.Engine: continuous batching instead of static batches
  tokens: int = 0

  def budget(self, max_new_tokens: int) -> int:
    """Tokens a prompt may take before `max_new_tokens` are generated after it."""
    limit = min(self.max_len, self.pretrained.model.cfg.max_positions)
    return limit - max_new_tokens

  def __call__(self, prompts, *, max_new_tokens: int, seed: int, stop_strings: Sequence[str] = ()):
    responses = sampling.generate_responses(
        self.pretrained,
        prompts,
        fmt=self.fmt,
        max_new_tokens=max_new_tokens,
        temperature=self.cfg.temperature,
        top_k=self.cfg.top_k or None,
        top_p=self.cfg.top_p,
        batch_size=self.cfg.batch_size,
        seed=seed,
        stop_strings=list(stop_strings),
        max_prompt_len=self.max_len - max_new_tokens,
        truncate='left',
        prefix_cache=self.prefix_cache,
        engine=self.engine,
    )
    self.tokens += sum(len(r.tokens) for r in responses)
    return responses


def revise_chunk(
    records: Sequence[dict],
    seed: Callable[[int], int],
    *,
    sample: _Sampler,
    constitution: constitution_lib.Constitution,
    n_rounds: int,
    principle_seed: int,
) -> list[dict]:
  """Initial responses, then `n_rounds` critique/revision rounds, for one chunk of prompts."""
  cfg, fmt, tok = sample.cfg, sample.fmt, sample.pretrained.tokenizer
  convs = [data.prompt_turns(r) for r in records]
  cr_stops = prompts_lib.critique_revision_stop_strings(fmt, tok)

  initial = sample(
      [conversation.fit_turns(c, fmt, tok, sample.budget(cfg.max_new_tokens)) for c in convs],
      max_new_tokens=cfg.max_new_tokens,
      seed=seed(0),
  )
  out = [
      dict(
          id=r['id'],
          source=r.get('source', ''),
          prompt=r['prompt'],
          initial_response=resp.text.strip(),
          rounds=[],
          revision='',
          revised=False,
          empty_revisions=0,
          tokens=len(resp.tokens),
          finish_reasons=dict(initial_response=resp.finish_reason, critique=[], revision=[]),
          **({'conversation': r['conversation']} if r.get('conversation') else {}),
      )
      for r, resp in zip(records, initial)
  ]
  # A fresh pair per round, drawn from (seed, prompt id): the same whatever chunk or host.
  pairs = [
      constitution_lib.sample_critique_revision_pairs(
          constitution, n_rounds, constitution_lib.principle_rng(principle_seed, r['id'], STAGE)
      )
      for r in records
  ]
  history = [[] for _ in records]  # finished rounds with a non-empty revision

  fit = prompts_lib.fit_critique_revision_prompt
  with_critique = cfg.get('critique', True)
  for k in range(n_rounds):
    if with_critique:
      critique_prompts = [
          fit(
              constitution,
              conv,
              o['initial_response'],
              p[k],
              h,
              fmt=fmt,
              tokenizer=tok,
              budget=sample.budget(cfg.critique_max_new_tokens),
          )
          for conv, o, p, h in zip(convs, out, pairs, history)
      ]
      critiques = sample(
          [f.text for f in critique_prompts],
          max_new_tokens=cfg.critique_max_new_tokens,
          stop_strings=cr_stops,
          seed=seed(1 + 2 * k),
      )
      critique_texts = [c.text.strip() for c in critiques]
    else:  # critique-free: the revision request follows the response
      critique_prompts, critiques, critique_texts = [], [None] * len(out), [None] * len(out)
    revision_prompts = [
        fit(
            constitution,
            conv,
            o['initial_response'],
            p[k],
            h,
            c,
            fmt=fmt,
            tokenizer=tok,
            budget=sample.budget(cfg.max_new_tokens),
            with_critique=with_critique,
        )
        for conv, o, p, h, c in zip(convs, out, pairs, history, critique_texts)
    ]
    revisions = sample(
        [f.text for f in revision_prompts],
        max_new_tokens=cfg.max_new_tokens,
        stop_strings=cr_stops,
        seed=seed(2 + 2 * k),
    )
    _log_fitting(critique_prompts + revision_prompts, f'round {k + 1}')
    for o, p, h, c, critique, r, rp, cp in zip(
        out,
        pairs,
        history,
        critiques,
        critique_texts,
        revisions,
        revision_prompts,
        critique_prompts or [None] * len(out),
    ):
      revision = r.text.strip()
      fitted = (rp,) if cp is None else (cp, rp)  # the round's prompts: critique-free, one
      o['rounds'].append(
          dict(
              principle=p[k].name,
              critique_request=p[k].critique_request if with_critique else None,
              critique=critique,
              revision_request=p[k].revision_request,
              revision=revision,
              empty_revision=not revision,
              few_shots=[f.few_shots for f in fitted],
              turns_dropped=[f.turns_dropped for f in fitted],
          )
      )
      if c is not None:
        o['finish_reasons']['critique'].append(c.finish_reason)
        o['tokens'] += len(c.tokens)
      o['finish_reasons']['revision'].append(r.finish_reason)
      o['tokens'] += len(r.tokens)
      if revision:
        o['revision'], o['revised'] = revision, True
        h.append(constitution_lib.CritiqueRevisionRound(p[k], critique, revision))
      else:
        o['empty_revisions'] += 1
  return out


def _log_fitting(fitted: Sequence[prompts_lib.FittedPrompt], where: str) -> None:
  """One warning per batch for prompts that had to shed turns or few-shots to fit."""
  turns = sum(f.turns_dropped > 0 for f in fitted)
  fewer = [f for f in fitted if f.few_shots < f.few_shots_total]
  over = sum(f.over_budget for f in fitted)
  if turns or fewer or over:
    logging.warning(
        '%s %s: of %d prompts, %d left out old turns, %d kept fewer few-shots '
        '(down to %d of %d), %d still over budget (their oldest tokens are cut)',
        STAGE,
        where,
        len(fitted),
        turns,
        len(fewer),
        min((f.few_shots for f in fewer), default=fitted[0].few_shots_total),
        fitted[0].few_shots_total,
        over,
    )


def few_shot_summary(samples: Sequence[dict], n_few_shots: int) -> dict:
  """How the critique and revision prompts fitted: few-shots kept, turns left out."""
  kept = [n for s in samples for r in s['rounds'] for n in r.get('few_shots', ())]
  dropped = [s for s in samples if any(n for r in s['rounds'] for n in r.get('turns_dropped', ()))]
  return dict(
      few_shots_available=n_few_shots,
      few_shots_min=min(kept, default=None),
      few_shots_mean=round(sum(kept) / len(kept), 3) if kept else None,
      prompts_short_of_few_shots=sum(
          any(n < n_few_shots for r in s['rounds'] for n in r.get('few_shots', ())) for s in samples
      ),
      prompts_lost_turns=len(dropped),
  )


def helpful_chunk(
    records: Sequence[dict], seed: Callable[[int], int], *, sample: _Sampler, n_samples: int
) -> list[dict]:
  """`n_samples` plain responses of the helpful model to each helpful prompt (the SL helpful
  mix; the paper samples 2 per prompt). Sample k of the whole chunk is drawn with seed k, so the
  samples of one prompt differ, and sample 0 is the one a single-sample run draws."""
  tok, budget = sample.pretrained.tokenizer, sample.budget(sample.cfg.max_new_tokens)
  convs = [conversation.fit_turns(data.prompt_turns(r), sample.fmt, tok, budget) for r in records]
  samples = [
      sample(convs, max_new_tokens=sample.cfg.max_new_tokens, seed=seed(k))
      for k in range(n_samples)
  ]
  return [
      dict(
          id=r['id'],
          source=r.get('source', ''),
          prompt=r['prompt'],
          **({'conversation': r['conversation']} if r.get('conversation') else {}),
          responses=[resp.text.strip() for resp in responses],
          finish_reasons=[resp.finish_reason for resp in responses],
          tokens=sum(len(resp.tokens) for resp in responses),
      )
      for r, *responses in zip(records, *samples)
  ]


def truncated_counts(samples: Sequence[dict], helpful: Sequence[dict]) -> dict[str, int]:
  """Generations cut at their token limit ('length': no EOS or stop string), by kind."""
  length = lambda reasons: sum(reason == 'length' for reason in reasons)
  return dict(
      initial_response=length(s['finish_reasons']['initial_response'] for s in samples),
      critique=sum(length(s['finish_reasons']['critique']) for s in samples),
      revision=sum(length(s['finish_reasons']['revision']) for s in samples),
      helpful=sum(length(h['finish_reasons']) for h in helpful),
  )


# ----------------------------------------------------------------------------------------------
# The stage.


def load_constitution(
    source: str, num_few_shots: int, num_principles: int = -1
) -> constitution_lib.Constitution:
  """The constitution with only its first `num_few_shots` critique few-shots and its first
  `num_principles` critique/revision pairs to draw from (-1: all; the paper's figure 6 varies
  the number of principles)."""
  c = constitution_lib.load_constitution(source)
  if num_few_shots >= 0:
    c = dataclasses.replace(c, critique_few_shots=c.critique_few_shots[:num_few_shots])
  if num_principles > len(c.critique_revision):
    raise StageError(
        f'config.{STAGE}.num_principles={num_principles}: the constitution {source!r} has '
        f'{len(c.critique_revision)} critique/revision principles'
    )
  if num_principles >= 0:
    c = dataclasses.replace(c, critique_revision=c.critique_revision[:num_principles])
  return c


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ()  # no upstream stage: it starts the pipeline
MODELS = ('helpful',)  # the given models it loads: their sources join its fingerprint
OPTIONAL = ('prompt_generation',)  # its prompts join the train split (prompt_generation.feed)


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution and the prompt sources."""
  return stage_inputs.files(config)


def check_config(config) -> None:
  """Fails on critique_revision settings that cannot work (run before anything is written)."""
  cfg, max_len = config[STAGE], config.model.max_len
  problems = []
  if cfg.n_rounds < 1:
    problems.append(f'n_rounds must be >= 1 (the paper uses 4), got {cfg.n_rounds}')
  if cfg.num_prompts == 0 or cfg.num_prompts < -1:
    problems.append(f'num_prompts must be -1 (all) or >= 1, got {cfg.num_prompts}')
  if cfg.get('num_principles', -1) == 0 or cfg.get('num_principles', -1) < -1:
    problems.append(f'num_principles must be -1 (all) or >= 1, got {cfg.num_principles}')
  for field in (
      'chunk_size',
      'batch_size',
      'max_new_tokens',
      'critique_max_new_tokens',
      'helpful_samples_per_prompt',
  ):
    if cfg[field] < 1:
      problems.append(f'{field} must be >= 1, got {cfg[field]}')
  if cfg.helpful_ratio < 0:
    problems.append(f'helpful_ratio must be >= 0, got {cfg.helpful_ratio}')
  longest = max(cfg.max_new_tokens, cfg.critique_max_new_tokens)
  if max_len <= longest:
    problems.append(
        f'config.model.max_len ({max_len}) leaves no room for a prompt before '
        f'{longest} new tokens'
    )
  if problems:
    raise StageError(f'config.{STAGE}: ' + '; '.join(problems))


def check_few_shots(constitution, sample: _Sampler, cfg) -> None:
  """Before any sampling: the few-shots and a one-line conversation must fit every prompt's
  budget (else every prompt would lose few-shots); logs what they take."""
  budget = sample.budget(max(cfg.max_new_tokens, cfg.critique_max_new_tokens))
  tok, what = sample.pretrained.tokenizer, f'config.{STAGE}.num_few_shots={cfg.num_few_shots}'
  try:
    prompts_lib.check_few_shot_budget(constitution, STAGE, tok, sample.fmt, budget, what=what)
  except ValueError as e:
    raise StageError(str(e)) from None


def run(ctx, stage_dir: Path) -> dict:
  t0 = time.time()
  cfg = ctx.config.critique_revision
  check_config(ctx.config)
  constitution = load_constitution(
      ctx.config.constitution, cfg.num_few_shots, cfg.get('num_principles', -1)
  )
  prompts = data.stage_prompts(ctx, 'redteam', STAGE)['train']
  prompts = prompts if cfg.num_prompts < 0 else prompts[: cfg.num_prompts]
  if not prompts:
    raise StageError(f'{STAGE}: the train split of config.data.redteam_sources is empty')
  n_helpful = round(cfg.helpful_ratio * len(prompts))
  helpful = data.stage_prompts(ctx, 'helpful', STAGE)['train'][:n_helpful] if n_helpful else []
  if len(helpful) < n_helpful:
    logging.warning(
        '%s: helpful_ratio asks for %d helpful prompts, the train split has %d',
        STAGE,
        n_helpful,
        len(helpful),
    )

  helpful_model = ctx.load_role('helpful', frozen=True)
  sample = _Sampler(
      helpful_model,
      cfg,
      ctx.config.conversation_format,
      ctx.config.model.max_len,
      sampling.PrefixCache.from_config(helpful_model.model, ctx.config.sampling),
      sampling.Engine.from_config(helpful_model.model, ctx.config, helpful_model.tokenizer),
  )
  check_few_shots(constitution, sample, cfg)
  stage_dir.mkdir(parents=True, exist_ok=True)
  seed = ctx.config.seed

  def in_chunks(items, name, fn, stream, desc):
    """Resumable: each chunk's records are appended to STAGE_DIR/<name>.jsonl when it is done;
    the bar shows the sampler's tokens per second since the call."""
    return records_lib.process_in_chunks(
        items,
        records_lib.part_path(stage_dir, name),
        fn,
        chunk_size=cfg.chunk_size,
        seed=seed,
        stream=stream,
        desc=desc,
        unit='prompt',
        postfix=records_lib.throughput('tok_s', lambda: sample.tokens, 1),
    )

  revise = lambda chunk, s: revise_chunk(
      chunk,
      s,
      sample=sample,
      constitution=constitution,
      n_rounds=cfg.n_rounds,
      principle_seed=seed,
  )
  answer = lambda chunk, s: helpful_chunk(
      chunk, s, sample=sample, n_samples=cfg.helpful_samples_per_prompt
  )
  red = in_chunks(prompts, 'samples', revise, _REDTEAM_STREAM, 'critique/revision')
  helped = in_chunks(helpful, 'helpful', answer, _HELPFUL_STREAM, 'helpful mix')
  barrier(f'{STAGE}-sampled')
  if jax.process_index() != 0:
    barrier(f'{STAGE}-merged')
    return {}
  samples = records_lib.merge_parts(stage_dir, 'samples', [r['id'] for r in prompts], STAGE)
  helpful_records = records_lib.merge_parts(stage_dir, 'helpful', [r['id'] for r in helpful], STAGE)
  if cfg.write_tfds:
    data.write_records_dataset(
        {'revisions': samples, 'helpful': helpful_records},
        DATASET,
        stage_dir / 'tfds',
        description='SL-CAI revisions and helpful mix',
    )
  barrier(f'{STAGE}-merged')
  rounds = [r for s in samples for r in s['rounds']]
  finish = collections.Counter(
      reason
      for s in samples
      for reasons in (
          [s['finish_reasons']['initial_response']],
          s['finish_reasons']['critique'],
          s['finish_reasons']['revision'],
      )
      for reason in reasons
  )
  finish.update(reason for h in helpful_records for reason in h['finish_reasons'])
  summary = dict(
      models=roles_line(ctx.config.model),
      prompts=len(samples),
      prompt_sources=generated.source_counts(prompts + helpful),
      helpful=len(helpful_records),
      helpful_samples=sum(len(h['responses']) for h in helpful_records),
      n_rounds=cfg.n_rounds,
      rounds=len(rounds),
      empty_revisions=sum(r['empty_revision'] for r in rounds),
      unrevised_prompts=sum(not s['revised'] for s in samples),
      critique=cfg.get('critique', True),  # False: critique-free revisions (paper figure 7)
      empty_critiques=sum(not r['critique'] for r in rounds if r['critique'] is not None),
      empty_initial_responses=sum(not s['initial_response'] for s in samples),
      empty_helpful_responses=sum(not r for h in helpful_records for r in h['responses']),
      tokens_generated=sum(r['tokens'] for r in samples + helpful_records),
      tokens_generated_this_run=sample.tokens,
      **sampling.engine_summary(sample.engine),
      finish_reasons=dict(finish),
      **few_shot_summary(samples, len(constitution.critique_few_shots)),
      truncated=truncated_counts(samples, helpful_records),
      resumed_prompts=red['resumed'] + helped['resumed'],
      seconds=round(time.time() - t0, 2),
  )
  print(f'{STAGE}: ' + ', '.join(f'{k} {v}' for k, v in summary.items()), flush=True)
  return summary
