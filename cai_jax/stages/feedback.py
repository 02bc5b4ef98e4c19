"""Stage `feedback`: AI feedback as (A)/(B) soft labels (paper section 4.1).

`feedback`: for each red-team prompt the SL-CAI model samples two responses; the feedback model
(by default the pretrained helpful model, as in the paper) reads the multiple-choice prompt of
`constitution.render_feedback_prompt` -- few-shot examples, the conversation, a sampled principle,
"Options: (A) ... (B) ...", "The answer is:" -- and the label is

    p_a = softmax(log P(" (A)"), log P(" (B)"))[0],

optionally averaged over K sampled principles (ensemble), over both option orders (debias), read
after generated chain-of-thought reasoning (cot), and clamped (clamp, paper: 40-60% with CoT).
`evaluate_feedback` (cai_jax/stages/evaluate_feedback.py) measures the same configuration's accuracy and
calibration on labeled comparisons (by default the paper's 438 HHH comparisons).

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

import collections
import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from cai_jax import sampling
from cai_jax.bookkeeping import StageError, barrier
from cai_jax.method import constitution as constitution_lib
from cai_jax.method import conversation, data, labels
from cai_jax.method.conversation import Turn
from cai_jax.utils import records as records_lib

STAGE = 'feedback'
DATASET = 'preferences'  # TFDS dataset name under STAGE_DIR/tfds
OPTIONS = constitution_lib.OPTION_STRINGS  # (' (A)', ' (B)')
# Room kept after a fitted prompt: an option (" (A)") is a few tokens; a CoT prompt is followed
# by the reasoning (cot_max_new_tokens), the answer turn ("\n\nHuman: So the answer is:") and
# an option.
_OPTION_TOKENS, _COT_ANSWER_TOKENS = 8, 24
# Seed streams (disjoint from critique_revision's 0 and 1); helpful prompts have their own, so
# the red-team pairs do not depend on how many helpful prompts are labeled.
_RESPONSE_STREAM, EVAL_STREAM, _HELPFUL_STREAM = 10, 11, 12
HARMLESSNESS, HELPFULNESS = 'harmlessness', 'helpfulness'  # the kinds of pairs


# ----------------------------------------------------------------------------------------------
# The label layer: pure functions of the scored option log-probs.


def scoring_probability(scoring: Mapping) -> float:
  """P(option (A)) of one scoring: the two options' log-probs renormalized."""
  lp = scoring['option_logprobs']
  return labels.option_probability(lp[OPTIONS[0]], lp[OPTIONS[1]])


def label_from_logprobs(scorings: Sequence[Mapping], cfg: Any) -> float:
  """P(response_a is better) from a pair's scorings (the `details` of a samples.jsonl record).

  Each scoring has ``option_logprobs``, ``order`` (0: response_a was option (A), 1: it was (B))
  and ``k`` (which sampled principle). Per principle, two orders are combined with
  `labels.debias` and one order is read directly; the principles are averaged
  (`labels.ensemble`); the result is clamped to [cfg.clamp_lo, cfg.clamp_hi] if cfg.clamp.
  """
  if not scorings:
    raise ValueError('label_from_logprobs needs at least one scoring')
  by_k: dict[int, dict[int, float]] = {}
  for s in scorings:
    order = int(s.get('order', 0))
    if order not in (0, 1):
      raise ValueError(f'scoring order must be 0 or 1, got {order}')
    orders = by_k.setdefault(int(s.get('k', 0)), {})
    if order in orders:
      raise ValueError(f'two scorings of principle k={s.get("k", 0)} in order {order}')
    orders[order] = scoring_probability(s)
  per_principle = []
  for orders in by_k.values():
    if len(orders) == 2:
      per_principle.append(labels.debias(orders[0], orders[1]))
    else:
      ((order, q),) = orders.items()
      per_principle.append(q if order == 0 else 1.0 - q)
  p = labels.ensemble(per_principle)
  if _get(cfg, 'clamp', False):
    p = labels.clamp(p, _get(cfg, 'clamp_lo', 0.4), _get(cfg, 'clamp_hi', 0.6))
  return float(p)


def _get(cfg, name, default):
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default)


# ----------------------------------------------------------------------------------------------
# Option tokenization.


