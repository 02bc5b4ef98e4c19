"""What the TPU configs share: the full-size stage defaults, bf16, and batch sizes for a slice.

Each configs/tpu_*.py names its checkpoint, chip and mesh and calls `tpu_config`. Download the
model on every host first (the hub is not reached at run time), then run the same command on
every host. `python -m cai_jax.aot --config configs/tpu_<x>.py` compiles every program for the
slice with libtpu (no TPU needed) and checks that each fits HBM; tests/test_aot.py runs it.
"""

import os

from configs import base


def tpu_config(
    *,
    model_dir: str,
    architecture: str,
    topology: str,
    mesh_shape: tuple,
    multi_host: bool,
    batch_size: int = 64,
):
  c = base.get_config('full')
  c.model.source = os.path.expanduser(
      model_dir
  )  # HF directory (safetensors), downloaded beforehand
  c.model.architecture = architecture  # ModelConfig preset of that checkpoint (for cai_jax.aot)
  c.model.dtype = 'bfloat16'  # bf16 matmuls: the MXU's native type
  c.model.param_dtype = 'float32'  # trained models: float32 master weights and AdamW moments
  c.model.frozen_param_dtype = 'bfloat16'  # PPO's reference and PM, feedback and sampling models
  c.model.remat = (
      'full'  # recompute each layer in the backward pass: activations fit HBM at 2k tokens
  )
  c.model.max_len = 2048  # prompt + response tokens
  c.conversation_format = 'chat_template'  # instruct models answer best in their own template
  c.mesh.shape = mesh_shape  # ('data', 'fsdp', 'tensor') over the slice's devices
  c.tpu_topology = topology  # the slice `python -m cai_jax.aot` compiles every program for
  c.distributed.enabled = (
      multi_host  # multi-host slice: jax.distributed.initialize from the TPU env
  )
  c.critique_revision.batch_size = (
      batch_size  # sequences per sampler call (divisible by data x fsdp)
  )
  c.feedback.batch_size = batch_size  # sequences per sampler call
  c.feedback.score_batch_size = batch_size  # prompts per scoring call (each scores all its options)
  # Sequences per SFT step: 64 x 2048 tokens leaves under 10% of a v5e's HBM (cai_jax.aot: 14.4 of
  # 15.75 GiB for gemma-2-2b); 32 takes 11.6 GiB.
  c.sft.batch_size = batch_size // 2
  c.preference.batch_size = batch_size // 2  # pairs per PM step (batch_size sequences)
  c.ppo.batch_size = batch_size  # rollouts per PPO step
  c.evaluate.batch_size = batch_size  # sequences per sampler call
  # The engine (off by default: `--config.sampling.engine=True`): a decode step's time is mostly
  # the model's weights moving, so it decodes as many slots as the static sampler's batch; each
  # config sizes its page pool from `python -m cai_jax.aot --config.sampling.engine=True`.
  c.sampling.engine_slots = batch_size
  return c
