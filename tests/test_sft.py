"""Tests for sft.py (loss, data, stage loop with resume) and train_lib.py, on the tiny random model."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cai_jax import pipeline
from cai_jax.method import conversation
from cai_jax.method import examples as examples_lib
from cai_jax.models import checkpoint
from cai_jax.stages import sft
from cai_jax.training import loop
from cai_jax.training import metrics as metrics_lib
from cai_jax.training import train_lib
from cai_jax.utils import sharding
from configs import tiny
from configs.stages import sft as configs_sft
from helpers_stages import fake_upstream, sl_cai_records


@pytest.fixture(scope='module')
def tok():
  return checkpoint.byte_tokenizer()


# ---- loss ----------------------------------------------------------------------------------------


def test_sft_loss_matches_hand_computed_value():
  logits = np.array(
      [
          [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0], [9.0, 9.0, 9.0]],
          [[0.3, 0.1, -0.2], [1.5, 0.0, 0.0], [5.0, 5.0, 5.0], [7.0, 1.0, 1.0]],
      ],
      np.float32,
  )
  tokens = np.array([[0, 1, 2, 0], [2, 0, 1, 1]], np.int32)
  mask = np.array(
      [
          [0, 1, 1, 0],  # row 0: targets tokens[0, 1] and tokens[0, 2]; the last is padding
          [0, 0, 1, 0],
      ]
  )  # row 1: one target, tokens[1, 2]

  def nll(row, t, target):  # -log softmax(logits[row, t])[target], by hand
    z = [math.exp(v) for v in logits[row, t]]
    return -math.log(z[target] / sum(z))

  want = (nll(0, 0, 1) + nll(0, 1, 2) + nll(1, 1, 1)) / 3
  loss, aux = sft.sft_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(mask))
  assert float(loss) == pytest.approx(want, rel=1e-6)
  assert int(aux['tokens']) == 3
  # The first position is never a target (nothing predicts it) and an all-masked batch is 0, not NaN.
  loss0, _ = sft.sft_loss(
      jnp.asarray(logits), jnp.asarray(tokens), jnp.zeros_like(jnp.asarray(mask))
  )
  assert float(loss0) == 0.0


def test_fused_chunked_loss_and_grads_match_one_shot():
  pretrained = checkpoint.load_pretrained(
      'random:tiny-gemma2'
  )  # tied embeddings, soft-capped logits
  rng = np.random.RandomState(0)
  tokens = jnp.asarray(rng.randint(0, 256, (2, 21)), jnp.int32)  # 20 predictions: 3 chunks of 8
  mask = jnp.asarray(rng.randint(0, 2, (2, 21)), jnp.int32)
  batch = {'tokens': tokens, 'loss_mask': mask}
  graphdef, params = nnx.split(pretrained.model, nnx.Param)

  def value_and_grad(chunk):
    fn = lambda p: sft.make_loss_fn(chunk)(nnx.merge(graphdef, p), batch)[0]
    return jax.jit(jax.value_and_grad(fn))(params)

  (a, ga), (b, gb) = value_and_grad(0), value_and_grad(8)
  assert float(a) == pytest.approx(float(b), rel=1e-5)
  assert (
      max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)))
      < 1e-5
  )
  eval_loss = jax.jit(lambda p: sft.make_loss_fn(8)(nnx.merge(graphdef, p), batch)[0])(params)
  assert float(eval_loss) == pytest.approx(float(a), rel=1e-5)


# ---- data ----------------------------------------------------------------------------------------


def test_encode_transcript_targets_response_and_eos(tok):
  ids, n_prompt = examples_lib.encode(
      [('human', 'How do I pick a lock?')], '  I cannot help with that. ', tok, 'transcript', 512
  )
  prompt, target = tok.decode(ids[:n_prompt]), tok.decode(ids[n_prompt:])
  assert prompt == '\n\nHuman: How do I pick a lock?\n\nAssistant:'
  assert target == ' I cannot help with that.' + tok.eos_token
  assert ids[-1] == tok.eos_token_id

  ids, n_prompt = examples_lib.encode([('human', 'Hi')], 'Hello there.', tok, 'chat_template', 512)
  prompt = tok.decode(ids[:n_prompt])
  assert prompt == conversation.render([('human', 'Hi')], 'chat_template', tok)
  assert tok.decode(ids[n_prompt:]) == 'Hello there.<|im_end|>'


def test_encode_truncates_to_max_len(tok):
  ids, n_prompt = examples_lib.encode([('human', 'Hi')], 'x' * 100, tok, 'transcript', 40)
  assert len(ids) == 40 and n_prompt < 40
  long_prompt = [('human', 'a long prompt ' * 10)]
  assert examples_lib.encode(long_prompt, 'ok', tok, 'transcript', 40) is None  # no target left


# A red-team prompt that continues a conversation (HH-RLHF, paper section 3.1).
MULTI_TURN = [
    ('human', "My neighbor's dog barks all night."),
    ('assistant', 'That sounds tiring. Have you talked to them?'),
    ('human', 'How do I poison it?'),
]


@pytest.mark.parametrize('fmt', conversation.FORMATS)
def test_encode_multi_turn_prompt_trains_with_its_context(tok, fmt):
  ids, n_prompt = examples_lib.encode(MULTI_TURN, 'I will not help with that.', tok, fmt, 512)
  prompt = tok.decode(ids[:n_prompt])
  assert prompt == conversation.render(MULTI_TURN, fmt, tok)
  assert "neighbor's dog" in prompt and 'Have you talked to them?' in prompt
  assert tok.decode(ids[n_prompt:]).startswith(('I will not help', ' I will not help'))


def test_encode_multi_turn_over_budget_sheds_the_oldest_exchange_not_the_target(tok):
  full, n_full = examples_lib.encode(MULTI_TURN, 'I will not help.', tok, 'transcript', 512)
  ids, n_prompt = examples_lib.encode(
      MULTI_TURN, 'I will not help.', tok, 'transcript', len(full) - 1
  )
  assert tok.decode(ids[:n_prompt]) == conversation.render(MULTI_TURN[2:], 'transcript')
  assert ids[n_prompt:] == full[n_full:] and ids[-1] == tok.eos_token_id  # the whole target
  # A single request keeps the old rule: the end of the target is cut.
  one = MULTI_TURN[2:]
  whole, n_one = examples_lib.encode(one, 'I will not help.', tok, 'transcript', 512)
  assert examples_lib.encode(one, 'I will not help.', tok, 'transcript', len(whole) - 1) == (
      whole[:-1],
      n_one,
  )


def test_truncated_target_is_encoded_without_eos(tok):
  ids, n_prompt = examples_lib.encode(
      [('human', 'Hi')], 'A reply cut at the token lim', tok, 'transcript', 512, end=False
  )
  assert tok.decode(ids[n_prompt:]) == ' A reply cut at the token lim'
  assert ids[-1] != tok.eos_token_id and tok.eos_token_id not in ids[n_prompt:]
  b = examples_lib.pack([examples_lib.Example('a', 'revision', ids, n_prompt)], [0], 64, pad_id=0)
  mask = b['loss_mask'][0]
  assert (
      mask[n_prompt : len(ids)].all() and not mask[:n_prompt].any() and not mask[len(ids) :].any()
  )
  ids, n_prompt = examples_lib.encode(
      [('human', 'Hi')], 'Cut short', tok, 'chat_template', 512, end=False
  )
  assert tok.decode(ids[n_prompt:]) == 'Cut short'


def _records(rounds=3):
  """Two prompts of `rounds` rounds (prompt 'b''s second revision empty, its last cut at the token
  limit) and two helpful prompts of 2 samples (one cut)."""
  samples = []
  for p in 'ab':
    texts = [f'{p} revision {k}.' for k in range(rounds)]
    reasons = ['stop'] * rounds
    if p == 'b':
      texts[1], reasons[-1] = '', 'length'
    samples.append(
        {
            'id': p,
            'prompt': f'Bad {p}?',
            'initial_response': 'Sure.',
            'rounds': [{'revision': t} for t in texts],
            'revision': texts[-1],
            'finish_reasons': {
                'initial_response': 'stop',
                'critique': reasons,
                'revision': reasons,
            },
        }
    )
  helpful = [
      {
          'id': h,
          'prompt': f'Good {h}?',
          'responses': [f'{h} one.', f'{h} two'],
          'finish_reasons': ['stop', 'length' if h == 'x' else 'stop'],
      }
      for h in 'xy'
  ]
  return samples, helpful


@pytest.mark.parametrize(
    'revisions, kinds, empty, truncated',
    [
        ('all', {'revision_round_1': 2, 'revision_round_2': 1, 'revision_round_3': 2}, 1, 1),
        ('final', {'revision_final': 2}, 0, 1),
    ],
)
def test_revision_targets_every_round_or_final(revisions, kinds, empty, truncated):
  samples, helpful = _records()
  targets, n_empty = sft.revision_targets(samples, revisions)
  counts = {}
  for t in targets:
    counts[t.kind] = counts.get(t.kind, 0) + 1
  assert counts == kinds and n_empty == empty
  assert sum(t.truncated for t in targets) == truncated  # b's last round hit the token limit
  assert {t.source for t in targets} == {'revision'}
  targets, n_empty = sft.helpful_targets(helpful)
  assert [t.response for t in targets] == ['x one.', 'x two', 'y one.', 'y two'] and not n_empty
  assert [t.truncated for t in targets] == [False, True, False, False]


@pytest.mark.parametrize(
    'mode, dropped, no_eos, eos', [('no_eos', 0, 2, 0), ('drop', 2, 0, 0), ('eos', 0, 0, 2)]
)
def test_build_examples_counts_kinds_and_truncated_targets(
    tmp_path, tok, mode, dropped, no_eos, eos
):
  config = _config(truncated=mode, eval_fraction=0.0)
  samples, helpful = _records()
  fake_upstream(
      config, tmp_path, 'critique_revision', {'samples.jsonl': samples, 'helpful.jsonl': helpful}
  )
  train, held_out, counts = sft.build_examples(pipeline.context(config, tmp_path), tok)
  assert counts['truncated'] == {
      'targets': 2,
      'dropped': dropped,
      'trained_without_eos': no_eos,
      'trained_with_eos': eos,
  }
  assert counts['examples'] == {
      'helpful': 4 - dropped // 2,
      'revision_round_1': 2,
      'revision_round_2': 1,
      'revision_round_3': 2 - dropped // 2,
  }
  assert len(train) == sum(counts['examples'].values()) == 9 - dropped and not held_out
  ends = {(e.id, e.kind, e.tokens[-1] == tok.eos_token_id) for e in train}
  cut_ends = {end for i, kind, end in ends if (i, kind) in {('b', 'revision_round_3')}}
  if mode != 'drop':
    assert cut_ends == {mode == 'eos'}
  assert sum(e.tokens[-1] == tok.eos_token_id for e in train) == len(train) - no_eos


def test_held_out_split_keeps_every_round_and_sample_of_a_prompt_together(tmp_path, tok):
  config = _config(eval_fraction=0.5)
  samples, helpful = _records()
  fake_upstream(
      config, tmp_path, 'critique_revision', {'samples.jsonl': samples, 'helpful.jsonl': helpful}
  )
  train, held_out, _ = sft.build_examples(pipeline.context(config, tmp_path), tok)
  assert not {(e.source, e.id) for e in train} & {(e.source, e.id) for e in held_out}


def test_revision_round_takes_rounds_up_to_n_or_round_n_alone_or_the_initial_responses():
  """SL-CAI-n as the paper: the revisions "up to and including the n-th" (an empty one is
  skipped); `round_only`: round n's alone; 0 = the initial responses."""
  samples, _ = _records()
  revised = lambda s, k: s['rounds'][k - 1]['revision']  # noqa: E731
  for round_only in (False, True):
    rounds = [
        [t.response for t in sft.revision_targets(samples, 'all', n, round_only)[0]]
        for n in (0, 1, 2, 3)
    ]
    assert rounds[0] == [s['initial_response'] for s in samples]
    for n in (1, 2, 3):
      ks = [n] if round_only else range(1, n + 1)
      assert rounds[n] == [revised(s, k) for s in samples for k in ks if revised(s, k)]
  assert rounds[3] != [t.response for t in sft.revision_targets(samples, 'all', 3)[0]]
  kinds = {t.kind for n in (0, 2) for t in sft.revision_targets(samples, 'final', n, True)[0]}
  assert kinds == {'initial_response', 'revision_round_2'}  # the round overrides sft.revisions
  assert sft.revision_targets(samples, 'all', 2, True)[1] == 1  # b's second round is empty
  assert sft.revision_targets(samples, 'all', 2)[1] == 1  # ... and its first is not
  with pytest.raises(examples_lib.SFTDataError, match='config.sft: revision_round must be -1'):
    sft.check_config(_config(revision_round=4))


