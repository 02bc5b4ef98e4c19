"""LoRA (cai_jax/models/lora.py): adapters that start as the identity, train alone, export to
transformers (merged) and peft (adapters), and give PPO and DPO their reference for free."""

import json
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cai_jax import validate
from cai_jax.method import ppo_learner
from cai_jax.models import checkpoint, lora
from cai_jax.models.decoder import ScalarHeadModel
from cai_jax.stages import sft
from cai_jax.training import train_lib
from configs import tiny as tiny_config
from configs.stages import ppo as ppo_stage_config
from helpers_stages import tiny_main_cmd

REPO = Path(__file__).resolve().parents[1]
ALL = tuple(lora.PROJECTIONS)


def _tokens(vocab, b=2, t=11, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def _base_dir(tmp_path, family='llama'):
  """A random tiny model of `family`, saved as an HF directory (what a stage loads)."""
  base = checkpoint.load_pretrained(f'random:tiny-{family}')
  out = str(tmp_path / f'base-{family}')
  checkpoint.save_pretrained(base, out)
  return out, base


def _adapted(source, targets=ALL, rank=4, seed=0, remat='none', dropout=0.0):
  return checkpoint.load_pretrained(
      source, seed=seed,
      model_overrides=dict(lora_rank=rank, lora_alpha=8.0, lora_targets=tuple(targets), remat=remat,
                           lora_dropout=dropout),
  )  # fmt: skip


def _perturb(model, scale=0.05):
  """Random adapters (a trained one, as far as the forward can tell)."""
  state = nnx.state(model, nnx.LoRAParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(tree, leaves))


@pytest.mark.parametrize('family', ['llama', 'gemma2', 'qwen2'])
def test_fresh_adapters_leave_the_logits_exactly_as_the_base(tmp_path, family):
  source, base = _base_dir(tmp_path, family)
  adapted = _adapted(source)
  tokens = _tokens(base.config.vocab_size)
  want, got = base.model(tokens)[0], adapted.model(tokens)[0]
  assert jnp.array_equal(want, got)
  n_adapters = len(jax.tree.leaves(nnx.state(adapted.model, nnx.LoRAParam)))
  assert n_adapters == 2 * len(ALL) * base.config.n_layers
  _perturb(adapted.model)
  assert float(jnp.max(jnp.abs(adapted.model(tokens)[0] - want))) > 1e-3  # they do act


@pytest.mark.parametrize('remat', ['none', 'full'])  # the TPU configs' layers rematerialize
def test_one_sft_step_changes_only_the_adapters_and_the_optimizer_tracks_only_them(tmp_path, remat):
  source, base = _base_dir(tmp_path)
  model = _adapted(source, targets=('q', 'v', 'down'), remat=remat).model
  tx, schedule = train_lib.make_optimizer(tiny_config.get_config().sft.optimizer, 100)
  graphdef, state, shardings = train_lib.init_state(model, tx)
  before = checkpoint.flat_params(nnx.merge(graphdef, state.params))
  moments = [x.shape for x in jax.tree.leaves(state.opt_state) if getattr(x, 'ndim', 0) >= 2]
  adapter_shapes = [v.shape for k, v in before.items() if lora.is_adapter(k)]
  assert sorted(moments) == sorted(adapter_shapes * 2)  # AdamW's mu and nu, adapters only
  step = train_lib.make_train_step(graphdef, tx, sft.make_loss_fn(0), shardings, schedule)
  tokens = _tokens(base.config.vocab_size, b=4, t=24)
  batch = {'tokens': tokens, 'loss_mask': jnp.ones_like(tokens).at[:, :8].set(0)}
  state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  after = checkpoint.flat_params(nnx.merge(graphdef, state.params))
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and all(lora.is_adapter(k) for k in changed), sorted(changed)
  assert any(str(k[-1]).endswith('_lora_b') for k in changed)  # B leaves zero on step one


@pytest.mark.parametrize('remat', ['none', 'full'])
def test_lora_dropout_acts_in_training_steps_only_and_repeats_for_a_step(tmp_path, remat):
  """PEFT's lora_dropout: a training step's loss sees dropped adapter inputs (drawn from the seed
  and the step, so a rerun of the step is identical and another seed differs); a forward outside
  a step (sampling, scoring, evaluation) is the model without dropout, exactly."""
  source, base = _base_dir(tmp_path)
  tokens = _tokens(base.config.vocab_size, b=4, t=24)
  batch = {'tokens': tokens, 'loss_mask': jnp.ones_like(tokens).at[:, :8].set(0)}
  tx, schedule = train_lib.make_optimizer(tiny_config.get_config().sft.optimizer, 100)
  losses = {}
  for rate in (0.0, 0.5):
    model = _adapted(source, targets=('q', 'v', 'down'), remat=remat, dropout=rate).model
    _perturb(model, 0.2)  # trained adapters: dropping their inputs changes the output
    graphdef, state, shardings = train_lib.init_state(model, tx)
    evaluate = train_lib.make_eval_step(graphdef, sft.make_loss_fn(0))
    losses[rate, 'eval'] = float(evaluate(state.params, batch)[0])
    for seed in (0, 0, 1):
      step = train_lib.make_train_step(
          graphdef, tx, sft.make_loss_fn(0), shardings, schedule, seed=seed, donate=False
      )
      losses[rate, 'step', seed] = losses.get((rate, 'step', seed), []) + [
          float(step(state, batch)[1]['loss'])
      ]
  assert losses[0.0, 'eval'] == losses[0.5, 'eval'] == losses[0.0, 'step', 0][0]
  assert losses[0.0, 'step', 0] == [losses[0.0, 'step', 1][0]] * 2  # nothing random without it
  with_dropout = losses[0.5, 'step', 0]
  assert with_dropout[0] == with_dropout[1]  # same seed and step: same masks
  assert abs(with_dropout[0] - losses[0.5, 'eval']) > 1e-4
  assert abs(losses[0.5, 'step', 1][0] - with_dropout[0]) > 1e-5  # another seed, other masks


def test_lora_dropout_drops_its_share_and_keeps_the_mean():
  """Inverted dropout: `rate` of the adapter's inputs are zero, the rest scaled by 1/(1-rate)."""
  module = nnx.Module()
  module.cfg = type('C', (), {'lora_dropout': 0.25})()
  x = jnp.ones((1, 64, 1024))
  assert lora._dropped(module, 'q', x) is x  # no key: outside a training step
  module.lora_dropout_key = lora.DropoutKey(jax.random.key(3))
  q, v = lora._dropped(module, 'q', x), lora._dropped(module, 'v', x)
  assert abs(float(jnp.mean(q == 0)) - 0.25) < 0.01 and abs(float(jnp.mean(q)) - 1.0) < 0.02
  np.testing.assert_allclose(np.unique(np.asarray(q)), [0.0, 4 / 3], rtol=1e-6)
  assert not jnp.array_equal(q, v)  # each projection draws its own mask


def test_merged_export_loads_in_transformers_and_the_adapters_in_peft(tmp_path):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  source, base = _base_dir(tmp_path)
  adapted = _adapted(source, targets=('q', 'k', 'v', 'o', 'gate', 'up', 'down'))
  _perturb(adapted.model)
  tokens = _tokens(base.config.vocab_size)
  want = np.asarray(adapted.model(tokens)[0])
  export = tmp_path / 'export'
  checkpoint.save_pretrained(adapted, str(export))
  config = json.loads((export / 'config.json').read_text())
  assert not any('lora' in k for k in config)
  adapter = export / lora.ADAPTER_DIR
  assert json.loads((adapter / 'adapter_config.json').read_text())['r'] == 4
  # Merged: our own loader and transformers both read the adapted model.
  ours = checkpoint.load_pretrained(str(export)).model(tokens)[0]
  assert float(np.max(np.abs(np.asarray(ours) - want))) < 1e-5
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32)
  with torch.no_grad():
    merged = hf(torch.tensor(np.asarray(tokens))).logits.numpy()
  assert float(np.max(np.abs(merged - want))) < 1e-4
  # Adapters alone: peft puts them on the base.
  hf_base = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
  with torch.no_grad():
    peft_logits = peft.PeftModel.from_pretrained(hf_base, str(adapter))(
        torch.tensor(np.asarray(tokens))
    ).logits.numpy()
  assert float(np.max(np.abs(peft_logits - want))) < 1e-4


