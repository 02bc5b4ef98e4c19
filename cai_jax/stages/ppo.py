"""Stage `ppo`: RL-CAI, PPO of the SL-CAI policy against the preference model (paper section 4).

One PPO step follows a batch of prompts from sampling to update:

1. prompts: red-team and helpful train prompts, mixed by `ppo.helpful_fraction`, rendered in
   `config.conversation_format` -- a prompt that continues a multi-turn red-team conversation
   with the turns before it (`data.prompt_turns`);
2. rollout: `sampling.generate` (or the engine, `config.sampling.engine`) samples a response per
   prompt from the current policy;
3. reward: the PM scores each rendered (conversation, response) (or the toy synthetic reward),
   with a penalty for responses cut at `max_new_tokens`, optionally normalized and clipped;
4. one jitted forward gives the policy's log-probs (the "old" log-probs), the frozen reference's
   log-probs and the value estimates; the per-token reward is -beta * KL(policy || reference)
   plus the score at the last token (rl.per_token_rewards); GAE and whitening give advantages;
5. `epochs` x `minibatches` jitted updates of the clipped policy loss, the clipped value loss
   and an entropy bonus, with separate AdamW optimizers for the policy and the value function;
6. the adaptive KL controller (if on) moves beta toward its target.

Old log-probs are recomputed by a training-layout forward rather than taken from the sampler:
the sampler's values come from the cached decode (a different computation order, and the raw
logits before temperature), so the first update's ratio would not be exactly 1. The forward
is needed for the values and reference log-probs anyway; `logprob_gap` in the metrics reports
how far the sampler's log-probs were from it at temperature 1 (float32: ~1e-6 on the tiny model,
~5e-5 on SmolLM2-135M).

Outputs in the stage directory: `metrics.jsonl` + `tb/` (per step), `samples.jsonl` (every
`sample_every` steps), `checkpoints/` (orbax; resumed automatically), `snapshots/step_NNNNNN/`
(the policy every `evaluate.rl_curve_every` steps, HF directories for evaluate's curves over RL)
and `export/` (the RL-CAI policy as an HF directory).

Why one module of ~615 lines: the PPO math lives in `method/rl.py` and `method/ppo_learner.py`;
what stays here is the stage's loop -- prompts, rollouts, rewards, updates, checkpoint and
resume, samples -- whose helpers share the loop's state and config; split, each would be read
only beside the loop.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cai_jax import bookkeeping, sampling
from cai_jax.method import comparisons as comparisons_lib
from cai_jax.method import conversation, data, generated, rl
from cai_jax.method import preference_model as pm_lib
from cai_jax.method import stage_inputs
from cai_jax.method.ppo_learner import (
    ActorCritic,
    make_loss_fn,
    make_rollout_fn,
    pack_rollout,
    per_model_optimizer,
)
from cai_jax.method.snapshots import save_snapshot, snapshot_steps
from cai_jax.models import checkpoint, lora
from cai_jax.models import decoder as model_lib
from cai_jax.models.decoder import ScalarHeadModel
from cai_jax.training import checkpoints as checkpoints_lib
from cai_jax.training import loop
from cai_jax.training import metrics as metrics_lib
from cai_jax.training import train_lib
from cai_jax.utils import records as records_lib
from cai_jax.utils import sharding

_REDTEAM_STREAM, _HELPFUL_STREAM, _SAMPLING_STREAM, _MINIBATCH_STREAM = 0, 1, 2, 3  # seed streams


class PPOError(bookkeeping.StageError):
  """A PPO run that cannot go on: bad models or config, no prompts, a non-finite loss."""


# ---- prompts -------------------------------------------------------------------------------------


def step_prompts(
    redteam: Sequence[dict],
    helpful: Sequence[dict],
    step: int,
    batch_size: int,
    helpful_fraction: float,
    seed: int,
) -> list[dict]:
  """The prompt records of the `step`-th rollout (0-based): a pure function of it, so resuming is free.

  Each stream (red-team, helpful) is read in order of a fresh seeded permutation per pass.
  """
  n_helpful = int(round(batch_size * helpful_fraction))
  out = []
  for stream, items, n in (
      (_REDTEAM_STREAM, redteam, batch_size - n_helpful),
      (_HELPFUL_STREAM, helpful, n_helpful),
  ):
    for i in range(step * n, (step + 1) * n):
      epoch, j = divmod(i, len(items))
      order = np.random.default_rng([seed, stream, epoch]).permutation(len(items))
      out.append(items[order[j]])
  return out


def encode_prompt(
    turns: Sequence[conversation.Turn], tokenizer, fmt: str, max_tokens: int
) -> list[int]:
  """The rendered prompt's ids (`conversation.encode`, as sft and the sampler encode them).

  `turns`: the prompt's conversation (`data.prompt_turns`). One over `max_tokens` sheds its
  oldest exchanges first (`conversation.fit_turns`), never the request; a request still too
  long keeps its end and its BOS.
  """
  turns = conversation.fit_turns(turns, fmt, tokenizer, max_tokens)
  ids, _ = conversation.encode(tokenizer, conversation.render(turns, fmt, tokenizer))
  return conversation.keep_last(ids, max_tokens, tokenizer)


# ---- rewards -------------------------------------------------------------------------------------


def synthetic_scores(
    responses: Sequence[Sequence[int]], token_id: int, max_new_tokens: int
) -> np.ndarray:
  """The toy reward: the share of the response budget spent on one chosen token, in [0, 1]."""
  return np.array([sum(t == token_id for t in r) / max_new_tokens for r in responses], np.float32)


def shape_scores(
    scores: np.ndarray, truncated: np.ndarray, cfg, reward_stats: dict
) -> tuple[np.ndarray, dict]:
  """Scores -> the reward at each response's last token, and the updated running stats.

  Normalization (running mean/std) and clipping act on the score; the truncation penalty is
  applied after them, so it is in the same units whatever the PM's scale.
  """
  rewards = jnp.asarray(scores, jnp.float32)
  if cfg.reward_normalize:
    rewards, reward_stats = rl.normalize_rewards(rewards, reward_stats)
  rewards = rl.clip_rewards(rewards, cfg.reward_clip if cfg.reward_clip > 0 else None)
  rewards = np.asarray(rewards, np.float32)
  if cfg.truncation_mode == 'add':
    rewards = rewards + np.float32(cfg.truncation_penalty) * truncated
  elif cfg.truncation_mode == 'replace':
    rewards = np.where(truncated, np.float32(cfg.truncation_penalty), rewards)
  return rewards.astype(np.float32), reward_stats


# ---- rollouts ------------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


# ---- setup ---------------------------------------------------------------------------------------


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ('sft', 'preference')  # the policy's initialization and the PM
MODELS = ()  # no given model: the policy is the SFT model's export
OPTIONAL = ('prompt_generation',)  # its prompts join the train split (prompt_generation.feed)


def upstream_unused(config, upstream: str) -> bool:
  """A synthetic reward needs no PM; an explicit `ppo.policy_source` needs no SFT model."""
  if 'ppo' not in config:
    return False
  return (upstream == 'preference' and config.ppo.reward == 'synthetic') or (
      upstream == 'sft' and bool(config.ppo.policy_source)
  )


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution and the prompt sources."""
  return stage_inputs.files(config)