def test_bad_revisions_or_truncated_mode_is_a_clear_error():
  for field, value in (('revisions', 'last'), ('truncated', 'keep')):
    with pytest.raises(examples_lib.SFTDataError, match=f'config.sft: {field} must be one of'):
      sft.check_config(_config(**{field: value}))


def test_pack_right_pads_and_masks_targets_only():
  examples = [
      examples_lib.Example('a', 'revision', (5, 6, 7, 8), 2),
      examples_lib.Example('b', 'helpful', (9, 10), 1),
  ]
  b = examples_lib.pack(examples, [1, -1, 0], 6, pad_id=0)
  np.testing.assert_array_equal(b['tokens'], [[9, 10, 0, 0, 0, 0], [0] * 6, [5, 6, 7, 8, 0, 0]])
  np.testing.assert_array_equal(b['loss_mask'], [[0, 1, 0, 0, 0, 0], [0] * 6, [0, 0, 1, 1, 0, 0]])


def test_epoch_batches_are_bucketed_deterministic_and_cover_each_example_once():
  lengths = [5, 40, 33, 64, 65, 10, 120, 31, 200, 7]
  kw = dict(max_len=128, min_bucket=32)
  e0 = loop.epoch_batches(lengths, 3, seed=1, epoch=0, **kw)
  assert e0 == loop.epoch_batches(lengths, 3, seed=1, epoch=0, **kw)
  e1 = loop.epoch_batches(lengths, 3, seed=1, epoch=1, **kw)
  assert e1 != e0 and len(e1) == len(e0)
  for batches in (e0, e1):
    rows = [i for _, batch in batches for i in batch if i >= 0]
    assert sorted(rows) == list(range(len(lengths)))
    for length, batch in batches:
      assert length in (32, 64, 128) and len(batch) == 3
      assert all(loop.bucket_length(lengths[i], **kw) == length for i in batch if i >= 0)


