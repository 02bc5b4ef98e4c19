"""Mixed precision and rematerialization, the TPU path, checked on the CPU.

Trained models keep float32 master weights and compute in bf16; frozen ones may be stored in
bf16; remat recomputes each decoder layer in the backward pass and changes no number.
"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cai_jax import bookkeeping, pipeline, validate
from cai_jax.method import ppo_learner
from cai_jax.models import checkpoint
from cai_jax.models import decoder as model_lib
from cai_jax.models.decoder import ScalarHeadModel
from cai_jax.stages import sft
from cai_jax.training import train_lib
from helpers_stages import tiny_main_cmd
from configs import tpu_gemma2_2b_v5e8
from configs.stages import ppo as ppo_stage_config
from configs.stages import sft as sft_stage_config

REPO = Path(__file__).resolve().parents[1]
PAD = 256


def _sft_batch(b=4, t=48, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 256, (b, t)).astype(np.int32)
  loss_mask = np.zeros((b, t), np.int32)
  loss_mask[:, t // 3 :] = 1
  return {'tokens': jnp.asarray(tokens), 'loss_mask': jnp.asarray(loss_mask)}


def _ppo_batch():
  b = ppo_learner.pack_rollout(
      [[10, 11, 12], [20, 21]], [[30, 31, 32, 33], [40]], prompt_len=4, response_len=4, pad_id=PAD
  )
  b = {k: jnp.asarray(v) for k, v in b.items()}
  mask = b['response_mask'].astype(jnp.float32)
  # Rollout log-probs a little below the policy's, so the clipped objective has a gradient.
  return dict(
      b,
      old_logp=jnp.full(mask.shape, -6.0) * mask,
      old_values=jnp.zeros(mask.shape),
      advantages=jnp.array([[1.0, -1.0, 2.0, 0.5], [3.0, 0.0, 0.0, 0.0]]),
      returns=jnp.ones(mask.shape),
  )


def _changed_fraction(before, after) -> float:
  """Share of the entries of the parameter *matrices* that one update changed."""
  changed = total = 0
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
    if a.ndim >= 2:
      changed += int(np.sum(np.asarray(a) != np.asarray(b)))
      total += a.size
  return changed / total


def _one_step(stage: str, param_dtype: str) -> float:
  """One optimizer step of `stage` at the `full` config's first-step learning rate, bf16 compute."""
  tiny = checkpoint.load_pretrained('random:tiny', dtype='bfloat16', param_dtype=param_dtype)
  if stage == 'sft':
    opt_cfg = sft_stage_config.get_config('full').optimizer
    model, loss_fn, batch = tiny.model, sft.make_loss_fn(16), _sft_batch()
  else:
    cfg = ppo_stage_config.get_config('full')
    opt_cfg = cfg.policy_optimizer
    value = ScalarHeadModel(tiny.config, rngs=nnx.Rngs(params=1), trunk=nnx.clone(tiny.model))
    model, loss_fn, batch = (
        ppo_learner.ActorCritic(tiny.model, value),
        ppo_learner.make_loss_fn(cfg),
        _ppo_batch(),
    )
  tx, schedule = train_lib.make_optimizer(opt_cfg, 1000)
  graphdef, state, shardings = train_lib.init_state(model, tx)
  before = jax.device_get(state.params)
  step = train_lib.make_train_step(graphdef, tx, loss_fn, shardings, schedule, donate=False)
  new_state, metrics = step(state, batch)
  assert np.isfinite(float(metrics['loss'])) and float(metrics['grad_norm']) > 0
  after = jax.device_get(new_state.params)
  if stage == 'ppo':  # the policy's matrices; the value net has its own optimizer
    before, after = before['policy'], after['policy']
  return _changed_fraction(before, after)


@pytest.mark.parametrize('stage', ['sft', 'ppo'])
def test_one_step_at_full_learning_rates_changes_the_trained_parameters(stage):
  """The TPU configs' trained dtype moves every weight on the first step (lr 2e-5/51 for SFT,
  1e-6/21 for PPO after warmup's first step); bf16 master weights would drop most updates."""
  master = tpu_gemma2_2b_v5e8.get_config().model.param_dtype
  assert master == 'float32'
  assert _one_step(stage, master) > 0.99
  assert _one_step(stage, 'bfloat16') < 0.2  # the failure the float32 masters fix


def test_frozen_copies_are_cast_once_and_share_nothing_with_the_trained_model():
  tiny = checkpoint.load_pretrained('random:tiny', dtype='bfloat16', param_dtype='float32')
  assert model_lib.with_param_dtype(tiny.model, 'float32') is tiny.model
  frozen = model_lib.with_param_dtype(tiny.model, 'bfloat16')
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(frozen, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(nnx.state(tiny.model, nnx.Param))} == {
      jnp.dtype('float32')
  }
  tokens = jnp.asarray(_sft_batch()['tokens'])
  a, _ = tiny.model(tokens)
  b, _ = frozen(tokens)
  # Same weights to bf16 rounding: the logits agree to the bf16 compute's precision.
  assert float(jnp.max(jnp.abs(a - b))) < 0.05


# ---- rematerialization -----------------------------------------------------------------------


def _loss_and_grads(family: str, remat: str, loss_chunk: int):
  tiny = checkpoint.load_pretrained(f'random:tiny-{family}', model_overrides={'remat': remat})
  graphdef, params = nnx.split(tiny.model, nnx.Param)
  loss_fn = sft.make_loss_fn(loss_chunk)
  batch = _sft_batch(t=40)
  f = jax.jit(jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p), batch)[0]))
  return f(params)


