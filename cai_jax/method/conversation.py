"""Conversation rendering: the paper's Human/Assistant transcript format and chat templates.

Every prompt the pipeline feeds a model is a list of turns rendered here (constitution.py adds
the critique/revision/feedback framing on top). Two formats exist:

* ``'transcript'`` -- the format of the paper and of HH-RLHF:
    ``"\\n\\nHuman: {text}\\n\\nAssistant: {text}"``. With a generation prompt the string ends in
    ``"\\n\\nAssistant:"``, so the model's reply starts with a space, as in the paper's data.
* ``'chat_template'`` -- ``tokenizer.apply_chat_template`` (human -> ``user``), for instruct
    models such as SmolLM2-Instruct.

It also holds the one encoder every stage turns rendered text into token ids with (`encode`,
one BOS rule, prompt and target tokenized apart), and the one pad id (`pad_id`): the ids a model
is trained on are the ids it is sampled with.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from typing import Any

Turn = tuple[str, str]  # (role, text) with role 'human' or 'assistant'.

HUMAN = 'human'
ASSISTANT = 'assistant'
FORMATS = ('transcript', 'chat_template')

# Speaker labels of the transcript format.
TRANSCRIPT_LABELS = {HUMAN: 'Human', ASSISTANT: 'Assistant'}
_CHAT_ROLES = {HUMAN: 'user', ASSISTANT: 'assistant'}
# End-of-turn markers of common chat templates, most specific first (ChatML, Llama 3, Gemma).
_END_OF_TURN_MARKERS = ('<|im_end|>', '<|eot_id|>', '<end_of_turn>', '<|end|>')


def check_format(fmt: str) -> str:
  if fmt not in FORMATS:
    raise ValueError(f'unknown prompt format {fmt!r}; valid formats: {", ".join(FORMATS)}')
  return fmt


def _check_turns(turns: Sequence[Turn]) -> None:
  for i, turn in enumerate(turns):
    if len(turn) != 2 or turn[0] not in TRANSCRIPT_LABELS or not isinstance(turn[1], str):
      raise ValueError(
          f'turn {i} must be (role, text) with role in ' f'{tuple(TRANSCRIPT_LABELS)}, got {turn!r}'
      )


def transcript_segment(label: str, text: str | None) -> str:
  """One ``"\\n\\n{label}: {text}"`` block; ``text=None`` leaves ``"\\n\\n{label}:"`` open.

  Texts are stripped so generated replies (which start with a space) do not double it.
  """
  if text is None:
    return f'\n\n{label}:'
  return f'\n\n{label}: {text.strip()}'


def render_transcript(turns: Sequence[Turn], add_generation_prompt: bool = True) -> str:
  """``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, ending in ``"\\n\\nAssistant:"`` if asked."""
  _check_turns(turns)
  text = ''.join(transcript_segment(TRANSCRIPT_LABELS[role], t) for role, t in turns)
  if add_generation_prompt:
    text += transcript_segment(TRANSCRIPT_LABELS[ASSISTANT], None)
  return text


def chat_messages(turns: Sequence[Turn]) -> list[dict[str, str]]:
  _check_turns(turns)
  return [{'role': _CHAT_ROLES[role], 'content': text.strip()} for role, text in turns]


def render_chat(turns: Sequence[Turn], tokenizer: Any, add_generation_prompt: bool = True) -> str:
  """Renders with the tokenizer's chat template (as text; the caller tokenizes)."""
  if tokenizer is None:
    raise ValueError("fmt 'chat_template' needs a tokenizer with a chat template")
  return tokenizer.apply_chat_template(
      chat_messages(turns), tokenize=False, add_generation_prompt=add_generation_prompt
  )


def render(
    turns: Sequence[Turn], fmt: str, tokenizer: Any = None, add_generation_prompt: bool = True
) -> str:
  if check_format(fmt) == 'transcript':
    return render_transcript(turns, add_generation_prompt)
  return render_chat(turns, tokenizer, add_generation_prompt)


def fit_turns(turns: Sequence[Turn], fmt: str, tokenizer: Any, budget: int) -> list[Turn]:
  """The conversation without as few of its oldest (human, assistant) exchanges as it takes
  for its rendered prompt to fit `budget` tokens; the last human turn always stays (if it
  alone is too long, the sampler cuts its oldest tokens, as a last resort)."""
  turns = list(turns)
  while len(turns) > 2 and len(encode(tokenizer, render(turns, fmt, tokenizer))[0]) > budget:
    turns = turns[2:]
  return turns


def stop_strings(fmt: str, tokenizer: Any = None) -> list[str]:
  """Strings at which a generated assistant turn ends."""
  if check_format(fmt) == 'transcript':
    return ['\n\nHuman:', '\n\nAssistant:']
  if tokenizer is None:
    raise ValueError("fmt 'chat_template' needs a tokenizer to find its end-of-turn marker")
  template = getattr(tokenizer, 'chat_template', None) or ''
  if not isinstance(template, str):  # Some tokenizers hold a dict of named templates.
    template = ' '.join(str(t) for t in dict(template).values())
  stops = [m for m in _END_OF_TURN_MARKERS if m in template][:1]
  eos = getattr(tokenizer, 'eos_token', None)
  if eos and eos not in stops:
    stops.append(eos)
  if not stops:
    raise ValueError('cannot find an end-of-turn marker in the chat template or eos_token')
  return stops


