"""Gemma-2-2B-it on a TPU v5e-8 (8 chips x 16 GiB): FSDP over all chips.

  huggingface-cli download google/gemma-2-2b-it --local-dir ~/models/gemma-2-2b-it   # on every host, beforehand
  python -m cai_jax.main --config configs/tpu_gemma2_2b_v5e8.py --workdir /mnt/disks/run   # one host
"""

from configs.tpu_common import tpu_config


def get_config():
  return tpu_config(model_dir='~/models/gemma-2-2b-it', architecture='gemma2_2b', tpu='v5e',
                    topology='v5e:2x4', mesh_shape=(1, 8, 1), multi_host=False)
