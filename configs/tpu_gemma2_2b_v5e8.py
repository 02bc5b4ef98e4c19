"""Gemma-2-2B-it on a TPU v5e-8 (8 chips x 16 GiB): FSDP over all chips.

huggingface-cli download google/gemma-2-2b-it --local-dir ~/models/gemma-2-2b-it   # on every host, beforehand
python -m cai_jax.main --config configs/tpu_gemma2_2b_v5e8.py --workdir /mnt/disks/run   # one host
"""

from configs.tpu_common import tpu_config


def get_config():
  c = tpu_config(
      model_dir='~/models/gemma-2-2b-it',
      architecture='gemma2_2b',
      topology='v5e:2x4',
      mesh_shape=(1, 8, 1),
      multi_host=False,
  )
  # The value head shares the policy's trunk. With a trunk of its own, the learner holds float32
  # master weights and AdamW moments of two 2.6B models (7.3 GiB per device) and the rollout
  # decode would need ~14.9 of the chip's 15.75 GiB; shared, PPO's peak is 11.5 GiB
  # (cai_jax.aot on v5e:2x4).
  c.ppo.value.shared_trunk = True
  # With prefix reuse (the default), score_options over per-group prefixes takes one prefix per
  # group of rows, replicated: at 64 prompts (64 group slots x 1,984 slots x 26 layers) that
  # argument alone is 12.59 GiB per device, and with the rows' cache, the model and the prefix
  # cache at its bound 15.6 GiB of the 15.75 (aot_programs.PrefixSpec on v5e:2x4, before any
  # temporaries). 16 prompts: 3.15 GiB. The judge in evaluate uses it too.
  c.feedback.score_batch_size = 16
  # Engine page pool (cai_jax.aot --config.sampling.engine=True, 2026-12-07): the pool is
  # replicated (4 KV heads, no tensor axis); PPO's rollout decode is the tightest: 9.55 GiB per
  # device with a 1 GiB pool, so 4 GiB (2,520 pages of 16 slots, ~40k tokens) leaves over 10% free.
  c.sampling.engine_kv_budget_mib = 4096
  return c
