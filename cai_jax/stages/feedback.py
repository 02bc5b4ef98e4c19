"""Stage `feedback`: AI feedback as (A)/(B) soft labels (paper section 4.1).

`feedback`: for each red-team prompt the SL-CAI model samples two responses; the feedback model
(by default the pretrained helpful model, as in the paper) reads the multiple-choice prompt of
`prompts.render_feedback_prompt` -- few-shot examples, the conversation, a sampled principle,
"Options: (A) ... (B) ...", "The answer is:" -- and the label is

    p_a = softmax(log P(" (A)"), log P(" (B)"))[0],

optionally averaged over K sampled principles (ensemble), over both option orders (debias), read
after generated chain-of-thought reasoning (cot), and clamped (clamp, paper: 40-60% with CoT).
`evaluate_feedback` (cai_jax/stages/evaluate_feedback.py) measures the same configuration's
accuracy and calibration on labeled comparisons (by default the paper's 438 HHH comparisons).

Helpfulness pairs: the paper's PM also learns human helpfulness comparisons. Unless
`preference.helpful_mix.path` names such a file (HH-RLHF), the stage samples two responses to
`num_helpful_prompts` helpful train prompts too and labels them the same way under the
constitution's *helpfulness* principles -- an AI-labeled substitute for the human labels. Each
record says its ``kind``: 'harmlessness' (red-team prompts) or 'helpfulness'.

The evaluation split: a seeded coin marks `evaluation_fraction` of the prompts (of each kind)
``split='evaluation'``; the preference stage never trains on them and the `evaluation_pm` stage
trains only on them, so the evaluation PM judges with comparisons the RL PM never saw.

Outputs of `feedback` (STAGE_DIR):

* ``samples.jsonl`` -- one object per prompt, in prompt order::

    {"id", "source", "kind", "split", "prompt", "response_a", "response_b",
     "p_a",        # P(response_a is better); 0.5 for identical responses; null when skipped
     "flags",      # subset of ["identical", "empty_a", "empty_b", "skipped"]
     "finish_reasons": [a, b],
     "details": [  # one entry per scoring: K principles x (1 or 2 orders)
        {"k", "principle", "order",   # order 0: response_a shown as (A); 1: as (B)
         "prompt",                    # the exact text scored (CoT: with reasoning and answer turn)
         "option_logprobs": {" (A)": float, " (B)": float},
         "p_option_a",                # softmax over the two options, of (A)
         "cot",                       # the generated reasoning (null without CoT)
         "few_shots",                 # few-shots the prompt kept to fit model.max_len
         "turns_dropped",             # oldest conversation turns it left out to fit
         "truncated_tokens",          # tokens still cut on the left (0 unless even the bare
                                      # question is over budget)
         "boundary_tokens"}]}         # prompt tokens scored inside the options (see below)

* ``tfds/`` -- the labeled pairs (flag "skipped" left out) as TFDS dataset ``preferences``,
  split ``train``: ``{id, prompt, response_a, response_b, p_a, flags}``; read with
  `load_preferences(stage_dir)`.

Bad input: identical responses (after stripping) get p_a = 0.5 by construction, unscored, flag
"identical". An empty response is flagged "empty_a"/"empty_b"; with
``feedback.empty_response='score'`` (default) it is labeled like any other pair -- the feedback
model then judges an empty reply against a real one, which is a legitimate preference -- and with
'skip' the pair gets flag "skipped", p_a null, and stays out of the dataset.

Option tokenization: each option is scored as the tokens of ``tokenize(prompt + option)`` after
the longest token prefix it shares with ``tokenize(prompt)`` (the shortest such prefix over both
options, so both are scored after the very same prompt tokens). Normally that prefix is the whole
prompt; if a tokenizer merges the prompt's last characters with the option's first (a BPE merge
across the boundary), the merged token(s) are part of both options' scored spans, and their
count is recorded as ``boundary_tokens``. A multi-token option scores the sum of its tokens'
log-probs.

Resuming and multiple hosts: pairs are processed in fixed chunks (``chunk_size``) in a fixed
order, each chunk with seeds derived from (seed, chunk index) only, appended and fsynced when
finished; a restart drops a torn last line and redoes only chunks with missing ids, so the
result equals an uninterrupted run's. Each process takes its contiguous share of the chunks
(`sharding.shard_for_process`) into ``samples.<process>.jsonl``; process 0 merges them in order.
The engine is `records.process_in_chunks`; the record keys are `records.FEEDBACK`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

from cai_jax import sampling
from cai_jax.bookkeeping import StageError, barrier
from cai_jax.method import conversation, data, generated
from cai_jax.method import stage_inputs
from cai_jax.method.comparisons import HARMLESSNESS, HELPFULNESS  # the kinds of pairs
from cai_jax.method.labeler import (
    Labeler,
    Pair,
    _check_principle_count,
    check_feedback_config,
    check_few_shots,
    feedback_model,
    few_shot_summary,
    label_from_logprobs,
    load_feedback_constitution,
)
from cai_jax.utils import records as records_lib

STAGE = 'feedback'
DATASET = 'preferences'  # TFDS dataset name under STAGE_DIR/tfds
# Seed streams (disjoint from critique_revision's 0 and 1); helpful prompts have their own, so
# the red-team pairs do not depend on how many helpful prompts are labeled.
_RESPONSE_STREAM, _HELPFUL_STREAM = 10, 12  # 11 is evaluate_feedback's


# ----------------------------------------------------------------------------------------------
# The label layer: pure functions of the scored option log-probs.


# ----------------------------------------------------------------------------------------------
# Option tokenization.


# ----------------------------------------------------------------------------------------------
# Labeling pairs with the feedback model.


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ('sft',)  # the SL-CAI model samples the pairs
MODELS = ('pretrained',)  # the feedback model
OPTIONAL = ('prompt_generation',)  # its prompts join the train split (prompt_generation.feed)


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution and the prompt sources."""
  return stage_inputs.files(config)


