"""Stage `evaluate_feedback`: the `feedback` stage's labeler scored on labeled comparisons (by
default the paper's 438 HHH comparisons), for accuracy and calibration.

Outputs of `evaluate_feedback` (STAGE_DIR):

* ``records.jsonl`` -- one object per comparison, in file order: ``{"id", "correct" (1.0, 0.0,
  or 0.5 for an exact tie), "p_chosen", "chosen_first", "scorings": [detail as above +
  "chosen_option"]}``; response_a of the pair is the chosen reply, so p_chosen is its label.
* ``summary.json`` -- ``accuracy``, ``n``, ``ece`` (`labels.expected_calibration_error` of
  P(first-shown reply is better) against the truth), reliability bins, position-bias numbers,
  malformed lines, the options evaluated and ``seconds``; ``reliability.png`` plots the bins.

Which reply is shown first is a seeded coin per comparison (rendered prompts), so a preference
for position (A) cannot inflate accuracy. With debias the label is symmetric in the order anyway;
the coin is still thrown so the calibration diagram has both outcomes. The paper's file
(``format='hhh_mc'``) is either scored as-is (``hhh_prompt='file'``, the default: zero-shot,
its one principle, its A/B order -- already balanced -- and, for debias, the same text with the
two options swapped) or rendered with our constitution and options (``'render'``).

Why 'file' is the default: it is the paper's protocol. Each line of 438HHHEvaluations.jsonl
carries the exact multiple-choice prompt the paper scored (section 2, Figure 4: "Consider the
following conversation ...", the one HHH principle "Please choose the response that is the
most helpful, honest, and harmless", options " (A)"/" (B)", "The answer is:"), with no
few-shots; rendering our few-shots around it measured a different task and made long prompts
lose their start. The paper's chain-of-thought points add few-shot CoT prompts, which the file
lacks: for `feedback.cot` (or an ensemble of principles) use 'render', ideally with the
release constitution (`config.constitution` = its prompts/ directory).

The paper's appendix evaluations (`evals`, by default both files beside the HHH one):
``HarmfulVsEthical`` (254 conversations: was the assistant " (A) harmful or unethical" or
" (B) ethical"?) and ``HarmfulnessClassification`` (287 harmful conversations: which of nine
kinds of harm, " (A) Theft" .. " (I) Misinformation or Conspiracy Theories"). Each line is
{"prompt", "corrects", "incorrects"}: the whole multiple-choice prompt, scored as-is (zero-shot,
as the HHH file) by the feedback model; its answer is the option of highest log-probability.
Written to ``appendix_<name>.jsonl`` ({id, option_logprobs, answer, correct}); the summary holds
``appendix: {name: {accuracy, n, options, chance}}`` ({available: False, why} for a paper file
that is absent).

Chunks are resumable and shared across processes exactly as in `feedback`: both run through
`records.process_in_chunks`; the record keys are `records.FEEDBACK_EVAL`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from cai_jax import sampling
from cai_jax.bookkeeping import StageError, barrier
from cai_jax.evaluation.appendix import (
    APPENDIX_EVALS,
    PAPER_EVALS,
    appendix_path,
    appendix_summary,
    read_multiple_choice,
    score_multiple_choice,
)
from cai_jax.evaluation.scores import pm_rewards
from cai_jax.method import constitution as constitution_lib
from cai_jax.method import conversation, labels
from cai_jax.method import stage_inputs
from cai_jax.method.conversation import ASSISTANT, HUMAN, Turn
from cai_jax.method.labeler import (
    Labeler,
    OPTIONS,
    Pair,
    check_feedback_config,
    check_few_shots,
    feedback_model,
    few_shot_summary,
    label_from_logprobs,
    load_feedback_constitution,
)
from cai_jax.utils import records as records_lib

EVAL_STAGE = 'evaluate_feedback'
EVAL_STREAM = 11  # seed stream, disjoint from feedback's (10, 12) and critique_revision's (0, 1)
PAPER_HHH = PAPER_EVALS / '438HHHEvaluations.jsonl'


_APPENDIX_STREAM = 13  # process_in_chunks seed stream (the scoring draws nothing from it)


_HHH_OPTIONS = re.compile(r'( \(A\) \[\[\[)(.*?)(\]\]\]\n \(B\) \[\[\[)(.*?)(\]\]\])', re.S)
_HHH_PRINCIPLE = re.compile(r'\n\n\n?([^\n]*?)\s*Options:\n \(A\)')


class MalformedLine(ValueError):
  pass


def _turns(value: Any) -> tuple[Turn, ...]:
  if isinstance(value, str):
    turns = conversation.parse_transcript(value)
    if not turns and value.strip():
      turns = [(HUMAN, value.strip())]  # a bare request without transcript labels
  elif isinstance(value, list):
    turns = []
    for t in value:
      if not (
          isinstance(t, (list, tuple))
          and len(t) == 2
          and t[0] in (HUMAN, ASSISTANT)
          and isinstance(t[1], str)
      ):
        raise MalformedLine(f'conversation turn {t!r} is not ["human"|"assistant", text]')
      turns.append((t[0], t[1].strip()))
  else:
    raise MalformedLine('"conversation" must be a transcript string or a list of turns')
  if not turns or turns[-1][0] != HUMAN:
    raise MalformedLine(
        "the conversation must end with the human's turn (the responses " 'answer it)'
    )
  return tuple(turns)


def _string(record: dict, key: str) -> str:
  if not isinstance(record.get(key), str) or not record[key].strip():
    raise MalformedLine(f'"{key}" must be a non-empty string')
  return record[key]


def parse_generic(record: dict, line: int) -> Pair:
  """{"conversation": transcript | [[role, text], ...], "chosen": str, "rejected": str}."""
  turns = _turns(record.get('conversation'))
  chosen, rejected = _string(record, 'chosen').strip(), _string(record, 'rejected').strip()
  if chosen == rejected:
    raise MalformedLine('"chosen" and "rejected" are identical')
  return Pair(str(record.get('id', f'line{line}')), turns, chosen, rejected)


def parse_hhh(record: dict, line: int, mode: str) -> Pair:
  """The paper's 438HHHEvaluations.jsonl: prompt, corrects, incorrects, text_correct/incorrect.

  response_a is the correct (chosen) reply. 'render' rebuilds the conversation and replies from
  text_correct/text_incorrect for our prompts; 'file' scores the given prompt as-is (order of
  the file), and its options swapped for debiasing.
  """
  correct, incorrect = record.get('corrects'), record.get('incorrects')
  if (
      not isinstance(correct, list)
      or not isinstance(incorrect, list)
      or sorted(correct + incorrect) != sorted(OPTIONS)
  ):
    raise MalformedLine(
        f'"corrects"/"incorrects" must be [" (A)"]/[" (B)"] or the reverse, got '
        f'{correct!r}/{incorrect!r}'
    )
  # Raw texts: the release constitution's text style renders them back as the file wrote them.
  ta = conversation.parse_transcript(_string(record, 'text_correct'), raw=True)
  tb = conversation.parse_transcript(_string(record, 'text_incorrect'), raw=True)
  if len(ta) < 2 or len(tb) < 2 or ta[-1][0] != ASSISTANT or tb[-1][0] != ASSISTANT:
    raise MalformedLine(
        'text_correct/text_incorrect must be transcripts ending with the ' "assistant's reply"
    )
  if ta[:-1] != tb[:-1]:
    raise MalformedLine('text_correct and text_incorrect differ before their last reply')
  primary = 0 if correct == [OPTIONS[0]] else 1
  pair = Pair(f'line{line}', tuple(ta[:-1]), ta[-1][1], tb[-1][1], primary)
  if mode == 'render':
    return pair
  prompt = _string(record, 'prompt')
  m, principle = _HHH_OPTIONS.search(prompt), _HHH_PRINCIPLE.search(prompt)
  if not m or not principle:
    raise MalformedLine(
        '"prompt" lacks the "<principle> Options:\\n (A) [[[...]]]\\n (B) ' '[[[...]]]" layout'
    )
  swapped = prompt[: m.start()] + m[1] + m[4] + m[3] + m[2] + m[5] + prompt[m.end() :]
  # Order 0 shows response_a (correct) as (A).
  prompts = (prompt, swapped) if primary == 0 else (swapped, prompt)
  return dataclasses.replace(pair, file_prompts=prompts, file_principle=principle[1].strip())


def read_comparisons(
    path: str | os.PathLike,
    fmt: str,
    *,
    limit: int = 0,
    on_malformed: str = 'fail',
    hhh_prompt: str = 'file',
) -> tuple[list[Pair], list[dict]]:
  """(the first `limit` comparisons (0: all), malformed lines [{line, error}])."""
  if fmt not in ('generic', 'hhh_mc'):
    raise StageError(f"config.{EVAL_STAGE}.format must be 'generic' or 'hhh_mc', got {fmt!r}")
  if on_malformed not in ('skip', 'fail'):
    raise StageError(
        f"config.{EVAL_STAGE}.on_malformed must be 'skip' or 'fail', got " f'{on_malformed!r}'
    )
  if hhh_prompt not in ('render', 'file'):
    raise StageError(
        f"config.{EVAL_STAGE}.hhh_prompt must be 'render' or 'file', got " f'{hhh_prompt!r}'
    )
  pairs, malformed = [], []
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, start=1):
      if limit and len(pairs) >= limit:
        break
      if not line.strip():
        continue
      try:
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise MalformedLine(f'not JSON ({e})') from None
        if not isinstance(record, dict):
          raise MalformedLine(f'expected a JSON object, got {type(record).__name__}')
        pair = (
            parse_generic(record, line_no)
            if fmt == 'generic'
            else parse_hhh(record, line_no, hhh_prompt)
        )
      except MalformedLine as e:
        if on_malformed == 'fail':
          raise StageError(
              f'{path}:{line_no}: malformed {fmt} comparison: {e} (set '
              f'config.{EVAL_STAGE}.on_malformed=skip to skip such lines)'
          ) from None
        logging.warning('%s:%d: skipping malformed %s comparison: %s', path, line_no, fmt, e)
        malformed.append({'line': line_no, 'error': str(e)})
        continue
      pairs.append(pair)
  ids = [p.id for p in pairs]
  if len(set(ids)) != len(ids):
    raise StageError(f'{path}: comparison ids are not unique')
  return pairs, malformed


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ()  # labeled comparisons from files, no upstream stage
MODELS = ('pretrained',)  # the feedback model
OPTIONAL = ('preference',)  # the RL PM, scored on the same comparisons once it has been trained


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution, the prompt sources, the labeled
  comparisons (`evaluate_feedback.comparisons`) and the appendix evaluations' files."""
  out = stage_inputs.files(config, 'evaluate_feedback.comparisons')
  for e in config.evaluate_feedback.get('evals', ()):
    if appendix_path(e).is_file():
      out[f'evaluate_feedback.evals.{e}'] = appendix_path(e)
  return out


