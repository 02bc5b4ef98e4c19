"""The preference stage: loss golden numbers, data parsing, scoring, and the stage end to end.

The stage tests run configs/tiny.py on a synthetic feedback upstream in which the response with
the word "banana" is preferred (p = 0.8); the PM must learn it. The model is ModelConfig.tiny()
initialized on the host with numpy and saved as an HF directory: `random:tiny` would build the
same shape, but its jitted threefry init costs ~20 s of XLA compilation on 2 CPU cores per load.
"""

import dataclasses
import gzip
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from cai_jax import bookkeeping, pipeline, validate
from cai_jax.method import comparisons as comparisons_lib
from cai_jax.method import preference_model as pm_lib
from cai_jax.models import checkpoint
from cai_jax.models.decoder import Decoder, ModelConfig
from cai_jax.stages import preference
from cai_jax.training import metrics as metrics_lib
from cai_jax.training import train_lib
from cai_jax.utils import sharding
from helpers_stages import fake_upstream

WORDS = (
    'sun sky red cat dog box cup hat pen map fox owl'.split()
)  # short: conversations fit 64 bytes
N_PAIRS, N_HELPFUL = (
    96,
    24,
)  # synthetic feedback pairs and helpfulness comparisons of the stage tests


# ---- loss golden numbers --------------------------------------------------------------------------

# Pair 1: r_a = 1.0, r_b = -0.5 -> d = 1.5, soft label p = 0.8.
#   softplus(-1.5) = ln(1 + e^-1.5) = 0.2014133, softplus(1.5) = 1.5 + 0.2014133 = 1.7014133
#   soft: 0.8 * 0.2014133 + 0.2 * 1.7014133 = 0.5014133      hard (p -> 1): 0.2014133
# Pair 2: r_a = 0.0, r_b = 2.0 -> d = -2, soft label p = 0.3.
#   softplus(2) = 2.1269280, softplus(-2) = 0.1269280
#   soft: 0.3 * 2.1269280 + 0.7 * 0.1269280 = 0.7269280      hard (p -> 0): 0.1269280
R_A, R_B, P = [1.0, 0.0], [-0.5, 2.0], [0.8, 0.3]


def test_soft_label_loss_golden():
  loss, aux = pm_lib.preference_loss(np.array(R_A), np.array(R_B), np.array(P))
  assert float(loss) == pytest.approx((0.5014133 + 0.7269280) / 2, abs=1e-6)
  assert float(aux['accuracy']) == 1.0  # d > 0 with p > 0.5, d < 0 with p < 0.5


def test_hard_label_loss_golden():
  hard = [comparisons_lib.training_label(p, 'hard') for p in P]
  assert hard == [1.0, 0.0]
  loss, _ = pm_lib.preference_loss(np.array(R_A), np.array(R_B), np.array(hard))
  assert float(loss) == pytest.approx((0.2014133 + 0.1269280) / 2, abs=1e-6)
  assert comparisons_lib.training_label(0.5, 'hard') == 0.5
  with pytest.raises(ValueError, match='label_type'):
    comparisons_lib.training_label(0.7, 'argmax')


def test_loss_weights_accuracy_and_extremes():
  # Weight 0 removes pair 2: the loss is pair 1's alone; a 0.5 label has no argmax.
  loss, aux = pm_lib.preference_loss(
      np.array(R_A), np.array(R_B), np.array([0.8, 0.5]), np.array([1.0, 0.0])
  )
  assert float(loss) == pytest.approx(0.5014133, abs=1e-6)
  assert float(aux['accuracy']) == 1.0
  # Wrong side: d = -1.5 with p = 0.8 is an error; huge |d| stays finite.
  loss, aux = pm_lib.preference_loss(
      np.array([-1.5, 1e4]), np.array([0.0, 0.0]), np.array([0.8, 1.0])
  )
  assert float(aux['accuracy']) == 0.5
  assert math.isfinite(float(loss))
  metrics = pm_lib.pair_metrics(np.array(R_A), np.array(R_B), np.array(P))
  assert metrics['loss'] == pytest.approx((0.5014133 + 0.7269280) / 2, abs=1e-6)
  assert metrics['accuracy'] == 1.0


# ---- data ---------------------------------------------------------------------------------------------


