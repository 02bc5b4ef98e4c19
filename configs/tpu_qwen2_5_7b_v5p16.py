"""Qwen2.5-7B-Instruct on a TPU v5p-16 (8 chips x 95 GiB, 2 hosts): FSDP x 2-way tensor parallelism.

huggingface-cli download Qwen/Qwen2.5-7B-Instruct --local-dir ~/models/Qwen2.5-7B-Instruct   # on every host, beforehand
python -m cai_jax.main --config configs/tpu_qwen2_5_7b_v5p16.py --workdir /mnt/disks/run   # the same command on both hosts
"""

from configs.tpu_common import tpu_config


def get_config():
  c = tpu_config(
      model_dir='~/models/Qwen2.5-7B-Instruct',
      architecture='qwen2_5_7b',
      topology='v5p:2x2x2',
      mesh_shape=(1, 4, 2),
      multi_host=True,
  )
  # Engine page pool (cai_jax.aot --config.sampling.engine=True, 2026-12-07): the pool is split over
  # the 2-way tensor axis; PPO's rollout decode is the tightest: 27.65 GiB per device with a 1 GiB
  # pool, so 32 GiB (16 per device: 37,449 pages of 16 slots, ~600k tokens) leaves over 10% free.
  c.sampling.engine_kv_budget_mib = 32768
  return c