def fingerprint_fields(config) -> dict:
  """Config outside `evaluate_feedback` it depends on: the feedback configuration it evaluates."""
  return {'feedback': config.feedback} if 'feedback' in config else {}


def check_config(config) -> None:
  """Fails on evaluate_feedback settings that cannot work (run before anything is written)."""
  ecfg = config[EVAL_STAGE]
  for name in ecfg.get('evals', ()):
    # The paper's files may be absent (a clone without ../shared): reported, not refused.
    if name not in APPENDIX_EVALS and not appendix_path(name).is_file():
      raise StageError(
          f'config.{EVAL_STAGE}.evals: {name!r} is not a file; give names of {APPENDIX_EVALS} '
          "(the paper's files beside the HHH comparisons), paths, or () for none"
      )
  check_feedback_config(config.feedback)
  for field, valid in (
      ('format', ('generic', 'hhh_mc')),
      ('on_malformed', ('skip', 'fail')),
      ('hhh_prompt', ('render', 'file')),
  ):
    if ecfg[field] not in valid:
      raise StageError(f'config.{EVAL_STAGE}.{field} must be one of {valid}, got {ecfg[field]!r}')
  comparisons_path(ecfg)


def comparisons_path(cfg) -> Path:
  if cfg.comparisons:
    path = Path(cfg.comparisons)
    if not path.is_file():
      raise StageError(f'config.{EVAL_STAGE}.comparisons: no such file {path}')
    try:  # read up front: a file that is not UTF-8 fails here, not after the run has started
      path.read_bytes().decode('utf-8')
    except UnicodeDecodeError as e:
      raise StageError(f'config.{EVAL_STAGE}.comparisons: {path} is not UTF-8 text ({e})') from None
    return path
  if not PAPER_HHH.is_file():
    raise StageError(
        f"config.{EVAL_STAGE}.comparisons is '' (the paper's HHH comparisons), but "
        f'{PAPER_HHH} does not exist; pass a JSONL file with '
        f'--config.{EVAL_STAGE}.comparisons=PATH (and .format=generic for '
        '{"conversation", "chosen", "rejected"} records)'
    )
  return PAPER_HHH


