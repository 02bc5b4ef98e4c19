"""Stage `sft`: supervised fine-tuning on the revisions, which makes the SL-CAI model (paper section 3).

The pretrained helpful model is fine-tuned on (red-team prompt, revision) pairs from the
`critique_revision` stage -- the revision of every round (`sft.revisions='all'`, as the paper) or
the final one only ('final'), or, for the paper's SL-CAI-n ablation, those of rounds 1..n
(`sft.revision_round=n`, "up to and including the n-th"; `sft.revision_round_only`: round n's
alone; 0: the initial responses, never revised) -- mixed with (helpful prompt, helpful response)
pairs, with the loss
on the response tokens only. A target the sampler cut at its token limit (finish reason 'length')
never ended itself, so by default it is trained without the end-of-turn marker
(`sft.truncated='no_eos'`); 'drop' leaves it out, 'eos' trains it as if it had ended. A prompt
that continues a multi-turn red-team conversation (HH-RLHF, paper section 3.1) is trained with
the turns before it, as the model saw them when it wrote the response. The SL-CAI model is
exported as an HF directory, `sft/export`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax import bookkeeping
from cai_jax.method import conversation, data
from cai_jax.method import stage_inputs
from cai_jax.method.examples import Example, SFTDataError, encode, pack
from cai_jax.models import checkpoint, quantize
from cai_jax.training import loop
from cai_jax.training import metrics as metrics_lib
from cai_jax.training import train_lib
from cai_jax.utils import records as records_lib
from cai_jax.utils import sharding


@dataclasses.dataclass(frozen=True)
class Target:
  """One (prompt, response) pair to train on, before tokenizing."""

  kind: str  # 'revision_round_<k>' | 'revision_final' | 'initial_response' (SL-CAI-0) | 'helpful'
  id: str
  turns: tuple[conversation.Turn, ...]  # the prompt: its conversation, ending in the request
  response: str
  truncated: bool  # cut at the sampler's token limit: the model never ended it

  @property
  def source(self) -> str:
    return 'helpful' if self.kind == 'helpful' else 'revision'


REVISIONS = ('all', 'final')  # sft.revisions
TRUNCATED = ('no_eos', 'drop', 'eos')  # sft.truncated


# ---- data ----------------------------------------------------------------------------------------


def read_records(path: Path, schema: records_lib.Schema) -> list[dict]:
  """critique_revision's records at `path`; a missing file is an SFTDataError, never empty data."""
  if not path.exists():
    raise SFTDataError(f'{path} is missing: the critique_revision stage writes it')
  return records_lib.read_jsonl(path, schema)


def _is_truncated(finish_reasons, k: int) -> bool:
  """Whether generation k stopped at the token limit; records without finish reasons (hand-made
  ones) count as ended."""
  return k < len(finish_reasons or ()) and finish_reasons[k] == 'length'


def revision_targets(
    samples: Sequence[dict], revisions: str, revision_round: int = -1, round_only: bool = False
) -> tuple[list[Target], int]:
  """The revisions to train on, and how many were empty (skipped).

  'all' (the paper fine-tunes on the revisions of every round): one target per round with a
  non-empty revision, kind 'revision_round_<k>'. 'final': the latest non-empty revision of each
  prompt, kind 'revision_final'; a prompt none of whose rounds revised it counts as empty.
  `revision_round` n >= 0 overrides both (SL-CAI-n, as the paper: the revisions "up to and
  including the n-th", kinds 'revision_round_<k>' for k <= n; with `round_only`, round n's alone),
  or with n = 0 the initial responses, kind 'initial_response'.
  """
  targets, empty = [], 0
  for i, s in enumerate(samples):
    ex_id, finish = str(s.get('id', i)), s.get('finish_reasons') or {}
    reasons = finish.get('revision')
    turns = tuple(data.prompt_turns(s))
    texts = [(r.get('revision') or '').strip() for r in s['rounds']]
    if revision_round == 0:
      text = (s.get('initial_response') or '').strip()
      if not text:
        empty += 1
        continue
      cut = finish.get('initial_response') == 'length'
      targets.append(Target('initial_response', ex_id, turns, text, cut))
      continue
    if revision_round > 0:
      if revision_round > len(texts):
        raise SFTDataError(
            f'sample {ex_id} has {len(texts)} revision rounds, fewer than '
            f'sft.revision_round={revision_round} (critique_revision.n_rounds)'
        )
      rounds = [revision_round - 1] if round_only else range(revision_round)
      empty += sum(not texts[k] for k in rounds)
      targets += [
          Target(f'revision_round_{k + 1}', ex_id, turns, texts[k], _is_truncated(reasons, k))
          for k in rounds
          if texts[k]
      ]
      continue
    if revisions == 'all':
      empty += sum(not t for t in texts)
      targets += [
          Target(f'revision_round_{k + 1}', ex_id, turns, t, _is_truncated(reasons, k))
          for k, t in enumerate(texts)
          if t
      ]
      continue
    final = (s['revision'] or '').strip()
    if not final:
      empty += 1
      continue
    k = max((k for k, t in enumerate(texts) if t == final), default=len(texts))
    targets.append(Target('revision_final', ex_id, turns, final, _is_truncated(reasons, k)))
  return targets, empty