def test_comparisons_from_feedback_and_helpful_files(tmp_path):
  got = comparisons_lib.feedback_comparisons(
      [dict(id='x', prompt='Hi?', response_a='A.', response_b='B.', p_a=0.7)]
  )
  assert got[0].a == (('human', 'Hi?'), ('assistant', 'A.')) and got[0].p_a == 0.7
  with pytest.raises(comparisons_lib.PreferenceDataError, match='lacks p_a'):
    comparisons_lib.feedback_comparisons([dict(prompt='Hi?', response_a='A.', response_b='B.')])
  with pytest.raises(comparisons_lib.PreferenceDataError, match='outside'):
    comparisons_lib.feedback_comparisons(
        [dict(prompt='Hi?', response_a='A.', response_b='B.', p_a=1.5)]
    )

  path = tmp_path / 'helpful.jsonl'
  rows = [
      {'prompt': 'Q1', 'chosen': 'good', 'rejected': 'bad'},
      {'conversation': [{'role': 'user', 'content': 'Q2'}], 'chosen': 'good', 'rejected': 'bad'},
      {'chosen': '\n\nHuman: Q3\n\nAssistant: good', 'rejected': '\n\nHuman: Q3\n\nAssistant: bad'},
  ]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  pairs = comparisons_lib.helpful_comparisons(str(path), weight=0.5)
  for i, c in enumerate(pairs):
    assert c.a == (('human', f'Q{i + 1}'), ('assistant', 'good'))
    assert c.b == (('human', f'Q{i + 1}'), ('assistant', 'bad'))
    assert (c.p_a, c.weight, c.kind, c.label_source) == (1.0, 0.5, 'helpfulness', 'hh_rlhf')
  assert len(comparisons_lib.helpful_comparisons(str(path), max_pairs=2)) == 2
  # HH-RLHF's own gzipped files read the same.
  gz = tmp_path / 'train.jsonl.gz'
  with gzip.open(gz, 'wt') as f:
    f.write(path.read_text())
  assert comparisons_lib.helpful_comparisons(str(gz), weight=0.5) == pairs


def test_malformed_helpful_line_is_a_one_line_error_with_its_number(tmp_path):
  path = tmp_path / 'helpful.jsonl'
  good = json.dumps(
      {
          'chosen': '\n\nHuman: Hi\n\nAssistant: Hello!',
          'rejected': '\n\nHuman: Hi\n\nAssistant: Go away.',
      }
  )
  path.write_text(f'{good}\n{good}\n{{"chosen": "\\n\\nHuman: Hi", "rejected"\n{good}\n')
  with pytest.raises(comparisons_lib.PreferenceDataError, match=r'helpful\.jsonl:3: not JSON'):
    comparisons_lib.helpful_comparisons(str(path))
  path.write_text(f'{good}\n{json.dumps({"chosen": "x"})}\n')
  with pytest.raises(
      comparisons_lib.PreferenceDataError, match=r'helpful\.jsonl:2: needs "chosen"'
  ):
    comparisons_lib.helpful_comparisons(str(path))
  # At config-check time, before the workdir is touched: one line naming file and line.
  path.write_text(f'{good}\n{good}\n{{"chosen": \n')
  from configs import tiny

  config = tiny.get_config()
  config.stages = 'preference'
  config.preference.helpful_mix.path = str(path)
  problems = validate.problems(config, tmp_path / 'work')
  assert len(problems) == 1 and problems[0].startswith(f'{path}:3: not JSON')
  assert '\n' not in problems[0] and not (tmp_path / 'work').exists()


def test_helpfulness_cap_and_per_kind_held_out():
  harmless = comparisons_lib.feedback_comparisons(synthetic_records(40))
  helpful = [
      dataclasses.replace(c, kind='helpfulness', id=f'h{c.id}')
      for c in comparisons_lib.feedback_comparisons(synthetic_records(100, seed=5))
  ]
  mixed = comparisons_lib.cap_helpfulness(harmless + helpful, 0.2, seed=0)
  assert sum(c.kind == 'helpfulness' for c in mixed) == 10  # 10 / (40 + 10) = 0.2
  assert [c for c in mixed if c.kind == 'harmlessness'] == harmless  # never dropped
  assert comparisons_lib.cap_helpfulness(harmless + helpful, 0.2, seed=0) == mixed  # seeded
  assert comparisons_lib.cap_helpfulness(harmless + helpful, 1.0, seed=0) == harmless + helpful
  assert comparisons_lib.cap_helpfulness(harmless + helpful, 0.0, seed=0) == harmless
  assert len(comparisons_lib.cap_helpfulness(harmless + helpful[:5], 0.43, seed=0)) == 45
  # Two helpfulness pairs at eval_fraction 0.01: one is still held out for its own accuracy.
  train, held = comparisons_lib.split_held_out(harmless + helpful[:2], 0.01, seed=0)
  assert [c.kind for c in held] == ['harmlessness', 'helpfulness']
  assert len(train) == 40


