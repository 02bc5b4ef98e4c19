"""The constitution: principles, few-shot examples, and every CAI prompt built from them.

A constitution (Bai et al. 2022, sections 3 and 4) holds

* critique/revision request pairs -- the SL stage samples one pair per revision round;
* few-shot critique/revision examples prepended to every critique and revision prompt;
* multiple-choice feedback principles -- the RL stage asks "which response is better?" under a
  sampled principle and reads p(A), p(B) from the option strings ``OPTION_STRINGS``;
* few-shot feedback examples, plain and chain-of-thought (CoT);
* helpfulness principles -- the feedback stage labels pairs of responses to helpful prompts
  under them. The paper's helpfulness comparisons are human (HH-RLHF); these AI labels are our
  documented substitute when no HH-RLHF comparisons file is given.

It is loaded from our JSON format (``configs/constitutions/README.md``; bundled ones under
``cai_jax/assets/constitutions/``) or from a directory in the format of the paper's data release.
Principles are sampled with ``principle_rng(seed, example_id, stage)`` so that a prompt gets the
same principles whatever batch, host or restart it is processed in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from cai_jax.method import conversation
from cai_jax.method.conversation import ASSISTANT, HUMAN, Turn

FORMAT_VERSION = 'cai_jax.constitution/v1'
BUNDLED = ('default', 'tiny')  # Names resolved to cai_jax/assets/constitutions/<name>.json.

# The option strings whose log-probabilities are compared when scoring feedback prompts.
OPTION_STRINGS = (' (A)', ' (B)')
ANSWERS = ('A', 'B')

# Fixed phrases of the feedback prompts (paper, section 4.1).
FEEDBACK_INTRO = 'Consider the following conversation between a human and an assistant:'
ANSWER_PREFIX = 'The answer is:'
COT_PREFIX = "Let's think step-by-step:"
COT_ANSWER_PREFIX = 'So the answer is:'

# Helpfulness principles, written for cai_jax (the paper has none: its helpfulness labels are
# human). A constitution file may bring its own (key 'helpfulness_principles'); else these.
HELPFULNESS_PRINCIPLES = (
    'Which of these assistant responses is more helpful, honest and accurate?',
    "Which response answers the human's actual question more directly and completely?",
    'Which response gives clearer, more correct and more useful information?',
    'Which response would a thoughtful expert judge the better answer: accurate, specific and '
    'easy to follow?',
    'Which response engages with the request instead of evading it, while staying truthful?',
    'Which response is better organized and to the point, without leaving out anything the '
    'human needs?',
)

# Transcript labels of the critique/revision prompts, mapped to the chat role that says them.
_CR_ROLES = {
    'Human': HUMAN,
    'Assistant': ASSISTANT,
    'CritiqueRequest': HUMAN,
    'Critique': ASSISTANT,
    'RevisionRequest': HUMAN,
    'Revision': ASSISTANT,
}


class ConstitutionError(ValueError):
  """A constitution file that cannot be used; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class CritiqueRevisionPair:
  """One principle of the SL stage, as the paper writes it: a request to critique the last
  response under it, and a request to revise the response accordingly (one is drawn per round)."""

  name: str
  critique_request: str
  revision_request: str


@dataclasses.dataclass(frozen=True)
class CritiqueRevisionRound:
  """One finished round of critique and revision: history in the next round's prompts, or the
  worked round of a few-shot."""

  pair: CritiqueRevisionPair
  critique: str
  revision: str


@dataclasses.dataclass(frozen=True)
class CritiqueFewShot:
  """A worked example shown before the conversation being revised: a conversation, the
  assistant's reply, and one round of critique and revision of it (its pair is unnamed)."""

  conversation: tuple[Turn, ...]  # Alternating turns ending with the human's.
  response: str  # The assistant reply that gets critiqued.
  round: CritiqueRevisionRound


@dataclasses.dataclass(frozen=True)
class FeedbackFewShot:
  """A worked multiple-choice example shown before the pair being labeled."""

  conversation: tuple[Turn, ...]  # Alternating turns ending with the human's.
  response_a: str
  response_b: str
  answer: str  # 'A' or 'B'.
  reasoning: str | None = None  # The chain of thought (CoT examples only).
  principle: str | None = None  # None: shown under the principle of the prompt being built.


def critique_few_shot(
    conversation: tuple[Turn, ...],
    response: str,
    critique_request: str,
    critique: str,
    revision_request: str,
    revision: str,
) -> CritiqueFewShot:
  """A few-shot from its fields as files write them (flat, in prompt order)."""
  pair = CritiqueRevisionPair('', critique_request, revision_request)
  return CritiqueFewShot(conversation, response, CritiqueRevisionRound(pair, critique, revision))


def critique_few_shot_dict(ex: CritiqueFewShot, conversation: list) -> dict:
  """The flat JSON record of a few-shot (the inverse of `critique_few_shot`)."""
  return dict(
      conversation=conversation,
      response=ex.response,
      critique_request=ex.round.pair.critique_request,
      critique=ex.round.critique,
      revision_request=ex.round.pair.revision_request,
      revision=ex.round.revision,
  )


@dataclasses.dataclass(frozen=True)
class Constitution:
  critique_revision: tuple[CritiqueRevisionPair, ...]
  critique_few_shots: tuple[CritiqueFewShot, ...]
  feedback_principles: tuple[str, ...]
  feedback_few_shots: tuple[FeedbackFewShot, ...]
  feedback_cot_few_shots: tuple[FeedbackFewShot, ...]
  description: str = ''
  # Where it was loaded from: not part of the content, so not compared.
  source: str = dataclasses.field(default='', compare=False)
  # Principles of the AI-labeled helpfulness comparisons (a substitute for human ones).
  helpfulness_principles: tuple[str, ...] = HELPFULNESS_PRINCIPLES


