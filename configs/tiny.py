"""A tiny random model (byte tokenizer) and tiny stage sizes: every stage runs in seconds.

python -m cai_jax.main --config configs/tiny.py --workdir /tmp/tiny
"""

from configs import base


def get_config():
  c = base.get_config('tiny')
  c.model.source = 'random:tiny'  # ModelConfig.tiny(): 2 layers, d=64, 8 heads / 4 KV heads
  c.model.max_len = 512  # byte tokens: prompts are long in tokens
  c.constitution = 'tiny'  # 2 principles, 1 short few-shot of each kind
  c.mesh.shape = (-1, 1, 1)  # data parallel over whatever devices exist
  return c
