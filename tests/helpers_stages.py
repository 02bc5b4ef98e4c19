"""Test helpers for stage bookkeeping: a finished upstream stage made from given files.

`fake_upstream` writes what `pipeline.run` would have left behind (the files, then
`fingerprint.json` and `DONE.json` with the config's fingerprint), so one stage can be tested
through the entry point without running the stages before it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cai_jax import pipeline

REPO = Path(__file__).resolve().parents[1]


def tiny_main_cmd(workdir, *args) -> list[str]:
  """The command line of a pipeline run on configs/tiny.py (`python -m cai_jax.main`) in
  `workdir`, with `args` (config overrides) after it."""
  tiny = str(REPO / 'configs' / 'tiny.py')
  return [sys.executable, '-m', 'cai_jax.main', '--config', tiny, '--workdir', str(workdir), *args]


def fake_upstream(config, workdir, stage: str, files: dict[str, str | list[dict]]) -> Path:
  """Writes WORKDIR/<stage>/ as a finished stage of `config`; `files` maps names to text or
  to a list of records (written as JSONL)."""
  ctx = pipeline.context(config, Path(workdir))
  d = ctx.stage_dir(stage)
  d.mkdir(parents=True, exist_ok=True)
  for name, content in files.items():
    if not isinstance(content, str):
      content = ''.join(json.dumps(r) + '\n' for r in content)
    (d / name).write_text(content)
  fp = ctx.fingerprint(stage)
  (d / 'fingerprint.json').write_text(
      json.dumps(
          {'fingerprint': fp, 'fields': ctx.stage_config_fingerprint(stage)}, indent=1, default=str
      )
  )
  (d / 'DONE.json').write_text(json.dumps({'fingerprint': fp, 'seconds': 0.0, 'summary': {}}))
  return d


def sl_cai_records(n: int = 12, n_helpful: int = 6, *, empty: int = 1) -> dict[str, list[dict]]:
  """Synthetic critique_revision outputs: short, patterned texts a tiny model can learn quickly.

  The first `empty` red-team records have an empty final revision (the stage must skip them).
  """
  samples = []
  for i in range(n):
    revision = '' if i < empty else f'I will not help, {i % 3}.'
    samples.append(
        {
            'id': f'r{i}',
            'prompt': f'How to do bad thing {i}?',
            'initial_response': f'Sure, here is bad thing {i}.',
            'rounds': [{'principle': 'harm', 'critique': 'It is harmful.', 'revision': revision}],
            'revision': revision,
        }
    )
  helpful = [
      {'id': f'h{i}', 'prompt': f'What is {i} plus {i}?', 'responses': [f'It is {2 * i}.']}
      for i in range(n_helpful)
  ]
  return {'samples.jsonl': samples, 'helpful.jsonl': helpful}