def helpful_targets(records: Sequence[dict]) -> tuple[list[Target], int]:
  """Every non-empty helpful sample (helpful_samples_per_prompt per prompt), and how many were
  empty."""
  targets, empty = [], 0
  for i, r in enumerate(records):
    for k, text in enumerate(r['responses']):
      text = (text or '').strip()
      if not text:
        empty += 1
        continue
      targets.append(
          Target(
              'helpful',
              str(r.get('id', i)),
              tuple(data.prompt_turns(r)),
              text,
              _is_truncated(r.get('finish_reasons'), k),
          )
      )
  return targets, empty


def mix(revisions: list, helpful: list, helpful_ratio: float, seed: int) -> list:
  """Revisions plus round(helpful_ratio * len(revisions)) helpful pairs (seeded draw, repeated if
  there are too few); a negative ratio keeps every helpful pair."""
  if helpful_ratio < 0 or not helpful:
    return revisions + helpful
  want = int(round(helpful_ratio * len(revisions)))
  order = np.random.default_rng([seed, 1]).permutation(len(helpful))
  return revisions + [helpful[order[i % len(helpful)]] for i in range(want)]


def is_held_out(example_id: str, source: str, fraction: float, seed: int) -> bool:
  """A seeded per-example coin on its id: the split is stable as the data grows."""
  u = int(hashlib.sha1(f'{seed}:{source}:{example_id}'.encode()).hexdigest()[:16], 16) / 2.0**64
  return u < fraction


# ---- loss ----------------------------------------------------------------------------------------


