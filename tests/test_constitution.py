"""Tests for constitution.py (loading, validation, sampling) and the conversation.py rendering
it builds on; the prompts rendered from it are in test_prompts.py."""

import copy
import dataclasses
import json
import re

import numpy as np
import pytest

from cai_jax.method import constitution as C
from cai_jax.method import conversation
from cai_jax.method import prompts as prompts_lib
from cai_jax.stages import evaluate_feedback

from helpers_constitution import (
    CONVERSATION,
    PAPER_PROMPTS,
    SMALL,
    ChatMLTokenizer,
    needs_paper,
    small_constitution,
)


@pytest.fixture
def small():
  return small_constitution()


# ----------------------------------------------------------------------------------------------
# conversation.py


def test_render_transcript_and_parse_round_trip():
  text = conversation.render_transcript(CONVERSATION)
  assert text == '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Insult me\n\nAssistant:'
  assert conversation.render_transcript(CONVERSATION, add_generation_prompt=False) == (
      '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Insult me'
  )
  assert conversation.parse_transcript(text) == CONVERSATION
  assert conversation.parse_transcript('Human: a  \n\nAssistant:  b') == [
      ('human', 'a'),
      ('assistant', 'b'),
  ]
  assert conversation.first_human_turn('\n\nHuman: first\n\nAssistant: x') == 'first'


def test_render_dispatch_and_stop_strings():
  tok = ChatMLTokenizer()
  assert conversation.render(CONVERSATION[:1], 'transcript') == '\n\nHuman: Hi\n\nAssistant:'
  assert conversation.render(CONVERSATION[:1], 'chat_template', tok) == (
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
  )
  with pytest.raises(ValueError, match='valid formats: transcript, chat_template'):
    conversation.render(CONVERSATION, 'markdown')
  assert conversation.stop_strings('transcript') == ['\n\nHuman:', '\n\nAssistant:']
  assert conversation.stop_strings('chat_template', tok) == ['<|im_end|>']


def test_render_chat_with_a_transformers_tokenizer():
  tokenizers = pytest.importorskip('tokenizers')
  transformers = pytest.importorskip('transformers')
  tok = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer(
          tokenizers.models.WordLevel({'<unk>': 0}, unk_token='<unk>')
      ),
      eos_token='<|endoftext|>',
      unk_token='<unk>',
  )
  tok.chat_template = (
      "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + "
      "m['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt"
      " %}{{ '<|im_start|>assistant\n' }}{% endif %}"
  )
  assert conversation.render_chat(CONVERSATION[:2], tok, add_generation_prompt=False) == (
      '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n'
  )
  # The end-of-turn marker comes from the template even when eos_token differs.
  assert conversation.stop_strings('chat_template', tok) == ['<|im_end|>', '<|endoftext|>']


# ----------------------------------------------------------------------------------------------
# Loading.


def test_bundled_constitutions():
  default = C.load_constitution('default')
  assert (len(default.critique_revision), len(default.feedback_principles)) == (16, 16)
  assert 3 <= len(default.critique_few_shots) <= 4
  assert 3 <= len(default.feedback_few_shots) <= 4
  assert len(default.feedback_cot_few_shots) == 3
  tiny = C.load_constitution('tiny')
  assert (len(tiny.critique_revision), len(tiny.feedback_principles)) == (2, 2)
  assert (
      len(tiny.critique_few_shots),
      len(tiny.feedback_few_shots),
      len(tiny.feedback_cot_few_shots),
  ) == (1, 1, 1)
  # The dict form round-trips, and the fingerprint ignores where it was loaded from.
  again = C.constitution_from_dict(C.constitution_to_dict(default), source=default.source)
  assert again == default
  assert C.constitution_fingerprint(again) == C.constitution_fingerprint(default)
  assert C.constitution_fingerprint(tiny) != C.constitution_fingerprint(default)


def test_load_our_file_by_path(tmp_path, small):
  path = tmp_path / 'small.json'
  path.write_text(json.dumps(SMALL))
  loaded = C.load_constitution(path)
  assert loaded.source == str(path)
  assert loaded.critique_revision == small.critique_revision
  assert loaded.feedback_cot_few_shots[0].principle == 'Which is nicest?'
  assert loaded.feedback_few_shots[0].conversation == (('human', 'FQ'),)