def fingerprint_fields(config) -> dict:
  """Config outside `ppo` it depends on: `evaluate.rl_curve_every` (the policy snapshots kept)."""
  if not config.get('evaluate', {}).get('rl_curve_every', 0):
    return {}
  return {'rl_curve_every': config.evaluate.rl_curve_every}


def check_config(config) -> int:
  """Problems with config.ppo as one error; returns the prompt token budget."""
  cfg, max_len = config.ppo, config.model.max_len
  problems = []
  if cfg.reward not in ('preference', 'synthetic'):
    problems.append(f"reward must be 'preference' or 'synthetic', got {cfg.reward!r}")
  if cfg.truncation_mode not in ('add', 'replace', 'none'):
    problems.append(
        f"truncation_mode must be 'add', 'replace' or 'none', got {cfg.truncation_mode!r}"
    )
  for field in (
      'steps',
      'batch_size',
      'max_new_tokens',
      'epochs',
      'minibatches',
      'max_prompt_tokens',
  ):
    if cfg[field] < 1:
      problems.append(f'{field} must be >= 1, got {cfg[field]}')
  if cfg.minibatches >= 1 and cfg.batch_size % cfg.minibatches:
    problems.append(
        f'batch_size {cfg.batch_size} does not split into {cfg.minibatches} minibatches'
    )
  if not 0.0 <= cfg.helpful_fraction <= 1.0:
    problems.append(f'helpful_fraction must be in [0, 1], got {cfg.helpful_fraction}')
  if not cfg.temperature > 0:
    problems.append(f'temperature must be > 0 (PPO samples from the policy), got {cfg.temperature}')
  if cfg.kl.adaptive and not (cfg.kl.target > 0 and cfg.kl.horizon > 0):
    problems.append('an adaptive KL controller needs kl.target > 0 and kl.horizon > 0')
  max_prompt_tokens = min(cfg.max_prompt_tokens, max_len - cfg.max_new_tokens)
  if max_prompt_tokens < 1:
    problems.append(
        f'max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in '
        f'config.model.max_len={max_len}'
    )
  if problems:
    raise PPOError('config.ppo: ' + '; '.join(problems))
  return max_prompt_tokens