_TRANSCRIPT_SPLIT = re.compile(r'(?:^|\n\n)\s*(Human|Assistant):')


def parse_transcript(text: str, raw: bool = False) -> list[Turn]:
  """Splits an HH-RLHF style transcript into turns.

  Text before the first ``Human:``/``Assistant:`` label is ignored; a trailing empty turn (a
  prompt ending in ``"\\n\\nAssistant:"``) is dropped. Texts are stripped; `raw` keeps each as
  written after its label's one space (double and trailing spaces too), for text that must be
  rendered back exactly (the paper release's prompts; every other rendering strips them).
  """
  parts = _TRANSCRIPT_SPLIT.split(text)
  # parts = [preamble, label, text, label, text, ...]
  keep = (lambda b: b[1:] if b.startswith(' ') else b) if raw else str.strip
  turns = [
      (HUMAN if label == 'Human' else ASSISTANT, keep(body))
      for label, body in zip(parts[1::2], parts[2::2])
  ]
  if turns and not turns[-1][1].strip():
    turns.pop()
  return turns


def first_human_turn(text: str) -> str | None:
  """The first human message of a transcript (the red-team prompt in HH-RLHF files)."""
  for role, body in parse_transcript(text):
    if role == HUMAN and body:
      return body
  return None


# ---- token ids ---------------------------------------------------------------------------------

_BOS_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bos_id(tokenizer: Any) -> int | None:
  """The BOS id the tokenizer's model expects at position 0, or None if it expects none.

  A model expects BOS exactly when its tokenizer's post-processor prepends one (Llama 3,
  Gemma). Naming a `bos_token` is not enough: SmolLM2 and the byte tokenizer of the random
  test models call `<|im_start|>` their BOS but never add it, and were trained without it.
  """
  try:
    return _BOS_IDS[tokenizer]
  except (KeyError, TypeError):
    pass
  bos = getattr(tokenizer, 'bos_token_id', None)
  with_specials = list(tokenizer('a', add_special_tokens=True)['input_ids'])
  plain = list(tokenizer('a', add_special_tokens=False)['input_ids'])
  found = None
  if bos is not None and with_specials[:1] == [bos] and plain[:1] != [bos]:
    found = int(bos)
  try:
    _BOS_IDS[tokenizer] = found
  except TypeError:  # not weak-referenceable: asked again next time
    pass
  return found


def encode(tokenizer: Any, prompt: str, target: str | None = None) -> tuple[list[int], int]:
  """(ids, n_prompt): a rendered prompt's ids, then those of the text that follows it.

  Every stage encodes with this: the sampler (prompt only; the model writes the rest), SFT
  (prompt + target response), the PM (a whole rendered conversation as `prompt`), PPO and AI
  feedback. Prompt and target are tokenized apart, as the sampler sees them: the prompt, then
  generated tokens; one string tokenized whole can merge across the boundary into ids the
  sampler never produces.

  The tokenizer adds no special tokens of its own: special-token text in the strings (a chat
  template's `<|im_start|>` or `<|begin_of_text|>`) becomes its id, and the BOS the model
  expects (`bos_id`) is prepended once, unless the rendered prompt already starts with it
  (chat templates that write `{{ bos_token }}`). A tokenizer that also appends EOS (T5-like)
  would put it mid-sequence, so EOS is the caller's to add.
  """
  ids = list(tokenizer(prompt, add_special_tokens=False)['input_ids'])
  bos = bos_id(tokenizer)
  if bos is not None and ids[:1] != [bos]:
    ids.insert(0, bos)
  n_prompt = len(ids)
  if target is not None:
    ids += tokenizer(target, add_special_tokens=False)['input_ids']
  return ids, n_prompt


def keep_last(ids: Sequence[int], max_len: int, tokenizer: Any) -> list[int]:
  """The last `max_len` ids, with the BOS kept at position 0.

  Long prompts and conversations lose their oldest text, never the token the model expects
  first (a model without its BOS can read the rest very differently, e.g. Gemma).
  """
  ids = list(ids)
  if len(ids) <= max_len:
    return ids
  bos = bos_id(tokenizer)
  if bos is not None and max_len > 1 and ids[:1] == [bos]:
    return [bos] + ids[len(ids) - max_len + 1 :]
  return ids[len(ids) - max_len :]


def pad_id(tokenizer: Any = None, model_cfg: Any = None) -> int:
  """The id every stage fills padded slots with (always masked out, but it must be a real id).

  In order of preference: the tokenizer's pad token, the model config's pad token, the
  tokenizer's EOS, the config's EOS, then 0. The tokenizer goes first because it wrote the ids
  being padded; the config covers scoring, which sees token ids and no tokenizer.
  """
  for owner, name in (
      (tokenizer, 'pad_token_id'),
      (model_cfg, 'pad_token_id'),
      (tokenizer, 'eos_token_id'),
      (model_cfg, 'eos_token_id'),
  ):
    value = getattr(owner, name, None) if owner is not None else None
    if value is not None:
      return int(value)
  return 0