def evaluate_chunk(
    pairs: Sequence[Pair], chunk_seed: Callable[[int], int], *, labeler: Labeler
) -> list[dict]:
  out = []
  scored = labeler.label(pairs, chunk_seed(0))
  for pair, scorings in zip(pairs, scored):
    p_chosen = label_from_logprobs(scorings, labeler.cfg)  # response_a is the chosen reply
    for s in scorings:
      s['chosen_option'] = OPTIONS[s['order']]
    out.append(
        dict(
            id=pair.id,
            correct=labels.hard_label(p_chosen),
            p_chosen=p_chosen,
            chosen_first=pair.primary_order == 0,
            scorings=scorings,
        )
    )
  return out


def _randomize_sides(pairs: Sequence[Pair], seed: int) -> list[Pair]:
  """A seeded coin per comparison puts the chosen reply first or second (rendered prompts)."""
  return [
      dataclasses.replace(
          p,
          primary_order=int(
              constitution_lib.principle_rng(seed, p.id, f'{EVAL_STAGE}/side').integers(2)
          ),
      )
      for p in pairs
  ]


def run(ctx, stage_dir: Path) -> dict:
  t0 = time.time()
  ecfg, cfg = ctx.config.evaluate_feedback, ctx.config.feedback
  check_feedback_config(cfg)
  path = comparisons_path(ecfg)
  file_mode = ecfg.format == 'hhh_mc' and ecfg.hhh_prompt == 'file'
  if file_mode and (cfg.cot or cfg.num_principles > 1):
    raise StageError(
        f"config.{EVAL_STAGE}.hhh_prompt='file' scores the file's own zero-shot "
        'prompt (one principle, no chain of thought); use hhh_prompt=render for '
        'feedback.num_principles > 1 or feedback.cot'
    )
  pairs, malformed = read_comparisons(
      path,
      ecfg.format,
      limit=ecfg.limit,
      on_malformed=ecfg.on_malformed,
      hhh_prompt=ecfg.hhh_prompt,
  )
  if not pairs:
    raise StageError(f'{EVAL_STAGE}: no usable comparisons in {path}')
  if not file_mode:
    # The file's own order is kept in 'file' mode (the paper's file balances A/B already).
    pairs = _randomize_sides(pairs, ctx.config.seed)
  constitution = (
      constitution_lib.load_constitution(ctx.config.constitution)
      if file_mode
      else load_feedback_constitution(ctx, cfg)
  )
  model = feedback_model(ctx)
  labeler = Labeler(
      model,
      constitution,
      cfg,
      ctx.config.conversation_format,
      ctx.config.model.max_len,
      ctx.config.seed,
      EVAL_STAGE,
      prefix_cache=sampling.PrefixCache.from_config(model.model, ctx.config.sampling),
      engine=sampling.Engine.from_config(model.model, ctx.config, model.tokenizer)
      if cfg.cot
      else None,
  )
  if not file_mode:
    check_few_shots(labeler, EVAL_STAGE)
  stage_dir.mkdir(parents=True, exist_ok=True)
  ids = [p.id for p in pairs]
  records_lib.process_in_chunks(
      pairs,
      records_lib.part_path(stage_dir, 'records'),
      lambda chunk, s: evaluate_chunk(chunk, s, labeler=labeler),
      chunk_size=ecfg.chunk_size,
      seed=ctx.config.seed,
      stream=EVAL_STREAM,
      desc='evaluate_feedback',
      ids=ids,
      unit='pair',
      progress=cfg.progress,
      postfix=records_lib.throughput('scored_tok_s', lambda: labeler.scored_tokens),
  )
  appendix = {}  # name -> items, scored into appendix_<name>.jsonl
  absent = {}  # name -> why it was not evaluated
  for name in ecfg.get('evals', ()):
    if not appendix_path(name).is_file():
      absent[name] = {'available': False, 'why': f'{appendix_path(name)} is absent'}
      continue
    items = read_multiple_choice(appendix_path(name), limit=ecfg.limit)
    appendix[name] = items
    records_lib.process_in_chunks(
        items,
        records_lib.part_path(stage_dir, f'appendix_{name}'),
        lambda chunk, s: score_multiple_choice(
            labeler.pretrained,
            chunk,
            max_len=ctx.config.model.max_len,
            batch_size=cfg.score_batch_size,
        ),
        chunk_size=ecfg.chunk_size,
        seed=ctx.config.seed,
        stream=_APPENDIX_STREAM,
        desc=name,
        ids=[i.id for i in items],
        unit='prompt',
        progress=cfg.progress,
    )
  barrier(f'{EVAL_STAGE}-scored')
  if jax.process_index() != 0:
    barrier(f'{EVAL_STAGE}-merged')
    return {}
  records = records_lib.merge_parts(stage_dir, 'records', ids, EVAL_STAGE)
  appendix_results = {
      name: appendix_summary(
          items,
          records_lib.merge_parts(stage_dir, f'appendix_{name}', [i.id for i in items], EVAL_STAGE),
      )
      for name, items in appendix.items()
  }
  appendix_results.update(absent)
  summary = summarize(records, n_bins=ecfg.ece_bins)
  summary['pm'] = pm_accuracy(ctx, pairs)
  summary.update(few_shot_summary([s for r in records for s in r['scorings']]))
  summary.update(
      comparisons=str(path),
      format=ecfg.format,
      hhh_prompt=ecfg.hhh_prompt,
      n_malformed=len(malformed),
      malformed=malformed[:50],
      appendix=appendix_results,
      feedback_model=cfg.model_source or ctx.model_source('pretrained'),
      options=dict(
          num_principles=cfg.num_principles,
          debias=cfg.debias,
          cot=cfg.cot,
          clamp=cfg.clamp,
          clamp_range=[cfg.clamp_lo, cfg.clamp_hi],
      ),
      seconds=round(time.time() - t0, 2),
  )
  plot_reliability(summary, stage_dir / 'reliability.png')
  (stage_dir / 'summary.json').write_text(json.dumps(summary, indent=1) + '\n')
  barrier(f'{EVAL_STAGE}-merged')
  appendix_line = ''.join(
      f'; {name} accuracy {a["accuracy"]:.4f} (n {a["n"]}, chance {a["chance"]:.2f})'
      for name, a in appendix_results.items()
      if 'accuracy' in a
  )
  pm = summary['pm']
  pm_line = f'; PM accuracy {pm["accuracy"]:.4f}' if pm['available'] else ''
  print(
      f'{EVAL_STAGE}: accuracy {summary["accuracy"]:.4f} (n {summary["n"]}), ECE '
      f'{summary["ece"]:.4f}{pm_line}{appendix_line}, {summary["seconds"]:.0f} s',
      flush=True,
  )
  keys = ('accuracy', 'ci95', 'n', 'ece', 'pm', 'n_malformed', 'appendix', 'seconds')
  return {k: summary[k] for k in keys}


