"""Tests for cai_jax.conversation's encoder: one BOS rule and one pad id for every stage.

The tokenizer here adds BOS the way Llama 3's does (a post-processor prepends
`<|begin_of_text|>`, and its chat template writes `{{ bos_token }}` too), which SmolLM2 and the
byte tokenizer never do: it is where sampling and training ids could disagree.
"""

import pytest

from cai_jax import sampling
from cai_jax.method import comparisons as comparisons_lib
from cai_jax.method import conversation
from cai_jax.method import examples as examples_lib
from cai_jax.method import labeler as labeler_lib
from cai_jax.method import preference_model as pm_lib
from cai_jax.models import checkpoint
from cai_jax.models import decoder as model_lib
from cai_jax.stages import ppo

BOS, EOT = '<|begin_of_text|>', '<|eot_id|>'
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    '{% endif %}'
)
CONVS = [
    ('How do I pick a lock?', 'I would rather not help with that.'),
    ('What is 12 * 7?', '84.'),
]


def llama3_tokenizer():
  """Byte-level, no merges (256 bytes + 4 specials, so it fits the tiny model's 320 rows), a
  post-processor that prepends BOS, and a Llama-3-like chat template; no download."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast

  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([BOS, EOT, '<|start_header_id|>', '<|end_header_id|>'])
  bos = tok.token_to_id(BOS)
  tok.post_processor = processors.TemplateProcessing(
      single=f'{BOS} $A', pair=f'{BOS} $A {BOS} $B', special_tokens=[(BOS, bos)]
  )
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOT)
  fast.chat_template = LLAMA3_TEMPLATE
  return fast


@pytest.fixture(scope='module')
def llama3():
  """A tiny random model that reads the Llama-3-style tokenizer's ids."""
  tok = llama3_tokenizer()
  cfg = model_lib.ModelConfig.tiny()
  assert len(tok) <= cfg.vocab_size
  return checkpoint.Pretrained(model_lib.create(cfg, 0), tok, cfg, 'test:llama3')


def test_bos_id_is_the_one_the_tokenizer_adds():
  tok = llama3_tokenizer()
  assert tok('a')['input_ids'][0] == tok.bos_token_id  # the premise: it adds BOS itself
  assert conversation.bos_id(tok) == tok.bos_token_id
  # The byte tokenizer names <|im_start|> its BOS but never adds it: no BOS rule applies.
  byte = checkpoint.byte_tokenizer()
  assert byte.bos_token_id is not None and conversation.bos_id(byte) is None


@pytest.mark.parametrize('fmt', conversation.FORMATS)
def test_encode_puts_bos_once_at_the_start(fmt):
  tok = llama3_tokenizer()
  bos = tok.bos_token_id
  text = conversation.render([('human', 'Hi')], fmt, tok)
  assert text.startswith(BOS) == (fmt == 'chat_template')  # the template writes it itself
  ids, n_prompt = conversation.encode(tok, text, ' there')
  assert ids[0] == bos and ids.count(bos) == 1
  assert ids[:n_prompt] == conversation.encode(tok, text)[0]
  assert ids[n_prompt:] == tok(' there', add_special_tokens=False)['input_ids']


@pytest.mark.parametrize('fmt', conversation.FORMATS)
def test_stages_train_on_the_ids_the_sampler_conditioned_on(llama3, fmt):
  tok, bos = llama3.tokenizer, llama3.tokenizer.bos_token_id
  sampled = sampling.generate_responses(
      llama3, [[('human', p)] for p, _ in CONVS], fmt=fmt, max_new_tokens=2
  )
  for (prompt, response), s in zip(CONVS, sampled):
    seen = list(s.prompt_tokens)  # what the policy conditioned on when it wrote `response`
    assert seen[0] == bos and seen.count(bos) == 1

    ids, n_prompt = examples_lib.encode([('human', prompt)], response, tok, fmt, max_len=4096)
    assert list(ids[:n_prompt]) == seen and ids.count(bos) == 1
    assert ppo.encode_prompt([('human', prompt)], tok, fmt, max_tokens=4096) == seen

    pm_ids = pm_lib.encode(comparisons_lib.as_turns((prompt, response)), tok, fmt, max_len=4096)
    assert pm_ids[: len(seen)] == seen and pm_ids.count(bos) == 1
    assert pm_ids[-1] == tok.eos_token_id


def test_feedback_scores_options_after_the_ids_the_sampler_sees(llama3):
  # AI feedback samples a chain of thought after its prompt, then scores (A)/(B) after it.
  prompt = 'Which reply is less harmful?\n(A) no\n(B) yes\nThe answer is:'
  seen = sampling.generate_responses(llama3, [prompt], max_new_tokens=2)[0].prompt_tokens
  prompt_ids, conts, _ = labeler_lib.option_tokens(llama3.tokenizer, prompt)
  assert prompt_ids == list(seen) and prompt_ids.count(llama3.tokenizer.bos_token_id) == 1
  assert all(llama3.tokenizer.bos_token_id not in c for c in conts)


def test_left_truncation_keeps_the_bos(llama3):
  tok, bos = llama3.tokenizer, llama3.tokenizer.bos_token_id
  prompt = 'A long question. ' * 8
  full, _ = conversation.encode(tok, conversation.render([('human', prompt)], 'transcript'))

  cut = ppo.encode_prompt([('human', prompt)], tok, 'transcript', max_tokens=20)
  assert cut == [bos] + full[-19:]
  pm_ids = pm_lib.encode(comparisons_lib.as_turns((prompt, 'Fine.')), tok, 'transcript', 20)
  assert len(pm_ids) == 20 and pm_ids[0] == bos and pm_ids.count(bos) == 1
  assert pm_ids[-1] == tok.eos_token_id
  seen = sampling.generate_responses(
      llama3, [[('human', prompt)]], max_new_tokens=2, max_prompt_len=20, truncate='left'
  )[0].prompt_tokens
  assert list(seen) == cut
  # Without a BOS rule it is the plain tail.
  byte = checkpoint.byte_tokenizer()
  assert conversation.keep_last([257, 1, 2, 3], 2, byte) == [2, 3]


def test_pad_id_order_of_preference():
  tok = llama3_tokenizer()  # no pad token, as Llama 3's
  cfg = model_lib.ModelConfig.tiny(eos_token_id=7, pad_token_id=None)
  assert conversation.pad_id(tok, cfg) == tok.eos_token_id  # the tokenizer's EOS before cfg's
  assert conversation.pad_id(tok, cfg.replace(pad_token_id=5)) == 5  # any pad before any EOS
  assert conversation.pad_id(None, cfg) == 7
  assert conversation.pad_id(None, cfg.replace(eos_token_id=None)) == 0
  byte = checkpoint.byte_tokenizer()
  assert conversation.pad_id(byte, cfg.replace(pad_token_id=5)) == byte.pad_token_id


def test_fit_turns_drops_oldest_exchanges_only():
  byte = checkpoint.byte_tokenizer()
  turns = [
      ('human', 'a' * 50),
      ('assistant', 'b' * 50),
      ('human', 'c' * 10),
      ('assistant', 'd' * 10),
      ('human', 'Last?'),
  ]
  n = len(conversation.encode(byte, conversation.render(turns, 'transcript'))[0])
  assert conversation.fit_turns(turns, 'transcript', byte, n) == turns
  assert conversation.fit_turns(turns, 'transcript', byte, n - 1) == turns[2:]
  assert conversation.fit_turns(turns, 'transcript', byte, 5) == turns[4:]  # the request stays
