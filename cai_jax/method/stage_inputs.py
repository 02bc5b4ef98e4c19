"""The files a stage reads besides its upstream stages' outputs: each stage's `inputs(config)`
returns them, and the bookkeeping hashes their contents into the stage's fingerprint, so an edited
constitution, prompt file or comparison file redoes the stages that read it."""

from __future__ import annotations

from pathlib import Path

from cai_jax.method import constitution as constitution_lib
from cai_jax.method import data


def files(config, *fields: str) -> dict[str, Path | list[Path]]:
  """The files a stage reads besides upstream outputs, for its fingerprint (its `inputs(config)`):
  those every stage reads -- the constitution and the prompt sources (ours, the wheels', the
  user's; each source's files hashed together) -- then the files named by the config `fields`
  (dotted, e.g. 'harmfulness.path') that are set and exist."""
  out = {}
  if 'constitution' in config:
    c = str(config.constitution)
    path = constitution_lib.bundled_path(c) if c in constitution_lib.BUNDLED else Path(c)
    if path.exists():
      out['constitution'] = path
  if 'data' in config:
    d = config.data
    for kind in ('redteam_sources', 'helpful_sources'):
      for source, count in sorted(d.get(kind, {}).items()):
        if count == 0:
          continue
        try:
          out[f'data.{source}'] = data.source_files(source, d.get('paths'))
        except data.DataSourceError:
          continue  # the stage that reads it reports the missing source
  for field in fields:
    section, *keys = field.split('.')
    value = config[section]
    for k in keys:
      value = value[k]
    if value and Path(value).expanduser().exists():
      out[field] = Path(value)
  return out