def fingerprint_fields(config) -> dict:
  """Config outside `feedback` it depends on: with an HH-RLHF helpfulness file
  (`preference.helpful_mix.path`) it labels no helpfulness pairs."""
  if 'preference' not in config:
    return {}
  return {'hh_rlhf_helpfulness': bool(config.preference.helpful_mix.path)}


def check_config(config) -> None:
  """Fails on feedback settings that cannot work (run before anything is written)."""
  check_feedback_config(config.feedback)


def labels_helpfulness(config) -> bool:
  """Whether the feedback stage labels helpfulness pairs: asked for, and no HH-RLHF file given."""
  return (
      config.feedback.get('num_helpful_prompts', 0) != 0 and not config.preference.helpful_mix.path
  )


# ----------------------------------------------------------------------------------------------
# Stage `feedback`.


def label_chunk(
    records: Sequence[dict],
    chunk_seed: Callable[[int], int],
    *,
    policy,
    labeler: Labeler,
    cfg,
    fmt: str,
    engine=None,
) -> list[dict]:
  """Two sampled responses per prompt (seed steps 0, 1), then their labels (step 2); `engine`
  (a `sampling.Engine` of the policy, or None for static batches) samples them."""
  convs = [data.prompt_turns(r) for r in records]
  budget = labeler.max_len - cfg.max_new_tokens
  fitted = [
      conversation.fit_turns(c, fmt, policy.tokenizer, budget) if len(c) > 1 else c for c in convs
  ]
  samples = [
      sampling.generate_responses(
          policy,
          fitted,
          fmt=fmt,
          max_new_tokens=cfg.max_new_tokens,
          temperature=cfg.temperature,
          top_k=cfg.top_k or None,
          top_p=cfg.top_p if cfg.top_p < 1.0 else None,
          batch_size=cfg.batch_size,
          seed=chunk_seed(step),
          max_prompt_len=labeler.max_len - cfg.max_new_tokens,
          engine=engine,
      )
      for step in (0, 1)
  ]
  out, pairs = [], []
  for r, conv, a, b in zip(records, convs, *samples):
    text_a, text_b = a.text.strip(), b.text.strip()
    flags = (
        ([] if text_a != text_b else ['identical'])
        + (['empty_a'] if not text_a else [])
        + (['empty_b'] if not text_b else [])
    )
    if (not text_a or not text_b) and 'identical' not in flags and cfg.empty_response == 'skip':
      flags.append('skipped')
    kind = r.get('kind', HARMLESSNESS)
    rec = dict(
        id=r['id'],
        source=r.get('source', ''),
        kind=kind,
        split=r.get('split', records_lib.TRAIN_SPLIT),
        prompt=r['prompt'],
        **({'conversation': r['conversation']} if r.get('conversation') else {}),
        response_a=text_a,
        response_b=text_b,
        p_a=None,
        flags=flags,
        finish_reasons=[a.finish_reason, b.finish_reason],
        details=[],
    )
    if 'identical' in flags:
      rec['p_a'] = 0.5  # by construction: nothing to prefer
    elif 'skipped' not in flags:
      pairs.append((rec, Pair(r['id'], tuple(conv), text_a, text_b, kind=kind)))
    out.append(rec)
  scored = labeler.label([p for _, p in pairs], chunk_seed(2))
  for (rec, _), scorings in zip(pairs, scored):
    rec['details'] = scorings
    rec['p_a'] = label_from_logprobs(scorings, cfg)
  return out


