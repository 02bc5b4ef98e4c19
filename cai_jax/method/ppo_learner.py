"""PPO's learner (Bai et al. 2022, section 4.1; the math is cai_jax/method/rl.py): the policy and
value models trained together (`ActorCritic`, each with its own optimizer), the clipped PPO loss
over a packed rollout (`make_loss_fn`, `pack_rollout`), and the jitted rollout forward that gives
the policy's and the reference's log-probs and the values (`make_rollout_fn`). The ppo stage runs
them in its own loop: a step is a rollout, not a batch."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cai_jax.method import rl
from cai_jax.models import lora
from cai_jax.models.decoder import Decoder, ScalarHeadModel


def response_logits(
    policy: Decoder, tokens, positions, key_mask, prompt_len: int, temperature: float, hidden=None
):
  """Logits [B, R, V] / temperature that predict the response tokens tokens[:, prompt_len:].

  Only the R response positions go through the LM head (the [B, T, V] logits never exist).
  """
  if hidden is None:
    hidden, _ = policy.hidden(tokens, positions, key_mask)
  return policy.logits_from_hidden(hidden[:, prompt_len - 1 : -1]) / temperature


def token_logprobs(logits, targets):
  """log softmax(logits)[targets]: [B, R, V], [B, R] -> [B, R] (float32)."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


class ActorCritic(nnx.Module):
  """The PPO learner: the policy LM and the value function V(prefix).

  The value function is its own ScalarHeadModel, or (`shared_trunk`) a head on the policy's
  trunk: then `value.trunk is policy`, and nnx keeps the shared parameters once, under 'policy',
  so the 'value' part of the parameters is only the head.
  """

  def __init__(self, policy: Decoder, value: ScalarHeadModel):
    self.policy = policy
    self.value = value

  def __call__(self, tokens, positions, key_mask, prompt_len: int, temperature: float):
    """(logits [B, R, V] of the response tokens, values [B, R] of the states before them)."""
    hidden, _ = self.policy.hidden(tokens, positions, key_mask)
    logits = response_logits(
        self.policy, tokens, positions, key_mask, prompt_len, temperature, hidden
    )
    if self.value.trunk is self.policy:
      values = self.value.values_from_hidden(hidden)
    else:
      values = self.value.values(tokens, positions, key_mask)
    return logits, values[:, prompt_len - 1 : -1]


def per_model_optimizer(
    txs: dict[str, optax.GradientTransformation],
) -> optax.GradientTransformation:
  """One optax optimizer per top-level part of the parameters ('policy', 'value').

  Unlike optax.multi_transform, each part's state holds only its own parameters, so it is laid
  out (and checkpointed) like them.
  """

  def init(params):
    return {k: tx.init(params[k]) for k, tx in txs.items()}

  def update(grads, state, params=None):
    updates, new_state = nnx.State({}), {}
    for k, tx in txs.items():
      updates[k], new_state[k] = tx.update(
          grads[k], state[k], None if params is None else params[k]
      )
    return updates, new_state

  return optax.GradientTransformation(init, update)


def make_loss_fn(cfg):
  """The per-update loss `(ActorCritic, minibatch) -> (loss, aux)` for train_lib.make_train_step.

  minibatch: tokens, positions, key_mask [B, P + R] (left-padded prompt, right-padded response);
  response_mask, old_logp, old_values, advantages, returns [B, R].
  """
  temperature = float(cfg.temperature)

  def loss_fn(ac: ActorCritic, batch):
    mask = batch['response_mask']
    prompt_len = batch['tokens'].shape[1] - mask.shape[1]
    logits, values = ac(
        batch['tokens'], batch['positions'], batch['key_mask'], prompt_len, temperature
    )
    logp = token_logprobs(logits, batch['tokens'][:, prompt_len:])
    policy_loss, policy_aux = rl.ppo_policy_loss(
        logp, batch['old_logp'], batch['advantages'], mask, cfg.clip_eps
    )
    value_loss, value_aux = rl.ppo_value_loss(
        values, batch['old_values'], batch['returns'], mask, cfg.value_clip_eps
    )
    entropy = rl.entropy_from_logits(logits, mask)
    loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy
    return loss, dict(
        policy_loss=policy_loss, value_loss=value_loss, entropy=entropy, **policy_aux, **value_aux
    )

  return loss_fn


