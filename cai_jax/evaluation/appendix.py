"""The paper's appendix evaluations of the feedback model (the files beside its 438 HHH
comparisons): `HarmfulVsEthical` (254 conversations: was the assistant " (A) harmful or
unethical" or " (B) ethical"?) and `HarmfulnessClassification` (287 harmful conversations: which
of nine kinds of harm). Each line is {"prompt", "corrects", "incorrects"}: the whole
multiple-choice prompt, scored as-is (zero-shot) by the feedback model; its answer is the option
of highest log-probability. The evaluate_feedback stage runs them."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cai_jax import sampling
from cai_jax.bookkeeping import StageError
from cai_jax.method import conversation
from cai_jax.method.labeler import option_tokens

# The paper's appendix evaluations, by name: files beside the HHH comparisons.
# The paper's evaluation files, beside the checkout (shared/data/anthropic_cai/evals/).
PAPER_EVALS = Path(__file__).resolve().parents[3] / 'shared/data/anthropic_cai/evals'
APPENDIX_EVALS = ('HarmfulVsEthical', 'HarmfulnessClassification')


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """A complete multiple-choice prompt; the answer is one of `options` (" (A)", " (B)", ...)."""

  id: str
  prompt: str
  options: tuple[str, ...]  # every option, in letter order
  corrects: frozenset[str]


def appendix_path(name: str) -> Path:
  """A name in APPENDIX_EVALS is the paper's file beside the HHH comparisons; else a path."""
  return PAPER_EVALS / f'{name}.jsonl' if name in APPENDIX_EVALS else Path(name).expanduser()


def read_multiple_choice(path: str | os.PathLike, limit: int = 0) -> list[MultipleChoice]:
  """The first `limit` (0: all) {"prompt", "corrects", "incorrects"} lines of a file (the
  format of the paper's HarmfulVsEthical and HarmfulnessClassification evaluations); a
  malformed line is a StageError naming it."""
  out = []
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, start=1):
      if limit and len(out) >= limit:
        break
      if not line.strip():
        continue
      where = f'{path}:{line_no}'
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise StageError(f'{where}: not JSON ({e.msg})') from None
      corrects, incorrects = record.get('corrects'), record.get('incorrects')
      if (
          not isinstance(record.get('prompt'), str)
          or not isinstance(corrects, list)
          or not isinstance(incorrects, list)
          or not corrects
          or not incorrects
          or not all(isinstance(o, str) and o for o in corrects + incorrects)
          or len(set(corrects + incorrects)) != len(corrects + incorrects)
      ):
        raise StageError(
            f'{where}: needs "prompt" and disjoint non-empty "corrects"/"incorrects" option '
            'lists (e.g. [" (B)"] / [" (A)"])'
        )
      out.append(
          MultipleChoice(
              f'line{line_no}',
              record['prompt'],
              tuple(sorted(corrects + incorrects)),
              frozenset(corrects),
          )
      )
  return out


def score_multiple_choice(
    pretrained, items: Sequence[MultipleChoice], *, max_len: int, batch_size: int
) -> list[dict]:
  """{id, option_logprobs, answer, correct} per item: the log-prob of each option after the
  prompt (its start cut if over budget), the argmax answer, and whether it is a correct one."""
  tok, model = pretrained.tokenizer, pretrained.model
  limit = min(max_len, model.cfg.max_positions)
  rows = []  # (position, item, prompt ids, per-option continuation ids)
  for k, item in enumerate(items):
    prompt_ids, conts, _ = option_tokens(tok, item.prompt, item.options)
    keep = limit - max(len(c) for c in conts)
    rows.append((k, item, conversation.keep_last(prompt_ids, keep, tok), conts))
  out: list[dict] = [{} for _ in items]
  # score_options takes rows of one option count: group by it, longest prompts first.
  for n_options in sorted({len(item.options) for item in items}):
    group = sorted((r for r in rows if len(r[1].options) == n_options), key=lambda r: -len(r[2]))
    for lo in range(0, len(group), max(1, batch_size)):
      batch = group[lo : lo + batch_size]
      totals = sampling.score_options(model, [r[2] for r in batch], [r[3] for r in batch])
      for (k, item, _, _), row in zip(batch, totals):
        logprobs = {o: float(t) for o, t in zip(item.options, row)}
        answer = max(item.options, key=logprobs.__getitem__)
        out[k] = dict(
            id=item.id,
            option_logprobs=logprobs,
            answer=answer,
            correct=float(answer in item.corrects),
        )
  return out


def appendix_summary(items: Sequence[MultipleChoice], records: Sequence[dict]) -> dict:
  """Accuracy, count, options per item and the accuracy of a uniform guess."""
  return dict(
      accuracy=float(np.mean([r['correct'] for r in records])),
      n=len(records),
      options=sorted({len(i.options) for i in items}),
      chance=float(np.mean([len(i.corrects) / len(i.options) for i in items])),
  )
