"""Prints per-device PPO bytes of each TPU config on fake CPU devices (run by test_tpu_configs)."""

import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
os.environ['JAX_PLATFORMS'] = 'cpu'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import importlib  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402

from cai_jax import memory, sharding  # noqa: E402
from cai_jax.model import ModelConfig  # noqa: E402

out = {}
for name in sys.argv[1:]:
  config = importlib.import_module(f'configs.{name}').get_config()
  shape = tuple(config.mesh.shape)
  n = 1
  for s in shape:
    n *= s
  mesh = sharding.make_mesh(shape, devices=jax.devices()[:n])
  cfg = getattr(ModelConfig, config.model.architecture)(dtype=config.model.dtype,
                                                        param_dtype=config.model.param_dtype)
  parts = memory.ppo_peak_bytes(cfg, config, mesh)
  out[name] = {'parts': parts, 'hbm_bytes': memory.HBM_GIB[config.tpu] << 30, 'devices': n,
               'params': cfg.num_params()}
print(json.dumps(out))
