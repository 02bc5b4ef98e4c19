"""Each TPU config's PPO state (the pipeline's peak) fits its chip's HBM with headroom."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU_CONFIGS = sorted(p.stem for p in (REPO / 'configs').glob('tpu_*.py') if p.stem != 'tpu_common')
HEADROOM = 0.7  # state may use at most 70% of HBM: activations, XLA scratch and fragmentation need the rest


@pytest.fixture(scope='module')
def fits():
  r = subprocess.run([sys.executable, str(REPO / 'tests/scripts/tpu_fit.py'), *TPU_CONFIGS],
                     capture_output=True, text=True, timeout=600, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_there_are_three_tpu_configs():
  assert len(TPU_CONFIGS) >= 3, TPU_CONFIGS


@pytest.mark.parametrize('name', TPU_CONFIGS)
def test_ppo_state_fits_hbm_with_headroom(fits, name):
  r = fits[name]
  total, hbm = r['parts']['total'], r['hbm_bytes']
  print(f"{name}: {r['params'] / 1e9:.2f}B params on {r['devices']} devices: "
        f"{total / 2**30:.2f} GiB of {hbm / 2**30:.0f} GiB per device "
        + ', '.join(f'{k} {v / 2**30:.2f}' for k, v in r['parts'].items() if k != 'total'))
  assert total <= HEADROOM * hbm, f'{name}: {total / 2**30:.1f} GiB > {HEADROOM:.0%} of {hbm / 2**30:.0f} GiB'
  # The state is really sharded: the biggest model's share is well below its full size.
  full_policy = r['params'] * 2  # bf16
  assert r['parts']['policy'] < full_policy / (r['devices'] / 2)