def option_tokens(
    tokenizer, prompt: str, options: Sequence[str] = OPTIONS
) -> tuple[list[int], list[list[int]], int]:
  """(prompt tokens, per-option continuation tokens, boundary_tokens) to score the options.

  Tokenizes ``prompt + option`` whole and splits it after the longest token prefix shared with
  ``tokenize(prompt)`` (the shortest over the options, so all are scored in the same context).
  `boundary_tokens` counts prompt tokens that a cross-boundary merge moved into the scored span.
  """
  p, _ = conversation.encode(tokenizer, prompt)  # as `sampling.generate_responses` encodes it
  fulls = [conversation.encode(tokenizer, prompt + o)[0] for o in options]
  k = min(_common_prefix(p, f) for f in fulls)
  conts = [f[k:] for f in fulls]
  if any(not c for c in conts):
    raise ValueError(f'an option adds no tokens after the prompt: {options!r}')
  return p[:k], conts, len(p) - k


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


# ----------------------------------------------------------------------------------------------
# Labeling pairs with the feedback model.


@dataclasses.dataclass(frozen=True)
class Pair:
  """Two responses to one conversation; the label is P(response_a is better)."""

  id: str
  conversation: tuple[Turn, ...]  # ends with the human's turn
  response_a: str
  response_b: str
  primary_order: int = 0  # order of the first scoring: 0 shows response_a as (A)
  # hhh_mc 'file' mode: the given prompt text for order 0 and order 1 (no rendering).
  file_prompts: tuple[str, str] | None = None
  file_principle: str = ''
  kind: str = HARMLESSNESS  # which principles label it: harmlessness or helpfulness ones