def test_fingerprints_follow_the_helpfulness_settings(tmp_path):
  from configs import tiny

  base = tiny.get_config()
  ctx = lambda c: pipeline.context(c, tmp_path)  # noqa: E731
  fp = {s: ctx(base).fingerprint(s) for s in ('feedback', 'preference')}
  for field, value, changed in (
      ('preference.helpfulness_fraction', 0.2, {'preference'}),
      ('preference.helpful_mix.weight', 2.0, {'preference'}),
      ('preference.helpful_mix.path', str(tmp_path / 'h.jsonl'), {'feedback', 'preference'}),
      ('feedback.num_helpful_prompts', 0, {'feedback', 'preference'}),
  ):
    c = base.copy_and_resolve_references()
    section, *keys = field.split('.')
    node = c[section]
    for k in keys[:-1]:
      node = node[k]
    node[keys[-1]] = value
    # preference depends on feedback's fingerprint (upstream) only once feedback ran; compare
    # the stage's own fields for it.
    got = {s for s in fp if ctx(c).fingerprint(s) != fp[s]}
    assert got >= changed and ('feedback' in got) == ('feedback' in changed), field


def test_as_turns_accepts_pairs_and_turns():
  assert comparisons_lib.as_turns(('Hi?', 'Hello.')) == (('human', 'Hi?'), ('assistant', 'Hello.'))
  turns = [('human', 'Hi?'), ('assistant', 'Hello.'), ('human', 'More?'), ('assistant', 'Sure.')]
  assert comparisons_lib.as_turns(turns) == tuple(turns)
  assert comparisons_lib.as_turns([('human', 'Hi?')]) == (('human', 'Hi?'),)


def test_pairs_run_as_one_batch_of_2b_sequences():
  tok = checkpoint.byte_tokenizer()
  comps = comparisons_lib.feedback_comparisons(synthetic_records(3))
  pairs = pm_lib.encode_pairs(comps, tok, 'transcript', 64, 'hard')
  assert all(p.a[-1] == tok.eos_token_id and len(p.a) <= 64 for p in pairs)
  assert [p.target for p in pairs] == [1.0 if c.p_a > 0.5 else 0.0 for c in comps]  # hard labels
  batch = pm_lib.pack_pairs(pairs, [2, 0, -1], 64, pad_id=256)
  assert batch['tokens'].shape == (6, 64)  # rows a_2, a_0, filler, b_2, b_0, filler
  np.testing.assert_array_equal(batch['tokens'][3, : len(pairs[2].b)], pairs[2].b)
  assert batch['read_index'][0] == len(pairs[2].a) - 1 and batch['read_index'][2] == 0
  np.testing.assert_array_equal(batch['weight'], [1.0, 1.0, 0.0])  # the filler pair does not count
  # A too-long conversation keeps its end (the reply and the EOS the reward is read at).
  ids = pm_lib.encode([('human', 'x' * 100), ('assistant', 'the end')], tok, 'transcript', 16)
  assert len(ids) == 16 and tok.decode(ids).endswith('the end<|im_end|>')
  ids = pm_lib.encode([('human', 'Hi'), ('assistant', 'Yo')], tok, 'chat_template', 256)
  assert tok.decode(ids).endswith('<|im_start|>assistant\nYo<|im_end|>\n<|im_end|>')


def test_held_out_split_is_seeded_and_stable():
  comps = comparisons_lib.feedback_comparisons(synthetic_records(200))
  train, held = comparisons_lib.split_held_out(comps, 0.25, seed=0)
  assert len(train) + len(held) == 200 and 30 < len(held) < 70
  train2, held2 = comparisons_lib.split_held_out(comps[:100], 0.25, seed=0)
  assert {c.id for c in held2} == {c.id for c in held if int(c.id[1:]) < 100}