@pytest.mark.parametrize('family', ['llama', 'gemma2'])
@pytest.mark.parametrize('remat', ['full', 'dots'])
def test_remat_gives_the_same_loss_and_gradients(family, remat):
  for loss_chunk in (0, 16):
    loss0, grads0 = _loss_and_grads(family, 'none', loss_chunk)
    loss1, grads1 = _loss_and_grads(family, remat, loss_chunk)
    assert abs(float(loss0) - float(loss1)) <= 1e-6
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1))
    )
    assert diff <= 1e-6, (family, remat, loss_chunk, diff)


_TEMP_BYTES = """
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from cai_jax.models import decoder as model_lib
from cai_jax.stages import sft

device = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu').devices[0]
on_tpu = jax.sharding.SingleDeviceSharding(device)
out = {}
for remat in sys.argv[1:]:
  cfg = model_lib.ModelConfig.tiny(n_layers=4, remat=remat)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: model_lib.Decoder(cfg, rngs=nnx.Rngs(0))))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_tpu), params)
  batch = {k: jax.ShapeDtypeStruct((4, 512), jnp.int32, sharding=on_tpu)
           for k in ('tokens', 'loss_mask')}
  loss_fn = sft.make_loss_fn(0)
  grad = jax.grad(lambda p, b: loss_fn(nnx.merge(graphdef, p), b)[0])
  out[remat] = jax.jit(grad).lower(params, batch).compile().memory_analysis().temp_size_in_bytes
print(json.dumps(out))
"""


@pytest.mark.slow
def test_remat_cuts_the_backward_pass_temporaries_on_tpu():
  """What remat is for, in the TPU compiler's own count of an SFT gradient's temporaries (no TPU
  needed: libtpu compiles for a v5e topology). XLA:CPU's count does not show it: its buffer
  assignment keeps the recomputed activations' space."""
  env = dict(os.environ, ALLOW_MULTIPLE_LIBTPU_LOAD='1', TPU_ACCELERATOR_TYPE='v5litepod-4')
  proc = subprocess.run(
      [sys.executable, '-c', _TEMP_BYTES, 'none', 'full', 'dots'],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  temp = json.loads(proc.stdout.strip().splitlines()[-1])
  assert temp['full'] < 0.2 * temp['none'], temp
  assert temp['full'] < temp['dots'] < temp['none'], temp


# ---- the whole pipeline ------------------------------------------------------------------------


def test_bad_precision_fields_are_one_line_errors_and_bf16_masters_warn(caplog):
  cfg = tpu_gemma2_2b_v5e8.get_config().model
  validate.check_precision(cfg)  # the shipped TPU config passes silently
  for field, value in (('dtype', 'float7'), ('param_dtype', 'int8'), ('remat', 'some')):
    bad = tpu_gemma2_2b_v5e8.get_config().model
    bad[field] = value
    with pytest.raises(bookkeeping.StageError, match=f'model.{field}'):
      validate.check_precision(bad)
  cfg.param_dtype = 'bfloat16'
  with caplog.at_level(logging.WARNING):
    validate.check_precision(cfg)
  assert 'barely moves them' in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize('remat', ['none', 'full'])
def test_tiny_pipeline_runs_in_bf16_with_the_fused_loss(tmp_path, remat):
  """Every stage, bf16 compute, float32 masters, bf16 frozen models, chunked SFT loss.

  Without remat the run stops after PPO: the stages after it train nothing (dpo aside, which
  trains as SFT does) and the remat=full run goes through them in bf16, sampling every stage's
  text through the continuous-batching engine (`sampling.engine`, bf16 pages)."""
  stages = [name for name in pipeline.ORDER if name != 'evaluate_feedback']  # not a default stage
  if remat == 'none':
    stages = stages[: stages.index('ppo') + 1]
  cmd = tiny_main_cmd(
      tmp_path,
      '--config.critique_revision.num_prompts=6',
      '--config.model.dtype=bfloat16',
      '--config.model.frozen_param_dtype=bfloat16',
      '--config.sft.loss_chunk=16',
      f'--config.model.remat={remat}',
      f'--config.stages={",".join(stages)}',
      f'--config.sampling.engine={remat == "full"}',
      # 4 MiB of pages hold 16k of the tiny model's tokens, 16 slots x max_len 512 twice over.
      # (XLA's CPU backend rewrites a bfloat16 scatter as float32 over the whole pool: with the
      # default 1 GiB each decode step would copy it, ~12x this run's sampling time.)
      '--config.sampling.engine_kv_budget_mib=4',
  )
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert f'compute bfloat16, remat {remat}' in proc.stdout
  for name in stages:
    assert (tmp_path / name / 'DONE.json').exists(), name
  losses = [json.loads(line)['loss'] for line in (tmp_path / 'sft' / 'metrics.jsonl').open()]
  assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5])
  ppo_rows = [json.loads(line) for line in (tmp_path / 'ppo' / 'metrics.jsonl').open()]
  assert all(np.isfinite(r['loss']) for r in ppo_rows) and ppo_rows[-1]['kl'] > 0
  if remat == 'full':  # each sampling stage says it sampled through the engine
    for name in ('critique_revision', 'feedback', 'ppo'):
      summary = json.loads((tmp_path / name / 'DONE.json').read_text())['summary']
      assert 0 < summary['engine_utilization'] <= 1, (name, summary)
    assert re.search(
        r'evaluate: ppo: \d+ responses in [\d.]+s, engine_utilization 0\.\d', proc.stdout
    )