def _prompt_pools(ctx, cfg) -> tuple[list[dict], list[dict]]:
  """The red-team and helpful train splits (only those the mix draws from)."""
  redteam = data.stage_prompts(ctx, 'redteam', 'ppo')['train'] if cfg.helpful_fraction < 1 else []
  helpful = data.stage_prompts(ctx, 'helpful', 'ppo')['train'] if cfg.helpful_fraction > 0 else []
  n_helpful = int(round(cfg.batch_size * cfg.helpful_fraction))
  for name, items, n in (
      ('red-team', redteam, cfg.batch_size - n_helpful),
      ('helpful', helpful, n_helpful),
  ):
    if n and not items:
      raise PPOError(
          f'ppo: the {name} train split is empty, but ppo.helpful_fraction='
          f'{cfg.helpful_fraction} asks for {n} {name} prompts per step (see config.data)'
      )
  return redteam, helpful


def check_same_tokenizer(
    policy: checkpoint.Pretrained, pm: checkpoint.Pretrained, where: str
) -> None:
  """The PM must read the policy's tokens as the policy means them (and a value net built
  from the PM must share the policy's vocabulary)."""
  a, b = policy.tokenizer.get_vocab(), pm.tokenizer.get_vocab()
  if a != b or policy.config.vocab_size != pm.config.vocab_size:
    differ = sum(1 for k in set(a) | set(b) if a.get(k) != b.get(k))
    raise PPOError(
        f"the preference model ({where}) does not match the policy's tokenizer: "
        f'{len(b)} vs {len(a)} tokens ({differ} differ), model vocabularies '
        f'{pm.config.vocab_size} vs {policy.config.vocab_size}; train the PM from the '
        'same base model as the policy'
    )


def _load_pm(
    ctx, policy: checkpoint.Pretrained, needed_by: str, *, frozen: bool
) -> checkpoint.Pretrained:
  ctx.require('preference', needed_by)
  # A frozen PM scores the whole stage; a trained one (the value net's start) is copied into the
  # train state, so it is not kept.
  pm = ctx.load_role('preference', scalar_head=True, frozen=frozen, cache=frozen)
  check_same_tokenizer(policy, pm, ctx.model_source('preference'))
  return pm


