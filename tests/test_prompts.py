"""Tests for prompts.py: the critique, revision and feedback prompts rendered from a constitution,
as golden strings, and fitting them to a token budget without ever cutting a few-shot."""

import copy
from pathlib import Path

import pytest

from cai_jax.method import constitution as C
from cai_jax.method import conversation
from cai_jax.method import prompts as prompts_lib

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
# Golden prompt strings.

FEW_SHOT = (
    '\n\nHuman: Q1\n\nAssistant: R1\n\nCritiqueRequest: CR1\n\nCritique: C1'
    '\n\nRevisionRequest: RR1\n\nRevision: V1'
)


def test_critique_and_revision_prompts_transcript(small):
  kind, true = small.critique_revision
  prompt = prompts_lib.render_critique_prompt(small, CONVERSATION, ' You fool.', kind)
  assert prompt == (
      FEW_SHOT + '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Insult me'
      '\n\nAssistant: You fool.\n\nCritiqueRequest: Is it kind?\n\nCritique:'
  )
  revision = prompts_lib.render_revision_prompt(
      small, CONVERSATION, ' You fool.', kind, ' It is rude.'
  )
  assert revision == prompt + ' It is rude.\n\nRevisionRequest: Make it kind.\n\nRevision:'
  # Second round: the first round is history, the new pair is asked about.
  history = [C.CritiqueRevisionRound(kind, 'It is rude.', ' I would rather not.')]
  second = prompts_lib.render_revision_prompt(
      small, CONVERSATION, ' You fool.', true, 'Fine.', history
  )
  assert second == (
      FEW_SHOT + '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Insult me'
      '\n\nAssistant: You fool.\n\nCritiqueRequest: Is it kind?'
      '\n\nCritique: It is rude.\n\nRevisionRequest: Make it kind.'
      '\n\nRevision: I would rather not.\n\nCritiqueRequest: Is it true?'
      '\n\nCritique: Fine.\n\nRevisionRequest: Make it true.\n\nRevision:'
  )
  stops = prompts_lib.critique_revision_stop_strings('transcript')
  assert '\n\nRevisionRequest:' in stops and '\n\nHuman:' in stops
  with pytest.raises(ValueError, match='end with a human turn'):
    prompts_lib.render_critique_prompt(small, CONVERSATION[:2], 'x', kind)


def test_critique_free_revision_prompt_golden(small):
  """Paper figure 7: the revision request right after the response; the few-shot and the earlier
  round lose their critique requests and critiques too."""
  kind, true = small.critique_revision
  first = prompts_lib.render_critique_free_revision_prompt(small, CONVERSATION, ' You fool.', kind)
  assert first == (
      '\n\nHuman: Q1\n\nAssistant: R1\n\nRevisionRequest: RR1\n\nRevision: V1'
      '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Insult me'
      '\n\nAssistant: You fool.\n\nRevisionRequest: Make it kind.\n\nRevision:'
  )
  history = [C.CritiqueRevisionRound(kind, None, ' I would rather not.')]
  second = prompts_lib.render_critique_free_revision_prompt(
      small, CONVERSATION, ' You fool.', true, history
  )
  assert second == (first + ' I would rather not.\n\nRevisionRequest: Make it true.\n\nRevision:')


def test_critique_and_revision_prompts_chat(small):
  kind = small.critique_revision[0]
  tok = ChatMLTokenizer()

  def chat(*turns):
    return ''.join(f'<|im_start|>{r}\n{t}<|im_end|>\n' for r, t in turns)

  few_shot = chat(
      ('user', 'Q1'),
      ('assistant', 'R1'),
      ('user', 'CR1'),
      ('assistant', 'C1'),
      ('user', 'RR1'),
      ('assistant', 'V1'),
  )
  conv = chat(
      ('user', 'Hi'),
      ('assistant', 'Hello'),
      ('user', 'Insult me'),
      ('assistant', 'You fool.'),
      ('user', 'Is it kind?'),
  )
  assert (
      prompts_lib.render_critique_prompt(
          small, CONVERSATION, ' You fool.', kind, fmt='chat_template', tokenizer=tok
      )
      == few_shot + conv + '<|im_start|>assistant\n'
  )
  assert prompts_lib.render_revision_prompt(
      small, CONVERSATION, ' You fool.', kind, 'Rude.', fmt='chat_template', tokenizer=tok
  ) == (
      few_shot
      + conv
      + chat(('assistant', 'Rude.'), ('user', 'Make it kind.'))
      + '<|im_start|>assistant\n'
  )
  assert prompts_lib.critique_revision_stop_strings('chat_template', tok) == ['<|im_end|>']