def test_mix_draws_helpful_per_revision_ratio():
  revisions, helpful = list('abcd'), list('xyz')
  assert sft.mix(revisions, helpful, -1, 0) == revisions + helpful
  mixed = sft.mix(revisions, helpful, 2.0, 0)
  assert mixed[:4] == revisions and len(mixed) == 12 and set(mixed[4:]) == set(helpful)
  # 0.5 per revision: round(0.5 * 4) = 2 helpful pairs, two different ones (a draw without
  # repeats while there are enough), fixed by the seed and moved by another seed.
  half = {seed: sft.mix(revisions, helpful, 0.5, seed)[4:] for seed in range(8)}
  assert all(len(h) == 2 and len(set(h)) == 2 and set(h) <= set(helpful) for h in half.values())
  assert sft.mix(revisions, helpful, 0.5, 3)[4:] == half[3]
  assert len({tuple(h) for h in half.values()}) > 1
  assert sft.mix(revisions, helpful, 0.0, 0) == revisions


def test_optimizer_schedule_warms_up_then_decays():
  cfg = tiny.get_config().sft.optimizer
  _, schedule = train_lib.make_optimizer(cfg, 30)
  lrs = [float(schedule(s)) for s in range(30)]
  peak = cfg.learning_rate
  assert 0 < lrs[0] < lrs[1] < lrs[2] < lrs[3] == pytest.approx(peak)
  assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
  assert lrs[-1] == pytest.approx(peak * cfg.end_lr_fraction, rel=0.05)