# ---- the stage ----------------------------------------------------------------------------------------


def synthetic_records(n, seed=0):
  """Pairs where the response containing 'banana' is preferred with p = 0.8, else random words."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    prompt = ' '.join(rng.choice(WORDS, 2))
    good = ' '.join(rng.choice(WORDS, 1)) + ' banana ' + ' '.join(rng.choice(WORDS, 1))
    bad = ' '.join(rng.choice(WORDS, 3))
    a_good = rng.random() < 0.5
    out.append(
        dict(
            id=f'p{i}',
            source='synthetic',
            prompt=prompt,
            response_a=good if a_good else bad,
            response_b=bad if a_good else good,
            p_a=0.8 if a_good else 0.2,
            flags=[],
        )
    )
  return out


def numpy_tiny_source(out_dir, seed=0):
  """ModelConfig.tiny() with HF-style init (normal(0.02), norms 1) drawn by numpy, as an HF dir."""
  cfg = ModelConfig.tiny()
  abstract = jax.eval_shape(lambda: nnx.state(Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  leaves = jax.tree_util.tree_flatten_with_path(
      abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]
  rng = np.random.default_rng(seed)
  getters = {}
  for path, var in leaves:
    key = tuple(getattr(k, 'key', getattr(k, 'idx', k)) for k in path)
    shape = var.get_value().shape
    x = np.ones(shape) if key[-1] == 'scale' else rng.normal(0.0, 0.02, shape)
    getters[key] = lambda x=x.astype(np.float32): x
  model = checkpoint.build_from_tensors(cfg, getters, 'numpy tiny')
  checkpoint.save_pretrained(
      checkpoint.Pretrained(model, checkpoint.byte_tokenizer(), cfg), str(out_dir)
  )
  return str(out_dir)


def helpful_records(n, seed=1):
  """Helpfulness comparisons in the {'prompt', 'chosen', 'rejected'} form: the same marker rule."""
  rng = np.random.default_rng(seed)
  return [
      {
          'id': f'h{i}',
          'prompt': ' '.join(rng.choice(WORDS, 2)),
          'chosen': f'{rng.choice(WORDS)} banana',
          'rejected': ' '.join(rng.choice(WORDS, 2)),
      }
      for i in range(n)
  ]


def tiny_config(root):
  from configs import tiny

  c = tiny.get_config()
  c.model.source = numpy_tiny_source(root / 'tiny')
  c.stages = 'preference'
  p = c.preference
  p.eval_fraction = 0.3
  p.checkpoint_every = 4
  p.epochs = 2.0
  (root / 'helpful.jsonl').write_text(
      ''.join(json.dumps(r) + '\n' for r in helpful_records(N_HELPFUL))
  )
  p.helpful_mix.path = str(root / 'helpful.jsonl')
  p.helpful_mix.weight = 0.5
  return c


def run_stage(config, workdir):
  with sharding.use_mesh(sharding.make_mesh(config.mesh.shape), config.logical_axis_rules):
    ctx = pipeline.context(config, workdir)
    rows = pipeline.run(ctx)
  return rows, json.loads((workdir / 'preference' / 'DONE.json').read_text())


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('preference')
  return root, tiny_config(root)


@pytest.fixture(scope='module')
def finished(setup):
  root, config = setup
  workdir = root / 'run'
  fake_upstream(config, workdir, 'feedback', {'samples.jsonl': synthetic_records(N_PAIRS)})
  rows, done = run_stage(config, workdir)
  assert rows[0][:2] == ('preference', 'ran')
  return workdir, done['summary']


def test_stage_learns_synthetic_preference(finished):
  workdir, summary = finished
  assert (summary['pairs_harmlessness'], summary['pairs_helpfulness']) == (N_PAIRS, N_HELPFUL)
  assert summary['helpfulness_source'].startswith('helpfulness: HH-RLHF human comparisons from ')
  assert summary['train'] + summary['held_out'] == N_PAIRS + N_HELPFUL
  assert summary['held_out_helpfulness'] == summary['eval_helpfulness_pairs'] >= 3
  assert summary['eval_harmlessness_pairs'] >= 20
  assert summary['eval_pairs'] == (
      summary['eval_harmlessness_pairs'] + summary['eval_helpfulness_pairs']
  )
  # docs/measurements.md's figure: every held-out pair of both kinds on the preferred side
  # (38 pairs).
  print({k: summary[k] for k in summary if k.startswith('eval_') and 'accuracy' in k})
  assert summary['eval_harmlessness_accuracy'] == 1.0, summary
  assert summary['eval_helpfulness_accuracy'] == 1.0, summary
  assert summary['eval_accuracy'] == 1.0, summary
  assert summary['eval_loss'] < 0.6  # from ln 2 = 0.693 towards the label entropy H(0.8) = 0.500
  assert 0.0 <= summary['eval_ece'] <= 1.0 and 0.0 <= summary['eval_ece_soft'] < 0.2
  rows = metrics_lib.read_metrics(workdir / 'preference' / 'metrics.jsonl')
  assert [r['step'] for r in rows] == list(range(1, summary['steps'] + 1))
  assert {'loss', 'accuracy', 'lr', 'grad_norm'} <= set(rows[0])
  assert rows[-1]['eval_accuracy'] == summary['eval_accuracy']
  assert any((workdir / 'preference' / 'tb').iterdir())
  assert rows[-1]['loss'] < rows[0]['loss']


def test_ai_labeled_helpfulness_pairs_are_the_substitute(setup, tmp_path):
  """No HH-RLHF path: the feedback stage's helpfulness-kind pairs are the helpfulness data."""
  _, config = setup
  config = config.copy_and_resolve_references()
  config.preference.helpful_mix.path = ''
  config.preference.epochs = 1.0
  helpful = [
      dict(r, id=f'h{i}', kind='helpfulness')
      for i, r in enumerate(synthetic_records(N_HELPFUL, seed=3))
  ]
  fake_upstream(
      config, tmp_path, 'feedback', {'samples.jsonl': synthetic_records(N_PAIRS) + helpful}
  )
  _, done = run_stage(config, tmp_path)
  summary = done['summary']
  assert (summary['pairs_harmlessness'], summary['pairs_helpfulness']) == (N_PAIRS, N_HELPFUL)
  assert summary['helpfulness_source'] == 'helpfulness: AI-labeled substitute (no HH-RLHF path)'
  assert summary['train_helpfulness'] + summary['held_out_helpfulness'] == N_HELPFUL
  for kind in ('harmlessness', 'helpfulness'):
    assert summary[f'eval_{kind}_pairs'] == summary[f'held_out_{kind}'] > 0
    # One epoch of the same synthetic preference (1.0 on each kind when measured): learned,
    # and a loss below chance's ln 2.
    assert summary[f'eval_{kind}_accuracy'] > 0.85 and summary[f'eval_{kind}_loss'] < 0.69, summary