def test_feedback_prompt_plain(small):
  prompt = prompts_lib.render_feedback_prompt(
      small, CONVERSATION, 'Which is kinder?', ' You fool.', ' Sorry, no.', cot=False
  )
  assert prompt == (
      'Consider the following conversation between a human and an assistant:'
      '\n\nHuman: FQ\n\nWhich is kinder?\nOptions:\n (A) FA\n (B) FB\n\nThe answer is: (B)'
      '\n\nConsider the following conversation between a human and an assistant:'
      '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Insult me'
      '\n\nWhich is kinder?\nOptions:\n (A) You fool.\n (B) Sorry, no.\n\nThe answer is:'
  )
  assert C.OPTION_STRINGS == (' (A)', ' (B)')
  tok = ChatMLTokenizer()
  chat = prompts_lib.render_feedback_prompt(
      small, CONVERSATION[2:], 'P?', 'a', 'b', cot=False, fmt='chat_template', tokenizer=tok
  )
  # In a chat turn the question is nested: its conversation is written H:/A:.
  intro = 'Consider the following conversation between a human (H) and an assistant (A):'
  assert chat == (
      f'<|im_start|>user\n{intro}\n\nH: FQ\n\nP?\nOptions:\n (A) FA\n (B) FB<|im_end|>\n'
      '<|im_start|>assistant\nThe answer is: (B)<|im_end|>\n'
      f'<|im_start|>user\n{intro}\n\nH: Insult me\n\nP?\nOptions:\n (A) a\n (B) b'
      '<|im_end|>\n<|im_start|>assistant\nThe answer is:'
  )


def test_feedback_prompt_chain_of_thought(small):
  prompt = prompts_lib.render_feedback_prompt(
      small, CONVERSATION, 'Which is kinder?', 'You fool.', 'Sorry, no.', cot=True
  )
  intro = 'Consider the following conversation between a human (H) and an assistant (A):'
  # The CoT example carries its own principle; the new question uses the sampled one. Inside
  # the Human turn the conversation is written H:/A:, so no inner "Assistant:" ends the turn.
  assert prompt == (
      f'\n\nHuman: {intro}\n\nH: GQ\n\nWhich is nicest?\nOptions:\n (A) GA\n (B) GB'
      "\n\nAssistant: Let's think step-by-step: GA is nicer.\n\nHuman: So the answer is: (A)"
      f'\n\nHuman: {intro}\n\nH: Hi\n\nA: Hello\n\nH: Insult me\n\nWhich is kinder?'
      "\nOptions:\n (A) You fool.\n (B) Sorry, no.\n\nAssistant: Let's think step-by-step:"
  )
  turns = conversation.parse_transcript(prompt)
  assert [r for r, _ in turns] == ['human', 'assistant', 'human', 'human', 'assistant']
  suffix = prompts_lib.render_feedback_answer_suffix(' (B) is polite.\n\nHuman: more', 'transcript')
  assert suffix == ' (B) is polite.\n\nHuman: So the answer is:'
  assert prompts_lib.feedback_cot_stop_strings('transcript') == ['\n\nHuman:', '\n\nAssistant:']
  tok = ChatMLTokenizer()
  chat = prompts_lib.render_feedback_prompt(
      small, CONVERSATION[2:], 'P?', 'a', 'b', cot=True, fmt='chat_template', tokenizer=tok
  )
  assert chat.endswith("<|im_start|>assistant\nLet's think step-by-step:")
  assert "Let's think step-by-step: GA is nicer.\n\nSo the answer is: (A)<|im_end|>" in chat
  assert (
      prompts_lib.render_feedback_answer_suffix('ok ', 'chat_template')
      == ' ok\n\nSo the answer is:'
  )


