"""The Colab walkthrough executes end to end on the tiny config (so it cannot rot)."""

import json
import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient
import pytest

from configs import tiny

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
  config = tiny.get_config()
  work = tmp_path / 'work'
  jsonl = lambda path: [json.loads(l) for l in path.read_text().splitlines() if l.strip()]

  def cell(opening):
    """(printed text, display outputs) of the one code cell whose source opens so."""
    (c,) = [c for c in nb.cells if c.cell_type == 'code' and c.source.startswith(opening)]
    outputs = c.get('outputs', [])
    assert not [o for o in outputs if o.output_type == 'error'], outputs
    text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
    return text, [o.get('data', {}) for o in outputs if o.output_type == 'display_data']

  # Each cell shows what its stage wrote: the first critique/revision sample, ...
  text, _ = cell("d = run('critique_revision')")
  sample = jsonl(work / 'critique_revision' / 'samples.jsonl')[0]
  assert f'PROMPT: {sample["prompt"]}' in text
  assert text.count('CRITIQUE:') == text.count('REVISION:') == len(sample['rounds']) > 0
  # ... the SFT losses of every step, ...
  text, _ = cell("d = run('sft')")
  steps = [r for r in jsonl(work / 'sft' / 'metrics.jsonl') if 'loss' in r]
  assert len(steps) == config.sft.num_steps
  assert (
      f'SFT loss: first {round(steps[0]["loss"], 4)} -> last {round(steps[-1]["loss"], 4)} '
      f'over {len(steps)} steps'
  ) in text
  # ... a feedback label as a probability, ...
  text, _ = cell("d = run('feedback')")
  p_a = jsonl(work / 'feedback' / 'samples.jsonl')[0]['p_a']
  assert 0.0 <= p_a <= 1.0 and f'p(A) = {round(p_a, 4)}' in text
  # ... the exported PM's scores of 4 responses and the stage's held-out accuracy, ...
  text, _ = cell("d = run('preference')")
  assert len(re.findall(r'^PM score [+-]\d+\.\d{3}  p_a', text, re.M)) == 4
  summary = json.loads((work / 'preference' / 'DONE.json').read_text())['summary']
  assert f"'eval_accuracy': {summary['eval_accuracy']}" in text
  # ... the PPO curves as an image, and the evaluation report itself.
  _, shown = cell("d = run('ppo')")
  assert [d for d in shown if 'image/png' in d] and (work / 'ppo_curve.png').exists()
  _, shown = cell("d = run('evaluate')")
  report = (work / 'evaluate' / 'report.md').read_text()
  assert [d['text/markdown'] for d in shown if 'text/markdown' in d] == [report]
  assert '| Elo' in report or 'Elo' in report