def sft_loss(logits, tokens, loss_mask):
  """Mean next-token cross-entropy over the target tokens, in float32.

  Args:
    logits: [B, T, V]; logits[:, t] predict tokens[:, t + 1].
    tokens: [B, T] int.
    loss_mask: [B, T]; 1 where tokens[b, t] is a target (response) token.
  Returns:
    (loss, {'tokens': number of target tokens}).
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  weights = loss_mask[:, 1:].astype(jnp.float32)
  nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  n = weights.sum()
  return (nll * weights).sum() / jnp.maximum(n, 1.0), {'tokens': n.astype(jnp.int32)}


def output_weight(model) -> tuple[jax.Array, str]:
  """The matrix that turns final hidden states into logits, and its layout: the embedding
  itself ('VD') when tied, the LM head ('DV') otherwise. Used as stored: no transposed copy (an
  int8 one, a LoRA run's frozen base, times its scales)."""
  if model.cfg.tie_embeddings:
    return quantize.weight(model, 'embed'), 'VD'
  return quantize.weight(model, 'lm_head'), 'DV'


def fused_nll_sum(
    hidden, w, targets, weights, chunk: int, softcap: float | None = None, layout: str = 'DV'
):
  """sum(weights * nll) for logits = hidden @ w (float32, optionally soft-capped), `chunk`
  positions at a time; the same pass forms the gradient (softmax - one_hot), so no [B, T, V]
  logits are ever stored and nothing is recomputed in the backward pass.

  Args:
    hidden: [B, T, D] final hidden states; w: [D, V] ('DV') or [V, D] ('VD');
    targets: [B, T] int; weights: [B, T] float.
  """
  return _fused_nll(chunk, softcap, layout, hidden, w, targets, weights)


def _nll_and_grads(chunk, softcap, layout, hidden, w, targets, weights, with_grads=True):
  b, t, d = hidden.shape
  pad = -t % chunk
  if pad:  # padded positions carry weight 0
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    weights = jnp.pad(weights, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  wc = w.astype(hidden.dtype)
  w_names = ('vocab', 'embed') if layout == 'VD' else ('embed', 'vocab')

  def body(carry, xs):
    total, dw = carry
    h, y, wt = xs
    z = jnp.einsum(f'BCD,{layout}->BCV', h, wc).astype(jnp.float32)
    z = sharding.constrain(z, ('batch', 'length', 'vocab'))
    if softcap is not None:
      capped = jnp.tanh(z / softcap)
      z = capped * softcap
    lse = jax.nn.logsumexp(z, -1)
    nll = lse - jnp.take_along_axis(z, y[..., None], -1)[..., 0]
    total = total + (nll * wt).sum()
    if not with_grads:
      return (total, dw), None
    g = jnp.exp(z - lse[..., None]) - jax.nn.one_hot(y, z.shape[-1], dtype=jnp.float32)
    g = g * wt[..., None]
    if softcap is not None:
      g = g * (1.0 - capped * capped)
    dh = jnp.einsum(f'BCV,{layout}->BCD', g.astype(h.dtype), wc)
    dw = dw + jnp.einsum(f'BCD,BCV->{layout}', h.astype(jnp.float32), g)
    return (total, sharding.constrain(dw, w_names)), dh

  dw0 = sharding.constrain(jnp.zeros(w.shape, jnp.float32), w_names) if with_grads else None
  (total, dw), dh = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), dw0), (split(hidden), split(targets), split(weights))
  )
  if not with_grads:
    return total, None
  dh = jnp.moveaxis(dh, 0, 1).reshape(b, n * chunk, d)[:, :t]
  return total, (dh.astype(hidden.dtype), dw.astype(w.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused_nll(chunk, softcap, layout, hidden, w, targets, weights):
  return _nll_and_grads(chunk, softcap, layout, hidden, w, targets, weights, with_grads=False)[0]


def _fused_nll_fwd(chunk, softcap, layout, hidden, w, targets, weights):
  return _nll_and_grads(chunk, softcap, layout, hidden, w, targets, weights)


def _fused_nll_bwd(chunk, softcap, layout, grads, g):
  # Cotangents in the primals' dtypes (bf16 hidden states, float32 master weights): the float32
  # loss cotangent `g` must not promote a bf16 gradient to float32.
  dh, dw = grads
  scale = lambda x: (g * x.astype(jnp.float32)).astype(x.dtype)
  return scale(dh), scale(dw), None, None


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


def make_loss_fn(loss_chunk: int = 0):
  """loss_fn(model, batch) -> (loss, aux) for train_lib; fused chunked cross-entropy when loss_chunk > 0."""

  def loss_fn(model, batch):
    tokens, loss_mask = batch['tokens'], batch['loss_mask']
    if not loss_chunk:
      logits, _ = model(tokens)  # right-padded rows: the causal mask alone keeps pads out of view
      return sft_loss(logits, tokens, loss_mask)
    hidden, _ = model.hidden(tokens)
    weights = loss_mask[:, 1:].astype(jnp.float32)
    n = weights.sum()
    w, layout = output_weight(model)
    total = fused_nll_sum(
        hidden[:, :-1],
        w,
        tokens[:, 1:],
        weights,
        min(loss_chunk, tokens.shape[1] - 1),
        model.cfg.final_softcap,
        layout,
    )
    return total / jnp.maximum(n, 1.0), {'tokens': n.astype(jnp.int32)}

  return loss_fn


def evaluate(eval_step, params, examples: Sequence[Example], batches, pad_id: int) -> float:
  """Token-weighted mean loss over `batches` (loop.epoch_batches) of held-out `examples`."""
  nll, n = 0.0, 0
  for length, rows in batches:
    loss, aux = eval_step(params, loop.device_batch(pack(examples, rows, length, pad_id)))
    k = int(aux['tokens'])
    nll, n = nll + float(loss) * k, n + k
  return nll / max(n, 1)


# ---- the stage -----------------------------------------------------------------------------------


def build_examples(
    ctx: bookkeeping.Context, tokenizer
) -> tuple[list[Example], list[Example], dict]:
  """(train, held_out, counts) from the critique_revision stage's files."""
  config, cfg = ctx.config, ctx.config.sft
  check_config(config)
  upstream = ctx.require('critique_revision', 'sft')
  samples_path = records_lib.REVISIONS.path(upstream)
  revisions, no_revision = revision_targets(
      read_records(samples_path, records_lib.REVISIONS),
      cfg.revisions,
      cfg.get('revision_round', -1),
      cfg.get('revision_round_only', False),
  )
  helpful_path = records_lib.HELPFUL.path(upstream)
  helpful, no_response = ([], 0)
  if helpful_path.exists():
    helpful, no_response = helpful_targets(read_records(helpful_path, records_lib.HELPFUL))
  targets = mix(revisions, helpful, float(cfg.helpful_ratio), config.seed)
  train, held_out, too_long = [], [], 0
  truncated = {'targets': 0, 'dropped': 0, 'trained_without_eos': 0, 'trained_with_eos': 0}
  kinds: dict[str, int] = {}
  for t in targets:
    if t.truncated:
      truncated['targets'] += 1
      if cfg.truncated == 'drop':
        truncated['dropped'] += 1
        continue
    end = not t.truncated or cfg.truncated == 'eos'
    enc = encode(
        t.turns, t.response, tokenizer, config.conversation_format, config.model.max_len, end
    )
    if enc is None:
      too_long += 1
      continue
    if t.truncated:
      truncated['trained_with_eos' if end else 'trained_without_eos'] += 1
    kinds[t.kind] = kinds.get(t.kind, 0) + 1
    ex = Example(t.id, t.source, *enc, kind=t.kind)
    # The coin is per prompt (its id), so every round and sample of a prompt stays on one side.
    held = is_held_out(t.id, t.source, cfg.eval_fraction, config.seed)
    (held_out if held else train).append(ex)
  counts = {
      'revisions': len(revisions),
      'empty_revisions': no_revision,
      'helpful': len(helpful),
      'empty_helpful': no_response,
      'too_long': too_long,
      'train': len(train),
      'held_out': len(held_out),
      'examples': dict(sorted(kinds.items())),
      'truncated': truncated,
      'revisions_mode': cfg.revisions,
      'revision_round': cfg.get('revision_round', -1),
      'revision_round_only': cfg.get('revision_round_only', False),
      'truncated_mode': cfg.truncated,
  }
  if not train:
    raise SFTDataError(
        f'no training examples in {upstream}: {counts} (every revision empty, or all '
        f'held out by sft.eval_fraction={cfg.eval_fraction})'
    )
  return train, held_out, counts


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ('critique_revision',)  # the revisions (and helpful samples)
MODELS = ('pretrained',)  # the model it fine-tunes


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution and the prompt sources."""
  return stage_inputs.files(config)


def check_config(config) -> None:
  """Fails on sft settings that cannot work (run before anything is written)."""
  cfg, problems = config.sft, []
  if cfg.revisions not in REVISIONS:
    problems.append(f'revisions must be one of {", ".join(REVISIONS)}, got {cfg.revisions!r}')
  if cfg.truncated not in TRUNCATED:
    problems.append(f'truncated must be one of {", ".join(TRUNCATED)}, got {cfg.truncated!r}')
  n_rounds = config.critique_revision.n_rounds
  if not -1 <= cfg.get('revision_round', -1) <= n_rounds:
    problems.append(
        f'revision_round must be -1 (sft.revisions decides) or 0..{n_rounds} '
        f'(critique_revision.n_rounds), got {cfg.revision_round}'
    )
  if problems:
    raise SFTDataError('config.sft: ' + '; '.join(problems))


def run(ctx: bookkeeping.Context, stage_dir: Path) -> dict:
  """Fine-tunes the pretrained model into the SL-CAI model; resumes from `stage_dir/checkpoints`.

  Writes metrics.jsonl (one row per step), tb/ (TensorBoard), checkpoints/ (none when
  sft.checkpoint_every is 0) and export/ (HF).
  """
  config, cfg = ctx.config, ctx.config.sft
  sharding.check_batch_size(cfg.batch_size, 'sft.batch_size')
  if cfg.batch_size % jax.process_count():
    raise sharding.ShardingError(
        f'sft.batch_size {cfg.batch_size} is not divisible by the '
        f'{jax.process_count()} processes'
    )
  pretrained = ctx.load_role('pretrained', cache=False)  # the train state holds the only copy
  tok = pretrained.tokenizer
  pad_id = conversation.pad_id(tok, pretrained.config)
  train, held_out, counts = build_examples(ctx, tok)
  logging.info('sft data: %s', counts)

  max_len, min_bucket = config.model.max_len, cfg.min_bucket
  lengths = [len(e.tokens) for e in train]
  plan, steps_per_epoch, total_steps = loop.plan_epochs(cfg, lengths, config.seed, max_len)
  eval_batches = loop.epoch_batches(
      [len(e.tokens) for e in held_out],
      cfg.batch_size,
      config.seed,
      0,
      max_len=max_len,
      min_bucket=min_bucket,
      shuffle=False,
  )

  tx, schedule = train_lib.make_optimizer(cfg.optimizer, total_steps, 'sft.optimizer')
  graphdef, state, shardings = train_lib.init_state(pretrained.model, tx)
  pretrained = dataclasses.replace(pretrained, model=None)  # frees the loaded copy (HBM)
  loss_fn = make_loss_fn(cfg.loss_chunk)
  train_step = train_lib.make_train_step(
      graphdef, tx, loss_fn, shardings, schedule, seed=config.seed
  )
  eval_step = train_lib.make_eval_step(
      graphdef, loss_fn, None if shardings is None else shardings.params
  )

  held_out_loss = lambda params: {
      'eval_loss': evaluate(eval_step, params, held_out, eval_batches, pad_id)
  }
  result = loop.fit(
      stage='sft',
      stage_dir=stage_dir,
      state=state,
      shardings=shardings,
      train_step=train_step,
      plan=plan,
      steps_per_epoch=steps_per_epoch,
      make_batch=lambda length, rows: pack(train, rows, length, pad_id),
      total_steps=total_steps,
      cfg=cfg,
      evaluate=held_out_loss if eval_batches else None,
      postfix={'loss': '{loss:.3f}'},
  )
  state, metrics, seconds = result.state, result.metrics, result.seconds
  eval_loss = result.eval_metrics.get('eval_loss')

  params = train_lib.gather_params(state.params)
  model = nnx.merge(graphdef, params)  # the SL-CAI model
  export = stage_dir / 'export'
  checkpoint.save_pretrained(checkpoint.Pretrained(model, tok, pretrained.config), str(export))
  if not metrics and jax.process_index() == 0:  # resumed after the last step: report from the log
    metrics = (metrics_lib.read_metrics(stage_dir / 'metrics.jsonl') or [{}])[-1]
    eval_loss = metrics.get('eval_loss')
  return {
      **counts,
      'models': bookkeeping.roles_line(config.model),
      'steps': total_steps,
      'steps_run': total_steps - result.start,
      'steps_per_epoch': steps_per_epoch,
      'final_loss': metrics.get('loss'),
      'eval_loss': eval_loss,
      'tokens_per_second': result.tokens / seconds if seconds and result.tokens else None,
      'export': str(export),
  }
