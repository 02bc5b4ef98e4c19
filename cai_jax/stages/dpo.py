"""Stage `dpo`: direct preference optimization of the SL-CAI model on the feedback stage's soft AI
labels, beside PPO: the ablation that asks whether RL against a preference model is worth it.

The paper turns the feedback model's (A)/(B) probabilities into a preference model and runs PPO
against it (section 4). DPO (Rafailov et al. 2023) skips both: the policy's log-ratio to a frozen
reference is an implicit reward, r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), and the
preference model's loss is applied to it directly. With the paper's *soft* labels p = P(A is
better) the loss is the cross-entropy against p,

  -(p * log sigmoid(beta * D) + (1 - p) * log sigmoid(-beta * D)),
  D = (log pi(a) - log pi_ref(a)) - (log pi(b) - log pi_ref(b)),

the log-probs summed over the response tokens (p = 1 is standard DPO). Policy and reference both
start as the SL-CAI model (`sft/export`); the reference stays frozen (`model.frozen_param_dtype`)
and its log-probs of every pair are computed once, before training. `dpo.label_type='hard'`
trains on the argmax label, `dpo.label_smoothing` eps fits (1 - eps) p + eps (1 - p) instead
(conservative DPO, meant for hard labels). `dpo.pairs='revisions'` trains on Hugging Face's
open CAI recipe instead: the final revision chosen over the initial response, label 1.

Metrics (metrics.jsonl, DONE.json): the loss, the implicit-reward accuracy, margin beta * D and
the chosen and rejected log-probs, on the training batches and on held-out pairs (split per pair
as the preference model's, `comparisons.split_held_out`). `eval_kl` is KL(policy || reference)
on held-out prompts, *sampled*: the policy answers `kl_prompts` of them at temperature 1, both
models score those responses, and the per-token k3 estimate summed over each response is
averaged -- the estimator of PPO's `kl`, so DPO and PPO can be compared at a matched KL
(experiments/sweeps/ppo_vs_dpo.py). The trained policy is exported as `dpo/export`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax import bookkeeping, sampling
from cai_jax.method import comparisons as comparisons_lib
from cai_jax.method import conversation, rl
from cai_jax.method import examples as examples_lib
from cai_jax.method import stage_inputs
from cai_jax.method.comparisons import Comparison, HARMLESSNESS
from cai_jax.models import checkpoint
from cai_jax.models import decoder as model_lib
from cai_jax.training import loop
from cai_jax.training import metrics as metrics_lib
from cai_jax.training import train_lib
from cai_jax.utils import records as records_lib
from cai_jax.utils import sharding

LABEL_TYPES = comparisons_lib.LABEL_TYPES  # dpo.label_type: 'soft' | 'hard'
PAIR_SOURCES = ('feedback', 'revisions')  # dpo.pairs


class DPODataError(bookkeeping.StageError):
  """Pairs that cannot be trained on: none usable, a missing file."""


# ---- the loss ------------------------------------------------------------------------------------


def soft_dpo_loss(margin, p, beta):
  """Per-pair loss -(p log sigmoid(beta D) + (1 - p) log sigmoid(-beta D)), D = `margin`.

  Written with softplus (-log sigmoid(z) = softplus(-z)) so a large |beta D| stays finite. p = 1
  is standard DPO; at p = 0.5 the gradient vanishes at D = 0: a tie teaches nothing.
  """
  z = beta * jnp.asarray(margin, jnp.float32)
  p = jnp.asarray(p, jnp.float32)
  return p * jax.nn.softplus(-z) + (1.0 - p) * jax.nn.softplus(z)


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, p, beta, weight=None):
  """Weighted mean soft-label DPO loss of a batch of pairs, and its metrics.

  Args: sequence log-probs [B] of the chosen (label-preferred, p >= 0.5) and rejected responses
  under the policy and the reference; p [B] the training target; weight [B] (0 = a filler row).
  Returns (loss, aux): accuracy (implicit reward of the chosen higher, over pairs with p != 0.5),
  margin (beta * D), reward_chosen / reward_rejected (beta * log-ratio), logp_chosen /
  logp_rejected (the policy's), all weighted means.
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  r_chosen = f32(logp_chosen) - f32(ref_chosen)
  r_rejected = f32(logp_rejected) - f32(ref_rejected)
  d = r_chosen - r_rejected
  weight = jnp.ones_like(d) if weight is None else f32(weight)
  total = jnp.maximum(jnp.sum(weight), 1e-9)
  mean = lambda x: jnp.sum(weight * x) / total  # noqa: E731
  decided = (weight > 0) & (f32(p) != 0.5)
  accuracy = jnp.sum(decided * (d > 0)) / jnp.maximum(jnp.sum(decided), 1)
  return mean(soft_dpo_loss(d, p, beta)), {
      'accuracy': accuracy,
      'margin': mean(beta * d),
      'reward_chosen': mean(beta * r_chosen),
      'reward_rejected': mean(beta * r_rejected),
      'logp_chosen': mean(f32(logp_chosen)),
      'logp_rejected': mean(f32(logp_rejected)),
  }


def sequence_logprobs(model, tokens, loss_mask, chunk: int = 0):
  """log pi(response | prompt) per row [N]: the token log-probs summed over loss_mask (float32).

  tokens, loss_mask: [N, T], right-padded (the causal mask keeps pads out of view); loss_mask is
  1 on the response tokens. chunk = 0 forms the [N, T, V] logits whole; chunk > 0 forms them
  `chunk` positions at a time in a scan whose body is rematerialized, so neither pass holds more
  than [N, chunk, V] of them (SmolLM2's 49k vocabulary at 1024 tokens: 200 MB per row whole).
  """
  targets, weights = tokens[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
  if not chunk:
    logits, _ = model(tokens)
    return jnp.sum(_token_logprobs(logits[:, :-1], targets) * weights, axis=1)
  hidden, _ = model.hidden(tokens)
  hidden = hidden[:, :-1]
  b, t, _ = hidden.shape
  chunk = min(chunk, t)
  pad = -t % chunk
  if pad:  # padded positions carry weight 0
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))
  split = lambda x: jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)  # noqa: E731

  @jax.checkpoint  # the backward pass recomputes a chunk's logits instead of keeping them
  def chunk_logprobs(h, y):
    return _token_logprobs(model.logits_from_hidden(h), y)

  def body(total, xs):
    h, y, w = xs
    return total + jnp.sum(chunk_logprobs(h, y) * w, axis=1), None

  total, _ = jax.lax.scan(
      body, jnp.zeros((b,), jnp.float32), (split(hidden), split(targets), split(weights))
  )
  return total


