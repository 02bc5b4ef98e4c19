"""What the constitution and prompt tests share: a hand-made constitution whose rendered prompts
they spell out in full, a conversation, a ChatML stand-in tokenizer and the paper's release."""

from pathlib import Path

import pytest

from cai_jax.method import constitution as C

SHARED = Path(__file__).resolve().parents[2] / 'shared'
PAPER_PROMPTS = SHARED / 'data' / 'anthropic_cai' / 'prompts'
needs_paper = pytest.mark.skipif(
    not PAPER_PROMPTS.is_dir(), reason='the paper release (../shared) is not beside the checkout'
)

# A hand-made constitution whose rendered prompts the tests spell out in full.
SMALL = {
    'format': 'cai_jax.constitution/v1',
    'critique_revision': [
        {'name': 'kind', 'critique_request': 'Is it kind?', 'revision_request': 'Make it kind.'},
        {'name': 'true', 'critique_request': 'Is it true?', 'revision_request': 'Make it true.'},
    ],
    'critique_few_shots': [
        {
            'conversation': [['human', 'Q1']],
            'response': 'R1',
            'critique_request': 'CR1',
            'critique': 'C1',
            'revision_request': 'RR1',
            'revision': 'V1',
        },
    ],
    'feedback_principles': ['Which is kinder?', 'Which is truer?'],
    'feedback_few_shots': [
        {'conversation': [['human', 'FQ']], 'response_a': 'FA', 'response_b': 'FB', 'answer': 'B'},
    ],
    'feedback_cot_few_shots': [
        {
            'conversation': [['human', 'GQ']],
            'response_a': 'GA',
            'response_b': 'GB',
            'reasoning': 'GA is nicer.',
            'answer': 'A',
            'principle': 'Which is nicest?',
        },
    ],
}
CONVERSATION = [('human', 'Hi'), ('assistant', 'Hello'), ('human', 'Insult me')]


def small_constitution():
  return C.constitution_from_dict(SMALL, source='small.json')


class ChatMLTokenizer:
  """Stands in for a HF tokenizer: ChatML, like SmolLM2-Instruct's template."""

  chat_template = '{% for m in messages %}<|im_start|>...<|im_end|>{% endfor %}'
  eos_token = '<|im_end|>'

  def apply_chat_template(self, messages, tokenize, add_generation_prompt):
    assert tokenize is False
    text = ''.join(f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n' for m in messages)
    return text + ('<|im_start|>assistant\n' if add_generation_prompt else '')
