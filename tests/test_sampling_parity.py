"""Real-model parity of cai_jax.sampling with transformers on the embedded SmolLM2-135M."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cai_jax import sampling
from cai_jax.method import conversation
from cai_jax.models import checkpoint

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

NEW_TOKENS = 48
TIE = 1e-4  # a divergence at a top-2 logit gap above this is a bug, not summation order

QUESTIONS = [
    'What is the capital of France?',
    'Write a haiku about the sea.',
    'How do I make a cup of tea? Explain step by step, briefly.',
    'Hi!',
    'Can you help me understand why the sky is blue? I have always wondered about it and my '
    'teacher never explained it properly.',
    'List three prime numbers.',
]


@pytest.fixture(scope='module')
def smol():
  return checkpoint.load_pretrained('smollm2-135m')


@pytest.fixture(scope='module')
def hf_model():
  path = checkpoint.smollm2_path()
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
  )
  return model.eval()


@pytest.fixture(scope='module')
def prompts(smol):
  tok = smol.tokenizer
  chat = [
      tok.encode(
          conversation.render([('human', q)], 'chat_template', tok), add_special_tokens=False
      )
      for q in QUESTIONS
  ]
  transcript = [
      tok.encode(conversation.render([('human', q)], 'transcript')) for q in QUESTIONS[:2]
  ]
  return chat + transcript  # 8 prompts of 8 to 60 tokens


@functools.cache
def _forward(graphdef):
  return jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens)[0][0])


def our_logits(model, seq, length=128):
  tokens = np.zeros((1, length), np.int32)
  tokens[0, : len(seq)] = seq
  graphdef, params = nnx.split(model)
  return np.asarray(_forward(graphdef)(params, jnp.asarray(tokens)))[: len(seq)]


def top2_gap(logits):
  a, b = np.sort(logits)[-2:]
  return float(b - a)


def hf_greedy(hf_model, prompt):
  out = hf_model.generate(
      torch.tensor([prompt]),
      max_new_tokens=NEW_TOKENS,
      min_new_tokens=0,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
      return_dict_in_generate=True,
      output_logits=True,
  )
  new = out.sequences[0, len(prompt) :].tolist()
  return new, [l[0].float().numpy() for l in out.logits]


def test_greedy_matches_transformers(smol, hf_model, prompts):
  ours = sampling.generate(smol.model, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[])
  assert len(set(map(len, prompts))) > 4  # really different lengths, one batched call
  exact, ties = 0, []
  for i, prompt in enumerate(prompts):
    theirs, hf_logits = hf_greedy(hf_model, prompt)
    assert len(theirs) == NEW_TOKENS and len(ours.tokens[i]) == NEW_TOKENS
    if ours.tokens[i] == theirs:
      exact += 1
      continue
    j = next(j for j, (a, b) in enumerate(zip(ours.tokens[i], theirs)) if a != b)
    ours_gap = top2_gap(our_logits(smol.model, prompt + ours.tokens[i][:j])[-1])
    hf_gap = top2_gap(hf_logits[j])
    ties.append((i, j, ours_gap, hf_gap))
    print(
        f'prompt {i}: first divergence at new token {j}: ours {ours.tokens[i][j]} vs '
        f'transformers {theirs[j]}; top-2 logit gap ours {ours_gap:.2e}, transformers {hf_gap:.2e}'
    )
    assert min(ours_gap, hf_gap) <= TIE, f'prompt {i} diverges at {j} without a near-tie'
  print(f'greedy parity: {exact}/{len(prompts)} rows identical, {len(ties)} near-tie divergences')
  # docs/measurements.md's figure: every row identical. A divergence at a near-tie (printed above,
  # with the gaps) is float32 summation order, not a bug, but it still fails the claim.
  assert exact == len(prompts), ties


def test_score_matches_transformers(smol, hf_model, prompts):
  tok = smol.tokenizer
  conts = [
      tok.encode(t, add_special_tokens=False)
      for t in [
          ' Paris is the capital.',
          ' Waves',
          ' Boil water first, then steep the tea.',
          ' Hello',
          ' Because of Rayleigh scattering.',
          ' 2, 3, 5',
          ' The capital of France is Paris.',
          ' Blue waves roll in',
      ]
  ]
  ours = sampling.score(smol.model, prompts, conts)
  for i, (p, c) in enumerate(zip(prompts, conts)):
    with torch.no_grad():
      logits = hf_model(torch.tensor([p + c])).logits[0].float()
    lp = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) + len(c) - 1]
    expected = lp[torch.arange(len(c)), torch.tensor(c)].numpy()
    np.testing.assert_allclose(ours.per_token[i], expected, atol=1e-4, err_msg=f'row {i}')
    np.testing.assert_allclose(ours.total[i], expected.sum(), atol=1e-3)