@dataclasses.dataclass
class Labeler:
  """Scores pairs under the feedback configuration (`config.feedback`)."""

  pretrained: Any  # checkpoint.Pretrained of the feedback model
  constitution: constitution_lib.Constitution
  cfg: Any  # config.feedback
  fmt: str  # config.conversation_format
  max_len: int  # longest token sequence built (config.model.max_len)
  seed: int
  stage: str  # principle draws are seeded by (seed, pair id, stage)
  scored_tokens: int = 0  # prompt + option tokens scored so far (throughput)
  prefix_cache: Any = None  # sampling.PrefixCache: shared prompt text (few-shots) prefilled once

  def principles(self, pair: Pair) -> list[str]:
    if pair.file_prompts is not None:
      return [pair.file_principle]
    rng = constitution_lib.principle_rng(self.seed, pair.id, self.stage)
    c = self.constitution
    if pair.kind == HELPFULNESS:  # drawn the same way, from the helpfulness principles
      c = dataclasses.replace(c, feedback_principles=c.helpfulness_principles)
    return constitution_lib.sample_feedback_principles(
        c, self.cfg.num_principles, rng, replace=self.cfg.principle_replace
    )

  def budget(self) -> int:
    """Tokens a rendered feedback prompt may take: what follows it -- the CoT reasoning, the
    answer turn and an option -- must still fit model.max_len."""
    limit = min(self.max_len, self.pretrained.model.cfg.max_positions)
    return limit - (
        self.cfg.cot_max_new_tokens + _COT_ANSWER_TOKENS if self.cfg.cot else _OPTION_TOKENS
    )

  def few_shot_principles(self, pair: Pair, k: int) -> list[str]:
    """The principle of each few-shot in the k-th scoring: independent draws, as in the paper
    (both option orders of one principle share them, so debiasing swaps only the options)."""
    few_shots = (
        self.constitution.feedback_cot_few_shots
        if self.cfg.cot
        else self.constitution.feedback_few_shots
    )
    rng = constitution_lib.principle_rng(self.seed, pair.id, f'{self.stage}/few_shots/{k}')
    return constitution_lib.sample_few_shot_principles(self.constitution, len(few_shots), rng)

  def scorings(self, pair: Pair) -> list[dict]:
    """The scorings of a pair before any model call: principle, order, prompt text."""
    orders = [pair.primary_order] + ([1 - pair.primary_order] if self.cfg.debias else [])
    out = []
    for k, principle in enumerate(self.principles(pair)):
      few_shot_principles = None if pair.file_prompts else self.few_shot_principles(pair, k)
      for order in orders:
        if pair.file_prompts is not None:
          fitted = constitution_lib.FittedPrompt(pair.file_prompts[order], 0, 0, 0)
        else:
          a, b = (
              (pair.response_a, pair.response_b)
              if order == 0
              else (pair.response_b, pair.response_a)
          )
          fitted = constitution_lib.fit_feedback_prompt(
              self.constitution,
              pair.conversation,
              principle,
              a,
              b,
              cot=self.cfg.cot,
              few_shot_principles=few_shot_principles,
              fmt=self.fmt,
              tokenizer=self.pretrained.tokenizer,
              budget=self.budget(),
          )
        scoring = dict(k=k, principle=principle, order=order, prompt=fitted.text, cot=None)
        out.append(dict(scoring, few_shots=fitted.few_shots, turns_dropped=fitted.turns_dropped))
    return out

  def label(self, pairs: Sequence[Pair], seed: int) -> list[list[dict]]:
    """Scorings (with option log-probs) of every pair; `seed` seeds the CoT sampling."""
    jobs = [self.scorings(p) for p in pairs]
    flat = [s for js in jobs for s in js]
    if self.cfg.cot:
      self._reason(flat, seed)
    # The scorings of one conversation (its option orders, the pairs a judge compares on it)
    # share most of their prompt: scored side by side, a PrefixCache computes that text once.
    conversations: dict = {}
    groups = [
        conversations.setdefault(p.conversation, len(conversations))
        for p, js in zip(pairs, jobs)
        for _ in js
    ]
    self._score(flat, groups)
    return jobs

  def _reason(self, scorings: list[dict], seed: int) -> None:
    tok = self.pretrained.tokenizer
    responses = sampling.generate_responses(
        self.pretrained,
        [s['prompt'] for s in scorings],
        fmt=self.fmt,
        max_new_tokens=self.cfg.cot_max_new_tokens,
        temperature=self.cfg.cot_temperature,
        batch_size=self.cfg.batch_size,
        seed=seed,
        stop_strings=constitution_lib.feedback_cot_stop_strings(self.fmt, tok),
        max_prompt_len=self.max_len - self.cfg.cot_max_new_tokens,
        truncate='left',
        prefix_cache=self.prefix_cache,
    )
    for s, r in zip(scorings, responses):
      s['cot'] = r.text.strip()
      s['prompt'] += constitution_lib.render_feedback_answer_suffix(r.text, self.fmt)

  def _score(self, scorings: list[dict], groups: Sequence[int]) -> None:
    tok, model = self.pretrained.tokenizer, self.pretrained.model
    limit = min(self.max_len, model.cfg.max_positions)
    rows = []  # (scoring index, prompt ids, per-option continuation ids)
    for i, s in enumerate(scorings):
      prompt_ids, conts, boundary = option_tokens(tok, s['prompt'], OPTIONS)
      keep = limit - max(len(c) for c in conts)
      if keep < 1:
        raise StageError(f'model.max_len={self.max_len} leaves no room for a feedback prompt')
      s['truncated_tokens'] = max(0, len(prompt_ids) - keep)
      if s['truncated_tokens']:  # only when even the bare question is over budget
        logging.warning(
            '%s: feedback prompt of %d tokens, with %d few-shots and its oldest '
            'turns left out, still loses its first %d (model.max_len %d)',
            self.stage,
            len(prompt_ids),
            s.get('few_shots', 0),
            s['truncated_tokens'],
            self.max_len,
        )
        prompt_ids = conversation.keep_last(prompt_ids, keep, tok)
      s['boundary_tokens'] = boundary
      rows.append((i, prompt_ids, conts))
    # Longest first, so each scoring call holds rows of similar length (tight buckets), and a
    # conversation's rows together, so that a call can prefill their shared text once; the
    # prompt runs once per call and both options read its KV cache.
    longest = collections.defaultdict(int)
    for i, p, _ in rows:
      longest[groups[i]] = max(longest[groups[i]], len(p))
    rows.sort(key=lambda r: (-longest[groups[r[0]]], groups[r[0]], -len(r[1])))
    logprobs: dict[tuple[int, str], float] = {}
    step = max(1, int(self.cfg.score_batch_size))
    for lo in range(0, len(rows), step):
      batch = rows[lo : lo + step]
      totals = sampling.score_options(
          model, [r[1] for r in batch], [r[2] for r in batch], prefix_cache=self.prefix_cache
      )
      for (i, p, conts), row in zip(batch, totals):
        for o, total in zip(OPTIONS, row):
          logprobs[(i, o)] = float(total)
        self.scored_tokens += len(p) + sum(len(c) for c in conts)
    for i, s in enumerate(scorings):
      s['option_logprobs'] = {o: logprobs[(i, o)] for o in OPTIONS}
      s['p_option_a'] = scoring_probability(s)


def feedback_model(ctx):
  """The feedback model: config.feedback.model_source, '' = the pretrained model (the paper's)."""
  if ctx.config.feedback.model_source:
    return ctx.load(ctx.config.feedback.model_source, frozen=True)
  return ctx.load_role('pretrained', frozen=True)


