"""The AI labeler (paper section 4.1): the feedback model reads the multiple-choice prompt of
`prompts.render_feedback_prompt` -- few-shot examples, the conversation, a sampled principle,
"Options: (A) ... (B) ...", "The answer is:" -- and the label is

    p_a = softmax(log P(" (A)"), log P(" (B)"))[0],

averaged over sampled principles, both option orders and CoT as configured (`Labeler`, `Pair`,
`label_from_logprobs`). The feedback stage labels its pairs with it, evaluate_feedback measures
it on labeled comparisons, and evaluate judges with it under held-out principles."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from cai_jax import sampling
from cai_jax.bookkeeping import StageError
from cai_jax.method import constitution as constitution_lib
from cai_jax.method import conversation, labels
from cai_jax.method import prompts as prompts_lib
from cai_jax.method.comparisons import HARMLESSNESS, HELPFULNESS
from cai_jax.method.conversation import Turn

OPTIONS = constitution_lib.OPTION_STRINGS  # (' (A)', ' (B)')


# Room kept after a fitted prompt: an option (" (A)") is a few tokens; a CoT prompt is followed
# by the reasoning (cot_max_new_tokens), the answer turn ("\n\nHuman: So the answer is:") and
# an option.
_OPTION_TOKENS, _COT_ANSWER_TOKENS = 8, 24


def scoring_probability(scoring: Mapping) -> float:
  """P(option (A)) of one scoring: the two options' log-probs renormalized."""
  lp = scoring['option_logprobs']
  return labels.option_probability(lp[OPTIONS[0]], lp[OPTIONS[1]])


def label_from_logprobs(scorings: Sequence[Mapping], cfg: Any) -> float:
  """P(response_a is better) from a pair's scorings (the `details` of a samples.jsonl record).

  Each scoring has ``option_logprobs``, ``order`` (0: response_a was option (A), 1: it was (B)),
  ``k`` (which sampled principle) and, with several chains of thought, ``chain``. Per principle
  and chain, two orders are combined with `labels.debias` and one order is read directly; those
  are averaged (`labels.ensemble`: the paper's ensembles of principles and of sampled chains);
  the result is clamped to [cfg.clamp_lo, cfg.clamp_hi] if cfg.clamp.
  """
  if not scorings:
    raise ValueError('label_from_logprobs needs at least one scoring')
  by_k: dict[tuple[int, int], dict[int, float]] = {}
  for s in scorings:
    order = int(s.get('order', 0))
    if order not in (0, 1):
      raise ValueError(f'scoring order must be 0 or 1, got {order}')
    orders = by_k.setdefault((int(s.get('k', 0)), int(s.get('chain', 0))), {})
    if order in orders:
      raise ValueError(
          f'two scorings of principle k={s.get("k", 0)}, chain {s.get("chain", 0)} in order {order}'
      )
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
  engine: Any = None  # sampling.Engine of the feedback model: samples the chains of thought

  def principles(self, pair: Pair) -> list[str]:
    if pair.file_prompts is not None:
      return [pair.file_principle]
    rng = constitution_lib.principle_rng(self.seed, pair.id, self.stage)
    c = self.constitution
    if pair.kind == HELPFULNESS:  # drawn the same way, from the helpfulness principles
      c = dataclasses.replace(c, feedback_principles=c.helpfulness_principles)
    elif self.cfg.get('fixed_principle', -1) >= 0:  # one principle for every harmlessness label
      return [c.feedback_principles[self.cfg.fixed_principle]] * self.cfg.num_principles
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
          fitted = prompts_lib.FittedPrompt(pair.file_prompts[order], 0, 0, 0)
        else:
          a, b = (
              (pair.response_a, pair.response_b)
              if order == 0
              else (pair.response_b, pair.response_a)
          )
          fitted = prompts_lib.fit_feedback_prompt(
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
        scoring.update(few_shots=fitted.few_shots, turns_dropped=fitted.turns_dropped)
        # Chains of thought: `cot_samples` sampled chains per principle and order, each scored
        # (the copies sit at different places in the sampler's batch, so they draw apart).
        chains = self.cfg.get('cot_samples', 1) if self.cfg.cot else 1
        out += [dict(scoring, chain=j) if chains > 1 else scoring for j in range(chains)]
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
        stop_strings=prompts_lib.feedback_cot_stop_strings(self.fmt, tok),
        max_prompt_len=self.max_len - self.cfg.cot_max_new_tokens,
        truncate='left',
        prefix_cache=self.prefix_cache,
        engine=self.engine,
    )
    for s, r in zip(scorings, responses):
      s['cot'] = r.text.strip()
      s['prompt'] += prompts_lib.render_feedback_answer_suffix(
          r.text, self.fmt, self.constitution.text_style
      )

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
  if cfg.get('cot_samples', 1) < 1:
    problems.append(f'cot_samples must be >= 1, got {cfg.cot_samples}')
  elif cfg.get('cot_samples', 1) > 1 and cfg.cot_temperature <= 0:
    problems.append(
        f'cot_samples={cfg.cot_samples} chains at cot_temperature={cfg.cot_temperature} would '
        'all be the one greedy chain; sample them (the paper: temperature 1)'
    )
  if not 0.0 <= cfg.get('evaluation_fraction', 0.0) < 1.0:
    problems.append(f'evaluation_fraction must be in [0, 1), got {cfg.evaluation_fraction}')
  if cfg.get('num_helpful_prompts', 0) < -1:
    problems.append(f'num_helpful_prompts must be -1 (all) or >= 0, got {cfg.num_helpful_prompts}')
  if problems:
    raise StageError(f'{what}: ' + '; '.join(problems))


def check_few_shots(labeler: Labeler, what: str) -> None:
  """Before any scoring: the few-shots and a one-line conversation must fit the prompt budget
  (else every prompt would lose few-shots); logs what they take."""
  c, tok, cfg = labeler.constitution, labeler.pretrained.tokenizer, labeler.cfg
  what = f'{what} (feedback.num_few_shots={cfg.num_few_shots})'
  try:
    prompts_lib.check_few_shot_budget(
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
  fixed = cfg.get('fixed_principle', -1)
  if fixed >= len(c.feedback_principles) or fixed < -1:
    raise StageError(
        f'config.feedback.fixed_principle={fixed}: -1 (drawn per label) or an index below the '
        f"constitution's {len(c.feedback_principles)} feedback principles"
    )
  return c


def _check_principle_count(cfg, principles: Sequence[str], what: str) -> None:
  if not cfg.principle_replace and cfg.num_principles > len(principles):
    raise StageError(
        f'config.feedback.num_principles={cfg.num_principles} but the constitution '
        f'has {len(principles)} {what} principles; lower it or set '
        'config.feedback.principle_replace=True'
    )