def test_the_ppo_reference_with_lora_is_the_base_model(tmp_path):
  """The rollout's reference log-probs, read from the learner's own state with the adapters
  off, equal the base model's, exactly, while the policy's (trained adapters) differ."""
  source, base = _base_dir(tmp_path)
  policy = _adapted(source).model
  _perturb(policy)
  cfg = ppo_stage_config.get_config('tiny')
  value = ScalarHeadModel(policy.cfg, rngs=nnx.Rngs(params=1), trunk=nnx.clone(policy))
  graphdef, params = nnx.split(ppo_learner.ActorCritic(policy, value), nnx.Param)
  rollout = ppo_learner.pack_rollout(
      [[10, 11, 12], [20, 21]], [[30, 31, 32, 33], [40]], prompt_len=4, response_len=4, pad_id=0
  )
  batch = {k: jnp.asarray(v) for k, v in rollout.items()}
  rewards, coef = jnp.zeros(2), jnp.float32(0.1)
  with_lora = ppo_learner.make_rollout_fn(graphdef, None, cfg)(params, None, batch, rewards, coef)
  ref_graphdef, ref_params = nnx.split(base.model, nnx.Param)
  plain = ppo_learner.make_rollout_fn(graphdef, ref_graphdef, cfg)(
      params, ref_params, batch, rewards, coef
  )
  for key in ('kl', 'kl_per_response', 'advantages'):
    np.testing.assert_array_equal(np.asarray(with_lora[key]), np.asarray(plain[key]), key)
  assert float(with_lora['kl']) > 0  # the policy did move away from its reference


