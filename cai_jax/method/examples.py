"""Supervised examples: a prompt conversation then the response to learn, tokenized as the sampler
sees the prompt (`encode`: prompt and target apart, the end-of-turn marker after the target) and
packed right-padded with a loss mask on the target tokens (`pack`). The sft stage trains on
them; DPO scores its chosen and rejected responses the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from cai_jax import bookkeeping
from cai_jax.method import conversation


class SFTDataError(bookkeeping.StageError):
  """Training data that cannot be used (missing files, malformed records, no examples at all)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One tokenized conversation: the prompt's tokens, then the target (response) tokens."""

  id: str  # the prompt's id: every round and sample of one prompt shares it (and its split)
  source: str  # 'revision' | 'helpful'
  tokens: tuple[int, ...]
  n_prompt: int  # the loss covers tokens[n_prompt:]
  kind: str = ''  # 'revision_round_<k>' | 'revision_final' | 'initial_response' | 'helpful'


def target_text(response: str, fmt: str, tokenizer, end: bool = True) -> str:
  """What the model learns to write after the prompt, with the marker that ends its turn.

  Transcript: " " + response + EOS (the prompt ends in "Assistant:"). Chat template: the
  response + the template's end-of-turn marker. `end=False` leaves the marker off: a response
  cut at the token limit did not end there, and must not teach the model to stop mid-thought.
  """
  if conversation.check_format(fmt) == 'transcript':
    if end and tokenizer.eos_token is None:
      raise SFTDataError('the tokenizer has no EOS token to end the responses with')
    return ' ' + response.strip() + (tokenizer.eos_token if end else '')
  return response.strip() + (conversation.stop_strings(fmt, tokenizer)[0] if end else '')


def encode(
    turns: Sequence[conversation.Turn],
    response: str,
    tokenizer,
    fmt: str,
    max_len: int,
    end: bool = True,
) -> tuple[tuple[int, ...], int] | None:
  """(tokens, n_prompt) of one example cut to max_len; None if no target token survives the cut.

  `turns`: the prompt's conversation, ending in the human request the response answers. Prompt
  and target are tokenized apart, as the sampler sees them (`conversation.encode`); `end`:
  whether the target ends with the end-of-turn marker (`target_text`). A conversation too long
  for its target sheds its oldest exchanges first (`conversation.fit_turns`, as the sampler's
  prompt did); what is still over max_len is cut from the end.
  """
  target = target_text(response, fmt, tokenizer, end)
  ids, n_prompt = conversation.encode(tokenizer, conversation.render(turns, fmt, tokenizer), target)
  if len(ids) > max_len and len(turns) > 2:
    turns = conversation.fit_turns(turns, fmt, tokenizer, max_len - (len(ids) - n_prompt))
    ids, n_prompt = conversation.encode(
        tokenizer, conversation.render(turns, fmt, tokenizer), target
    )
  ids = ids[:max_len]
  if len(ids) <= n_prompt:
    return None
  return tuple(ids), n_prompt


def pack(
    examples: Sequence[Example], rows: Sequence[int], length: int, pad_id: int
) -> dict[str, np.ndarray]:
  """Right-padded `tokens` [N, length] int32 and `loss_mask` [N, length] (1 on target tokens)."""
  tokens = np.full((len(rows), length), pad_id, np.int32)
  loss_mask = np.zeros((len(rows), length), np.int32)
  for r, i in enumerate(rows):
    if i < 0:
      continue
    ex = examples[i]
    tokens[r, : len(ex.tokens)] = ex.tokens
    loss_mask[r, ex.n_prompt : len(ex.tokens)] = 1
  return {'tokens': tokens, 'loss_mask': loss_mask}