def load_preferences(stage_dir: str | os.PathLike) -> list[dict]:
  """The labeled pairs of a finished feedback stage: {id, prompt, response_a, response_b, p_a,
  flags, kind} (and conversation, for a multi-turn prompt), from the TFDS dataset (or
  samples.jsonl when it was not written)."""
  stage_dir = Path(stage_dir)
  if (data.dataset_dir(DATASET, stage_dir / 'tfds') / 'dataset_info.json').is_file():
    return data.read_records_dataset(DATASET, stage_dir / 'tfds', split='train')
  return [
      _preference(r)
      for r in records_lib.read_jsonl(records_lib.FEEDBACK.path(stage_dir), records_lib.FEEDBACK)
      if 'skipped' not in r['flags']
  ]


def _preference(r: dict) -> dict:
  return {
      **{k: r[k] for k in ('id', 'prompt', 'response_a', 'response_b', 'p_a', 'flags')},
      'kind': r.get('kind', HARMLESSNESS),
      'split': r.get('split', records_lib.TRAIN_SPLIT),
      **({'conversation': r['conversation']} if r.get('conversation') else {}),
  }


def evaluation_coin(seed: int, record: dict) -> float:
  """A uniform [0, 1) number of (seed, prompt kind, prompt id): stable as prompts are added."""
  key = f'{seed}:evaluation:{record.get("kind", HARMLESSNESS)}:{record["id"]}'
  return int(hashlib.sha1(key.encode()).hexdigest()[:16], 16) / 2.0**64


def mark_splits(prompts: Sequence[dict], fraction: float, seed: int) -> list[dict]:
  """The prompts, each with `split`: 'evaluation' for a seeded `fraction` of each kind (held out
  from the RL PM, the evaluation PM's data), else 'train'.

  With fraction > 0, a kind of at least two prompts gives at least one (its lowest coin) to the
  evaluation split and keeps at least one (its highest) for training.
  """
  coins = [evaluation_coin(seed, r) for r in prompts]
  held = {i for i, u in enumerate(coins) if u < fraction}
  for kind in {r.get('kind', HARMLESSNESS) for r in prompts}:
    mine = [i for i, r in enumerate(prompts) if r.get('kind', HARMLESSNESS) == kind]
    if fraction > 0 and len(mine) >= 2:
      held.add(min(mine, key=coins.__getitem__))
      held.discard(max(mine, key=coins.__getitem__))
  return [
      dict(r, split=records_lib.EVALUATION_SPLIT if i in held else records_lib.TRAIN_SPLIT)
      for i, r in enumerate(prompts)
  ]


def _helpful_prompts(ctx, cfg) -> list[dict]:
  """The helpful train prompts whose pairs get helpfulness labels ([] when none are asked for)."""
  if not labels_helpfulness(ctx.config):
    return []
  prompts = data.stage_prompts(ctx, 'helpful', STAGE)['train']
  prompts = prompts if cfg.num_helpful_prompts < 0 else prompts[: cfg.num_helpful_prompts]
  return [dict(r, kind=HELPFULNESS) for r in prompts]


def _helpfulness_source(config) -> str:
  if config.preference.helpful_mix.path:
    return f'none here: HH-RLHF human comparisons from {config.preference.helpful_mix.path}'
  if not labels_helpfulness(config):
    return 'none (feedback.num_helpful_prompts=0)'
  return 'AI-labeled substitute (no HH-RLHF path): helpful prompts under helpfulness principles'


