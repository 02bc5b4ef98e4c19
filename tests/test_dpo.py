"""Stage dpo: golden numbers of the soft-label DPO loss, a learnable synthetic preference on the
tiny model, the no-usable-pairs error, and the tiny pipeline through the entry point killed with
SIGKILL during dpo and rerun."""

import json
import math
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers_stages import fake_upstream, sl_cai_records, tiny_main_cmd

from cai_jax import bookkeeping, pipeline
from cai_jax.models import checkpoint
from cai_jax.stages import dpo
from cai_jax.training import metrics as metrics_lib
from cai_jax.utils import sharding
from configs import tiny

REPO = Path(__file__).resolve().parents[1]


# ---- the loss --------------------------------------------------------------------------------


def test_soft_label_one_is_standard_dpo():
  margin = jnp.array([-3.0, -0.4, 0.0, 0.7, 5.0])
  for beta in (0.1, 1.0):
    standard = -jax.nn.log_sigmoid(beta * margin)
    np.testing.assert_allclose(dpo.soft_dpo_loss(margin, 1.0, beta), standard, rtol=1e-6)
  # And p = 0 is standard DPO with the responses swapped.
  np.testing.assert_allclose(
      dpo.soft_dpo_loss(margin, 0.0, 0.5), -jax.nn.log_sigmoid(-0.5 * margin), rtol=1e-6
  )


def test_tie_has_zero_gradient_at_zero_margin_and_soft_labels_pull_toward_their_odds():
  grad = jax.grad(lambda d, p: dpo.soft_dpo_loss(d, p, 0.3))
  assert grad(0.0, 0.5) == 0.0
  assert grad(0.0, 0.8) < 0  # a pair preferred at p = 0.8 pushes its margin up ...
  # ... until sigmoid(beta * D) = p: the minimum sits at D = logit(p) / beta, not at infinity.
  d_star = math.log(0.8 / 0.2) / 0.3
  assert abs(float(grad(d_star, 0.8))) < 1e-6
  # d/dD = beta * (sigmoid(beta D) - p), by hand at D = 1, p = 0.8, beta = 0.3.
  want = 0.3 * (1 / (1 + math.exp(-0.3)) - 0.8)
  assert float(grad(1.0, 0.8)) == pytest.approx(want, rel=1e-6)


def test_hand_computed_value_of_the_batch_loss():
  # Pair 1: D = (-10 - -12) - (-20 - -19) = 3; pair 2: D = (-5 - -5) - (-6 - -4) = 2.
  loss, aux = dpo.dpo_loss(
      jnp.array([-10.0, -5.0]),
      jnp.array([-20.0, -6.0]),
      jnp.array([-12.0, -5.0]),
      jnp.array([-19.0, -4.0]),
      jnp.array([0.9, 0.6]),
      0.5,
      jnp.array([1.0, 3.0]),
  )
  # -(0.9 log s(1.5) + 0.1 log s(-1.5)) = 0.351413; -(0.6 log s(1) + 0.4 log s(-1)) = 0.713262.
  assert float(loss) == pytest.approx((0.3514133 + 3 * 0.7132617) / 4, rel=1e-5)
  assert float(aux['accuracy']) == 1.0
  assert float(aux['margin']) == pytest.approx((0.5 * 3 + 3 * 0.5 * 2) / 4)
  assert float(aux['reward_chosen']) == pytest.approx((0.5 * 2 + 0) / 4)
  assert float(aux['logp_rejected']) == pytest.approx((-20 - 18) / 4)