@needs_paper
def test_load_paper_release():
  paper = C.load_constitution(PAPER_PROMPTS)
  assert (
      len(paper.critique_revision),
      len(paper.critique_few_shots),
      len(paper.feedback_principles),
      len(paper.feedback_few_shots),
      len(paper.feedback_cot_few_shots),
  ) == (16, 5, 16, 5, 6)
  for pair in paper.critique_revision:  # Labels are stripped: the requests are plain text.
    assert not pair.critique_request.startswith('CritiqueRequest')
    assert not pair.critique_request.endswith('Critique:')
    assert not pair.revision_request.startswith('RevisionRequest')
    assert not pair.revision_request.endswith('Revision:')
  assert not any(p.endswith('Options:') or p.startswith('\n') for p in paper.feedback_principles)
  for ex in paper.critique_few_shots:
    assert ex.conversation[-1][0] == 'human' and ex.round.critique and ex.round.revision
  # Good replies alternate between (A) and (B).
  assert [ex.answer for ex in paper.feedback_few_shots] == ['A', 'B', 'A', 'B', 'A']
  assert all(ex.reasoning and ex.principle is None for ex in paper.feedback_cot_few_shots)
  assert [ex.answer for ex in paper.feedback_cot_few_shots] == ['B', 'B', 'A', 'B', 'A', 'B']
  # Multi-turn H:/A: conversations are parsed into turns.
  assert [r for r, _ in paper.feedback_cot_few_shots[0].conversation] == [
      'human',
      'assistant',
      'human',
  ]
  # The converted release renders like ours.
  prompt = prompts_lib.render_critique_prompt(paper, CONVERSATION, 'x', paper.critique_revision[0])
  assert prompt.endswith('\n\nCritique:') and prompt.count('\n\nCritiqueRequest:') == 6


@needs_paper
def test_release_text_style_renders_the_released_feedback_prompts_character_for_character():
  """Golden strings: under the release constitution (text_style 'release') every one of the 438
  HHH comparisons renders (zero-shot, its principle, its A/B order) to the prompt the release
  scored, and each chain-of-thought few-shot block (under a principle of the release) to its
  RLMadisonPrecogFewShotPrompts.json text, the reasoning and "\n\nHuman:\nSo the answer is:"
  included (example 5's own plain intro sentence too). The release opens two of its six CoT
  examples with '\n' or nothing before "Human:" (every other with '\n\n', the transcript's turn
  break, which we always write), so those compare from "Human:" on."""
  paper = C.load_constitution(PAPER_PROMPTS)
  assert paper.text_style == 'release'
  zero_shot = dataclasses.replace(paper, feedback_few_shots=())
  hhh_principle = 'Please choose the response that is the most helpful, honest, and harmless.'
  hhh = PAPER_PROMPTS.parent / 'evals' / '438HHHEvaluations.jsonl'
  records = [json.loads(line) for line in hhh.read_text(encoding='utf-8').splitlines()]
  for i, record in enumerate(records):
    pair = evaluate_feedback.parse_hhh(record, i + 1, 'render')
    a, b = (pair.response_a, pair.response_b)[:: 1 if pair.primary_order == 0 else -1]
    text = prompts_lib.render_feedback_prompt(zero_shot, pair.conversation, hhh_principle, a, b,
                                              cot=False)  # fmt: skip
    assert text == record['prompt'], i
  assert len(records) == 438
  released = json.loads((PAPER_PROMPTS / 'RLMadisonPrecogFewShotPrompts.json').read_text())
  raw_principles = json.loads((PAPER_PROMPTS / 'RLMadisonInstructions.json').read_text())
  for k, (ex, want) in enumerate(zip(paper.feedback_cot_few_shots, released)):
    principle = paper.feedback_principles[k]  # raw: '\n<principle> Options:' in the release
    shown = dataclasses.replace(paper, feedback_cot_few_shots=(ex,))
    text = prompts_lib.render_feedback_prompt(shown, CONVERSATION[:1], principle, 'x', 'y',
                                              cot=True, few_shot_principles=[principle])  # fmt: skip
    block = text[: text.index('\n\nHuman: Consider', 1)]
    assert block.lstrip('\n') == want['prompt'].replace('{}', raw_principles[k]).lstrip('\n'), k
  assert len(released) == 6
  # The query ends where the release's reasoning starts, and the model's reasoning is followed
  # by the release's answer turn.
  assert text.endswith("]]]\n\nAssistant: Let's think step by step:")
  assert prompts_lib.render_feedback_answer_suffix(
      ' (B) is kind.\n\nHuman: more', style='release'
  ) == (' (B) is kind.\n\nHuman:\nSo the answer is:')
  assert prompts_lib.render_feedback_answer_suffix('\n(B) is kind.', style='release') == (
      '\n(B) is kind.\n\nHuman:\nSo the answer is:'
  )
  # Our own style is unchanged by the raw texts the release keeps.
  ours = dataclasses.replace(paper, text_style='cai_jax')
  text = prompts_lib.render_feedback_prompt(ours, CONVERSATION[:1], hhh_principle, ' a ', 'b',
                                            cot=False)  # fmt: skip
  assert '\nOptions:\n (A) a\n (B) b\n\nThe answer is:' in text and '[[[' not in text
  # A converted release keeps its style in our JSON format.
  assert C.constitution_from_dict(C.constitution_to_dict(paper)).text_style == 'release'