def _value_model(ctx, cfg, policy: checkpoint.Pretrained) -> ScalarHeadModel:
  new_head = lambda trunk: ScalarHeadModel(
      policy.config, rngs=nnx.Rngs(params=ctx.config.seed + 1), trunk=trunk
  )
  if cfg.value.shared_trunk:
    return new_head(policy.model)
  if cfg.value.init == 'preference':  # the PM's trunk and head (the stage's PM stays untouched)
    return _load_pm(ctx, policy, 'ppo (ppo.value.init=preference)', frozen=False).model
  if cfg.value.init == 'policy':  # a copy of the policy's trunk, not shared with it
    return new_head(nnx.clone(policy.model))
  value = ctx.load(cfg.value.init, scalar_head=True, cache=False)
  if value.config.vocab_size != policy.config.vocab_size:
    raise PPOError(
        f'ppo.value.init={cfg.value.init!r}: vocabulary {value.config.vocab_size} '
        f"differs from the policy's {policy.config.vocab_size}"
    )
  return value.model


class _Scorer:
  """The score of each (prompt, response): the PM's, or the toy synthetic reward."""

  def __init__(self, ctx, cfg, policy: checkpoint.Pretrained, max_prompt_tokens: int):
    self.cfg, self.fmt = cfg, ctx.config.conversation_format
    if cfg.reward == 'preference':
      self.pm = _load_pm(ctx, policy, 'ppo', frozen=True)
      # Every conversation pads to one length that holds a full prompt and response.
      self.bucket = min(
          cfg.pm_max_len, 1 << (max_prompt_tokens + cfg.max_new_tokens + 8 - 1).bit_length()
      )
    else:
      # Not a prompt: the id of a token the policy may generate, so no BOS belongs in front.
      ids = policy.tokenizer(cfg.synthetic_text, add_special_tokens=False)['input_ids']
      if not ids:
        raise PPOError(f'ppo.synthetic_text={cfg.synthetic_text!r} encodes to no token')
      self.token_id = int(ids[0])

  def __call__(self, step: int, records, responses: list[str], response_tokens) -> np.ndarray:
    cfg = self.cfg
    if cfg.reward == 'preference':
      return pm_lib.score_conversations(
          self.pm,
          [comparisons_lib.response_conversation(r, text) for r, text in zip(records, responses)],
          fmt=self.fmt,
          batch_size=min(cfg.pm_batch_size, cfg.batch_size),
          max_len=cfg.pm_max_len,
          min_bucket=self.bucket,
      )
    scores = synthetic_scores(response_tokens, self.token_id, cfg.max_new_tokens)
    return np.full_like(scores, np.nan) if step == cfg.synthetic_nan_step else scores


# ---- the stage -----------------------------------------------------------------------------------