def test_export_round_trip_gives_the_same_rewards(finished, setup):
  workdir, summary = finished
  _, config = setup
  ctx = pipeline.context(config, workdir)
  pm = ctx.load(ctx.model_source('preference'), scalar_head=True)
  # The held-out harmlessness pairs again, scored by the exported PM: the stage's metrics of that
  # kind come back.
  comps = comparisons_lib.feedback_comparisons(synthetic_records(N_PAIRS))
  _, held = comparisons_lib.split_held_out(comps, config.preference.eval_fraction, config.seed)
  kw = dict(fmt=config.conversation_format, batch_size=8, max_len=config.preference.max_len)
  r_a = pm_lib.score_conversations(pm, [c.a for c in held], **kw)
  r_b = pm_lib.score_conversations(pm, [(c.b[0][1], c.b[1][1]) for c in held], **kw)
  metrics = pm_lib.pair_metrics(r_a, r_b, [c.p_a for c in held])
  assert metrics['loss'] == pytest.approx(summary['eval_harmlessness_loss'], abs=1e-5)
  assert metrics['accuracy'] == summary['eval_harmlessness_accuracy']
  # Batching and order do not change a reward.
  np.testing.assert_allclose(
      pm_lib.score_conversations(pm, [c.a for c in held[:3]], **kw), r_a[:3], atol=1e-5
  )
  # Conversation scores that favour the marker word.
  good = pm_lib.score_conversations(pm, [('cat sky', 'red banana box')], **kw)
  bad = pm_lib.score_conversations(pm, [('cat sky', 'red owl box')], **kw)
  assert good[0] > bad[0]