def accuracy_interval(correct: Sequence[float]) -> dict:
  """Accuracy of per-comparison scores (1, 0, or 1/2 for a tie) with its 95% normal interval."""
  x = np.asarray(correct, np.float64)
  acc = float(x.mean())
  half = 1.96 * float(np.sqrt(max(acc * (1 - acc), 0.0) / len(x)))
  return dict(accuracy=acc, ci95=[max(0.0, acc - half), min(1.0, acc + half)], n=int(len(x)))


def pm_accuracy(ctx, pairs: Sequence[Pair]) -> dict:
  """The RL PM's accuracy on the same comparisons, drawn beside the feedback model's in the
  paper (figure 4): its reward of the chosen reply above the rejected one's (ties 1/2), with a 95%
  interval; unavailable, with why, until the preference stage has finished in this workdir."""
  d, why = ctx.optional('preference')
  if d is None:
    return {'available': False, 'why': why}
  pm = ctx.load_role('preference', scalar_head=True, cache=False, frozen=True)
  rewards = pm_rewards(
      ctx,
      pm,
      [(*p.conversation, (ASSISTANT, r)) for p in pairs for r in (p.response_a, p.response_b)],
  ).reshape(-1, 2)
  correct = np.where(rewards[:, 0] > rewards[:, 1], 1.0, 0.0)
  correct[rewards[:, 0] == rewards[:, 1]] = 0.5
  return {'available': True, 'source': ctx.model_source('preference'), **accuracy_interval(correct)}


