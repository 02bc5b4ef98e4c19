"""Qwen2.5-7B-Instruct on a TPU v5p-16 (8 chips x 95 GiB, 2 hosts): the full pipeline at paper-like settings.

Download the model on every host first (the hub is not reached at run time), e.g.
  huggingface-cli download Qwen/Qwen2.5-7B-Instruct --local-dir ~/models/Qwen2.5-7B-Instruct
then run the same command on every host:
  python -m cai_jax.main --config configs/tpu_qwen2_5_7b_v5p16.py --workdir gs://... or /mnt/disks/...
tests/test_tpu_configs.py checks on fake CPU devices that PPO's state fits this chip's HBM.
"""

import os

from configs import base


def get_config():
  c = base.get_config('full')
  c.model.source = os.path.expanduser('~/models/Qwen2.5-7B-Instruct')  # HF directory (safetensors)
  c.model.architecture = 'qwen2_5_7b'  # ModelConfig preset of that checkpoint (for the HBM-fit check)
  c.model.dtype = 'bfloat16'  # bf16 matmuls: the MXU's native type
  c.model.param_dtype = 'bfloat16'  # bf16 params and AdamW moments keep PPO's 4 models in HBM
  c.model.max_len = 2048  # prompt + response tokens
  c.conversation_format = 'chat_template'  # instruct models answer best in their own template
  c.mesh.shape = (1, 4, 2)  # ('data', 'fsdp', 'tensor') over the 8 devices of a v5p slice
  c.tpu = 'v5p'  # chip kind, for the HBM-fit check (cai_jax.memory.HBM_GIB)
  c.distributed.enabled = True  # multi-host slice: jax.distributed.initialize from the TPU env
  c.critique_revision.batch_size = 64  # sequences per sampler call (divisible by data x fsdp)
  c.feedback.batch_size = 64  # sequences per sampler call
  c.feedback.score_batch_size = 64  # (prompt + option) sequences per scoring call
  c.sft.batch_size = 64  # sequences per SFT step
  c.preference.batch_size = 32  # pairs per PM step (64 sequences)
  c.ppo.batch_size = 64  # rollouts per PPO step
  c.evaluate.batch_size = 64  # sequences per sampler call
  return c