def run(ctx, stage_dir: Path) -> dict:
  t0 = time.time()
  cfg = ctx.config.feedback
  check_feedback_config(cfg)
  ctx.require('sft', STAGE)
  if cfg.num_prompts == 0 or cfg.num_prompts < -1 or cfg.prompt_offset < 0:
    raise StageError(
        f'config.{STAGE}: num_prompts must be -1 (all) or >= 1 and prompt_offset '
        f'>= 0, got {cfg.num_prompts}, {cfg.prompt_offset}'
    )
  constitution = load_feedback_constitution(ctx, cfg)
  prompts = data.stage_prompts(ctx, 'redteam', STAGE)['train'][cfg.prompt_offset :]
  prompts = prompts if cfg.num_prompts < 0 else prompts[: cfg.num_prompts]
  if not prompts:
    raise StageError(f'{STAGE}: no red-team train prompts after prompt_offset={cfg.prompt_offset}')

  helpful = _helpful_prompts(ctx, cfg)
  if labels_helpfulness(ctx.config) and not helpful:
    raise StageError(
        f'{STAGE}: no helpful train prompts to label (see config.data.helpful_sources)'
        '; or set config.feedback.num_helpful_prompts=0'
    )
  if helpful:
    _check_principle_count(cfg, constitution.helpfulness_principles, 'helpfulness')
  fraction = cfg.get('evaluation_fraction', 0.0)
  prompts, helpful = (mark_splits(p, fraction, ctx.config.seed) for p in (prompts, helpful))

  fmt, seed = ctx.config.conversation_format, ctx.config.seed
  policy = ctx.load_role('sft', frozen=True)
  model = feedback_model(ctx)
  engine = lambda m: sampling.Engine.from_config(m.model, ctx.config, m.tokenizer)  # noqa: E731
  policy_engine = engine(policy)
  labeler = Labeler(
      model,
      constitution,
      cfg,
      fmt,
      ctx.config.model.max_len,
      seed,
      STAGE,
      prefix_cache=sampling.PrefixCache.from_config(model.model, ctx.config.sampling),
      engine=engine(model) if cfg.cot else None,
  )
  check_few_shots(labeler, STAGE)
  stage_dir.mkdir(parents=True, exist_ok=True)
  ids = [r['id'] for r in prompts + helpful]
  resumed = 0
  # Red-team prompts, then helpful ones, each in chunks of its own seed stream, into one file.
  for items, stream, desc in (
      (prompts, _RESPONSE_STREAM, 'feedback'),
      (helpful, _HELPFUL_STREAM, 'feedback (helpful)'),
  ):
    if not items:
      continue
    progress = records_lib.process_in_chunks(
        items,
        records_lib.part_path(stage_dir, 'samples'),
        lambda chunk, s: label_chunk(
            chunk, s, policy=policy, labeler=labeler, cfg=cfg, fmt=fmt, engine=policy_engine
        ),
        chunk_size=cfg.chunk_size,
        seed=seed,
        stream=stream,
        desc=desc,
        unit='pair',
        progress=cfg.progress,
        postfix=records_lib.throughput('scored_tok_s', lambda: labeler.scored_tokens),
    )
    resumed += progress['resumed']
  barrier(f'{STAGE}-labeled')
  if jax.process_index() != 0:
    barrier(f'{STAGE}-merged')
    return {}
  samples = records_lib.merge_parts(stage_dir, 'samples', ids, STAGE)
  labeled = [_preference(r) for r in samples if 'skipped' not in r['flags']]
  if cfg.write_tfds:
    data.write_records_dataset(
        {'train': labeled},
        DATASET,
        stage_dir / 'tfds',
        description='AI-feedback preference pairs (p_a = P(a is better))',
    )
  barrier(f'{STAGE}-merged')
  p = np.array([r['p_a'] for r in labeled], np.float64)
  count = lambda flag: sum(flag in r['flags'] for r in samples)  # noqa: E731
  kinds = lambda rs, kind: sum(r.get('kind', HARMLESSNESS) == kind for r in rs)  # noqa: E731
  summary = dict(
      **sampling.engine_summary(policy_engine),
      pairs=len(samples),
      prompt_sources=generated.source_counts(prompts + helpful),
      labeled=len(labeled),
      pairs_harmlessness=kinds(samples, HARMLESSNESS),
      pairs_helpfulness=kinds(samples, HELPFULNESS),
      labeled_harmlessness=kinds(labeled, HARMLESSNESS),
      labeled_helpfulness=kinds(labeled, HELPFULNESS),
      # held out from the RL PM: the evaluation PM's comparisons (evaluation_fraction)
      evaluation_split=sum(r.get('split') == records_lib.EVALUATION_SPLIT for r in labeled),
      helpfulness=_helpfulness_source(ctx.config),
      identical=count('identical'),
      empty=sum(bool({'empty_a', 'empty_b'} & set(r['flags'])) for r in samples),
      skipped=count('skipped'),
      mean_p_a=round(float(p.mean()), 4) if p.size else None,
      frac_a_preferred=round(float(np.mean(p > 0.5)), 4) if p.size else None,
      scorings=sum(len(r['details']) for r in samples),
      resumed_pairs=resumed,
      **few_shot_summary([s for r in samples for s in r['details']]),
      seconds=round(time.time() - t0, 2),
  )
  print(f'{STAGE}: ' + ', '.join(f'{k} {v}' for k, v in summary.items()), flush=True)
  return summary