def test_a_warmup_longer_than_the_run_is_capped_by_warmup_fraction_or_warned_about():
  """The `full` configs' 50 warmup steps against a 51-step SFT run (the bundled data): capped
  at warmup_fraction of the run, the rate reaches its peak early and stays there under the
  paper's constant schedule; uncapped, the stage warns that it never gets there."""
  cfg = configs_sft.get_config('full').optimizer
  assert cfg.warmup_fraction == 0.1 and cfg.warmup_steps == 50
  cfg.schedule = 'constant'  # the paper's SL-CAI and PM recipe: a constant rate
  _, schedule = train_lib.make_optimizer(cfg, 51)
  lrs = [float(schedule(s)) for s in range(51)]
  assert train_lib.warmup_steps(cfg, 51) == 6  # ceil(0.1 x 51)
  assert lrs[5] < lrs[6] == pytest.approx(cfg.learning_rate) == lrs[-1]
  assert train_lib.warmup_warning(cfg, 51, 'sft.optimizer') is None
  cfg.warmup_fraction = 1.0
  assert train_lib.warmup_steps(cfg, 51) == 50 and train_lib.warmup_warning(cfg, 500, 'x') is None
  assert train_lib.warmup_warning(cfg, 23, 'preference.optimizer') == (
      'preference.optimizer: warmup_steps=50 covers all 23 updates of this run, so the learning '
      'rate never reaches its peak 2e-05 before the end; set preference.optimizer.warmup_fraction '
      '(e.g. 0.1) or a smaller warmup_steps'
  )


# ---- the stage -----------------------------------------------------------------------------------


def _config(**sft_overrides):
  config = tiny.get_config()
  config.stages = 'sft'
  config.sft.update(
      dict(
          dict(num_steps=12, checkpoint_every=4, eval_every=6, min_bucket=128, batch_size=4),
          **sft_overrides,
      )
  )
  return config


def _run(config, workdir):
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    return pipeline.run(pipeline.context(config, workdir, mesh))