def test_resume_after_interrupt_continues_from_checkpoint(finished, setup, monkeypatch):
  _, reference = finished
  root, config = setup
  workdir = root / 'resume'
  fake_upstream(config, workdir, 'feedback', {'samples.jsonl': synthetic_records(N_PAIRS)})
  every = config.preference.checkpoint_every
  calls = []
  real_step, real_write = train_lib.make_train_step, metrics_lib.MetricsWriter.write

  def counting_step(*args, **kw):
    step = real_step(*args, **kw)
    return lambda state, batch: (calls.append(1), step(state, batch))[1]

  def interrupting_write(self, step, metrics):
    real_write(self, step, metrics)
    if step == every + 1:  # one step past the first checkpoint, as a kill would leave it
      raise KeyboardInterrupt

  monkeypatch.setattr(train_lib, 'make_train_step', counting_step)
  monkeypatch.setattr(metrics_lib.MetricsWriter, 'write', interrupting_write)
  with pytest.raises(KeyboardInterrupt):
    run_stage(config, workdir)
  assert not (workdir / 'preference' / 'DONE.json').exists()
  assert len(calls) == every + 1

  monkeypatch.setattr(metrics_lib.MetricsWriter, 'write', real_write)
  calls.clear()
  rows, done = run_stage(config, workdir)
  assert rows[0][:2] == ('preference', 'ran')
  assert len(calls) == reference['steps'] - every  # resumed at the checkpoint, not from step 0
  steps = [r['step'] for r in metrics_lib.read_metrics(workdir / 'preference' / 'metrics.jsonl')]
  assert steps == list(range(1, reference['steps'] + 1))  # the log reads as one run
  # Same data order and optimizer state after the restore: the same PM as the uninterrupted run.
  assert done['summary']['eval_loss'] == pytest.approx(reference['eval_loss'], abs=1e-5)
  # A third run reuses the finished stage.
  rows, _ = run_stage(config, workdir)
  assert rows[0][:2] == ('preference', 'reused')


def test_empty_feedback_is_a_clear_error(setup, tmp_path):
  _, config = setup
  fake_upstream(config, tmp_path, 'feedback', {'samples.jsonl': ''})
  with pytest.raises(comparisons_lib.PreferenceDataError, match='no labelled harmlessness pairs'):
    run_stage(config, tmp_path)
  bad = config.copy_and_resolve_references()
  bad.preference.label_type, bad.preference.eval_fraction = 'argmax', 1.0
  with pytest.raises(
      bookkeeping.StageError, match='label_type must be one of .* eval_fraction must be'
  ):
    preference.check_config(bad)


def test_scoring_checks_the_model(setup):
  root, _ = setup
  pm = checkpoint.load_pretrained(str(root / 'tiny'), scalar_head=True)
  assert pm_lib.score_conversations(pm, [], fmt='transcript').shape == (0,)
  lm = checkpoint.load_pretrained(str(root / 'tiny'))
  with pytest.raises(TypeError, match='scalar_head=True'):
    pm_lib.score_conversations(lm, [('Hi', 'Hello')], fmt='transcript')
  # A tokenizer whose ids run past the model's vocabulary: the byte tokenizer's EOS is 258.
  small = checkpoint.Pretrained(pm.model, pm.tokenizer, pm.config.replace(vocab_size=256), 'small')
  with pytest.raises(checkpoint.CheckpointError, match='outside its vocabulary'):
    pm_lib.score_conversations(small, [('Hi', 'Hello')], fmt='transcript')


def test_a_non_finite_step_stops_training_and_exports_nothing(setup, tmp_path):
  _, config = setup
  bad = config.copy_and_resolve_references()
  bad.preference.optimizer.learning_rate = 1e30  # weights overflow float32 within a step or two
  fake_upstream(bad, tmp_path, 'feedback', {'samples.jsonl': synthetic_records(N_PAIRS)})
  with pytest.raises(train_lib.NonFiniteError, match=r'^preference: non-finite .* at step \d+; '):
    run_stage(bad, tmp_path)
  d = tmp_path / 'preference'
  assert not (d / 'DONE.json').exists() and not (d / 'export').exists()