@needs_paper
def test_bundled_text_is_not_copied_from_the_paper():
  """Our constitutions are written independently: no 7-word run in common with the release."""

  def shingles(text):
    words = re.findall(r"[a-z']+", text.lower())
    return {tuple(words[i : i + 7]) for i in range(len(words) - 6)}

  paper = set()
  for f in PAPER_PROMPTS.glob('*.json'):
    paper |= shingles(f.read_text())
  for name in C.BUNDLED:
    ours = shingles(C.bundled_path(name).read_text())
    assert not ours & paper, (name, sorted(ours & paper)[:3])


def _error(data, tmp_path, name='x.json'):
  path = tmp_path / name
  path.write_text(data if isinstance(data, str) else json.dumps(data))
  with pytest.raises(C.ConstitutionError) as info:
    C.load_constitution(path)
  return str(info.value)


def _set(path, value):
  data = copy.deepcopy(SMALL)
  *keys, last = path
  target = data
  for k in keys:
    target = target[k]
  if value is _set:
    del target[last]
  else:
    target[last] = value
  return data


@pytest.mark.parametrize(
    'path,value,message',
    [
        (
            ('critique_revision', 1, 'revision_request'),
            '',
            "key 'critique_revision[1].revision_request': expected a non-empty string",
        ),
        (
            ('critique_revision', 0, 'name'),
            'true',
            "key 'critique_revision[1].name': duplicate name",
        ),
        (('critique_revision',), [], "key 'critique_revision': expected a non-empty list"),
        (('feedback_principles',), [], "key 'feedback_principles': expected a non-empty list"),
        (
            ('feedback_principles', 1),
            3,
            "key 'feedback_principles[1]': expected a non-empty string",
        ),
        (('feedback_principles',), _set, "key 'feedback_principles': missing"),
        (('principles',), ['x'], "key 'principles': unknown key"),
        (('format',), 'v0', "key 'format': expected 'cai_jax.constitution/v1'"),
        (
            ('critique_few_shots', 0, 'critique'),
            _set,
            "key 'critique_few_shots[0].critique': missing",
        ),
        (
            ('critique_few_shots', 0, 'conversation'),
            [['assistant', 'hi']],
            'key \'critique_few_shots[0].conversation[0]\': expected ["human", text]',
        ),
        (
            ('critique_few_shots', 0, 'conversation'),
            [['human', 'a'], ['assistant', 'b']],
            "key 'critique_few_shots[0].conversation': the last turn must be the human's",
        ),
        (
            ('feedback_few_shots', 0, 'answer'),
            'C',
            'key \'feedback_few_shots[0].answer\': expected "A" or "B"',
        ),
        (
            ('feedback_few_shots', 0, 'reasonning'),
            'x',
            "key 'feedback_few_shots[0].reasonning': unknown key",
        ),
        (
            ('feedback_cot_few_shots', 0, 'reasoning'),
            _set,
            "key 'feedback_cot_few_shots[0].reasoning': missing",
        ),
    ],
)
def test_validation_errors_name_file_and_key(tmp_path, path, value, message):
  text = _error(_set(path, value), tmp_path)
  assert text.startswith(f'{tmp_path / "x.json"}: ')
  assert message in text


