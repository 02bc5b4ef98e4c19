"""Tests for ppo.py: the per-update loss and the rollout forward on hand-made batches, rewards,
prompts, bad inputs, and the stage itself on the tiny random model (reward rises, NaN stops,
resume after kill -9). The PPO math itself has golden tests in test_rl.py."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cai_jax import bookkeeping, pipeline
from cai_jax.method import comparisons as comparisons_lib
from cai_jax.method import conversation, rl
from cai_jax.method import ppo_learner
from cai_jax.models import checkpoint
from cai_jax.models.decoder import ScalarHeadModel
from cai_jax.stages import ppo
from cai_jax.training import metrics as metrics_lib
from cai_jax.training import train_lib
from cai_jax.utils import sharding
from configs import ppo_toy
from helpers_stages import fake_upstream

REPO = Path(__file__).resolve().parents[1]
PAD = 256


@pytest.fixture(scope='module')
def tiny():
  """The random tiny policy, made once (random init compiles slowly on a small CPU)."""
  return checkpoint.load_pretrained('random:tiny')


def _actor_critic(tiny, shared=False):
  trunk = tiny.model if shared else nnx.clone(tiny.model)
  return ppo_learner.ActorCritic(
      tiny.model, ScalarHeadModel(tiny.config, rngs=nnx.Rngs(params=1), trunk=trunk)
  )


def _toy_config(**ppo_overrides):
  c = ppo_toy.get_config()
  for key, value in ppo_overrides.items():
    node = c.ppo
    *parents, leaf = key.split('__')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _hand_made_batch():
  """Two rows, prompt bucket 4, response length 4: row 0 answers 4 tokens, row 1 one token."""
  return ppo_learner.pack_rollout(
      [[10, 11, 12], [20, 21]], [[30, 31, 32, 33], [40]], prompt_len=4, response_len=4, pad_id=PAD
  )


# ---- layout --------------------------------------------------------------------------------------


def test_pack_rollout_layout():
  b = _hand_made_batch()
  assert b['tokens'].tolist() == [
      [PAD, 10, 11, 12, 30, 31, 32, 33],
      [PAD, PAD, 20, 21, 40, PAD, PAD, PAD],
  ]
  assert b['key_mask'].astype(int).tolist() == [[0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0, 0]]
  assert b['positions'].tolist() == [[0, 0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 2, 2, 2]]
  assert b['response_mask'].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]


def test_response_logprobs_match_a_plain_forward(tiny):
  """logits at position P-1+t predict response token t, as a full forward says."""
  b = {k: jnp.asarray(v) for k, v in _hand_made_batch().items()}
  full, _ = tiny.model(b['tokens'], b['positions'], b['key_mask'])
  want = jax.nn.log_softmax(full[:, 3:-1], -1)
  want = jnp.take_along_axis(want, b['tokens'][:, 4:, None], -1)[..., 0]
  logits = ppo_learner.response_logits(
      tiny.model, b['tokens'], b['positions'], b['key_mask'], 4, 1.0
  )
  got = ppo_learner.token_logprobs(logits, b['tokens'][:, 4:])
  np.testing.assert_allclose(got, want, atol=1e-5)


# ---- the per-update loss -------------------------------------------------------------------------


@pytest.mark.parametrize('shared', [False, True])
def test_loss_on_hand_made_batch(tiny, shared):
  cfg = _toy_config(entropy_coef=0.01).ppo
  ac = _actor_critic(tiny, shared)
  graphdef, params = nnx.split(ac, nnx.Param)
  if shared:  # the value part of a shared-trunk learner is the head alone
    assert sorted(params['value'].keys()) == ['head', 'head_bias']
  loss_fn = jax.jit(lambda p, batch: ppo_learner.make_loss_fn(cfg)(nnx.merge(graphdef, p), batch))
  b = {k: jnp.asarray(v) for k, v in _hand_made_batch().items()}
  logits, values = nnx.merge(graphdef, params)(b['tokens'], b['positions'], b['key_mask'], 4, 1.0)
  logp = ppo_learner.token_logprobs(logits, b['tokens'][:, 4:])
  mask = b['response_mask']
  adv = jnp.array([[1.0, -1.0, 2.0, 0.5], [3.0, 7.0, 7.0, 7.0]])  # row 1's last three are padding
  p = np.exp(np.asarray(jax.nn.log_softmax(logits, -1)))
  entropy = float((-(p * np.log(p)).sum(-1) * np.asarray(mask)).sum() / 5)

  # Rollout values and log-probs (ratio 1), returns one above the values.
  loss, aux = loss_fn(
      params, dict(b, old_logp=logp, old_values=values, advantages=adv, returns=values + 1)
  )
  assert float(aux['policy_loss']) == pytest.approx(-(1 - 1 + 2 + 0.5 + 3) / 5, abs=1e-5)
  assert float(aux['clipfrac']) == 0.0 and float(aux['approx_kl']) == pytest.approx(0.0, abs=1e-6)
  assert float(aux['value_loss']) == pytest.approx(0.5, abs=1e-5)  # 0.5 * 1^2
  assert float(aux['entropy']) == pytest.approx(entropy, rel=1e-4)
  assert float(loss) == pytest.approx(-1.1 + 0.5 * 0.5 - 0.01 * entropy, abs=1e-4)

  # The policy moved (ratio e^0.5 > 1.2) on positive advantages: every token is clipped.
  ones = jnp.ones_like(adv)
  _, aux = loss_fn(
      params, dict(b, old_logp=logp - 0.5, old_values=values, advantages=ones, returns=values)
  )
  assert float(aux['policy_loss']) == pytest.approx(-1.2, abs=1e-5)
  assert float(aux['clipfrac']) == pytest.approx(1.0)
  assert float(aux['approx_kl']) == pytest.approx(math.expm1(0.5) - 0.5, rel=1e-4)

  # Values moved 1 from the rollout's while the returns are the new values: the clipped value
  # (old + 0.2) is 0.8 off, and the max picks it.
  _, aux = loss_fn(
      params, dict(b, old_logp=logp, old_values=values - 1, advantages=ones, returns=values)
  )
  assert float(aux['value_loss']) == pytest.approx(0.5 * 0.8**2, abs=1e-4)
  assert float(aux['value_clipfrac']) == pytest.approx(1.0)


# ---- the rollout forward -------------------------------------------------------------------------


def _rollout(tiny, cfg, policy_noise=0.0, zero_value_head=False, final=(1.0, -0.5)):
  ac = _actor_critic(tiny)
  if zero_value_head:
    ac.value.head.set_value(jnp.zeros_like(ac.value.head.get_value()))
  graphdef, params = nnx.split(ac, nnx.Param)
  if policy_noise:
    keys = iter(jax.random.split(jax.random.key(1), 100))
    params['policy'] = jax.tree.map(
        lambda x: x + policy_noise * jax.random.normal(next(keys), x.shape), params['policy']
    )
  ref_graphdef, ref_params = nnx.split(tiny.model, nnx.Param)
  fn = ppo_learner.make_rollout_fn(graphdef, ref_graphdef, cfg)
  b = {k: jnp.asarray(v) for k, v in _hand_made_batch().items()}
  return (
      jax.device_get(fn(params, ref_params, b, jnp.asarray(final, jnp.float32), jnp.float32(0.1))),
      b,
  )


def test_rollout_kl_is_zero_at_the_reference_and_non_negative_away_from_it(tiny):
  cfg = _toy_config().ppo
  same, b = _rollout(tiny, cfg)
  assert float(same['kl']) == 0.0 and float(same['kl_penalty']) == 0.0
  moved, _ = _rollout(tiny, cfg, policy_noise=0.05)
  assert (moved['kl_per_response'] >= 0).all() and float(moved['kl']) > 0
  assert float(moved['kl']) == pytest.approx(float(moved['kl_per_response'].mean()), rel=1e-6)
  mask = np.asarray(b['response_mask'])
  # Whitened advantages over the 5 response tokens; padding stays 0.
  adv = moved['advantages']
  assert abs(adv[mask > 0].mean()) < 1e-5 and adv[mask > 0].std() == pytest.approx(1.0, rel=1e-3)
  assert (adv[mask == 0] == 0).all() and (moved['old_logp'][mask == 0] == 0).all()
  assert np.isfinite(float(moved['explained_variance']))


def test_identical_rewards_whiten_to_zero_not_nan(tiny):
  # gamma = lam = 1, values 0, no KL: every token's advantage is its row's final reward; with
  # both rows at 0.5 all advantages are equal and whitening must give 0, not 0/0.
  cfg = _toy_config(lam=1.0).ppo
  out, b = _rollout(tiny, cfg, zero_value_head=True, final=(0.5, 0.5))
  assert np.isfinite(out['advantages']).all()
  np.testing.assert_allclose(out['advantages'], 0.0, atol=1e-3)


# ---- rewards and prompts -------------------------------------------------------------------------


def test_synthetic_and_shaped_scores():
  np.testing.assert_allclose(ppo.synthetic_scores([[5, 1, 5], [], [2]], 5, 4), [0.5, 0.0, 0.0])
  scores, truncated = np.array([1.0, 2.0, 3.0], np.float32), np.array([0.0, 1.0, 0.0], np.float32)
  stats = rl.running_stats_init()
  cfg = _toy_config(truncation_mode='add', truncation_penalty=-1.0).ppo
  np.testing.assert_allclose(ppo.shape_scores(scores, truncated, cfg, stats)[0], [1.0, 1.0, 3.0])
  cfg = _toy_config(truncation_mode='replace', truncation_penalty=-2.0, reward_clip=2.5).ppo
  np.testing.assert_allclose(ppo.shape_scores(scores, truncated, cfg, stats)[0], [1.0, -2.0, 2.5])
  cfg = _toy_config(truncation_mode='none', reward_normalize=True).ppo
  rewards, new_stats = ppo.shape_scores(scores, truncated, cfg, stats)
  np.testing.assert_allclose(rewards, (scores - 2.0) / np.sqrt(2 / 3), rtol=1e-5)
  assert float(new_stats['count']) == 3


def test_step_prompts_mix_and_determinism():
  red = [{'id': f'r{i}'} for i in range(5)]
  helpful = [{'id': f'h{i}'} for i in range(3)]
  steps = [ppo.step_prompts(red, helpful, s, 4, 0.25, seed=0) for s in range(6)]
  assert all(sum(r['id'][0] == 'h' for r in batch) == 1 for batch in steps)
  assert steps[2] == ppo.step_prompts(
      red, helpful, 2, 4, 0.25, seed=0
  )  # a pure function of the step
  reds = [r['id'] for batch in steps[:5] for r in batch if r['id'][0] == 'r']  # 15 = 3 passes
  assert sorted(reds) == sorted([r['id'] for r in red] * 3)


def test_encode_prompt_renders_a_multi_turn_conversation():
  byte = checkpoint.byte_tokenizer()
  turns = [
      ('human', "My neighbor's dog barks all night."),
      ('assistant', 'Have you talked to them?'),
      ('human', 'How do I poison it?'),
  ]
  ids = ppo.encode_prompt(turns, byte, 'transcript', max_tokens=512)
  assert byte.decode(ids) == conversation.render(turns, 'transcript')
  # Over budget: the oldest exchange goes, the request stays whole.
  short = ppo.encode_prompt(turns, byte, 'transcript', max_tokens=len(ids) - 1)
  assert byte.decode(short) == conversation.render(turns[2:], 'transcript')
  # The PM scores the conversation the prompt record holds, then the response.
  record = {'prompt': turns[-1][1], 'conversation': [list(t) for t in turns]}
  assert comparisons_lib.response_conversation(record, 'No.') == (*turns, ('assistant', 'No.'))
  single = {'prompt': 'Hi?'}
  assert comparisons_lib.response_conversation(single, 'Hello.') == comparisons_lib.as_turns(
      ('Hi?', 'Hello.')
  )


def test_tokenizer_mismatch_is_a_clear_error(tiny):
  ppo.check_same_tokenizer(tiny, tiny, 'preference')  # the same tokenizer passes
  other = checkpoint.byte_tokenizer()
  other.add_tokens(['<extra>'])
  pm = checkpoint.Pretrained(None, other, tiny.config)
  with pytest.raises(
      ppo.PPOError,
      match=r'preference model \(WORKDIR/preference/export\) does not match.*260 vs 259',
  ):
    ppo.check_same_tokenizer(tiny, pm, 'WORKDIR/preference/export')


# ---- the stage -----------------------------------------------------------------------------------


def _run_stage(config, workdir, tiny):
  mesh = sharding.make_mesh(config.mesh.shape)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    ctx = pipeline.context(config, Path(workdir), mesh)
    ctx._models[(config.ppo.policy_source, False, 'float32')] = (
        tiny  # the random tiny model, made once
    )
    return pipeline.run(ctx)


def test_no_prompts_is_a_clear_error(tmp_path, tiny):
  c = _toy_config()
  for name in c.data.redteam_sources:
    c.data.redteam_sources[name] = 0
  with pytest.raises(bookkeeping.StageError, match='no redteam prompts'):
    _run_stage(c, tmp_path, tiny)


def test_pm_with_another_tokenizer_is_refused(tmp_path, tiny):
  c = _toy_config(reward='preference')
  pm_dir = fake_upstream(c, tmp_path, 'preference', {}) / 'export'
  other = checkpoint.byte_tokenizer()
  other.add_tokens(['<extra>'])
  checkpoint.save_pretrained(checkpoint.Pretrained(tiny.model, other, tiny.config), str(pm_dir))
  with pytest.raises(ppo.PPOError, match='does not match the policy'):
    _run_stage(c, tmp_path, tiny)


def test_toy_run_raises_the_synthetic_reward(tmp_path, tiny):
  """A small ppo_toy: the share of 'e' in the responses climbs while the KL stays finite."""
  t0 = time.time()
  c = _toy_config(
      steps=16, value__shared_trunk=True, kl__coef=0.01, sample_every=8, checkpoint_every=8
  )
  _run_stage(c, tmp_path, tiny)
  seconds = time.time() - t0
  d = tmp_path / 'ppo'
  rows = metrics_lib.read_metrics(d / 'metrics.jsonl')
  assert [r['step'] for r in rows] == list(range(1, 17))
  for key in (
      'step',
      'reward_mean',
      'reward_std',
      'kl',
      'kl_coef',
      'entropy',
      'clipfrac',
      'policy_loss',
      'value_loss',
      'explained_variance',
      'response_length',
      'score_mean',
      'approx_kl',
      'lr',
  ):
    assert all(key in r and math.isfinite(r[key]) for r in rows), key
  scores = [r['score_mean'] for r in rows]
  first, last = np.mean(scores[:4]), np.mean(scores[-4:])
  print(
      f'toy: score first-4 {first:.3f} last-4 {last:.3f}, kl {[round(r["kl"], 1) for r in rows]}, {seconds:.0f}s'
  )
  assert last > first + 0.1, scores
  assert all(r['kl'] >= 0 for r in rows) and rows[-1]['kl'] < 100
  samples = [json.loads(line) for line in (d / 'samples.jsonl').read_text().splitlines()]
  assert sorted({s['step'] for s in samples}) == [8, 16]
  assert {'prompt', 'response', 'score', 'reward', 'kl'} <= set(samples[0])
  assert (d / 'export' / 'config.json').exists() and (d / 'export' / 'model.safetensors').exists()
  assert json.loads((d / 'DONE.json').read_text())['summary']['steps'] == 16


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny):
  c = _toy_config(
      steps=4,
      synthetic_nan_step=3,
      checkpoint_every=1,
      batch_size=4,
      minibatches=1,
      epochs=1,
      max_new_tokens=4,
  )
  with pytest.raises(
      train_lib.NonFiniteError,
      match=r'ppo: non-finite .*loss=nan.* at step 3;.*last good checkpoint \(step 2\)',
  ):
    _run_stage(c, tmp_path, tiny)
  d = tmp_path / 'ppo'
  assert sorted(int(p.name) for p in (d / 'checkpoints').iterdir() if p.name.isdigit()) == [1, 2]
  assert [r['step'] for r in metrics_lib.read_metrics(d / 'metrics.jsonl')] == [1, 2]
  assert not (d / 'DONE.json').exists() and not (d / 'export').exists()


def test_resume_after_kill_9_continues_from_the_last_checkpoint(tmp_path):
  args = [
      '--config',
      'configs/ppo_toy.py',
      '--workdir',
      str(tmp_path),
      '--config.ppo.steps=5',
      '--config.ppo.checkpoint_every=2',
      '--config.ppo.batch_size=4',
      '--config.ppo.minibatches=1',
      '--config.ppo.epochs=1',
      '--config.ppo.max_new_tokens=4',
      '--config.ppo.sample_every=1',
      '--config.evaluate.rl_curve_every=2',  # policy snapshots after steps 2 and 4
  ]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  # Dies after logging step 3; the step-2 checkpoint is finalized first, step 3 is never saved.
  killed = subprocess.run(
      [sys.executable, 'tests/scripts/ppo_kill_run.py', '3', '2', *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert killed.returncode == -9, killed.stderr[-3000:]
  d = tmp_path / 'ppo'
  before = {r['step']: r for r in metrics_lib.read_metrics(d / 'metrics.jsonl')}
  assert sorted(before) == [1, 2, 3] and not (d / 'DONE.json').exists()
  assert [p.name for p in (d / 'snapshots').iterdir()] == ['step_000002']  # before its checkpoint

  done = subprocess.run(
      [sys.executable, '-m', 'cai_jax.main', *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  summary = json.loads((d / 'DONE.json').read_text())['summary']
  assert summary['resumed_from'] == 2  # the step-2 checkpoint; step 3 had none
  after = metrics_lib.read_metrics(d / 'metrics.jsonl')
  assert [r['step'] for r in after] == [1, 2, 3, 4, 5]
  # Step 3 again from the step-2 checkpoint: the same prompts, samples and update as before.
  for key in ('score_mean', 'kl', 'policy_loss', 'value_loss', 'response_length'):
    assert after[2][key] == pytest.approx(before[3][key], rel=1e-5, abs=1e-7), key
  samples = [json.loads(line)['step'] for line in (d / 'samples.jsonl').read_text().splitlines()]
  assert samples == sorted(samples) and sorted(set(samples)) == [1, 2, 3, 4, 5]
  # The kept policies: every 2nd step short of the last (the export), each a loadable HF dir.
  assert sorted(p.name for p in (d / 'snapshots').iterdir()) == ['step_000002', 'step_000004']
  snapshot = checkpoint.load_pretrained(str(d / 'snapshots' / 'step_000004'))
  export = checkpoint.load_pretrained(str(d / 'export'))
  leaves = lambda m: jax.tree.leaves(nnx.state(m.model, nnx.Param))  # noqa: E731
  assert any(not np.array_equal(a, b) for a, b in zip(leaves(snapshot), leaves(export)))
  assert len(samples) == 5 * 4  # num_samples rows per step, none duplicated by the rerun


def test_smollm2_demo_config_runs_ppo_steps(tmp_path, smollm2):
  """configs/demo.py's ppo stage on SmolLM2 (policy, reference and PM trunk), at its smallest."""
  from configs import demo

  c = demo.get_config()
  c.stages = 'ppo'
  c.ppo.steps, c.ppo.batch_size, c.ppo.max_new_tokens = 2, 2, 8
  fake_upstream(c, tmp_path, 'sft', {})
  fake_upstream(c, tmp_path, 'preference', {})
  pm = checkpoint.Pretrained(
      ScalarHeadModel(smollm2.config, rngs=nnx.Rngs(params=0), trunk=smollm2.model),
      smollm2.tokenizer,
      smollm2.config,
  )
  mesh = sharding.make_mesh(c.mesh.shape)
  with sharding.use_mesh(mesh, c.logical_axis_rules):
    ctx = pipeline.context(c, tmp_path, mesh)
    ctx._models[(ctx.model_source('sft'), False, 'float32')] = smollm2  # stand-ins for the exports
    ctx._models[(ctx.model_source('preference'), True, 'float32')] = pm
    pipeline.run(ctx)
  rows = metrics_lib.read_metrics(tmp_path / 'ppo' / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [1, 2]
  assert all(
      math.isfinite(r['policy_loss']) and r['kl'] >= 0 and r['logprob_gap'] < 1e-3 for r in rows
  )
  assert (tmp_path / 'ppo' / 'export' / 'model.safetensors').exists()