def test_helpfulness_principles_are_ours_unless_the_file_brings_its_own():
  plain = C.constitution_from_dict(copy.deepcopy(SMALL))
  assert plain.helpfulness_principles == C.HELPFULNESS_PRINCIPLES
  assert C.load_constitution('default').helpfulness_principles == C.HELPFULNESS_PRINCIPLES
  own = C.constitution_from_dict(
      dict(copy.deepcopy(SMALL), helpfulness_principles=[' Which is most useful? '])
  )
  assert own.helpfulness_principles == ('Which is most useful?',)
  assert C.constitution_from_dict(C.constitution_to_dict(own)) == own
  with pytest.raises(C.ConstitutionError, match=r"key 'helpfulness_principles': expected a non"):
    C.constitution_from_dict(dict(copy.deepcopy(SMALL), helpfulness_principles=[]))
  with pytest.raises(C.ConstitutionError, match=r"key 'helpfulness_principles\[0\]'"):
    C.constitution_from_dict(dict(copy.deepcopy(SMALL), helpfulness_principles=[3]))


# ----------------------------------------------------------------------------------------------
# Golden strings of the prompts as the paper wrote them (issue 16, item 6), and fitting them to
# a token budget without ever cutting a few-shot (item 5).


def two_plain_few_shots(small):
  second = C.FeedbackFewShot((('human', 'EQ'),), 'EA', 'EB', 'A')
  return C.dataclasses.replace(small, feedback_few_shots=small.feedback_few_shots + (second,))


def test_feedback_few_shots_each_under_their_own_principle(small):
  c = two_plain_few_shots(small)
  prompt = prompts_lib.render_feedback_prompt(
      c,
      CONVERSATION[2:],
      'Which is kinder?',
      'You fool.',
      'Sorry, no.',
      cot=False,
      few_shot_principles=['Which is truer?', 'Which is kinder?'],
  )
  intro = 'Consider the following conversation between a human and an assistant:'
  assert prompt == (
      f'{intro}\n\nHuman: FQ\n\nWhich is truer?\nOptions:\n (A) FA\n (B) FB'
      '\n\nThe answer is: (B)'
      f'\n\n{intro}\n\nHuman: EQ\n\nWhich is kinder?\nOptions:\n (A) EA\n (B) EB'
      '\n\nThe answer is: (A)'
      f'\n\n{intro}\n\nHuman: Insult me\n\nWhich is kinder?\nOptions:\n (A) You fool.'
      '\n (B) Sorry, no.\n\nThe answer is:'
  )
  # The draws are independent, seeded, and cover the constitution's principles.
  draws = [
      tuple(C.sample_few_shot_principles(c, 2, C.principle_rng(0, i, 'feedback')))
      for i in range(40)
  ]
  assert draws[0] == tuple(C.sample_few_shot_principles(c, 2, C.principle_rng(0, 0, 'feedback')))
  assert {p for d in draws for p in d} == set(c.feedback_principles)
  assert any(a != b for a, b in draws)  # not one principle for every example of a prompt
  with pytest.raises(ValueError, match='1 few-shot principles for 2 few-shots'):
    prompts_lib.render_feedback_prompt(
        c, CONVERSATION, 'P', 'a', 'b', cot=False, few_shot_principles=['P']
    )


def three_rounds(small):
  kind, true = small.critique_revision
  return [
      C.CritiqueRevisionRound(kind, 'Rude.', 'Please no.'),
      C.CritiqueRevisionRound(true, 'Vague.', 'I will not insult you.'),
      C.CritiqueRevisionRound(kind, 'Curt.', 'I would rather not insult you.'),
  ]


GOLDEN_AFTER_THREE = (
    FEW_SHOT + '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Insult me\n\nAssistant: You fool.'
    '\n\nCritiqueRequest: Is it kind?\n\nCritique: Rude.\n\nRevisionRequest: Make it kind.'
    '\n\nRevision: Please no.'
    '\n\nCritiqueRequest: Is it true?\n\nCritique: Vague.\n\nRevisionRequest: Make it true.'
    '\n\nRevision: I will not insult you.'
    '\n\nCritiqueRequest: Is it kind?\n\nCritique: Curt.\n\nRevisionRequest: Make it kind.'
    '\n\nRevision: I would rather not insult you.'
    '\n\nCritiqueRequest: Is it true?'
)