def _token_logprobs(logits, targets):
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return picked - jax.nn.logsumexp(logits, -1)


def make_loss_fn(beta: float, chunk: int = 0):
  """loss_fn(model, batch) for train_lib: B pairs run as 2B rows [chosen..., rejected...]."""

  def loss_fn(model, batch):
    logp = sequence_logprobs(model, batch['tokens'], batch['loss_mask'], chunk)
    chosen, rejected = jnp.split(logp, 2)
    ref_chosen, ref_rejected = jnp.split(batch['ref_logp'], 2)
    return dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected, batch['target'], beta, batch['weight']
    )

  return loss_fn


# ---- pairs -------------------------------------------------------------------------------------


def training_target(p_chosen: float, label_type: str, label_smoothing: float) -> float:
  """The loss's target: the soft label (or its argmax, `comparisons.training_label`), smoothed
  toward 0.5 by eps: (1 - eps) p + eps (1 - p) (conservative DPO)."""
  p = comparisons_lib.training_label(p_chosen, label_type)
  return (1.0 - label_smoothing) * p + label_smoothing * (1.0 - p)


def oriented(c: Comparison) -> Comparison:
  """The pair with its label-preferred response first (p_a >= 0.5). The loss is symmetric under
  the swap (D -> -D, p -> 1 - p); orienting makes 'chosen' and 'rejected' metrics mean what they
  say."""
  if c.p_a >= 0.5:
    return c
  return dataclasses.replace(c, a=c.b, b=c.a, p_a=1.0 - c.p_a)


def _no_usable_pairs(n: int, what: str, counts: dict[str, int]) -> DPODataError:
  reasons = ', '.join(f'{v} {k}' for k, v in counts.items() if v)
  return DPODataError(f'dpo: no usable pairs among {n} {what}: {reasons or "none given"}')