def test_bad_lora_settings_are_one_line_errors_before_the_workdir_is_touched(tmp_path):
  config = tiny_config.get_config()
  config.model.lora.rank = 4
  assert validate.lora_problem(config.model) is None
  config.model.lora.targets = ('q', 'qkv_proj')
  assert validate.lora_problem(config.model) == (
      "model.lora.targets names 'qkv_proj', which the llama architecture has no projection of; "
      'valid: q, k, v, o, gate, up, down'
  )
  config.model.lora.targets = ('q',)
  config.model.lora.rank = -2
  assert validate.lora_problem(config.model) == 'model.lora.rank=-2: 0 (off) or a positive rank'
  config.model.lora.rank, config.model.lora.alpha = 4, 0.0
  assert 'model.lora.alpha=0.0: must be positive' in validate.lora_problem(config.model)
  config.model.lora.alpha, config.model.lora.dropout = 16.0, 1.0
  assert validate.lora_problem(config.model) == (
      'model.lora.dropout=1.0: a probability in [0, 1) (the share of inputs dropped)'
  )
  config.model.lora.dropout = 0.1
  assert validate.lora_problem(config.model) is None
  workdir = tmp_path / 'never'
  cmd = tiny_main_cmd(workdir, '--config.model.lora.rank=4', '--config.model.lora.targets=("w",)')
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and not workdir.exists()
  assert "model.lora.targets names 'w'" in proc.stderr + proc.stdout


def test_the_lora_ppo_toy_config_passes_the_preflight_checks(tmp_path):
  """configs/ppo_toy_lora.py (measured by hand: docs/measurements.md) is a valid LoRA PPO run of
  SmolLM2 alone."""
  from configs import ppo_toy_lora

  config = ppo_toy_lora.get_config()
  assert validate.problems(config, tmp_path / 'w') == []
  assert (config.stages, config.ppo.policy_source, config.model.lora.rank) == (
      'ppo', 'smollm2-135m', 8
  )  # fmt: skip


@pytest.mark.slow
def test_tiny_pipeline_runs_every_stage_with_lora_on_an_int8_base(tmp_path):
  """Every default stage trains adapters only, on a base held in int8 like every frozen model
  (`model.frozen_quantization`), with LoRA dropout in their training steps; each trained model's
  export is merged HF weights plus its PEFT adapter directory, and the startup line says what is
  trained and how the rest is held."""
  cmd = tiny_main_cmd(
      tmp_path, '--config.model.lora.rank=4', '--config.model.lora.targets=("q","v","up","down")',
      '--config.model.frozen_quantization=int8', '--config.model.lora.dropout=0.1',
  )  # fmt: skip
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert 'LoRA rank 4 on q v up down (float32 adapters;' in proc.stdout
  assert 'trained params) / int8 matrices + float32 (frozen)' in proc.stdout
  for name in ('sft', 'preference', 'ppo', 'dpo', 'evaluation_pm'):
    export = tmp_path / name / 'export'
    assert (export / 'model.safetensors').exists(), name
    adapter_config = json.loads((export / lora.ADAPTER_DIR / 'adapter_config.json').read_text())
    assert adapter_config['lora_dropout'] == 0.1, name
  assert (tmp_path / 'evaluate' / 'DONE.json').exists()
  ppo_rows = [json.loads(line) for line in (tmp_path / 'ppo' / 'metrics.jsonl').open()]
  assert all(np.isfinite(r['loss']) for r in ppo_rows) and ppo_rows[-1]['kl'] > 0
