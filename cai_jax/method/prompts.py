"""Every CAI prompt, rendered from a constitution and fitted to its token budget (Bai et al. 2022,
sections 3 and 4): the critique and revision prompts of the SL stage (few-shot examples, the
conversation, earlier rounds, the sampled request), the multiple-choice feedback prompt of the RL
stage ("Options: (A) ... (B) ...", plain or chain-of-thought), their stop strings, and the check
that a constitution's few-shots leave room for a conversation (`check_few_shot_budget`).

A prompt over budget (`model.max_len` less the tokens generated after it) loses whole segments,
never a raw cut through its text (`fit_prompt`): first the oldest conversation turns, then
few-shots from the end."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from cai_jax.method import conversation
from cai_jax.method.constitution import (
    CR_ROLES,
    Constitution,
    CritiqueRevisionPair,
    CritiqueRevisionRound,
)
from cai_jax.method.conversation import ASSISTANT, HUMAN, Turn

# Fixed phrases of the feedback prompts (paper, section 4.1).
FEEDBACK_INTRO = 'Consider the following conversation between a human and an assistant:'
ANSWER_PREFIX = 'The answer is:'
COT_PREFIX = "Let's think step-by-step:"
COT_ANSWER_PREFIX = 'So the answer is:'
# The release's own wording (its RLMadisonPrecogFewShotPrompts.json and 438HHHEvaluations.jsonl),
# used with a constitution of text_style 'release'.
RELEASE_COT_PREFIX = "Let's think step by step:"
RELEASE_COT_ANSWER = '\n\nHuman:\nSo the answer is:'


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
  turns = [(CR_ROLES[label], text) for label, text in segments]
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
    return [f'\n\n{label}:' for label in CR_ROLES]
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
    style: str = 'cai_jax',
    intro: str | None = None,
) -> str:
  """The multiple-choice question; `nested`: it goes inside a turn, so H:/A: inner labels.

  `style` 'release' writes it as the paper's release does (438HHHEvaluations.jsonl's prompts,
  RLMadisonPrecogFewShotPrompts.json's questions): texts unstripped, the principle on a line of
  its own ending in " Options:", each option inside [[[ ]]], and a few-shot's own `intro`
  sentence where it has one.
  """
  _check_conversation(conversation_turns)
  release = style == 'release'
  if nested:
    inner = ''.join(
        f'\n\n{NESTED_LABELS[role]}: {text if release else text.strip()}'
        for role, text in conversation_turns
    )
    head = (intro if release and intro else NESTED_FEEDBACK_INTRO) + inner
  elif release:
    head = (intro or FEEDBACK_INTRO) + ''.join(
        f'\n\n{conversation.TRANSCRIPT_LABELS[role]}: {text}' for role, text in conversation_turns
    )
  else:
    head = FEEDBACK_INTRO + conversation.render_transcript(
        conversation_turns, add_generation_prompt=False
    )
  if release:  # the release's principles are "\n<principle> Options:"
    return (
        head
        + f'\n\n\n{principle.strip()} Options:\n (A) [[[{response_a}]]]\n (B) [[[{response_b}]]]'
    )
  return (
      head
      + f'\n\n{principle.strip()}\nOptions:\n (A) {response_a.strip()}'
      + f'\n (B) {response_b.strip()}'
  )


def _feedback_text(examples, question: str, cot: bool, fmt: str, tokenizer, style: str) -> str:
  """Few-shot (question, example) blocks then the question, in `fmt`."""
  release = style == 'release'
  cot_prefix = RELEASE_COT_PREFIX if release else COT_PREFIX
  if conversation.check_format(fmt) == 'transcript':
    seg = conversation.transcript_segment
    if not cot and release:  # as 438HHHEvaluations.jsonl: each block opens with a blank line
      blocks = [f'\n\n{q}\n\n{ANSWER_PREFIX} ({ex.answer})' for q, ex in examples]
      return ''.join(blocks) + f'\n\n{question}\n\n{ANSWER_PREFIX}'
    if not cot:
      blocks = [f'{q}\n\n{ANSWER_PREFIX} ({ex.answer})' for q, ex in examples]
      return '\n\n'.join(blocks + [f'{question}\n\n{ANSWER_PREFIX}'])
    if release:  # as RLMadisonPrecogFewShotPrompts.json: the reasoning as written after the colon
      text = ''.join(
          seg('Human', q)
          + f'\n\nAssistant: {cot_prefix}{ex.reasoning}{RELEASE_COT_ANSWER} ({ex.answer})'
          for q, ex in examples
      )
      return text + seg('Human', question) + f'\n\nAssistant: {cot_prefix}'
    text = ''.join(
        seg('Human', q)
        + seg('Assistant', f'{cot_prefix} {ex.reasoning.strip()}')
        + seg('Human', f'{COT_ANSWER_PREFIX} ({ex.answer})')
        for q, ex in examples
    )
    return text + seg('Human', question) + seg('Assistant', cot_prefix)
  # Chat template: each example is a user question and the assistant's answer; the final
  # assistant turn is opened by the template and started with the answer / reasoning prefix.
  turns = []
  for q, ex in examples:
    reply = (
        f'{cot_prefix} {ex.reasoning.strip()}\n\n{COT_ANSWER_PREFIX} ({ex.answer})'
        if cot
        else f'{ANSWER_PREFIX} ({ex.answer})'
    )
    turns += [(HUMAN, q), (ASSISTANT, reply)]
  turns.append((HUMAN, question))
  prompt = conversation.render_chat(turns, tokenizer, add_generation_prompt=True)
  return prompt + (cot_prefix if cot else ANSWER_PREFIX)


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
  style = constitution.text_style
  examples = [
      (
          feedback_question(
              ex.conversation,
              ex.principle or p,
              ex.response_a,
              ex.response_b,
              nested,
              style,
              ex.intro,
          ),
          ex,
      )
      for ex, p in zip(few_shots, few_shot_principles)
  ]
  _check_conversation(conversation_turns)

  def render(k: int, dropped: int) -> str:
    question = feedback_question(
        _drop_context(conversation_turns, dropped),
        principle,
        response_a,
        response_b,
        nested,
        style,
    )
    return _feedback_text(examples[:k], question, cot, fmt, tokenizer, style)

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


def render_feedback_answer_suffix(
    cot_text: str, fmt: str = 'transcript', style: str = 'cai_jax'
) -> str:
  """Text appended to a CoT feedback prompt: the reasoning, then the answer lead-in.

  The options are scored as ``prompt + suffix + OPTION_STRINGS[i]``. Anything after a
  transcript stop string in `cot_text` is dropped. `style` 'release': the reasoning as
  generated (its own first character after the colon) and the release's "\n\nHuman:\nSo the
  answer is:".
  """
  if conversation.check_format(fmt) == 'transcript':
    for stop in conversation.stop_strings('transcript'):
      cot_text = cot_text.split(stop)[0]
    if style == 'release':
      lead = '' if cot_text[:1].isspace() else ' '
      return f'{lead}{cot_text.rstrip()}{RELEASE_COT_ANSWER}'
    return f' {cot_text.strip()}\n\nHuman: {COT_ANSWER_PREFIX}'
  return f' {cot_text.strip()}\n\n{COT_ANSWER_PREFIX}'


def feedback_cot_stop_strings(fmt: str, tokenizer: Any = None) -> list[str]:
  """Where generated CoT reasoning ends (the end of the assistant turn)."""
  return conversation.stop_strings(fmt, tokenizer)