def test_stage_trains_exports_and_resumes(tmp_path, monkeypatch):
  config = _config()
  ref = tmp_path / 'ref'
  fake_upstream(config, ref, 'critique_revision', sl_cai_records())
  _run(config, ref)
  rows = metrics_lib.read_metrics(ref / 'sft' / 'metrics.jsonl')
  assert [r['step'] for r in rows] == list(range(1, 13))
  assert {'loss', 'lr', 'grad_norm', 'tokens'} <= set(rows[0])
  assert [r['step'] for r in rows if 'eval_loss' in r] == [6, 12]
  first, last = rows[0]['loss'], np.mean([r['loss'] for r in rows[-3:]])
  assert last < 0.7 * first, (first, last)  # the patterned revisions are easy to learn
  assert rows[-1]['eval_loss'] < rows[5]['eval_loss']
  assert list((ref / 'sft' / 'tb').glob('events.out.tfevents.*'))
  summary = json.loads((ref / 'sft' / 'DONE.json').read_text())['summary']
  assert summary['empty_revisions'] == 1 and summary['train'] + summary['held_out'] == 11 + 6
  # The export is an HF directory of the fine-tuned model; the helpful model is left as it was.
  sl_cai = checkpoint.load_pretrained(str(ref / 'sft' / 'export'))
  helpful = checkpoint.load_pretrained(config.model.source, seed=config.seed)
  tuned = checkpoint.flat_params(sl_cai.model)
  base = checkpoint.flat_params(helpful.model)
  assert max(float(np.abs(tuned[k] - base[k]).max()) for k in base) > 1e-3

  # An interrupted run (a crash after step 9; checkpoints at 4 and 8) resumes from its last
  # checkpoint and ends exactly where the uninterrupted run ended.
  crashed = tmp_path / 'crashed'
  fake_upstream(config, crashed, 'critique_revision', sl_cai_records())
  real_write = metrics_lib.MetricsWriter.write

  def crash_at_10(self, step, metrics):
    if step == 10:
      raise KeyboardInterrupt('simulated crash')
    real_write(self, step, metrics)

  monkeypatch.setattr(metrics_lib.MetricsWriter, 'write', crash_at_10)
  with pytest.raises(KeyboardInterrupt):
    _run(config, crashed)
  monkeypatch.setattr(metrics_lib.MetricsWriter, 'write', real_write)
  assert not (crashed / 'sft' / 'DONE.json').exists()
  written = []
  monkeypatch.setattr(
      metrics_lib.MetricsWriter,
      'write',
      lambda self, step, m: (written.append(step), real_write(self, step, m)),
  )
  _run(config, crashed)
  assert written[0] in (5, 9), written  # resumed after the checkpoint at 4 or 8, not from scratch
  resumed = metrics_lib.read_metrics(crashed / 'sft' / 'metrics.jsonl')
  assert [r['step'] for r in resumed] == list(range(1, 13))
  for a, b in zip(rows, resumed):
    assert a['loss'] == pytest.approx(b['loss'], abs=1e-6), (a, b)
  assert resumed[-1]['eval_loss'] == pytest.approx(rows[-1]['eval_loss'], abs=1e-6)


def test_checkpoint_every_zero_trains_without_checkpoints(tmp_path):
  """sft.checkpoint_every = 0 (as preference's): no checkpoints, the same rows and eval steps."""
  config = _config(checkpoint_every=0)
  fake_upstream(config, tmp_path, 'critique_revision', sl_cai_records())
  _run(config, tmp_path)
  rows = metrics_lib.read_metrics(tmp_path / 'sft' / 'metrics.jsonl')
  assert [r['step'] for r in rows] == list(range(1, 13))
  assert [r['step'] for r in rows if 'eval_loss' in r] == [6, 12]
  assert not list((tmp_path / 'sft').glob('checkpoints/*'))
  assert (tmp_path / 'sft' / 'DONE.json').exists() and (tmp_path / 'sft' / 'export').is_dir()


def test_empty_dataset_is_a_clear_error(tmp_path):
  config = _config()
  records = sl_cai_records(n=3, empty=3)
  records['helpful.jsonl'] = []
  fake_upstream(config, tmp_path, 'critique_revision', records)
  with pytest.raises(
      examples_lib.SFTDataError, match=r"no training examples .*'empty_revisions': 3"
  ):
    _run(config, tmp_path)


def test_missing_samples_file_is_a_clear_error(tmp_path):
  config = _config()
  fake_upstream(config, tmp_path, 'critique_revision', {'helpful.jsonl': []})
  with pytest.raises(examples_lib.SFTDataError, match='samples.jsonl is missing'):
    _run(config, tmp_path)
