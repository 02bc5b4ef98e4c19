"""Llama-3.1-8B-Instruct on a TPU v5e-8 (8 chips x 16 GiB) with LoRA: FSDP over all chips.

Full fine-tuning an 8B model keeps ~90 GiB of float32 masters and AdamW moments per trained
model, against 126 GiB of HBM on the whole slice; with rank-16 adapters on all seven projections
the trained state is 0.47 GiB (42M parameters) and each model's base is frozen, in int8 here
(0.94 GiB per device; 1.87 in bfloat16). PPO's KL reference and DPO's are that base with the adapters off.

huggingface-cli download meta-llama/Llama-3.1-8B-Instruct --local-dir ~/models/llama-3.1-8b-instruct   # on every host, beforehand
python -m cai_jax.main --config configs/tpu_llama3_1_8b_v5e8_lora.py --workdir /mnt/disks/run   # one host
python -m cai_jax.aot --config configs/tpu_llama3_1_8b_v5e8_lora.py   # every program, compiled for v5e:2x4
"""

from configs.tpu_common import tpu_config


def get_config():
  c = tpu_config(
      model_dir='~/models/llama-3.1-8b-instruct',
      architecture='llama3_1_8b',
      topology='v5e:2x4',
      mesh_shape=(1, 8, 1),
      multi_host=False,
  )
  c.model.lora.rank = 16  # adapters on q k v o gate up down (configs/base.py's default targets)
  c.model.lora.alpha = 32.0
  # Every frozen model and the LoRA base in int8 (QLoRA-style). Under FSDP the decode loop
  # gathers the policy's whole base onto each chip: in bfloat16 PPO's rollout decode needed
  # 14.72 GiB + 2.09 GiB resident of the chip's 15.75 (cai_jax.aot, 2026-12-07); int8 halves it.
  c.model.frozen_quantization = 'int8'
  # The value head shares the policy's trunk (and its adapters): a trunk of its own would be a
  # second 8B base beside the policy's.
  c.ppo.value.shared_trunk = True
  # 32 rollouts per step: at 64 (tpu_common's), PPO's rollout forward needs 18.06 GiB of the
  # chip's 15.75 (its float32 logits over a 128k vocabulary).
  c.ppo.batch_size = 32
  # Scoring with prefix reuse holds one prefix per group of rows, replicated: Llama-3.1-8B's KV
  # per token (131 KB) is about Gemma-2-2B's (106 KB), whose config measured 12.59 GiB for that
  # argument at 64 prompts and 3.15 at 16; so 16, as there (not compiled for this model yet).
  c.feedback.score_batch_size = 16
  return c