def run(ctx: bookkeeping.Context, stage_dir: Path) -> dict:
  config, cfg = ctx.config, ctx.config.ppo
  max_prompt_tokens = check_config(config)
  sharding.check_batch_size(cfg.batch_size // cfg.minibatches, 'ppo minibatch size')
  fmt, seed = config.conversation_format, config.seed + cfg.seed_offset
  redteam, helpful = _prompt_pools(ctx, cfg)

  # The policy starts as SL-CAI, which also stays frozen as the KL reference.
  policy_source = cfg.policy_source or ctx.model_source('sft')
  policy = ctx.load(policy_source, cache=False)  # the train state holds the trained copy
  tok = policy.tokenizer
  pad_id = conversation.pad_id(tok, policy.config)
  score = _Scorer(ctx, cfg, policy, max_prompt_tokens)
  # The frozen KL reference, in model.frozen_param_dtype (the learner trains a copy of the policy).
  # With LoRA it is the learner's own base with the adapters off, read from the train state: no
  # second copy of the weights.
  ref_graphdef, ref_params = None, None
  if not lora.has_adapters(policy.model):
    ref_graphdef, ref_params = nnx.split(
        model_lib.with_param_dtype(policy.model, bookkeeping.frozen_param_dtype(config.model))
    )

  # The learner, with separate AdamW optimizers (and schedules) for the policy and the value.
  n_updates = cfg.steps * cfg.epochs * cfg.minibatches
  policy_tx, policy_lr = train_lib.make_optimizer(
      cfg.policy_optimizer, n_updates, 'ppo.policy_optimizer'
  )
  value_tx, value_lr = train_lib.make_optimizer(
      cfg.value_optimizer, n_updates, 'ppo.value_optimizer'
  )
  tx = per_model_optimizer({'policy': policy_tx, 'value': value_tx})
  graphdef, train_state, shardings = train_lib.init_state(
      ActorCritic(policy.model, _value_model(ctx, cfg, policy)), tx
  )
  policy = dataclasses.replace(policy, model=None)  # frees the loaded copy (HBM) for the learner
  train_step = train_lib.make_train_step(
      graphdef, tx, make_loss_fn(cfg), shardings, policy_lr, seed=seed
  )
  rollout_fn = make_rollout_fn(graphdef, ref_graphdef, cfg)

  # A checkpoint holds the learner, the KL coefficient and the reward statistics; the step is
  # the data position (a step's prompts and samples are functions of it).
  kl_ctl = rl.kl_controller_init(cfg.kl.coef, cfg.kl.target, cfg.kl.horizon, cfg.kl.adaptive)
  state = dict(
      train=train_state,
      kl_coef=jnp.float32(kl_ctl['coef']),
      reward_stats={k: jnp.float32(v) for k, v in rl.running_stats_init().items()},
  )
  ckpt = checkpoints_lib.Checkpointer(
      stage_dir / 'checkpoints', save_every=cfg.checkpoint_every, max_to_keep=cfg.max_to_keep
  )
  start = ckpt.latest_step() or 0
  if start:
    state = ckpt.restore_latest(state)
    metrics_lib.announce(f'ppo: resumed from the checkpoint after step {start}')
  writer = metrics_lib.MetricsWriter(stage_dir, resume_step=start)
  guard = train_lib.Guard('ppo', cfg.get('guard'), stage_dir, state['train'].params)
  samples_path = records_lib.PPO_SAMPLES.path(stage_dir)
  _truncate_samples(samples_path, start)

  stops = conversation.stop_strings(fmt, tok)
  snapshots = set(snapshot_steps(config))
  bar = metrics_lib.progress(cfg.steps, start, 'ppo')
  # With config.sampling.engine the rollouts go through one engine of the policy's structure.
  engine = sampling.Engine.from_config(
      nnx.merge(graphdef, state['train'].params).policy, config, tok
  )
  t_start = time.time()
  for step in range(start + 1, cfg.steps + 1):  # 1-based, as in metrics.jsonl and checkpoints
    t0 = time.time()
    # 1. Prompts, and one padded prompt length for sampling and training (few compilations).
    records = step_prompts(redteam, helpful, step - 1, cfg.batch_size, cfg.helpful_fraction, seed)
    prompt_ids = [encode_prompt(data.prompt_turns(r), tok, fmt, max_prompt_tokens) for r in records]
    prompt_len = sampling.length_bucket(max(len(p) for p in prompt_ids), cfg.min_prompt_bucket)

    # 2. Rollout from the current policy (the train state's own arrays: no copy).
    current = nnx.merge(graphdef, state['train'].params).policy
    kw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop_strings=stops,
              seed=_seed(seed, _SAMPLING_STREAM, step))  # fmt: skip
    if engine is not None:  # the current weights as an argument; its prefix pages are emptied
      out = engine.generate_output(prompt_ids, params=nnx.state(current), **kw)
    else:
      out = sampling.generate(
          current, prompt_ids, tokenizer=tok, min_prompt_bucket=prompt_len, **kw
      )
    t_sample = time.time() - t0
    responses = [t.lstrip() if fmt == 'transcript' else t for t in out.texts]
    truncated = np.array([f == 'length' for f in out.finish_reason], np.float32)

    # 3. Reward at the last token.
    scores = score(step, records, responses, out.tokens)
    final_rewards, reward_stats = shape_scores(scores, truncated, cfg, state['reward_stats'])
    state['reward_stats'] = {k: jnp.float32(v) for k, v in reward_stats.items()}

    # 4. Old and reference log-probs, values, KL-penalized rewards, advantages.
    rollout = pack_rollout(
        prompt_ids,
        out.tokens,
        prompt_len=prompt_len,
        response_len=cfg.max_new_tokens,
        pad_id=pad_id,
    )
    stats = jax.device_get(
        rollout_fn(
            state['train'].params,
            ref_params,
            loop.device_batch(rollout),
            jnp.asarray(final_rewards),
            state['kl_coef'],
        )
    )
    rollout.update(
        {k: np.asarray(stats[k]) for k in ('old_logp', 'old_values', 'advantages', 'returns')}
    )

    # 5. epochs x minibatches updates of the policy and the value function.
    t1 = time.time()
    state['train'], updates = _train_on(state['train'], train_step, rollout, cfg, seed, step)
    t_train = time.time() - t1
    _stop_if_not_finite(updates, step, ckpt, bar, writer)

    # 6. The KL controller sees this step's KL; the next rollout uses the new coefficient.
    kl_coef = float(state['kl_coef'])
    kl_ctl = rl.kl_controller_update(dict(kl_ctl, coef=kl_coef), float(stats['kl']), cfg.batch_size)
    state['kl_coef'] = jnp.float32(kl_ctl['coef'])

    metrics = _step_metrics(scores, final_rewards, stats, updates, out, truncated, rollout, cfg)
    metrics.update(
        kl_coef=kl_coef,
        lr=updates[-1]['lr'],
        value_lr=float(value_lr(int(state['train'].step) - 1)),
        sample_seconds=t_sample,
        train_seconds=t_train,
        step_seconds=time.time() - t0,
    )
    if guard.broken(metrics):  # off a cliff without a NaN: stop as the NaN guard does
      _close(ckpt, bar, writer)
      guard.check(step, metrics, ckpt)
    writer.write(step, metrics)
    if cfg.sample_every and step % cfg.sample_every == 0 and jax.process_index() == 0:
      _write_samples(samples_path, step, records, responses, scores, final_rewards,
                     stats['kl_per_response'], out.finish_reason, cfg.num_samples)  # fmt: skip
    if step in snapshots:  # before the checkpoint: a run resumed after this step has it
      params = train_lib.gather_params(state['train'].params)
      save_snapshot(nnx.merge(graphdef, params).policy, tok, policy.config, stage_dir, step)
    ckpt.save(step, state, force=step == cfg.steps)
    bar.update(1)
    bar.set_postfix(score=f'{metrics["score_mean"]:.3f}', kl=f'{metrics["kl"]:.3f}')
  bar.close()
  ckpt.close()
  writer.close()

  export = stage_dir / 'export'
  rl_cai = nnx.merge(graphdef, train_lib.gather_params(state['train'].params)).policy
  checkpoint.save_pretrained(
      checkpoint.Pretrained(rl_cai, tok, policy.config, str(export)), str(export)
  )
  history = metrics_lib.read_metrics(stage_dir / 'metrics.jsonl')
  mean = lambda rows, k: float(np.mean([r[k] for r in rows])) if rows else None
  return {
      'steps': cfg.steps,
      'resumed_from': start,
      'seconds': time.time() - t_start,
      'score_mean_first10': mean(history[:10], 'score_mean'),
      'score_mean_last10': mean(history[-10:], 'score_mean'),
      'kl_last': history[-1]['kl'] if history else None,
      'policy_source': policy_source,
      'prompt_sources': generated.source_counts(
          redteam + helpful
      ),  # the pools the batches drew from
      'export': str(export),
      **sampling.engine_summary(engine),
  }