def test_chunked_log_probs_and_their_gradient_equal_the_whole_logits():
  model = checkpoint.load_pretrained('random:tiny', seed=0).model
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, 200, (4, 21)), jnp.int32)
  mask = jnp.asarray(np.arange(21)[None] >= np.array([[5], [9], [20], [3]]), jnp.int32)
  graphdef, params = nnx.split(model)

  def total(params, chunk):
    logp = dpo.sequence_logprobs(nnx.merge(graphdef, params), tokens, mask, chunk)
    return jnp.sum(logp * jnp.arange(1.0, 5.0)), logp

  grad = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=1)
  (_, whole), g_whole = grad(params, 0)
  (_, chunked), g_chunked = grad(params, 8)  # 20 positions = 8 + 8 + 4
  np.testing.assert_allclose(chunked, whole, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_whole)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_targets_hard_labels_smoothing_and_orientation():
  assert dpo.training_target(0.7, 'soft', 0.0) == pytest.approx(0.7)
  assert dpo.training_target(0.7, 'hard', 0.0) == 1.0
  assert dpo.training_target(0.7, 'hard', 0.1) == pytest.approx(0.9)
  assert dpo.training_target(0.5, 'hard', 0.1) == pytest.approx(0.5)
  c = dpo.Comparison(
      (('human', 'q'), ('assistant', 'x')), (('human', 'q'), ('assistant', 'y')), 0.2
  )
  o = dpo.oriented(c)
  assert (o.a[-1][1], o.b[-1][1], o.p_a) == ('y', 'x', pytest.approx(0.8))


# ---- the stage on the tiny model --------------------------------------------------------------


def _config(**overrides):
  c = tiny.get_config()
  c.stages = 'dpo'
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


def _upstream(config, workdir: Path, records: list[dict]) -> None:
  """A finished sft stage whose export is the tiny random model, and the given feedback records."""
  fake_upstream(config, workdir, 'sft', {})
  model = checkpoint.load_pretrained('random:tiny', seed=config.seed)
  checkpoint.save_pretrained(model, str(workdir / 'sft' / 'export'))
  fake_upstream(config, workdir, 'feedback', {'samples.jsonl': records})