# ----------------------------------------------------------------------------------------------
# Loading our JSON format.

_TOP_LEVEL_KEYS = (
    'format',
    'description',
    'critique_revision',
    'critique_few_shots',
    'feedback_principles',
    'feedback_few_shots',
    'feedback_cot_few_shots',
    'helpfulness_principles',
)


class _Reader:
  """Typed access to parsed JSON that reports errors as '<file>: key '<path>': <problem>'."""

  def __init__(self, source: str):
    self.source = source

  def error(self, key: str, problem: str) -> ConstitutionError:
    return ConstitutionError(f"{self.source}: key '{key}': {problem}")

  def string(self, value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
      raise self.error(key, 'expected a non-empty string')
    return value.strip()

  def entries(self, obj: dict, key: str, *, min_len: int = 0) -> list:
    if key not in obj:
      raise self.error(key, 'missing')
    value = obj[key]
    if not isinstance(value, list):
      raise self.error(key, f'expected a list, got {type(value).__name__}')
    if len(value) < min_len:
      raise self.error(
          key,
          'expected a non-empty list'
          if min_len == 1
          else f'expected at least {min_len} entries, got {len(value)}',
      )
    return value

  def record(
      self, value: Any, key: str, required: Sequence[str], optional: Sequence[str] = ()
  ) -> dict:
    if not isinstance(value, dict):
      raise self.error(key, f'expected an object, got {type(value).__name__}')
    for k in required:
      if k not in value:
        raise self.error(f'{key}.{k}', 'missing')
    for k in value:
      if k not in required and k not in optional:
        raise self.error(
            f'{key}.{k}', f'unknown key; expected one of {list(required) + list(optional)}'
        )
    return value

  def conversation(self, value: Any, key: str) -> tuple[Turn, ...]:
    if not isinstance(value, list) or not value:
      raise self.error(key, 'expected a non-empty list of ["human"|"assistant", text] turns')
    turns = []
    for i, turn in enumerate(value):
      expected_role = (HUMAN, ASSISTANT)[i % 2]
      if not isinstance(turn, (list, tuple)) or len(turn) != 2 or turn[0] != expected_role:
        raise self.error(
            f'{key}[{i}]',
            f'expected ["{expected_role}", text] (turns ' 'alternate, starting with "human")',
        )
      turns.append((expected_role, self.string(turn[1], f'{key}[{i}][1]')))
    if turns[-1][0] != HUMAN:
      raise self.error(key, "the last turn must be the human's (the response follows it)")
    return tuple(turns)

  def answer(self, value: Any, key: str) -> str:
    if value not in ANSWERS:
      raise self.error(key, f'expected "A" or "B", got {value!r}')
    return value


def _feedback_few_shot(r: _Reader, value: Any, key: str, cot: bool) -> FeedbackFewShot:
  required = ['conversation', 'response_a', 'response_b', 'answer']
  if cot:
    required.append('reasoning')
  obj = r.record(value, key, required, optional=['principle'])
  principle = obj.get('principle')
  return FeedbackFewShot(
      conversation=r.conversation(obj['conversation'], f'{key}.conversation'),
      response_a=r.string(obj['response_a'], f'{key}.response_a'),
      response_b=r.string(obj['response_b'], f'{key}.response_b'),
      answer=r.answer(obj['answer'], f'{key}.answer'),
      reasoning=r.string(obj['reasoning'], f'{key}.reasoning') if cot else None,
      principle=None if principle is None else r.string(principle, f'{key}.principle'),
  )


def constitution_from_dict(data: Any, source: str = '<dict>') -> Constitution:
  """Validates and converts our JSON format (already parsed)."""
  r = _Reader(source)
  if not isinstance(data, dict):
    raise ConstitutionError(f'{source}: expected a JSON object at the top level')
  for k in data:
    if k not in _TOP_LEVEL_KEYS:
      raise r.error(k, f'unknown key; expected one of {list(_TOP_LEVEL_KEYS)}')
  if data.get('format', FORMAT_VERSION) != FORMAT_VERSION:
    raise r.error('format', f'expected {FORMAT_VERSION!r}, got {data["format"]!r}')
  description = data.get('description', '')
  if not isinstance(description, str):
    raise r.error('description', 'expected a string')

  pairs = []
  for i, value in enumerate(r.entries(data, 'critique_revision', min_len=1)):
    key = f'critique_revision[{i}]'
    obj = r.record(value, key, ['name', 'critique_request', 'revision_request'])
    pair = CritiqueRevisionPair(
        *(r.string(obj[k], f'{key}.{k}') for k in ('name', 'critique_request', 'revision_request'))
    )
    if any(p.name == pair.name for p in pairs):
      raise r.error(f'{key}.name', f'duplicate name {pair.name!r}')
    pairs.append(pair)

  critique_few_shots = []
  for i, value in enumerate(r.entries(data, 'critique_few_shots')):
    key = f'critique_few_shots[{i}]'
    fields = ('response', 'critique_request', 'critique', 'revision_request', 'revision')
    obj = r.record(value, key, ('conversation',) + fields)
    response, critique_request, critique, revision_request, revision = (
        r.string(obj[k], f'{key}.{k}') for k in fields
    )
    critique_few_shots.append(
        critique_few_shot(
            r.conversation(obj['conversation'], f'{key}.conversation'),
            response,
            critique_request,
            critique,
            revision_request,
            revision,
        )
    )

  principles = tuple(
      r.string(p, f'feedback_principles[{i}]')
      for i, p in enumerate(r.entries(data, 'feedback_principles', min_len=1))
  )
  helpfulness = HELPFULNESS_PRINCIPLES  # optional key: ours unless the file brings its own
  if 'helpfulness_principles' in data:
    helpfulness = tuple(
        r.string(p, f'helpfulness_principles[{i}]')
        for i, p in enumerate(r.entries(data, 'helpfulness_principles', min_len=1))
    )
  return Constitution(
      critique_revision=tuple(pairs),
      critique_few_shots=tuple(critique_few_shots),
      feedback_principles=principles,
      feedback_few_shots=tuple(
          _feedback_few_shot(r, v, f'feedback_few_shots[{i}]', cot=False)
          for i, v in enumerate(r.entries(data, 'feedback_few_shots'))
      ),
      feedback_cot_few_shots=tuple(
          _feedback_few_shot(r, v, f'feedback_cot_few_shots[{i}]', cot=True)
          for i, v in enumerate(r.entries(data, 'feedback_cot_few_shots'))
      ),
      description=description,
      source=source,
      helpfulness_principles=helpfulness,
  )


def constitution_to_dict(constitution: Constitution) -> dict:
  """The inverse of `constitution_from_dict` (our JSON format), e.g. to save a converted one."""

  def turns(conv):
    return [list(t) for t in conv]

  def feedback(ex: FeedbackFewShot) -> dict:
    d = {
        'conversation': turns(ex.conversation),
        'response_a': ex.response_a,
        'response_b': ex.response_b,
        'answer': ex.answer,
    }
    if ex.reasoning is not None:
      d['reasoning'] = ex.reasoning
    if ex.principle is not None:
      d['principle'] = ex.principle
    return d

  return {
      'format': FORMAT_VERSION,
      'description': constitution.description,
      'critique_revision': [dataclasses.asdict(p) for p in constitution.critique_revision],
      'critique_few_shots': [
          critique_few_shot_dict(ex, turns(ex.conversation))
          for ex in constitution.critique_few_shots
      ],
      'feedback_principles': list(constitution.feedback_principles),
      'feedback_few_shots': [feedback(ex) for ex in constitution.feedback_few_shots],
      'feedback_cot_few_shots': [feedback(ex) for ex in constitution.feedback_cot_few_shots],
      'helpfulness_principles': list(constitution.helpfulness_principles),
  }


def constitution_fingerprint(constitution: Constitution) -> str:
  """sha1 of the content (not the source path), for stage fingerprints."""
  text = json.dumps(constitution_to_dict(constitution), sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()


def bundled_path(name: str) -> Path:
  return Path(
      str(importlib.resources.files('cai_jax') / 'assets' / 'constitutions' / f'{name}.json')
  )


def load_constitution(path: str | os.PathLike) -> Constitution:
  """Loads 'default' / 'tiny' (bundled), our JSON file, or a paper-release directory."""
  if str(path) in BUNDLED:
    path = bundled_path(str(path))
  path = Path(path)
  if path.is_dir():
    return load_paper_release(path)
  if not path.is_file():
    raise ConstitutionError(
        f'{path}: no such file or directory (bundled names: ' f'{", ".join(BUNDLED)})'
    )
  try:
    data = json.loads(path.read_text(encoding='utf-8'))
  except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for a file that is not UTF-8
    raise ConstitutionError(f'{path}: not valid UTF-8 JSON: {e}') from None
  return constitution_from_dict(data, source=str(path))


# ----------------------------------------------------------------------------------------------
# The evaluation principles: the evaluate stage's judge asks under these, never trained on. The
# bundled 'evaluation' file is ours, worded independently of the training constitution (a judge
# that asks the questions the models were trained to answer grades them by construction).

EVALUATION_FORMAT = 'cai_jax.evaluation_principles/v1'
EVALUATION_BUNDLED = 'evaluation'  # cai_jax/assets/constitutions/evaluation.json


@dataclasses.dataclass(frozen=True)
class EvaluationPrinciples:
  harmlessness: tuple[str, ...]  # the judge's questions on red-team prompts
  helpfulness: tuple[str, ...]  # ... and on helpful prompts
  description: str = ''
  source: str = dataclasses.field(default='', compare=False)


def evaluation_path(path: str | os.PathLike) -> Path:
  """The file `load_evaluation_principles` reads: the bundled name or the path itself."""
  return bundled_path(EVALUATION_BUNDLED) if str(path) == EVALUATION_BUNDLED else Path(path)


def load_evaluation_principles(path: str | os.PathLike) -> EvaluationPrinciples:
  """Loads 'evaluation' (bundled) or a JSON file {"format": EVALUATION_FORMAT, "description",
  "harmlessness_principles": [...], "helpfulness_principles": [...]} (each a non-empty list)."""
  path = evaluation_path(path)
  if not path.is_file():
    raise ConstitutionError(
        f'{path}: no such file (the bundled evaluation principles: {EVALUATION_BUNDLED!r})'
    )
  try:
    data = json.loads(path.read_text(encoding='utf-8'))
  except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for a file that is not UTF-8
    raise ConstitutionError(f'{path}: not valid UTF-8 JSON: {e}') from None
  r = _Reader(str(path))
  keys = ('format', 'harmlessness_principles', 'helpfulness_principles')
  r.record(data, 'evaluation principles', keys, optional=('description',))
  if data['format'] != EVALUATION_FORMAT:
    raise r.error('format', f'expected {EVALUATION_FORMAT!r}, got {data["format"]!r}')
  principles = {
      key: tuple(r.string(p, f'{key}[{i}]') for i, p in enumerate(r.entries(data, key, min_len=1)))
      for key in ('harmlessness_principles', 'helpfulness_principles')
  }
  return EvaluationPrinciples(
      principles['harmlessness_principles'],
      principles['helpfulness_principles'],
      str(data.get('description', '')),
      str(path),
  )


# ----------------------------------------------------------------------------------------------
# Loading the paper's data release (github.com/anthropics/ConstitutionalHarmlessnessPaper,
# prompts/*.json). Its prompts carry their own transcript labels; we strip them so the requests
# and principles are plain text like ours.

PAPER_FILES = (
    'CritiqueRevisionInstructions.json',
    'CritiqueRevisionFewShotPrompts.json',
    'RLMadisonInstructions.json',
    'RLMadisonFewShotPrompts.json',
    'RLMadisonPrecogFewShotPrompts.json',
)

_CR_SPLIT = re.compile(r'\n\n(Human|Assistant|CritiqueRequest|Critique|RevisionRequest|Revision):')
_HA_SPLIT = re.compile(r'(?:^|\n\n)(H|A):')
_PRECOG = re.compile(
    r'Consider the following conversation[^\n]*\n\n(?P<conv>.*?)\n\n\{\}\n'
    r' \(A\) \[\[\[(?P<a>.*?)\]\]\]\n \(B\) \[\[\[(?P<b>.*?)\]\]\]\n\n'
    r'Assistant: Let\'s think step by step:(?P<reasoning>.*?)\n\nHuman:\s*'
    r'So the answer is: \((?P<answer>[AB])\)',
    re.S,
)


def _strip_label(text: str, label: str, trailing: str | None = None) -> str:
  text = text.strip()
  if text.startswith(f'{label}:'):
    text = text[len(label) + 1 :]
  if trailing and text.endswith(f'{trailing}:'):
    text = text[: -len(trailing) - 1]
  return text.strip()


def _paper_critique_few_shot(text: str, where: str) -> CritiqueFewShot:
  parts = _CR_SPLIT.split(text)
  segments = [(label, body.strip()) for label, body in zip(parts[1::2], parts[2::2])]
  if segments and segments[-1] == ('Human', ''):  # The examples end with an open "Human:".
    segments.pop()
  labels = [label for label, _ in segments]
  tail = ['CritiqueRequest', 'Critique', 'RevisionRequest', 'Revision']
  if len(segments) < 6 or labels[-4:] != tail or labels[-5] != 'Assistant':
    raise ConstitutionError(
        f'{where}: expected a Human/Assistant transcript followed by '
        f'one {"/".join(tail)} round, got labels {labels}'
    )
  turns = tuple((_CR_ROLES[label], body) for label, body in segments[:-5])
  return critique_few_shot(turns, *(body for _, body in segments[-5:]))


def _paper_precog_few_shot(text: str, where: str) -> FeedbackFewShot:
  m = _PRECOG.search(text)
  if not m:
    raise ConstitutionError(f'{where}: not in the expected multiple-choice CoT layout')
  parts = _HA_SPLIT.split(m['conv'])
  turns = tuple(
      (HUMAN if label == 'H' else ASSISTANT, body.strip())
      for label, body in zip(parts[1::2], parts[2::2])
  )
  return FeedbackFewShot(
      turns, m['a'].strip(), m['b'].strip(), m['answer'], reasoning=m['reasoning'].strip()
  )


def load_paper_release(directory: str | os.PathLike) -> Constitution:
  """Reads the five prompt files of the paper's release as they are."""
  directory = Path(directory)
  data = {}
  for name in PAPER_FILES:
    try:
      data[name] = json.loads((directory / name).read_text(encoding='utf-8'))
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
      raise ConstitutionError(f'{directory / name}: cannot read: {e}') from None
  try:
    return _from_paper_release(directory, data)
  except (KeyError, IndexError, TypeError, AttributeError) as e:
    raise ConstitutionError(
        f"{directory}: not in the layout of the paper's release: " f'{e!r}'
    ) from None


def _from_paper_release(directory: Path, data: dict[str, Any]) -> Constitution:
  pairs = tuple(
      CritiqueRevisionPair(
          name,
          _strip_label(v['prompt'][0], 'CritiqueRequest', 'Critique'),
          _strip_label(v['edit_request'], 'RevisionRequest', 'Revision'),
      )
      for name, v in data['CritiqueRevisionInstructions.json'].items()
  )
  critique_few_shots = tuple(
      _paper_critique_few_shot(text, f'{directory / PAPER_FILES[1]}[{i}]')
      for i, text in enumerate(data['CritiqueRevisionFewShotPrompts.json'])
  )
  principles = tuple(
      re.sub(r'\s*Options:\s*$', '', p).strip() for p in data['RLMadisonInstructions.json']
  )

  # Plain examples list good and bad replies; alternate the good one between (A) and (B) so the
  # few-shots do not teach a position bias.
  feedback_few_shots = []
  for ex in data['RLMadisonFewShotPrompts.json']:
    turns = tuple(conversation.parse_transcript(ex['prompt']))
    for good, bad in zip(ex['corrects'], ex['incorrects']):
      a_is_good = len(feedback_few_shots) % 2 == 0
      a, b = (good, bad) if a_is_good else (bad, good)
      feedback_few_shots.append(
          FeedbackFewShot(turns, a.strip(), b.strip(), 'A' if a_is_good else 'B')
      )
  cot_few_shots = tuple(
      _paper_precog_few_shot(text['prompt'], f'{directory / PAPER_FILES[4]}[{i}]')
      for i, text in enumerate(data['RLMadisonPrecogFewShotPrompts.json'])
  )
  return Constitution(
      pairs,
      critique_few_shots,
      principles,
      tuple(feedback_few_shots),
      cot_few_shots,
      description='Bai et al. 2022 data release',
      source=str(directory),
  )


# ----------------------------------------------------------------------------------------------
# Principle sampling.


def _stable_int(value: int | str) -> int:
  """A non-negative 64-bit integer; strings via sha256 (Python's hash() is salted per run)."""
  if isinstance(value, (int, np.integer)) and value >= 0:
    return int(value)
  return int.from_bytes(hashlib.sha256(str(value).encode()).digest()[:8], 'little')


def principle_rng(seed: int, example_id: int | str, stage: str) -> np.random.Generator:
  """The generator for one example in one stage: independent of batch order and host."""
  return np.random.default_rng([_stable_int(seed), _stable_int(example_id), _stable_int(stage)])


def sample_critique_revision_pairs(
    constitution: Constitution, n_rounds: int, rng: np.random.Generator
) -> list[CritiqueRevisionPair]:
  """One pair per revision round, each an independent uniform draw (as in the paper)."""
  indices = rng.integers(len(constitution.critique_revision), size=n_rounds)
  return [constitution.critique_revision[i] for i in indices]


def sample_feedback_principles(
    constitution: Constitution, k: int, rng: np.random.Generator, replace: bool = False
) -> list[str]:
  """k principles to ensemble over; distinct unless replace=True."""
  n = len(constitution.feedback_principles)
  if not replace and k > n:
    raise ValueError(f'cannot draw {k} distinct principles from {n}; pass replace=True')
  indices = rng.choice(n, size=k, replace=replace)
  return [constitution.feedback_principles[i] for i in indices]


def sample_few_shot_principles(
    constitution: Constitution, n_examples: int, rng: np.random.Generator
) -> list[str]:
  """A principle for each of `n_examples` feedback few-shots, each an independent uniform draw.

  The paper shows every few-shot example under a principle of its own, drawn independently
  of the query's, so the examples do not all teach one principle (and do not tell the model
  which principle the query is asked under by repeating it)."""
  indices = rng.integers(len(constitution.feedback_principles), size=n_examples)
  return [constitution.feedback_principles[i] for i in indices]


# ----------------------------------------------------------------------------------------------
# Fitting a prompt to its token budget. Every prompt below is built from segments -- few-shot
# examples, the conversation's turns, the request -- and a prompt over budget (model.max_len
# less the tokens generated after it) loses whole segments, never a raw cut through its text:
# first the oldest conversation turns (the last human request and the response under review
# stay), then few-shots from the end (the first k are kept, so a shortened prompt is exactly
# the one `num_few_shots=k` renders, and the examples a constitution puts first -- in the
# paper's release, the ones alternating (A) and (B) answers from the start -- stay).


@dataclasses.dataclass(frozen=True)
class FittedPrompt:
  """A rendered prompt and what fitting it to its token budget dropped."""

  text: str
  few_shots: int  # few-shot examples shown
  few_shots_total: int  # few-shot examples the constitution offers
  turns_dropped: int  # oldest conversation turns (and earlier rounds) left out
  tokens: int | None = None  # its length in tokens (None when not fitted)
  over_budget: bool = False  # still too long with everything droppable gone


def count_tokens(tokenizer: Any, text: str) -> int:
  """Tokens of a rendered prompt as every stage encodes it (`conversation.encode`)."""
  return len(conversation.encode(tokenizer, text)[0])


def fit_prompt(
    render: Callable[[int, int], str],
    n_few_shots: int,
    n_droppable: int,
    tokenizer: Any = None,
    budget: int | None = None,
) -> FittedPrompt:
  """The longest `render(few_shots, turns_dropped)` within `budget` tokens.

  Drops oldest turns first (up to `n_droppable`), then few-shots from the end. Without a
  budget (or tokenizer) the full prompt comes back unmeasured. If nothing droppable is left
  and it is still too long, the shortest rendering comes back with `over_budget` set (the
  sampler then cuts its oldest tokens, as its last resort).
  """

  def fitted(k, d, text, n=None, over=False):
    return FittedPrompt(text, k, n_few_shots, d, n, over)

  if budget is None or tokenizer is None:
    return fitted(n_few_shots, 0, render(n_few_shots, 0))

  def measure(k, d):
    text = render(k, d)
    return text, count_tokens(tokenizer, text)

  text, n = measure(n_few_shots, 0)
  if n <= budget:
    return fitted(n_few_shots, 0, text, n)
  # The fewest turns to drop: a bisection, as every dropped turn shortens the prompt.
  lo, hi = 1, n_droppable
  while lo <= hi:
    mid = (lo + hi) // 2
    mid_text, mid_n = measure(n_few_shots, mid)
    if mid_n <= budget:
      text, n, best, hi = mid_text, mid_n, mid, mid - 1
    else:
      lo = mid + 1
  if hi < n_droppable:  # some drop count fitted; `best` is the smallest
    return fitted(n_few_shots, best, text, n)
  for k in range(n_few_shots - 1, -1, -1):
    text, n = measure(k, n_droppable)
    if n <= budget:
      return fitted(k, n_droppable, text, n)
  if n_few_shots == 0:
    text, n = measure(0, n_droppable)
  return fitted(0, n_droppable, text, n, over=True)


def _context_pairs(turns: Sequence[Turn]) -> int:
  """How many (human, assistant) pairs precede the last human turn: the droppable context."""
  return (len(turns) - 1) // 2


def _drop_context(turns: Sequence[Turn], n_pairs: int) -> tuple[Turn, ...]:
  """The conversation without its `n_pairs` oldest (human, assistant) exchanges."""
  return tuple(turns[2 * n_pairs :])


# ----------------------------------------------------------------------------------------------
# Critique and revision prompts. Both are a list of labeled segments -- few-shots, the
# conversation with the response, earlier rounds, the new request -- rendered either as the
# paper's transcript ("\n\nCritiqueRequest: ...\n\nCritique:") or as chat turns in which the
# requests are the user's and the critiques/revisions the assistant's.


def _check_conversation(turns: Sequence[Turn]) -> None:
  if not turns or turns[-1][0] != HUMAN:
    raise ValueError('conversation_turns must end with a human turn; the response follows it')


def _round_segments(
    pair: CritiqueRevisionPair, critique: str, revision: str, with_critique: bool = True
):
  """One round as segments; critique-free (paper figure 7), the revision request alone."""
  if not with_critique:
    return [('RevisionRequest', pair.revision_request), ('Revision', revision)]
  return [
      ('CritiqueRequest', pair.critique_request),
      ('Critique', critique),
      ('RevisionRequest', pair.revision_request),
      ('Revision', revision),
  ]


def _critique_revision_segments(
    few_shots, conversation_turns, response, pair, history, critique=None, with_critique=True
) -> list[tuple[str, str]]:
  def exchange(turns, reply):
    return [(conversation.TRANSCRIPT_LABELS[role], text) for role, text in turns] + [
        ('Assistant', reply)
    ]

  segments = []
  for ex in few_shots:
    segments += exchange(ex.conversation, ex.response)
    segments += _round_segments(ex.round.pair, ex.round.critique, ex.round.revision, with_critique)
  _check_conversation(conversation_turns)
  segments += exchange(conversation_turns, response)
  for past in history:
    segments += _round_segments(past.pair, past.critique, past.revision, with_critique)
  if not with_critique:  # the revision request right after the response (or the last revision)
    return segments + [('RevisionRequest', pair.revision_request)]
  segments.append(('CritiqueRequest', pair.critique_request))
  if critique is not None:
    segments += [('Critique', critique), ('RevisionRequest', pair.revision_request)]
  return segments


def _render_segments(segments, open_label: str, fmt: str, tokenizer) -> str:
  """Renders segments and leaves `open_label` open for the model to write."""
  if conversation.check_format(fmt) == 'transcript':
    return ''.join(
        conversation.transcript_segment(label, text) for label, text in segments
    ) + conversation.transcript_segment(open_label, None)
  # Chat: the open segment is the assistant turn the generation prompt starts.
  turns = [(_CR_ROLES[label], text) for label, text in segments]
  return conversation.render_chat(turns, tokenizer, add_generation_prompt=True)


def fit_critique_revision_prompt(
    constitution: Constitution,
    conversation_turns: Sequence[Turn],
    response: str,
    pair: CritiqueRevisionPair,
    history_rounds: Sequence[CritiqueRevisionRound] = (),
    critique: str | None = None,
    fmt: str = 'transcript',
    tokenizer: Any = None,
    budget: int | None = None,
    with_critique: bool = True,
) -> FittedPrompt:
  """The critique prompt (`critique` None) or the revision prompt, fitted to `budget` tokens.
  `with_critique=False`: the critique-free revision prompt (paper figure 7): few-shots, earlier
  rounds and the request with no critique request or critique, ending at the revision.

  Droppable, oldest first: the conversation's earlier exchanges, then earlier rounds except
  the latest (it holds the revision under review); the last human turn, the response and
  the new request always stay.
  """
  _check_conversation(conversation_turns)
  n_context = _context_pairs(conversation_turns)
  n_rounds = max(0, len(history_rounds) - 1)

  def render(k: int, dropped: int) -> str:
    turns = _drop_context(conversation_turns, min(dropped, n_context))
    rounds = history_rounds[max(0, dropped - n_context) :]
    segments = _critique_revision_segments(
        constitution.critique_few_shots[:k], turns, response, pair, rounds, critique, with_critique
    )
    open_label = 'Critique' if critique is None and with_critique else 'Revision'
    return _render_segments(segments, open_label, fmt, tokenizer)

  return fit_prompt(
      render, len(constitution.critique_few_shots), n_context + n_rounds, tokenizer, budget
  )


def render_critique_prompt(
    constitution: Constitution,
    conversation_turns: Sequence[Turn],
    response: str,
    pair: CritiqueRevisionPair,
    history_rounds: Sequence[CritiqueRevisionRound] = (),
    fmt: str = 'transcript',
    tokenizer: Any = None,
) -> str:
  """The prompt ending where the model writes a critique of the latest response."""
  return fit_critique_revision_prompt(
      constitution, conversation_turns, response, pair, history_rounds, fmt=fmt, tokenizer=tokenizer
  ).text


def render_revision_prompt(
    constitution: Constitution,
    conversation_turns: Sequence[Turn],
    response: str,
    pair: CritiqueRevisionPair,
    critique: str,
    history_rounds: Sequence[CritiqueRevisionRound] = (),
    fmt: str = 'transcript',
    tokenizer: Any = None,
) -> str:
  """The critique prompt plus the critique and revision request, ending at the revision."""
  return fit_critique_revision_prompt(
      constitution, conversation_turns, response, pair, history_rounds, critique, fmt, tokenizer
  ).text


def render_critique_free_revision_prompt(
    constitution: Constitution,
    conversation_turns: Sequence[Turn],
    response: str,
    pair: CritiqueRevisionPair,
    history_rounds: Sequence[CritiqueRevisionRound] = (),
    fmt: str = 'transcript',
    tokenizer: Any = None,
) -> str:
  """The revision prompt without a critique step (paper figure 7): the response, then the
  revision request at once; its few-shots and earlier rounds omit their critiques too."""
  return fit_critique_revision_prompt(
      constitution,
      conversation_turns,
      response,
      pair,
      history_rounds,
      fmt=fmt,
      tokenizer=tokenizer,
      with_critique=False,
  ).text


def critique_revision_stop_strings(fmt: str, tokenizer: Any = None) -> list[str]:
  """Where a generated critique or revision ends: at the next label or end of turn."""
  if conversation.check_format(fmt) == 'transcript':
    return [f'\n\n{label}:' for label in _CR_ROLES]
  return conversation.stop_strings(fmt, tokenizer)


# ----------------------------------------------------------------------------------------------
# Feedback (multiple choice) prompts, paper section 4.1:
#
#   Consider the following conversation between a human and an assistant:
#   [conversation]
#   [principle]
#   Options:
#    (A) [response A]
#    (B) [response B]
#   The answer is:
#
# The plain prompt is scored on OPTION_STRINGS right away. The CoT prompt wraps the question in
# a Human turn and ends in "Assistant: Let's think step-by-step:"; after the model's reasoning,
# render_feedback_answer_suffix() adds the turn in which the options are scored.
#
# A question inside a Human turn (CoT, and every chat-template prompt) cannot hold its
# conversation as "Human: ... Assistant: ..." turns: a transcript reader (the model too) would
# take the inner "Assistant:" for the end of the outer Human turn. As in the paper's release
# (RLMadisonPrecogFewShotPrompts.json), the inner conversation is then written "H: ... A: ...",
# introduced as "a human (H) and an assistant (A)".

NESTED_FEEDBACK_INTRO = (
    'Consider the following conversation between a human (H) and an ' 'assistant (A):'
)
NESTED_LABELS = {HUMAN: 'H', ASSISTANT: 'A'}


def feedback_question(
    conversation_turns: Sequence[Turn],
    principle: str,
    response_a: str,
    response_b: str,
    nested: bool = False,
) -> str:
  """The multiple-choice question; `nested`: it goes inside a turn, so H:/A: inner labels."""
  _check_conversation(conversation_turns)
  if nested:
    inner = ''.join(
        f'\n\n{NESTED_LABELS[role]}: {text.strip()}' for role, text in conversation_turns
    )
    head = NESTED_FEEDBACK_INTRO + inner
  else:
    head = FEEDBACK_INTRO + conversation.render_transcript(
        conversation_turns, add_generation_prompt=False
    )
  return (
      head
      + f'\n\n{principle.strip()}\nOptions:\n (A) {response_a.strip()}'
      + f'\n (B) {response_b.strip()}'
  )


def _feedback_text(examples, question: str, cot: bool, fmt: str, tokenizer) -> str:
  """Few-shot (question, example) blocks then the question, in `fmt`."""
  if conversation.check_format(fmt) == 'transcript':
    seg = conversation.transcript_segment
    if not cot:
      blocks = [f'{q}\n\n{ANSWER_PREFIX} ({ex.answer})' for q, ex in examples]
      return '\n\n'.join(blocks + [f'{question}\n\n{ANSWER_PREFIX}'])
    text = ''.join(
        seg('Human', q)
        + seg('Assistant', f'{COT_PREFIX} {ex.reasoning}')
        + seg('Human', f'{COT_ANSWER_PREFIX} ({ex.answer})')
        for q, ex in examples
    )
    return text + seg('Human', question) + seg('Assistant', COT_PREFIX)
  # Chat template: each example is a user question and the assistant's answer; the final
  # assistant turn is opened by the template and started with the answer / reasoning prefix.
  turns = []
  for q, ex in examples:
    reply = (
        f'{COT_PREFIX} {ex.reasoning}\n\n{COT_ANSWER_PREFIX} ({ex.answer})'
        if cot
        else f'{ANSWER_PREFIX} ({ex.answer})'
    )
    turns += [(HUMAN, q), (ASSISTANT, reply)]
  turns.append((HUMAN, question))
  prompt = conversation.render_chat(turns, tokenizer, add_generation_prompt=True)
  return prompt + (COT_PREFIX if cot else ANSWER_PREFIX)


def fit_feedback_prompt(
    constitution: Constitution,
    conversation_turns: Sequence[Turn],
    principle: str,
    response_a: str,
    response_b: str,
    *,
    cot: bool,
    few_shot_principles: Sequence[str] | None = None,
    fmt: str = 'transcript',
    tokenizer: Any = None,
    budget: int | None = None,
) -> FittedPrompt:
  """Few-shot examples then the question, fitted to `budget` tokens.

  `few_shot_principles`: the principle each few-shot is shown under (the paper draws them
  independently of the query's: `sample_few_shot_principles`); an example that carries its own
  principle keeps it; None shows every other example under the query's `principle`.
  Droppable: the conversation's earlier exchanges (oldest first), then few-shots from the end.
  """
  few_shots = constitution.feedback_cot_few_shots if cot else constitution.feedback_few_shots
  if few_shot_principles is None:
    few_shot_principles = [principle] * len(few_shots)
  if len(few_shot_principles) != len(few_shots):
    raise ValueError(
        f'{len(few_shot_principles)} few-shot principles for ' f'{len(few_shots)} few-shots'
    )
  nested = cot or conversation.check_format(fmt) == 'chat_template'
  examples = [
      (
          feedback_question(
              ex.conversation, ex.principle or p, ex.response_a, ex.response_b, nested
          ),
          ex,
      )
      for ex, p in zip(few_shots, few_shot_principles)
  ]
  _check_conversation(conversation_turns)

  def render(k: int, dropped: int) -> str:
    question = feedback_question(
        _drop_context(conversation_turns, dropped), principle, response_a, response_b, nested
    )
    return _feedback_text(examples[:k], question, cot, fmt, tokenizer)

  return fit_prompt(render, len(few_shots), _context_pairs(conversation_turns), tokenizer, budget)


def render_feedback_prompt(*args, **kwargs) -> str:
  """Few-shot examples then the question, whole (no budget); plain ends at "The answer is:", CoT
  at the reasoning. The arguments are `fit_feedback_prompt`'s."""
  return fit_feedback_prompt(*args, **kwargs).text


# ----------------------------------------------------------------------------------------------
# What the few-shots cost, checked when a stage starts (the tokenizer comes with the model).

_SHORT = ((HUMAN, 'Hi.'),)  # the one short conversation every max_len must hold
_SHORT_REPLY = 'Hello.'


def few_shot_cost(
    constitution: Constitution, kind: str, tokenizer: Any, fmt: str, cot: bool = False
) -> tuple[int, int, int]:
  """(few-shots, tokens they take, tokens of the longest prompt with them and a one-line
  conversation) for `kind` 'critique_revision' (its revision prompt, the longer one) or
  'feedback'. The longest request or principle is used: the worst a prompt can start from."""
  if kind == 'critique_revision':
    pair = max(
        constitution.critique_revision,
        key=lambda p: len(p.critique_request) + len(p.revision_request),
    )

    def render(k):
      c = dataclasses.replace(constitution, critique_few_shots=constitution.critique_few_shots[:k])
      return render_revision_prompt(
          c, _SHORT, _SHORT_REPLY, pair, 'Fine.', fmt=fmt, tokenizer=tokenizer
      )

    n = len(constitution.critique_few_shots)
  elif kind == 'feedback':
    few_shots = constitution.feedback_cot_few_shots if cot else constitution.feedback_few_shots
    principle = max(constitution.feedback_principles, key=len)

    def render(k):
      c = dataclasses.replace(
          constitution, feedback_few_shots=few_shots[:k], feedback_cot_few_shots=few_shots[:k]
      )
      return render_feedback_prompt(
          c, _SHORT, principle, _SHORT_REPLY, 'Hi.', cot=cot, fmt=fmt, tokenizer=tokenizer
      )

    n = len(few_shots)
  else:
    raise ValueError(f"kind must be 'critique_revision' or 'feedback', got {kind!r}")
  full = count_tokens(tokenizer, render(n))
  return n, full - count_tokens(tokenizer, render(0)), full


def check_few_shot_budget(
    constitution: Constitution,
    kind: str,
    tokenizer: Any,
    fmt: str,
    budget: int,
    *,
    cot: bool = False,
    what: str = '',
) -> tuple[int, int]:
  """(few-shots, tokens they take); raises ValueError (one line) when a prompt with every
  few-shot and a one-line conversation does not fit `budget` tokens."""
  n, cost, full = few_shot_cost(constitution, kind, tokenizer, fmt, cot)
  if full > budget:
    raise ValueError(
        f'{what or kind}: the {n} {kind} few-shots take {cost} tokens and a prompt with '
        f'them and a one-line conversation needs {full}, over the prompt budget of {budget} '
        '(model.max_len less the tokens generated after the prompt); raise model.max_len '
        'or lower num_few_shots'
    )
  logging.info(
      '%s: %d %s few-shots take %d tokens of the %d-token prompt budget',
      what or kind,
      n,
      kind,
      cost,
      budget,
  )
  return n, cost


def render_feedback_answer_suffix(cot_text: str, fmt: str = 'transcript') -> str:
  """Text appended to a CoT feedback prompt: the reasoning, then the answer lead-in.

  The options are scored as ``prompt + suffix + OPTION_STRINGS[i]``. Anything after a
  transcript stop string in `cot_text` is dropped.
  """
  if conversation.check_format(fmt) == 'transcript':
    for stop in conversation.stop_strings('transcript'):
      cot_text = cot_text.split(stop)[0]
    return f' {cot_text.strip()}\n\nHuman: {COT_ANSWER_PREFIX}'
  return f' {cot_text.strip()}\n\n{COT_ANSWER_PREFIX}'


def feedback_cot_stop_strings(fmt: str, tokenizer: Any = None) -> list[str]:
  """Where generated CoT reasoning ends (the end of the assistant turn)."""
  return conversation.stop_strings(fmt, tokenizer)