def make_rollout_fn(graphdef, ref_graphdef, cfg):
  """The jitted rollout forward: old log-probs, reference log-probs, values, rewards, advantages.

  `(params, ref_params, batch, final_rewards [B], kl_coef) -> dict` of [B, R] arrays and scalars.
  """
  temperature = float(cfg.temperature)

  @jax.jit
  def rollout_fn(params, ref_params, batch, final_rewards, kl_coef):
    mask = batch['response_mask']
    prompt_len = batch['tokens'].shape[1] - mask.shape[1]
    targets = batch['tokens'][:, prompt_len:]
    inputs = (batch['tokens'], batch['positions'], batch['key_mask'])
    logits, values = nnx.merge(graphdef, params)(*inputs, prompt_len, temperature)
    logp = token_logprobs(logits, targets)
    if ref_graphdef is None:  # LoRA: the reference is the policy with its adapters off
      reference = nnx.merge(graphdef, lora.disabled(params)).policy
    else:
      reference = nnx.merge(ref_graphdef, ref_params)
    ref_logits = response_logits(reference, *inputs, prompt_len, temperature)
    ref_logp = token_logprobs(ref_logits, targets)
    rewards = rl.per_token_rewards(final_rewards, logp, ref_logp, mask, kl_coef, cfg.kl.estimator)
    advantages, returns = rl.gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
      advantages = rl.masked_whiten(advantages, mask)
    # KL per response (sum over its tokens), averaged over responses: k3 (>= 0) is reported and
    # steers the adaptive controller; the penalty is what the reward actually subtracted.
    kl_per_response = rl.masked_sum(rl.kl_penalty(logp, ref_logp, 'k3'), mask, axis=1)
    kl_penalty = (
        kl_coef
        * rl.masked_sum(rl.kl_penalty(logp, ref_logp, cfg.kl.estimator), mask, axis=1).mean()
    )
    return dict(
        old_logp=logp * mask,
        old_values=values * mask,
        advantages=advantages,
        returns=returns,
        kl=kl_per_response.mean(),
        kl_per_response=kl_per_response,
        kl_penalty=kl_penalty,
        explained_variance=rl.explained_variance(values, returns, mask),
        value_mean=rl.masked_mean(values, mask),
        return_mean=rl.masked_mean(returns, mask),
    )

  return rollout_fn


def pack_rollout(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    *,
    prompt_len: int,
    response_len: int,
    pad_id: int,
) -> dict[str, np.ndarray]:
  """The training layout of a rollout batch: [left-padded prompt | right-padded response].

  tokens, positions (cumsum of the mask - 1, so a row's first real token is at 0), key_mask
  [B, prompt_len + response_len]; response_mask [B, response_len] (1 on generated tokens,
  including the stop token that ended the response: choosing to stop is an action too).
  """
  b = len(prompts)
  tokens = np.full((b, prompt_len + response_len), pad_id, np.int32)
  key_mask = np.zeros(tokens.shape, bool)
  for i, (p, r) in enumerate(zip(prompts, responses)):
    tokens[i, prompt_len - len(p) : prompt_len] = p
    tokens[i, prompt_len : prompt_len + len(r)] = r
    key_mask[i, prompt_len - len(p) : prompt_len + len(r)] = True
  positions = np.maximum(np.cumsum(key_mask, axis=1) - 1, 0).astype(np.int32)
  return dict(
      tokens=tokens,
      positions=positions,
      key_mask=key_mask,
      response_mask=key_mask[:, prompt_len:].astype(np.float32),
  )