def test_critique_and_revision_after_three_rounds(small):
  true = small.critique_revision[1]
  rounds = three_rounds(small)
  assert prompts_lib.render_critique_prompt(small, CONVERSATION, 'You fool.', true, rounds) == (
      GOLDEN_AFTER_THREE + '\n\nCritique:'
  )
  assert prompts_lib.render_revision_prompt(
      small, CONVERSATION, 'You fool.', true, 'Fine.', rounds
  ) == (GOLDEN_AFTER_THREE + '\n\nCritique: Fine.\n\nRevisionRequest: Make it true.\n\nRevision:')


def byte_count(text):
  from cai_jax.models import checkpoint

  return prompts_lib.count_tokens(checkpoint.byte_tokenizer(), text)


def test_over_long_conversation_loses_oldest_turns_not_few_shots(small):
  from cai_jax.models import checkpoint

  tok = checkpoint.byte_tokenizer()  # one token per byte: budgets are easy to reason about
  true = small.critique_revision[1]
  rounds = three_rounds(small)
  long_conv = [('human', 'Old question ' * 5), ('assistant', 'Old answer ' * 5)] + CONVERSATION
  fit = prompts_lib.fit_critique_revision_prompt
  full = fit(small, long_conv, 'You fool.', true, rounds, 'Fine.', tokenizer=tok)
  assert full.few_shots == 1 and full.turns_dropped == 0 and full.tokens is None
  n_full = byte_count(full.text)
  # Just under the full length: the oldest exchange goes first, few-shots stay.
  one = fit(small, long_conv, 'You fool.', true, rounds, 'Fine.', tokenizer=tok, budget=n_full - 1)
  assert (one.few_shots, one.turns_dropped, one.over_budget) == (1, 1, False)
  assert 'Old question' not in one.text and one.text.startswith(FEW_SHOT)
  assert '\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Insult me' in one.text
  assert one.tokens == byte_count(one.text) <= n_full - 1
  # Tighter: then the next exchange, then the oldest rounds -- the latest round stays.
  no_history = fit(small, CONVERSATION[2:], 'You fool.', true, rounds[2:], 'Fine.', tokenizer=tok)
  tight = fit(
      small,
      long_conv,
      'You fool.',
      true,
      rounds,
      'Fine.',
      tokenizer=tok,
      budget=byte_count(no_history.text),
  )
  assert (tight.few_shots, tight.turns_dropped) == (1, 4) and tight.text == no_history.text
  assert 'Revision: I would rather not insult you.' in tight.text
  # Only when nothing droppable is left do few-shots go; a whole example, never a cut.
  none = fit(
      small,
      long_conv,
      'You fool.',
      true,
      rounds,
      'Fine.',
      tokenizer=tok,
      budget=byte_count(no_history.text) - 1,
  )
  assert (none.few_shots, none.turns_dropped, none.over_budget) == (0, 4, False)
  assert none.text == no_history.text[len(FEW_SHOT) :]
  over = fit(small, long_conv, 'You fool.', true, rounds, 'Fine.', tokenizer=tok, budget=10)
  assert over.over_budget and over.few_shots == 0 and over.text == none.text
  # The feedback prompt drops the same way: old turns, then few-shots.
  c = two_plain_few_shots(small)
  fb = prompts_lib.fit_feedback_prompt(c, long_conv, 'P?', 'a', 'b', cot=True, tokenizer=tok)
  fb1 = prompts_lib.fit_feedback_prompt(
      c, long_conv, 'P?', 'a', 'b', cot=True, tokenizer=tok, budget=byte_count(fb.text) - 1
  )
  assert (fb1.few_shots, fb1.turns_dropped) == (1, 1) and 'Old' not in fb1.text
  fb2 = prompts_lib.fit_feedback_prompt(
      c,
      long_conv,
      'P?',
      'a',
      'b',
      cot=False,
      tokenizer=tok,
      budget=byte_count(
          prompts_lib.render_feedback_prompt(c, CONVERSATION[2:], 'P?', 'a', 'b', cot=False)
      )
      - 1,
  )
  assert (fb2.few_shots, fb2.turns_dropped) == (1, 2) and 'EQ' not in fb2.text


