"""Gemma-2-2B-it on a TPU v5e-8 (8 chips x 16 GiB): the full pipeline at paper-like settings.

Download the model on every host first (the hub is not reached at run time), e.g.
  huggingface-cli download google/gemma-2-2b-it --local-dir ~/models/gemma-2-2b-it
then run the same command on every host:
  python -m cai_jax.main --config configs/tpu_gemma2_2b_v5e8.py --workdir gs://... or /mnt/disks/...
tests/test_tpu_configs.py checks on fake CPU devices that PPO's state fits this chip's HBM.
"""

import os

from configs import base


def get_config():
  c = base.get_config('full')
  c.model.source = os.path.expanduser('~/models/gemma-2-2b-it')  # HF directory (safetensors)
  c.model.architecture = 'gemma2_2b'  # ModelConfig preset of that checkpoint (for the HBM-fit check)
  c.model.dtype = 'bfloat16'  # bf16 matmuls: the MXU's native type
  c.model.param_dtype = 'bfloat16'  # bf16 params and AdamW moments keep PPO's 4 models in HBM
  c.model.max_len = 2048  # prompt + response tokens
  c.conversation_format = 'chat_template'  # instruct models answer best in their own template
  c.mesh.shape = (1, 8, 1)  # ('data', 'fsdp', 'tensor') over the 8 devices of a v5e slice
  c.tpu = 'v5e'  # chip kind, for the HBM-fit check (cai_jax.memory.HBM_GIB)
  c.distributed.enabled = False  # multi-host slice: jax.distributed.initialize from the TPU env
  c.critique_revision.batch_size = 64  # sequences per sampler call (divisible by data x fsdp)
  c.feedback.batch_size = 64  # sequences per sampler call
  c.feedback.score_batch_size = 64  # (prompt + option) sequences per scoring call
  c.sft.batch_size = 64  # sequences per SFT step
  c.preference.batch_size = 32  # pairs per PM step (64 sequences)
  c.ppo.batch_size = 64  # rollouts per PPO step
  c.evaluate.batch_size = 64  # sequences per sampler call
  return c
