"""Llama-3.2-3B-Instruct on a TPU v4-8 (4 chips x 32 GiB): FSDP over all chips.

  huggingface-cli download meta-llama/Llama-3.2-3B-Instruct --local-dir ~/models/Llama-3.2-3B-Instruct   # on every host, beforehand
  python -m cai_jax.main --config configs/tpu_llama3_2_3b_v4_8.py --workdir /mnt/disks/run   # one host
"""

from configs.tpu_common import tpu_config


def get_config():
  return tpu_config(model_dir='~/models/Llama-3.2-3B-Instruct', architecture='llama3_2_3b',
                    topology='v4:2x2x1', mesh_shape=(1, 4, 1), multi_host=False)
