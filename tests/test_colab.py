"""The Colab walkthrough executes end to end on the tiny config (so it cannot rot)."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient
import pytest

pytestmark = pytest.mark.slow  # executes the whole walkthrough notebook

REPO = Path(__file__).resolve().parents[1]


def test_walkthrough_notebook_runs_on_tiny(tmp_path, monkeypatch):
  monkeypatch.setenv('CAI_COLAB_CONFIG', 'tiny')
  monkeypatch.setenv('CAI_COLAB_WORKDIR', str(tmp_path / 'work'))
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('PYTHONPATH', str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''))
  nb = nbformat.read(REPO / 'colab' / 'cai_jax_walkthrough.ipynb', as_version=4)
  NotebookClient(
      nb, timeout=600, kernel_name='python3', resources={'metadata': {'path': str(REPO)}}
  ).execute()
  outputs = '\n'.join(
      o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
  )
  assert 'CRITIQUE:' in outputs and 'REVISION:' in outputs
  assert 'p(A) =' in outputs and 'PM score' in outputs
  assert (tmp_path / 'work' / 'ppo_curve.png').exists()
  assert (tmp_path / 'work' / 'evaluate' / 'report.md').exists()