def _run(config, workdir: Path):
  mesh = sharding.make_mesh(config.mesh.shape)
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    return pipeline.run(pipeline.context(config, workdir, mesh))


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
  """Pairs whose preferred response is a repeated pattern and the other random letters; the
  preferred one is response_a or response_b at random, p_a soft (0.7-1 toward it)."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    good = 'ab' * 6
    bad = ''.join(rng.choice(list('cdefghijklmnopqrstuvwxyz'), 12))
    p = float(rng.uniform(0.7, 1.0))
    a_good = bool(rng.integers(2))
    out.append(
        {
            'id': f's{i}',
            'prompt': f'Q{i}?',
            'response_a': good if a_good else bad,
            'response_b': bad if a_good else good,
            'p_a': p if a_good else 1 - p,
        }
    )
  return out


def test_synthetic_preference_is_learned_on_held_out_pairs(tmp_path):
  config = _config(
      **{
          'dpo.num_steps': 30,
          'dpo.batch_size': 8,
          'dpo.eval_fraction': 0.25,
          'dpo.checkpoint_every': 0,
          'dpo.beta': 0.5,
          'dpo.optimizer.learning_rate': 3e-3,
          'dpo.kl_prompts': 2,
          'dpo.kl_max_new_tokens': 4,
      }
  )
  _upstream(config, tmp_path, synthetic_records(48))
  _run(config, tmp_path)
  summary = json.loads((tmp_path / 'dpo' / 'DONE.json').read_text())['summary']
  assert summary['held_out'] >= 8 and summary['train'] + summary['held_out'] == 48
  assert summary['eval_accuracy'] > 0.9, summary
  assert (
      summary['eval_margin'] > 0 and summary['eval_reward_chosen'] > summary['eval_reward_rejected']
  )
  assert summary['eval_kl'] > 0
  rows = metrics_lib.read_metrics(tmp_path / 'dpo' / 'metrics.jsonl')
  assert [r['step'] for r in rows] == list(range(1, 31))
  assert rows[0]['loss'] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at step 1
  assert rows[-1]['loss'] < rows[0]['loss']
  assert (tmp_path / 'dpo' / 'export' / 'config.json').exists()


def test_no_usable_pairs_is_one_line_naming_the_counts(tmp_path):
  records = [
      {'id': f'i{i}', 'prompt': 'Q?', 'response_a': 'same', 'response_b': 'same', 'p_a': 0.5}
      for i in range(7)
  ]
  records += [
      {'id': f'u{i}', 'prompt': 'Q?', 'response_a': 'x', 'response_b': 'y', 'p_a': p}
      for i, p in enumerate([None, float('nan'), None, float('nan'), None])
  ]
  config = _config()
  _upstream(config, tmp_path, records)
  with pytest.raises(
      bookkeeping.StageError,
      match=r'^dpo: no usable pairs among 12 feedback records: 7 identical responses, 5 unlabeled$',
  ):
    _run(config, tmp_path)
  assert not (tmp_path / 'dpo' / 'DONE.json').exists()


def test_revision_pairs_train_without_feedback(tmp_path):
  """dpo.pairs=revisions: critique_revision's final revision chosen over the initial response
  (label 1); prompts without a revision are counted and left out; no feedback stage needed."""
  config = _config(
      **{
          'dpo.pairs': 'revisions',
          'dpo.num_steps': 2,
          'dpo.checkpoint_every': 0,
          'dpo.kl_prompts': 0,
      }
  )
  fake_upstream(config, tmp_path, 'critique_revision', sl_cai_records(n=8, empty=2))
  fake_upstream(config, tmp_path, 'sft', {})
  checkpoint.save_pretrained(
      checkpoint.load_pretrained('random:tiny', seed=0), str(tmp_path / 'sft' / 'export')
  )
  _run(config, tmp_path)
  summary = json.loads((tmp_path / 'dpo' / 'DONE.json').read_text())['summary']
  assert (summary['pairs'], summary['without_a_revision'], summary['pairs_source']) == (
      6,
      2,
      'revisions',
  )
  assert summary['steps'] == 2 and 'eval_kl' not in summary


def test_bad_settings_are_one_line_each():
  config = _config(
      **{'dpo.pairs': 'judge', 'dpo.label_smoothing': 0.5, 'dpo.beta': 0.0, 'dpo.num_steps': 0}
  )
  with pytest.raises(bookkeeping.StageError) as e:
    dpo.check_config(config)
  msg = str(e.value)
  assert msg.startswith('config.dpo: pairs must be one of feedback, revisions')
  for field in ('label_smoothing', 'beta', 'num_steps'):
    assert f'{field} must be' in msg, field


# ---- the pipeline through the entry point, killed during dpo ---------------------------------


pipeline_overrides = [
    '--config.stages=critique_revision,sft,feedback,dpo',
    '--config.critique_revision.num_prompts=4',
    '--config.sft.num_steps=6',
    '--config.dpo.checkpoint_every=1',
]


def _main(workdir: Path) -> subprocess.CompletedProcess:
  proc = subprocess.run(
      tiny_main_cmd(workdir, *pipeline_overrides),
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  return proc


def _final(workdir: Path) -> tuple[dict, list[dict]]:
  summary = json.loads((workdir / 'dpo' / 'DONE.json').read_text())['summary']
  drop = lambda d: {k: v for k, v in d.items() if 'seconds' not in k and k not in ('export', 'steps_run')}  # noqa: E731
  return drop(summary), metrics_lib.read_metrics(workdir / 'dpo' / 'metrics.jsonl')


@pytest.mark.slow
def test_tiny_pipeline_through_dpo_killed_and_rerun_ends_the_same(tmp_path):
  reference, killed = tmp_path / 'reference', tmp_path / 'killed'
  _main(reference)
  # The interrupted run starts from the same upstream stages, with dpo's outputs removed.
  shutil.copytree(reference, killed, symlinks=True)
  shutil.rmtree(killed / 'dpo')
  proc = subprocess.Popen(
      tiny_main_cmd(killed, *pipeline_overrides),
      cwd=REPO,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  metrics, ckpts = killed / 'dpo' / 'metrics.jsonl', killed / 'dpo' / 'checkpoints'
  saved = lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())  # noqa: E731
  while proc.poll() is None and time.time() < deadline:
    if metrics.exists() and metrics.read_text().count('\n') >= 2 and saved():
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, 'dpo finished before it could be killed'
  assert not (killed / 'dpo' / 'DONE.json').exists()
  _main(killed)
  resumed = json.loads((killed / 'dpo' / 'DONE.json').read_text())['summary']
  assert resumed['steps_run'] < resumed['steps']  # the rerun started from a checkpoint
  (want, want_rows), (got, got_rows) = _final(reference), _final(killed)
  assert got == want
  assert [r['step'] for r in got_rows] == list(range(1, want['steps'] + 1))
  assert got_rows[-1] == want_rows[-1]
  assert want['train'] > 0 and 'eval_kl' in want and 'eval_accuracy' in want
