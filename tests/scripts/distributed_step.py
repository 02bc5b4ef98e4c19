"""Sharded SFT steps of the tiny model in one process of a (possibly multi-process) CPU run.

  python tests/scripts/distributed_step.py NUM_PROCESSES PROCESS_ID PORT LOCAL_DEVICES

Each process feeds only its own rows of every global batch (loop.local_rows), as on a multi-host
pod; process 0 prints the losses and grad norms as one JSON line. Run by tests/test_distributed.py.
"""

import json
import os
import sys

num_processes, process_id, port, local_devices = map(int, sys.argv[1:5])
os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={local_devices}'
).strip()
os.environ['JAX_PLATFORMS'] = 'cpu'  # maybe_initialize_distributed then picks gloo collectives
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..'))

import jax  # noqa: E402
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from cai_jax.models import checkpoint, decoder as model_lib  # noqa: E402
from cai_jax.models.decoder import ModelConfig  # noqa: E402
from cai_jax.stages import sft  # noqa: E402
from cai_jax.training import loop
from cai_jax.training import train_lib  # noqa: E402
from cai_jax.utils import sharding  # noqa: E402
from configs import tiny  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import batches  # noqa: E402


def main():
  if num_processes > 1:
    sharding.maybe_initialize_distributed(
        ml_collections.ConfigDict(
            dict(
                enabled=True,
                coordinator_address=f'localhost:{port}',
                num_processes=num_processes,
                process_id=process_id,
                local_device_ids=(),
            )
        )
    )
  assert jax.process_count() == num_processes and jax.device_count() == 4, (
      jax.process_count(),
      jax.devices(),
  )
  config = tiny.get_config()
  mesh = sharding.make_mesh((2, 2, 1))  # batch over data x fsdp = 4 devices; params over fsdp
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    model = model_lib.create(
        ModelConfig.tiny(), seed=0
    )  # = load_pretrained('random:tiny'), minus its tokenizer
    tx, schedule = train_lib.make_optimizer(config.sft.optimizer, 10)
    graphdef, state, shardings = train_lib.init_state(model, tx)
    step = train_lib.make_train_step(graphdef, tx, sft.make_loss_fn(0), shardings, schedule)
    losses, grad_norms = [], []
    for b in batches():
      state, m = step(state, loop.device_batch(b))
      m = train_lib.host_metrics(m)
      losses.append(m['loss'])
      grad_norms.append(m['grad_norm'])
    exported = checkpoint.flat_params(nnx.merge(graphdef, train_lib.gather_params(state.params)))
  if jax.process_index() == 0:
    print(
        json.dumps(
            {
                'losses': losses,
                'grad_norms': grad_norms,
                'processes': jax.process_count(),
                'embed_sum': float(exported[('embed',)].sum()),
            }
        ),
        flush=True,
    )


if __name__ == '__main__':
  main()