def _distinct(c: Comparison) -> bool:
  return c.a[-1][1].strip() != c.b[-1][1].strip()


def feedback_pairs(records: Sequence[dict], where: str) -> tuple[list[Comparison], dict]:
  """The feedback stage's labeled pairs (harmlessness and helpfulness, read by the preference
  model's reader), without the unlabeled (p_a null or NaN: skipped by the feedback stage) and
  those whose two responses are identical (p_a = 0.5 by construction: no signal)."""
  labeled = [r for r in records if r.get('p_a') is not None and not math.isnan(float(r['p_a']))]
  pairs = comparisons_lib.feedback_comparisons(labeled, where)
  usable = [c for c in pairs if _distinct(c)]
  counts = {
      'identical responses': len(pairs) - len(usable),
      'unlabeled': len(records) - len(labeled),
  }
  if not usable:
    raise _no_usable_pairs(len(records), 'feedback records', counts)
  return usable, counts


def revision_pairs(samples: Sequence[dict]) -> tuple[list[Comparison], dict]:
  """Hugging Face's CAI recipe: critique_revision's final revision chosen over the initial
  response (label 1), per red-team prompt; prompts without a revision or whose revision repeats
  the initial response are left out."""
  pairs, counts = [], {'identical responses': 0, 'without a revision': 0}
  for i, s in enumerate(samples):
    chosen, rejected = (s.get('revision') or '').strip(), (s.get('initial_response') or '').strip()
    if not chosen:
      counts['without a revision'] += 1
    elif chosen == rejected:
      counts['identical responses'] += 1
    else:
      a = comparisons_lib.response_conversation(s, chosen)
      b = comparisons_lib.response_conversation(s, rejected)
      pairs.append(Comparison(a, b, 1.0, str(s.get('id', i)), 1.0, HARMLESSNESS, 'revision'))
  if not pairs:
    raise _no_usable_pairs(len(samples), 'critique_revision records', counts)
  return pairs, counts


def load_pairs(ctx: bookkeeping.Context) -> tuple[list[Comparison], dict]:
  """The comparisons `dpo.pairs` names, oriented chosen-first, and their counts."""
  if ctx.config.dpo.pairs == 'revisions':
    schema = records_lib.REVISIONS
    path = schema.path(ctx.require('critique_revision', 'dpo (dpo.pairs=revisions)'))
  else:
    schema = records_lib.FEEDBACK
    path = schema.path(ctx.require('feedback', 'dpo'))
  if not path.exists():
    raise DPODataError(f'{path} is missing: the {schema.stage} stage writes it')
  records = records_lib.read_jsonl(path, schema)
  if ctx.config.dpo.pairs == 'revisions':
    pairs, counts = revision_pairs(records)
  else:
    pairs, counts = feedback_pairs(records, str(path))
  return [oriented(c) for c in pairs], {k.replace(' ', '_'): v for k, v in counts.items()}


@dataclasses.dataclass(frozen=True)
class EncodedPair:
  """A pair as two token rows (prompt, then response and its end-of-turn marker)."""

  chosen: tuple[int, ...]
  n_prompt_chosen: int  # the log-prob covers chosen[n_prompt_chosen:]
  rejected: tuple[int, ...]
  n_prompt_rejected: int
  p_chosen: float  # the label as given (>= 0.5): accuracy counts pairs with p != 0.5
  target: float  # what the loss fits (training_target)
  weight: float
  kind: str

  @property
  def prompt(self) -> tuple[int, ...]:
    return self.chosen[: self.n_prompt_chosen]


def encode_pairs(
    comparisons: Sequence[Comparison], tokenizer, fmt: str, max_len: int, cfg
) -> tuple[list[EncodedPair], int]:
  """Pairs tokenized as sft trains (`examples.encode`: the sampler's prompt, the response and its
  end-of-turn marker), and how many were dropped because no response token fit max_len."""
  out, dropped = [], 0
  for c in comparisons:
    chosen = examples_lib.encode(c.a[:-1], c.a[-1][1], tokenizer, fmt, max_len)
    rejected = examples_lib.encode(c.b[:-1], c.b[-1][1], tokenizer, fmt, max_len)
    if chosen is None or rejected is None:
      dropped += 1
      continue
    target = training_target(c.p_a, cfg.label_type, cfg.label_smoothing)
    out.append(EncodedPair(*chosen, *rejected, c.p_a, target, c.weight, c.kind))
  return out, dropped