def _train_on(train_state, train_step, rollout: dict[str, np.ndarray], cfg, seed: int, step: int):
  """`epochs` passes over the rollout batch in `minibatches` seeded random minibatches."""
  updates, size = [], cfg.batch_size // cfg.minibatches
  for epoch in range(cfg.epochs):
    order = np.random.default_rng([seed, _MINIBATCH_STREAM, step, epoch]).permutation(
        cfg.batch_size
    )
    for k in range(cfg.minibatches):
      rows = order[k * size : (k + 1) * size]
      train_state, m = train_step(
          train_state, loop.device_batch({n: v[rows] for n, v in rollout.items()})
      )
      updates.append(m)
  return train_state, [train_lib.host_metrics(m) for m in updates]


def _stop_if_not_finite(updates, step, ckpt, bar, writer) -> None:
  """A NaN/inf loss ends the run without saving its state; the last good checkpoint stays."""
  if not train_lib.non_finite(updates):
    return
  _close(ckpt, bar, writer)
  train_lib.check_finite('ppo', step, updates, ckpt)


def _close(ckpt, bar, writer) -> None:
  bar.close()
  ckpt.close()  # waits for the last good save, if one is in flight
  writer.close()


def _step_metrics(scores, final_rewards, stats, updates, out, truncated, rollout, cfg) -> dict:
  metrics = {
      'reward_mean': float(final_rewards.mean()),
      'reward_std': float(final_rewards.std()),
      'score_mean': float(np.mean(scores)),
      'score_std': float(np.std(scores)),
      'kl': float(stats['kl']),
      'kl_penalty': float(stats['kl_penalty']),
      **{
          k: float(np.mean([m[k] for m in updates]))
          for k in (
              'entropy',
              'clipfrac',
              'approx_kl',
              'ratio',
              'policy_loss',
              'value_loss',
              'value_clipfrac',
              'loss',
              'grad_norm',
          )
      },
      'param_norm': updates[-1]['param_norm'],  # after this step's last update
      'explained_variance': float(stats['explained_variance']),
      'value_mean': float(stats['value_mean']),
      'return_mean': float(stats['return_mean']),
      'response_length': float(np.mean([len(t) for t in out.tokens])),
      'truncated_fraction': float(truncated.mean()),
  }
  if cfg.temperature == 1.0:  # how far the sampler's log-probs were from the training forward's
    metrics['logprob_gap'] = max(
        (
            float(np.max(np.abs(lp - rollout['old_logp'][i, : len(lp)])))
            for i, lp in enumerate(out.logprobs)
            if len(lp)
        ),
        default=0.0,
    )
  return metrics


