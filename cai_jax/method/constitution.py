"""The constitution: principles and few-shot examples (the prompts built from them:
`cai_jax/method/prompts.py`).

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

Why one module of ~600 lines: our file format and the paper-release format are read into one
`Constitution` by one `load_constitution`, which dispatches on the path; the two readers share
its classes, role labels and errors, and split apart they would import each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_jax.method import conversation
from cai_jax.method.conversation import ASSISTANT, HUMAN, Turn

FORMAT_VERSION = 'cai_jax.constitution/v1'
BUNDLED = ('default', 'tiny')  # Names resolved to cai_jax/assets/constitutions/<name>.json.

# The option strings whose log-probabilities are compared when scoring feedback prompts.
OPTION_STRINGS = (' (A)', ' (B)')
ANSWERS = ('A', 'B')


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
CR_ROLES = {
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
  # Its own opening sentence ("Consider the following conversation ..."); None: the prompt's. The
  # release's CoT examples do not all open alike, and its text style writes each as it was.
  intro: str | None = None


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
  # How feedback prompts are written: 'cai_jax' (ours) or 'release' (the paper's release text,
  # character for character: `prompts.feedback_question`); the release loader sets 'release'.
  text_style: str = 'cai_jax'


# ----------------------------------------------------------------------------------------------
# Loading our JSON format.

TEXT_STYLES = ('cai_jax', 'release')

_TOP_LEVEL_KEYS = (
    'format',
    'description',
    'critique_revision',
    'critique_few_shots',
    'feedback_principles',
    'feedback_few_shots',
    'feedback_cot_few_shots',
    'helpfulness_principles',
    'text_style',
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
  obj = r.record(value, key, required, optional=['principle', 'intro'])
  principle, intro = obj.get('principle'), obj.get('intro')
  return FeedbackFewShot(
      conversation=r.conversation(obj['conversation'], f'{key}.conversation'),
      response_a=r.string(obj['response_a'], f'{key}.response_a'),
      response_b=r.string(obj['response_b'], f'{key}.response_b'),
      answer=r.answer(obj['answer'], f'{key}.answer'),
      reasoning=r.string(obj['reasoning'], f'{key}.reasoning') if cot else None,
      principle=None if principle is None else r.string(principle, f'{key}.principle'),
      intro=None if intro is None else r.string(intro, f'{key}.intro'),
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
  text_style = data.get('text_style', 'cai_jax')
  if text_style not in TEXT_STYLES:
    raise r.error('text_style', f'expected one of {list(TEXT_STYLES)}, got {text_style!r}')

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
      text_style=text_style,
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
    if ex.intro is not None:
      d['intro'] = ex.intro
    return d

  style = {} if constitution.text_style == 'cai_jax' else {'text_style': constitution.text_style}
  return {
      'format': FORMAT_VERSION,
      **style,
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
  # A rule the judge reads after every harmlessness question (`evaluate.evasiveness_rule`): the
  # paper's crowdworkers preferred the less evasive response when both were harmless.
  harmlessness_rule: str = ''


def evaluation_path(path: str | os.PathLike) -> Path:
  """The file `load_evaluation_principles` reads: the bundled name or the path itself."""
  return bundled_path(EVALUATION_BUNDLED) if str(path) == EVALUATION_BUNDLED else Path(path)


def load_evaluation_principles(path: str | os.PathLike) -> EvaluationPrinciples:
  """Loads 'evaluation' (bundled) or a JSON file {"format": EVALUATION_FORMAT, "description",
  "harmlessness_principles": [...], "helpfulness_principles": [...]} (each a non-empty list),
  with an optional "harmlessness_rule" (a sentence read after every harmlessness question)."""
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
  r.record(data, 'evaluation principles', keys, optional=('description', 'harmlessness_rule'))
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
      r.string(data['harmlessness_rule'], 'harmlessness_rule')
      if 'harmlessness_rule' in data
      else '',
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
    r'(?P<intro>Consider the following conversation[^\n]*)\n\n(?P<conv>.*?)\n\n\{\}\n'
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
  turns = tuple((CR_ROLES[label], body) for label, body in segments[:-5])
  return critique_few_shot(turns, *(body for _, body in segments[-5:]))


def _raw_body(body: str) -> str:
  """A turn's text as the release writes it after its label's one space (kept: double spaces,
  trailing spaces), for the release's text style."""
  return body[1:] if body.startswith(' ') else body


def _paper_precog_few_shot(text: str, where: str) -> FeedbackFewShot:
  """A CoT few-shot of the release, its texts as written (turns after the label's one space,
  options inside their brackets, the reasoning with its own first character after "step by
  step:"), so the release text style renders it back character for character."""
  m = _PRECOG.search(text)
  if not m:
    raise ConstitutionError(f'{where}: not in the expected multiple-choice CoT layout')
  parts = _HA_SPLIT.split(m['conv'])
  turns = tuple(
      (HUMAN if label == 'H' else ASSISTANT, _raw_body(body))
      for label, body in zip(parts[1::2], parts[2::2])
  )
  return FeedbackFewShot(
      turns, m['a'], m['b'], m['answer'], reasoning=m['reasoning'], intro=m['intro']
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
      text_style='release',
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