def pack_pairs(
    pairs: Sequence[EncodedPair],
    rows: Sequence[int],
    length: int,
    pad_id: int,
    ref_logp: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
  """B pairs as 2B right-padded rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1] with their
  loss masks, the reference's log-probs `ref_logp[i] = (chosen, rejected)` and the targets;
  filler rows (-1) weigh 0."""
  examples, index = [], []
  for side in ('chosen', 'rejected'):
    for i in rows:
      if i >= 0:
        p = pairs[i]
        tokens, n_prompt = (
            (p.chosen, p.n_prompt_chosen) if side == 'chosen' else (p.rejected, p.n_prompt_rejected)
        )
        examples.append(examples_lib.Example('', side, tokens, n_prompt))
      index.append(len(examples) - 1 if i >= 0 else -1)
  batch = examples_lib.pack(examples, index, length, pad_id)
  ref = np.zeros((2 * len(rows),), np.float32)
  if ref_logp is not None:
    for r, i in enumerate(rows):
      if i >= 0:
        ref[r], ref[r + len(rows)] = ref_logp[i]
  batch.update(
      ref_logp=ref,
      target=np.array([pairs[i].target if i >= 0 else 0.5 for i in rows], np.float32),
      weight=np.array([pairs[i].weight if i >= 0 else 0.0 for i in rows], np.float32),
  )
  return batch


@functools.partial(jax.jit, static_argnums=(0, 4))
def _sequence_logprobs(graphdef, params, tokens, loss_mask, chunk):
  logp = sequence_logprobs(nnx.merge(graphdef, params), tokens, loss_mask, chunk)
  return sharding.constrain(logp, (None,))  # replicated: every host reads all of them


def pair_logprobs(
    graphdef, params, pairs: Sequence[EncodedPair], cfg, *, pad_id: int, max_len: int
) -> np.ndarray:
  """(chosen, rejected) sequence log-probs [N, 2] of `pairs` under a model, in batches of
  cfg.eval_batch_size pairs of similar length."""
  out = np.zeros((len(pairs), 2), np.float32)
  lengths = [max(len(p.chosen), len(p.rejected)) for p in pairs]
  batches = loop.epoch_batches(
      lengths, cfg.eval_batch_size, 0, 0, max_len=max_len, min_bucket=cfg.min_bucket, shuffle=False
  )
  for length, rows in batches:
    batch = loop.device_batch(pack_pairs(pairs, rows, length, pad_id))
    logp = np.asarray(
        jax.device_get(
            _sequence_logprobs(
                graphdef, params, batch['tokens'], batch['loss_mask'], cfg.loss_chunk
            )
        )
    )
    for r, i in enumerate(rows):
      if i >= 0:
        out[i] = logp[r], logp[r + len(rows)]
  return out


# ---- KL to the reference -------------------------------------------------------------------------


def sampled_kl(
    policy,
    reference,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    seed: int,
    tokenizer,
    stop_strings,
) -> float:
  """KL(policy || reference) per response: the policy samples each prompt at temperature 1, both
  models score the samples, and the k3 estimate (`rl.kl_penalty`, as PPO reports its `kl`) is
  summed over each response's tokens and averaged over responses."""
  out = sampling.generate(
      policy,
      prompts,
      max_new_tokens=max_new_tokens,
      temperature=1.0,
      stop_strings=stop_strings,
      tokenizer=tokenizer,
      seed=seed,
  )
  logp = sampling.score(policy, prompts, out.tokens).per_token
  ref_logp = sampling.score(reference, prompts, out.tokens).per_token
  per_response = [
      float(np.sum(rl.kl_penalty(jnp.asarray(a), jnp.asarray(b), 'k3')))
      for a, b in zip(logp, ref_logp)
  ]
  return float(np.mean(per_response)) if per_response else float('nan')


# ---- the stage -----------------------------------------------------------------------------------


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ('sft', 'feedback')  # the SL-CAI model (policy and reference) and the AI labels
MODELS = ()  # no given model


def upstream_unused(config, upstream: str) -> bool:
  """DPO on critique_revision's pairs (`dpo.pairs='revisions'`) needs no feedback."""
  return 'dpo' in config and upstream == 'feedback' and config.dpo.pairs == 'revisions'


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution and the prompt sources."""
  return stage_inputs.files(config)


def check_config(config) -> None:
  """Fails on dpo settings that cannot work (run before anything is written)."""
  cfg, problems = config.dpo, []
  if cfg.pairs not in PAIR_SOURCES:
    problems.append(f'pairs must be one of {", ".join(PAIR_SOURCES)}, got {cfg.pairs!r}')
  if cfg.label_type not in LABEL_TYPES:
    problems.append(f'label_type must be one of {", ".join(LABEL_TYPES)}, got {cfg.label_type!r}')
  if not 0.0 <= cfg.label_smoothing < 0.5:
    problems.append(f'label_smoothing must be in [0, 0.5), got {cfg.label_smoothing}')
  if not cfg.beta > 0:
    problems.append(f'beta must be > 0, got {cfg.beta}')
  if not 0.0 <= cfg.eval_fraction < 1.0:
    problems.append(f'eval_fraction must be in [0, 1), got {cfg.eval_fraction}')
  for field in ('batch_size', 'eval_batch_size', 'min_bucket'):
    if cfg[field] < 1:
      problems.append(f'{field} must be >= 1, got {cfg[field]}')
  if cfg.num_steps == 0 or cfg.num_steps < -1 or (cfg.num_steps == -1 and not cfg.epochs > 0):
    problems.append(
        f'num_steps must be >= 1 or -1 with epochs > 0, got {cfg.num_steps}, {cfg.epochs}'
    )
  if cfg.loss_chunk < 0:
    problems.append(f'loss_chunk must be >= 0, got {cfg.loss_chunk}')
  if cfg.kl_prompts < 0 or cfg.kl_max_new_tokens < 1:
    problems.append(
        f'kl_prompts must be >= 0 and kl_max_new_tokens >= 1, got {cfg.kl_prompts}, '
        f'{cfg.kl_max_new_tokens}'
    )
  if problems:
    raise DPODataError('config.dpo: ' + '; '.join(problems))


def run(ctx: bookkeeping.Context, stage_dir: Path) -> dict:
  """Trains the SL-CAI model with DPO; resumes from `stage_dir/checkpoints`.

  Writes metrics.jsonl (one row per step), tb/, checkpoints/ (none when dpo.checkpoint_every is
  0) and export/ (HF).
  """
  config, cfg = ctx.config, ctx.config.dpo
  check_config(config)
  sharding.check_batch_size(cfg.batch_size, 'dpo.batch_size')
  if cfg.batch_size % jax.process_count():
    raise sharding.ShardingError(
        f'dpo.batch_size {cfg.batch_size} is not divisible by the {jax.process_count()} processes'
    )
  comparisons, counts = load_pairs(ctx)
  # The policy starts as SL-CAI, which also stays frozen as the reference.
  policy = ctx.load_role('sft', cache=False)  # the train state holds the trained copy
  tok, fmt = policy.tokenizer, config.conversation_format
  pad_id = conversation.pad_id(tok, policy.config)
  max_len = min(cfg.max_len, config.model.max_len) if cfg.max_len > 0 else config.model.max_len
  train, held_out = comparisons_lib.split_held_out(comparisons, cfg.eval_fraction, config.seed)
  train, dropped_train = encode_pairs(train, tok, fmt, max_len, cfg)
  held_out, dropped_held = encode_pairs(held_out, tok, fmt, max_len, cfg)
  counts.update(
      pairs=len(comparisons),
      too_long=dropped_train + dropped_held,
      train=len(train),
      held_out=len(held_out),
  )
  if not train:
    raise DPODataError(
        f'dpo: no pairs to train on: {counts} (all held out by dpo.eval_fraction='
        f'{cfg.eval_fraction}, or too long for dpo.max_len={max_len})'
    )
  logging.info('dpo data: %s', counts)

  # The frozen reference, in model.frozen_param_dtype; its log-probs of every pair, once.
  reference = model_lib.with_param_dtype(policy.model, bookkeeping.frozen_param_dtype(config.model))
  ref_graphdef, ref_params = nnx.split(reference)
  logprobs = functools.partial(pair_logprobs, cfg=cfg, pad_id=pad_id, max_len=max_len)
  ref_train = logprobs(ref_graphdef, ref_params, train)
  ref_held = logprobs(ref_graphdef, ref_params, held_out)

  lengths = [max(len(p.chosen), len(p.rejected)) for p in train]
  plan, steps_per_epoch, total_steps = loop.plan_epochs(cfg, lengths, config.seed, max_len)
  tx, schedule = train_lib.make_optimizer(cfg.optimizer, total_steps, 'dpo.optimizer')
  graphdef, state, shardings = train_lib.init_state(policy.model, tx)
  model_config = policy.config
  policy = dataclasses.replace(policy, model=None)  # the reference and the train state remain
  train_step = train_lib.make_train_step(
      graphdef, tx, make_loss_fn(cfg.beta, cfg.loss_chunk), shardings, schedule, seed=config.seed
  )

  kl_prompts = list(dict.fromkeys(p.prompt for p in held_out))[: cfg.kl_prompts]

  def evaluate(params) -> dict:
    if not held_out:
      return {}
    logp = logprobs(graphdef, params, held_out)
    target = np.array([p.target for p in held_out], np.float32)
    p_chosen = np.array([p.p_chosen for p in held_out], np.float32)
    weight = np.array([p.weight for p in held_out], np.float32)
    _, aux = dpo_loss(
        logp[:, 0], logp[:, 1], ref_held[:, 0], ref_held[:, 1], p_chosen, cfg.beta, weight
    )
    loss, _ = dpo_loss(
        logp[:, 0], logp[:, 1], ref_held[:, 0], ref_held[:, 1], target, cfg.beta, weight
    )
    out = {'eval_loss': float(loss), **{f'eval_{k}': float(v) for k, v in aux.items()}}
    if kl_prompts:
      out['eval_kl'] = sampled_kl(
          nnx.merge(graphdef, params),
          reference,
          kl_prompts,
          max_new_tokens=cfg.kl_max_new_tokens,
          seed=config.seed + cfg.seed_offset,
          tokenizer=tok,
          stop_strings=conversation.stop_strings(fmt, tok),
      )
    return out

  result = loop.fit(
      stage='dpo',
      stage_dir=stage_dir,
      state=state,
      shardings=shardings,
      train_step=train_step,
      plan=plan,
      steps_per_epoch=steps_per_epoch,
      make_batch=lambda length, rows: pack_pairs(train, rows, length, pad_id, ref_train),
      total_steps=total_steps,
      cfg=cfg,
      evaluate=evaluate,
      postfix={'loss': '{loss:.3f}', 'acc': '{accuracy:.2f}'},
  )
  state, metrics, eval_metrics = result.state, result.metrics, result.eval_metrics
  if result.start == total_steps:  # resumed after the last step: evaluate again
    eval_metrics = evaluate(state.params)
  if not metrics and jax.process_index() == 0:  # resumed after the last step: report from the log
    metrics = (metrics_lib.read_metrics(stage_dir / 'metrics.jsonl') or [{}])[-1]
  fmt3 = lambda x: 'n/a' if x is None or math.isnan(x) else f'{x:.3f}'  # noqa: E731
  print(
      f'dpo: {counts["train"]} training pairs, held-out accuracy '
      f'{fmt3(eval_metrics.get("eval_accuracy"))}, KL to SL-CAI '
      f'{fmt3(eval_metrics.get("eval_kl"))}',
      flush=True,
  )

  model = nnx.merge(graphdef, train_lib.gather_params(state.params))
  export = stage_dir / 'export'
  checkpoint.save_pretrained(checkpoint.Pretrained(model, tok, model_config), str(export))
  return {
      **counts,
      'pairs_source': cfg.pairs,
      'label_type': cfg.label_type,
      'beta': cfg.beta,
      'steps': total_steps,
      'steps_run': total_steps - result.start,
      'steps_per_epoch': steps_per_epoch,
      'train_seconds': result.seconds,
      'final_loss': metrics.get('loss'),
      'final_accuracy': metrics.get('accuracy'),
      **eval_metrics,
      'export': str(export),
  }