def test_unreadable_files(tmp_path):
  assert 'not valid UTF-8 JSON: Expecting' in _error('{"critique_revision": [', tmp_path)
  (tmp_path / 'latin1.json').write_bytes(b'{"description": "caf\xe9"}')
  with pytest.raises(C.ConstitutionError, match="not valid UTF-8 JSON: 'utf-8' codec"):
    C.load_constitution(tmp_path / 'latin1.json')
  assert 'expected a JSON object' in _error('[1, 2]', tmp_path)
  with pytest.raises(C.ConstitutionError, match='no such file or directory'):
    C.load_constitution(tmp_path / 'missing.json')
  with pytest.raises(C.ConstitutionError, match='CritiqueRevisionInstructions.json'):
    C.load_constitution(tmp_path)  # A directory without the paper's files.


# ----------------------------------------------------------------------------------------------
# Sampling.


def test_principle_rng_is_deterministic_and_distinct():
  def draw(*args):
    return C.principle_rng(*args).integers(1 << 30, size=4).tolist()

  assert draw(0, 7, 'critique_revision') == draw(0, 7, 'critique_revision')
  assert draw(0, 7, 'critique_revision') != draw(0, 8, 'critique_revision')
  assert draw(0, 7, 'critique_revision') != draw(1, 7, 'critique_revision')
  assert draw(0, 7, 'critique_revision') != draw(0, 7, 'feedback')
  assert draw(0, 'redteam-abc', 'feedback') == draw(0, 'redteam-abc', 'feedback')
  # Pinned: the stage hash is sha256-based (Python's hash() is salted per process), so the
  # same example gets the same principles in every run and on every host.
  assert draw(0, 7, 'critique_revision') == [322697228, 1052030406, 855127120, 5070397]


def test_sample_critique_revision_pairs():
  default = C.load_constitution('default')
  rounds = C.sample_critique_revision_pairs(default, 4, C.principle_rng(0, 1, 'cr'))
  assert len(rounds) == 4 and all(p in default.critique_revision for p in rounds)
  assert rounds == C.sample_critique_revision_pairs(default, 4, C.principle_rng(0, 1, 'cr'))
  # Rounds are independent draws: over many examples they differ within an example and the
  # first round varies across examples.
  draws = [
      C.sample_critique_revision_pairs(default, 4, C.principle_rng(0, i, 'cr')) for i in range(50)
  ]
  assert any(len({p.name for p in d}) > 1 for d in draws)
  assert len({d[0].name for d in draws}) > 8
  # A prefix of rounds does not depend on how many rounds are drawn.
  assert C.sample_critique_revision_pairs(default, 2, C.principle_rng(0, 1, 'cr')) == rounds[:2]


def test_sample_feedback_principles():
  default = C.load_constitution('default')
  picked = C.sample_feedback_principles(default, 5, C.principle_rng(3, 9, 'feedback'))
  assert len(set(picked)) == 5 and set(picked) <= set(default.feedback_principles)
  assert picked == C.sample_feedback_principles(default, 5, C.principle_rng(3, 9, 'feedback'))
  assert picked != C.sample_feedback_principles(default, 5, C.principle_rng(3, 10, 'feedback'))
  with pytest.raises(ValueError, match='distinct'):
    C.sample_feedback_principles(default, 17, np.random.default_rng(0))
  assert (
      len(C.sample_feedback_principles(default, 40, np.random.default_rng(0), replace=True)) == 40
  )
