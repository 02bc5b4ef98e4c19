"""The tree has one format: pyink's, configured in pyproject.toml (2-space indentation, 100
columns, majority quotes). Run `pyink .` from the repository root to apply it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_tree_is_formatted_with_pyink():
  out = subprocess.run(
      [sys.executable, '-m', 'pyink', '--check', '.'], cwd=ROOT, capture_output=True, text=True
  )
  would = [line for line in out.stderr.splitlines() if line.startswith('would reformat')]
  assert out.returncode == 0, f'run `pyink .` in {ROOT}:\n' + '\n'.join(would or [out.stderr])