def check_feedback_config(cfg, what: str = 'config.feedback') -> None:
  problems = []
  if cfg.num_principles < 1:
    problems.append(f'num_principles must be >= 1, got {cfg.num_principles}')
  if not 0.0 <= cfg.clamp_lo <= cfg.clamp_hi <= 1.0:
    problems.append(f'need 0 <= clamp_lo <= clamp_hi <= 1, got {cfg.clamp_lo}, {cfg.clamp_hi}')
  if cfg.empty_response not in ('score', 'skip'):
    problems.append(f"empty_response must be 'score' or 'skip', got {cfg.empty_response!r}")
  for field in (
      'chunk_size',
      'batch_size',
      'score_batch_size',
      'max_new_tokens',
      'cot_max_new_tokens',
  ):
    if cfg[field] < 1:
      problems.append(f'{field} must be >= 1, got {cfg[field]}')
  if not 0.0 <= cfg.get('evaluation_fraction', 0.0) < 1.0:
    problems.append(f'evaluation_fraction must be in [0, 1), got {cfg.evaluation_fraction}')
  if cfg.get('num_helpful_prompts', 0) < -1:
    problems.append(f'num_helpful_prompts must be -1 (all) or >= 0, got {cfg.num_helpful_prompts}')
  if problems:
    raise StageError(f'{what}: ' + '; '.join(problems))


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ('sft',)  # the SL-CAI model samples the pairs
MODELS = ('pretrained',)  # the feedback model


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution and the prompt sources."""
  return data.stage_inputs(config)


def fingerprint_fields(config) -> dict:
  """Config outside `feedback` it depends on: with an HH-RLHF helpfulness file
  (`preference.helpful_mix.path`) it labels no helpfulness pairs."""
  if 'preference' not in config:
    return {}
  return {'hh_rlhf_helpfulness': bool(config.preference.helpful_mix.path)}


def check_config(config) -> None:
  """Fails on feedback settings that cannot work (run before anything is written)."""
  check_feedback_config(config.feedback)


def check_few_shots(labeler: Labeler, what: str) -> None:
  """Before any scoring: the few-shots and a one-line conversation must fit the prompt budget
  (else every prompt would lose few-shots); logs what they take."""
  c, tok, cfg = labeler.constitution, labeler.pretrained.tokenizer, labeler.cfg
  what = f'{what} (feedback.num_few_shots={cfg.num_few_shots})'
  try:
    constitution_lib.check_few_shot_budget(
        c, 'feedback', tok, labeler.fmt, labeler.budget(), cot=cfg.cot, what=what
    )
  except ValueError as e:
    raise StageError(str(e)) from None


def few_shot_summary(scorings: Sequence[dict]) -> dict:
  """How the feedback prompts fitted: few-shots kept per prompt, prompts that lost turns."""
  kept = [s['few_shots'] for s in scorings if 'few_shots' in s]
  return dict(
      few_shots_min=min(kept, default=None),
      few_shots_mean=round(sum(kept) / len(kept), 3) if kept else None,
      prompts_lost_turns=sum(bool(s.get('turns_dropped')) for s in scorings),
      prompts_left_cut=sum(bool(s.get('truncated_tokens')) for s in scorings),
  )


def load_feedback_constitution(ctx, cfg) -> constitution_lib.Constitution:
  """The constitution with only its first `num_few_shots` feedback few-shots (-1: all)."""
  c = constitution_lib.load_constitution(ctx.config.constitution)
  if cfg.num_few_shots >= 0:
    c = dataclasses.replace(
        c,
        feedback_few_shots=c.feedback_few_shots[: cfg.num_few_shots],
        feedback_cot_few_shots=c.feedback_cot_few_shots[: cfg.num_few_shots],
    )
  _check_principle_count(cfg, c.feedback_principles, 'feedback')
  return c


def _check_principle_count(cfg, principles: Sequence[str], what: str) -> None:
  if not cfg.principle_replace and cfg.num_principles > len(principles):
    raise StageError(
        f'config.feedback.num_principles={cfg.num_principles} but the constitution '
        f'has {len(principles)} {what} principles; lower it or set '
        'config.feedback.principle_replace=True'
    )


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
) -> list[dict]:
  """Two sampled responses per prompt (seed steps 0, 1), then their labels (step 2)."""
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
  prompts = data.stage_prompts(ctx, 'helpful')['train']
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
  prompts = data.stage_prompts(ctx, 'redteam')['train'][cfg.prompt_offset :]
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
  labeler = Labeler(
      model,
      constitution,
      cfg,
      fmt,
      ctx.config.model.max_len,
      seed,
      STAGE,
      prefix_cache=sampling.PrefixCache.from_config(model.model, ctx.config.sampling),
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
        lambda chunk, s: label_chunk(chunk, s, policy=policy, labeler=labeler, cfg=cfg, fmt=fmt),
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
      pairs=len(samples),
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