def _write_samples(
    path: Path, step: int, records, responses, scores, rewards, kls, finish_reasons, n: int
) -> None:
  with path.open('a') as f:
    for i in range(min(n, len(records))):
      f.write(
          json.dumps(
              {
                  'step': step,
                  'id': records[i]['id'],
                  'source': records[i].get('source'),
                  'prompt': records[i]['prompt'],
                  # multi-turn prompts only: single-turn records stay as they were
                  **({'conversation': c} if (c := records[i].get('conversation')) else {}),
                  'response': responses[i],
                  'score': float(scores[i]),
                  'reward': float(rewards[i]),
                  'kl': float(kls[i]),
                  'finish_reason': finish_reasons[i],
              }
          )
          + '\n'
      )


def _truncate_samples(path: Path, resume_step: int) -> None:
  """Drops samples of steps after the checkpoint a resumed run restarts from.

  A line filter rather than `records.read_jsonl`: the kept lines stay byte for byte as written,
  and an unreadable line (cut short by a kill) is dropped wherever it is.
  """
  if jax.process_index() != 0 or not path.exists():
    return
  keep = []
  for line in path.read_text().splitlines():
    try:
      if json.loads(line)['step'] <= resume_step:
        keep.append(line + '\n')
    except (ValueError, KeyError):  # a line cut short by a kill
      continue
  path.write_text(''.join(keep))
