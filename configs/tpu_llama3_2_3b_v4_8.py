"""Llama-3.2-3B-Instruct on a TPU v4-8 (4 chips x 32 GiB): FSDP over all chips.

huggingface-cli download meta-llama/Llama-3.2-3B-Instruct --local-dir ~/models/Llama-3.2-3B-Instruct   # on every host, beforehand
python -m cai_jax.main --config configs/tpu_llama3_2_3b_v4_8.py --workdir /mnt/disks/run   # one host
"""

from configs.tpu_common import tpu_config


def get_config():
  c = tpu_config(
      model_dir='~/models/Llama-3.2-3B-Instruct',
      architecture='llama3_2_3b',
      topology='v4:2x2x1',
      mesh_shape=(1, 4, 1),
      multi_host=False,
  )
  # Scoring (A)/(B) on 64 prompts x 2 orders x 4 options at 2048 tokens took 29.1 of a v4's
  # 30.75 GiB beside the resident SL-CAI sampler (cai_jax.aot, before prefix reuse), 22.4 at 32.
  # Prefix reuse adds per-group prefixes (6.78 GiB per device at 32 prompts, 3.39 at 16) and the
  # prefix cache at its bound (0.88 GiB): 16.
  c.feedback.score_batch_size = 16
  # The value head shares the policy's trunk: with a trunk of its own, PPO's learner state
  # (float32 masters and AdamW moments of two 3.2B models) is 18 GiB per device and the train step
  # needs 32.3 GiB (cai_jax.aot on v4:2x2x1).
  c.ppo.value.shared_trunk = True
  # Engine page pool (cai_jax.aot --config.sampling.engine=True, 2026-12-07): the pool is
  # replicated (FSDP only); PPO's rollout decode is the tightest: 15.30 GiB per device with a
  # 1 GiB pool, so 8 GiB (4,681 pages of 16 slots, ~75k tokens) leaves over 10% free.
  c.sampling.engine_kv_budget_mib = 8192
  return c