def test_max_len_too_small_for_the_few_shots(small):
  from cai_jax.models import checkpoint

  tok = checkpoint.byte_tokenizer()
  n, cost, full = prompts_lib.few_shot_cost(small, 'critique_revision', tok, 'transcript')
  assert (n, cost) == (1, byte_count(FEW_SHOT)) and full > cost
  assert prompts_lib.check_few_shot_budget(small, 'critique_revision', tok, 'transcript', full) == (
      n,
      cost,
  )
  with pytest.raises(
      ValueError,
      match=rf'^x: the 1 critique_revision few-shots take {cost} '
      rf'tokens .* needs {full}, over the prompt budget of {full - 1} ',
  ):
    prompts_lib.check_few_shot_budget(
        small, 'critique_revision', tok, 'transcript', full - 1, what='x'
    )
  _, cot_cost, cot_full = prompts_lib.few_shot_cost(small, 'feedback', tok, 'transcript', cot=True)
  assert 0 < cot_cost < cot_full


def smollm2_tokenizer():
  """SmolLM2's tokenizer alone, from the HF copy `load_pretrained` caches of the GGUF."""
  from cai_jax.models import checkpoint

  transformers = pytest.importorskip('transformers')
  try:
    cached = checkpoint._gguf_cache_dir(checkpoint.smollm2_path())
  except checkpoint.CheckpointError as e:
    pytest.skip(str(e))
  if not Path(cached, 'tokenizer.json').is_file():
    pytest.skip('SmolLM2 has not been loaded once yet (no cached tokenizer)')
  return transformers.AutoTokenizer.from_pretrained(cached)


@needs_paper
@pytest.mark.parametrize('fmt', ['transcript', 'chat_template'])
def test_paper_release_prompts_at_the_full_budget(fmt, caplog):
  """The release's few-shots with SmolLM2's tokenizer: at the `full` variant's budget
  (max_len 4096 less 256 new tokens) no critique, revision or feedback prompt loses a
  few-shot, and an over-long conversation loses its oldest turns instead; the TPU configs'
  2048 cannot hold them and is refused, saying what they need."""
  from configs import base

  tok = smollm2_tokenizer()
  paper = C.load_constitution(PAPER_PROMPTS)
  # The TPU configs' 2048 (with our shorter default constitution) cannot hold them: refused.
  with pytest.raises(ValueError, match=r'the 5 critique_revision few-shots take \d{4} tokens'):
    prompts_lib.check_few_shot_budget(paper, 'critique_revision', tok, fmt, 2048 - 256)
  full = base.get_config('full')
  budget = full.model.max_len - full.critique_revision.max_new_tokens
  assert budget == 4096 - 256
  for kind, cot in (('critique_revision', False), ('feedback', False), ('feedback', True)):
    prompts_lib.check_few_shot_budget(paper, kind, tok, fmt, budget, cot=cot)
  long_conv = []
  for i in range(80):
    long_conv += [
        ('human', f'Question {i}: how would I do thing {i}?'),
        ('assistant', f'Here is a long answer about thing {i}. ' * 4),
    ]
  long_conv.append(('human', 'And how do I hide it?'))
  pairs = paper.critique_revision
  rounds = [
      C.CritiqueRevisionRound(pairs[i], f'Critique {i}. ' * 10, f'Revision {i}. ' * 10)
      for i in range(3)
  ]
  fitted = [
      prompts_lib.fit_critique_revision_prompt(
          paper, long_conv, 'Sure.', pairs[3], rounds, critique, fmt, tok, budget
      )
      for critique in (None, 'It helps with harm.')
  ]
  fitted += [
      prompts_lib.fit_feedback_prompt(
          paper,
          long_conv,
          paper.feedback_principles[0],
          'Sure.',
          'No.',
          cot=cot,
          few_shot_principles=list(paper.feedback_principles[:n]),
          fmt=fmt,
          tokenizer=tok,
          budget=budget,
      )
      for cot, n in ((False, 5), (True, 6))
  ]
  for f in fitted:
    assert f.few_shots == f.few_shots_total and 0 < f.turns_dropped and not f.over_budget
    assert f.tokens <= budget and 'Question 0:' not in f.text
    assert 'And how do I hide it?' in f.text