def summarize(records: Sequence[dict], n_bins: int = 10) -> dict:
  """Accuracy (ties count 1/2), and calibration of P(first-shown reply is better) against the
  truth. Using the first-shown reply (not the chosen one) keeps both outcomes in the diagram."""
  p_chosen = np.array([r['p_chosen'] for r in records], np.float64)
  first = np.array([r['chosen_first'] for r in records], bool)
  p_first = np.where(first, p_chosen, 1.0 - p_chosen)
  outcome = first.astype(np.float64)
  bins = labels.reliability_bins(p_first, outcome, n_bins)
  return dict(
      **accuracy_interval([r['correct'] for r in records]),
      ece=labels.expected_calibration_error(p_first, outcome, n_bins),
      ece_bins=n_bins,
      mean_p_chosen=float(p_chosen.mean()),
      # Position bias: how often the first-shown reply is preferred (truth: mean of outcome).
      frac_first_preferred=float(np.mean(p_first > 0.5)),
      frac_chosen_first=float(outcome.mean()),
      reliability=[
          dict(mean_p=None if c == 0 else m, frac=None if c == 0 else f, count=c)
          for m, f, c in bins
      ],
  )


def plot_reliability(summary: dict, path: Path) -> None:
  """Reliability diagram: observed frequency against mean predicted probability per bin."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  bins = [b for b in summary['reliability'] if b['count']]
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  ax.plot([0, 1], [0, 1], ls='--', c='gray', lw=1, label='perfect calibration')
  if bins:
    ax.plot([b['mean_p'] for b in bins], [b['frac'] for b in bins], marker='o', label='labels')
    for b in bins:
      ax.annotate(
          str(b['count']),
          (b['mean_p'], b['frac']),
          fontsize=7,
          textcoords='offset points',
          xytext=(3, 3),
      )
  ax.set(
      xlim=(0, 1),
      ylim=(0, 1),
      xlabel='P(first-shown reply is better)',
      ylabel='fraction where it is',
      title=f'accuracy {summary["accuracy"]:.3f}, ECE {summary["ece"]:.3f}, n {summary["n"]}',
  )
  ax.legend(loc='upper left', fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
