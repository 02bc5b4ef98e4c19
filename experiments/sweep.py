"""Ablation sweeps: run the pipeline at several config points, reuse shared stages, tabulate.

  python -m experiments.sweep experiments/sweeps/n_revisions.py [--workdir_root DIR]
      [--base tiny|demo|<config path>[:arg]] [--points NAME_OR_INDEX,...] [--set FIELD=VALUE ...]
      [--stages STAGE,...] [--dry_run]

A sweep file (experiments/sweeps/*.py) defines

  BASE = 'tiny'                       # default base config (--base overrides it)
  STAGES = 'critique_revision,sft'    # optional: stages each point runs (default: the config's)
  OVERRIDES = {'sft.max_steps': 4}    # optional: fields set at every point
  AXES = {'critique_revision.n_rounds': [1, 2, 3, 4]}   # the points: the product of the axes
  def points(): return [{'name': 'soft', 'preference.label_type': 'soft'}, ...]  # or listed
  METRICS = {'label': 'evaluate/summary.json:metrics.sft.harmlessness_pm', ...}

A metric is `<file>.json:<dotted.key>` (a file under the point's workdir), `<stage>:<key>` (the
`summary` of WORKDIR/<stage>/DONE.json) or a callable `f(workdir) -> value`. A value may be a
number, a {'mean', 'stderr'} dict (plotted with error bars) or a list (plotted as a curve).

Each point runs `python -m cai_jax.main` in its own workdir `ROOT/<sweep>/<point>` (the same code
path as a user's run). Stage outputs live in a cache shared by all sweeps under the root,
`ROOT/_stages/<stage>-<fingerprint>`, and each point's `<stage>` is a symlink into it; the
fingerprint (`cai_jax.bookkeeping.Context.fingerprint`) covers the stage's config and all of its
upstream stages, so points (or earlier sweep runs) that agree on them share one finished run:
a KL-beta sweep runs critique_revision, sft, feedback and preference once. Results go to
`ROOT/<sweep>/results.{md,csv,json}` and `ROOT/<sweep>/<metric>.png`.

Why one module of ~630 lines: a sweep is one pass -- load the base config, expand the points,
link each point's stages into the shared cache, run, then read, tabulate and plot the metrics --
and the parts hand each other only the point rows; a reader follows a sweep top to bottom here,
and tests/test_sweep.py calls each part by name.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
NAMED_BASES = ('tiny', 'demo')

# Metrics of a full pipeline run (evaluate/summary.json, see cai_jax/stages/evaluate.py and
# cai_jax/evaluation/), for METRICS.
_EVAL = 'evaluate/summary.json:'
PIPELINE_METRICS = {
    'ppo_harmlessness_elo': _EVAL + 'harmlessness.elo.ppo',
    'sft_harmlessness_elo': _EVAL + 'harmlessness.elo.sft',
    'ppo_helpfulness_elo': _EVAL + 'helpfulness.elo.ppo',
    'ppo_pm_score': _EVAL + 'metrics.ppo.harmlessness_pm',
    'ppo_refusal_rate': _EVAL + 'metrics.ppo.refusal_rate_redteam',
    'ppo_helpful_refusal_rate': _EVAL + 'metrics.ppo.refusal_rate_helpful',
}


class SweepError(RuntimeError):
  """A sweep file or command line that cannot be run; the message says what to fix."""


# ---- loading ----------------------------------------------------------------------------------


def _load_module(path: Path, name: str):
  if not path.is_file():
    raise SweepError(f'{path}: no such file')
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # configs/*.py import `configs.base`
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def base_config_path(base: str) -> tuple[Path, str | None]:
  """'tiny' / 'demo' / 'path/to/config.py[:arg]' -> (config file, get_config argument)."""
  if base in NAMED_BASES:
    return REPO / 'configs' / f'{base}.py', None
  path, _, arg = base.partition(':')
  path = Path(path)
  if not path.is_absolute() and not path.exists():
    path = REPO / path
  return path, arg or None


def load_config(base: str):
  path, arg = base_config_path(base)
  module = _load_module(path, f'_sweep_base_{path.stem}')
  return module.get_config(arg) if arg is not None else module.get_config()


def set_field(config, field: str, value: Any) -> None:
  """config.<dotted field> = value; the field must exist (as with --config.<field>=...)."""
  *parents, leaf = field.split('.')
  node = config
  for p in parents:
    if p not in node:
      raise SweepError(f'unknown config field {field!r} ({p!r} is not in the config)')
    node = node[p]
  if leaf not in node:
    raise SweepError(f'unknown config field {field!r}')
  current = node[leaf]
  if isinstance(value, str) and current is not None and not isinstance(current, str):
    value = parse_value(value)  # a --set value for a number, bool or tuple field
  try:
    node[leaf] = tuple(value) if isinstance(value, list) else value
  except TypeError as e:
    raise SweepError(f'{field}: {e}') from None


def get_field(config, field: str) -> Any:
  node = config
  for p in field.split('.'):
    node = node[p]
  return node


def parse_value(text: str) -> Any:
  """A --set value for a non-string field: a Python literal (true/false spelled either way)."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def cli_value(value: Any) -> str:
  """How cai_jax.main's --config.<field>=... flag must spell `value`."""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value)


# ---- points -----------------------------------------------------------------------------------


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9_.,=+-]+', '_', text).strip('_') or 'point'


def sweep_points(sweep) -> list[tuple[str, dict]]:
  """[(name, {field: value})] from the sweep's AXES (product) or points()."""
  if hasattr(sweep, 'points'):
    out = []
    for i, p in enumerate(sweep.points()):
      p = dict(p)
      name = (
          p.pop('name', None) or ','.join(f'{k.split(".")[-1]}={v}' for k, v in p.items()) or str(i)
      )
      out.append((_slug(str(name)), p))
  elif hasattr(sweep, 'AXES'):
    fields = list(sweep.AXES)
    out = []
    for values in itertools.product(*(sweep.AXES[f] for f in fields)):
      p = dict(zip(fields, values))
      out.append((_slug(','.join(f'{f.split(".")[-1]}={v}' for f, v in p.items())), p))
  else:
    raise SweepError('a sweep file defines AXES or points()')
  names = [n for n, _ in out]
  if len(set(names)) != len(names):
    raise SweepError(f'point names are not unique: {names}')
  return out


def select_points(points, selection: str | None):
  if not selection:
    return points
  chosen = []
  for item in (s.strip() for s in selection.split(',') if s.strip()):
    if item.isdigit() and int(item) < len(points):
      chosen.append(points[int(item)])
    else:
      match = [p for p in points if p[0] == item]
      if not match:
        raise SweepError(
            f'--points: no point {item!r}; points: '
            f'{", ".join(f"{i}:{n}" for i, (n, _) in enumerate(points))}'
        )
      chosen.append(match[0])
  return chosen


# ---- stage cache ------------------------------------------------------------------------------


def stage_fingerprints(config, cache: Path | None = None) -> dict[str, str]:
  """Every stage's fingerprint under `config` (what WORKDIR/<stage>/fingerprint.json records).

  A stage's optional upstream stages (pipeline.Stage.optional) join its fingerprint when they
  will be in the point's workdir: those it runs, and those `cache` holds finished.
  """
  from cai_jax import pipeline

  ctx = pipeline.context(config, Path('.'))
  fps = {name: ctx.fingerprint(name) for name in pipeline.ORDER}
  present = set(pipeline.parse_stage_list(config.stages))
  if cache is not None:
    present |= {s for s in pipeline.ORDER if (cache / f'{s}-{fps[s]}' / 'DONE.json').exists()}
  ctx = pipeline.context(config, Path('.'), assume_done=frozenset(present))
  return {name: ctx.fingerprint(name) for name in pipeline.ORDER}


def data_key(config) -> str:
  """The shared TFDS prompt datasets depend on the seed and the data config only."""
  blob = json.dumps(
      {'seed': config.seed, 'data': config.data.to_dict()}, sort_keys=True, default=str
  )
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _link(link: Path, target: Path) -> None:
  """Points `link` at `target`, replacing an older symlink; a real directory is left alone."""
  target.mkdir(parents=True, exist_ok=True)
  if link.is_symlink():
    if Path(os.readlink(link)) == target:
      return
    link.unlink()
  elif link.exists():
    print(f'  {link} is a directory of its own; not shared through the cache', flush=True)
    return
  link.symlink_to(target, target_is_directory=True)


def link_stages(workdir: Path, cache: Path, config, run_stages: list[str]) -> dict[str, str]:
  """Links the point's stages (and finished cached upstream ones) into `workdir`."""
  from cai_jax import pipeline

  fps = stage_fingerprints(config, cache)
  workdir.mkdir(parents=True, exist_ok=True)
  for name in pipeline.ORDER:
    target = cache / f'{name}-{fps[name]}'
    if name in run_stages or (target / 'DONE.json').exists():
      _link(workdir / name, target)
  if not config.data.data_dir:
    _link(workdir / 'data', cache / f'data-{data_key(config)}')
  return fps


# ---- running ----------------------------------------------------------------------------------


def point_command(base: str, workdir: Path, overrides: dict) -> list[str]:
  path, arg = base_config_path(base)
  cmd = [
      sys.executable,
      '-m',
      'cai_jax.main',
      '--config',
      f'{path}{":" + arg if arg else ""}',
      '--workdir',
      str(workdir),
  ]
  return cmd + [f'--config.{k}={cli_value(v)}' for k, v in overrides.items()]


def run_point(
    cmd: list[str], workdir: Path, timeout: float | None, jax_cache: Path | None = None
) -> tuple[int, float]:
  """Runs one point's command, its output in WORKDIR/sweep_log.txt; (exit code, seconds).

  Points share a persistent JAX compilation cache (unless JAX_COMPILATION_CACHE_DIR is set), so
  only the first point pays for compiling the shapes they have in common.
  """
  env = dict(os.environ)
  if jax_cache is not None:
    env.setdefault('JAX_COMPILATION_CACHE_DIR', str(jax_cache))
    env.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  t0 = time.time()
  with open(workdir / 'sweep_log.txt', 'w') as log:
    log.write(' '.join(cmd) + '\n\n')
    log.flush()
    try:
      rc = subprocess.run(
          cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env
      ).returncode
    except subprocess.TimeoutExpired:
      rc = -9
  return rc, time.time() - t0


def _dig(value: Any, key: str) -> Any:
  for part in key.split('.') if key else []:
    if isinstance(value, list):
      value = value[int(part)]
    else:
      value = value[part]
  return value


def read_metric(workdir: Path, spec: str | Callable) -> Any:
  """A metric of a finished point, or None if its file or key is missing."""
  try:
    if callable(spec):
      return spec(workdir)
    where, _, key = spec.partition(':')
    if where.endswith('.json'):
      value = _dig(json.loads((workdir / where).read_text()), key)
    else:
      value = _dig(json.loads((workdir / where / 'DONE.json').read_text())['summary'], key)
  except (OSError, KeyError, IndexError, ValueError, TypeError):
    return None
  if isinstance(value, dict) and isinstance(value.get('mean'), list):  # a curve with error bars
    return [
        {'mean': m, 'stderr': s}
        for m, s in zip(value['mean'], value.get('stderr') or [None] * len(value['mean']))
    ]
  return value


def format_value(v: Any) -> str:
  if v is None:
    return '–'
  if isinstance(v, dict) and 'mean' in v:
    return f'{format_value(v["mean"])} ± {format_value(v.get("stderr"))}'
  if isinstance(v, dict) and 'elo' in v:
    return f'{v["elo"]:+.0f} [{v["lo"]:+.0f}, {v["hi"]:+.0f}]'
  if isinstance(v, (list, tuple)):
    return '[' + ', '.join(format_value(x) for x in v) + ']'
  if isinstance(v, float):
    return f'{v:.4g}'
  return str(v)


def _scalar(v: Any) -> tuple[float, float, float] | None:
  """(value, error below, error above) of a plottable scalar metric."""
  if isinstance(v, dict) and v.get('mean') is not None:
    err = float(v.get('stderr') or 0.0)
    return float(v['mean']), err, err
  if isinstance(v, dict) and v.get('elo') is not None:  # Elo with its bootstrap interval
    return float(v['elo']), float(v['elo'] - v['lo']), float(v['hi'] - v['elo'])
  if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
    return float(v), 0.0, 0.0
  return None


def merge_rows(root: Path, rows: list[dict], order: list[str]) -> list[dict]:
  """This run's rows over those of earlier runs of the sweep (a point run again replaces its
  row), in the sweep's point order: running points one at a time still builds one table."""
  path = root / 'results.json'
  old = json.loads(path.read_text()) if path.exists() else []
  by_point = {r['point']: r for r in old}
  by_point.update({r['point']: r for r in rows})
  rank = {name: i for i, name in enumerate(order)}
  return sorted(by_point.values(), key=lambda r: rank.get(r['point'], len(rank)))


def write_results(
    root: Path, sweep_name: str, rows: list[dict], axes: list[str], metrics: list[str]
) -> None:
  """results.md / results.csv / results.json and one PNG per metric in `root`."""
  root.mkdir(parents=True, exist_ok=True)
  (root / 'results.json').write_text(json.dumps(rows, indent=1, default=str))
  columns = ['point'] + axes + metrics + ['status', 'ran', 'reused', 'seconds']
  with open(root / 'results.csv', 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(columns)
    for r in rows:
      w.writerow(
          [r['point']]
          + [r['overrides'].get(a, '') for a in axes]
          + [json.dumps(r['metrics'].get(m)) for m in metrics]
          + [r['status'], ' '.join(r['ran']), ' '.join(r['reused']), f'{r["seconds"]:.1f}']
      )
  present = [m for m in metrics if any(r['metrics'].get(m) is not None for r in rows)]
  missing = [m for m in metrics if m not in present]
  columns = ['point'] + axes + present + ['status', 'ran', 'reused', 'seconds']
  lines = [
      f'# Sweep `{sweep_name}`',
      '',
      f'Base config: `{rows[0]["base"] if rows else ""}`.',
      '',
      '| ' + ' | '.join(columns) + ' |',
      '|' + '---|' * len(columns),
  ]
  for r in rows:
    cells = (
        [r['point']]
        + [format_value(r['overrides'].get(a)) for a in axes]
        + [format_value(r['metrics'].get(m)) for m in present]
        + [
            r['status'],
            ', '.join(r['ran']) or '–',
            ', '.join(r['reused']) or '–',
            f'{r["seconds"]:.1f}',
        ]
    )
    lines.append('| ' + ' | '.join(cells) + ' |')
  lines += [
      '',
      '`ran` / `reused`: stages this point computed / took finished from the stage cache.',
  ]
  if missing:
    lines.append(f'Not produced by the stages run: {", ".join(missing)}.')
  lines.append('')
  for m in present:
    png = plot_metric(root, rows, axes, m)
    if png:
      lines += [f'![{m}]({png})', '']
  (root / 'results.md').write_text('\n'.join(lines))


def _yerr(scalars):
  return [[max(s[1], 0.0) for s in scalars], [max(s[2], 0.0) for s in scalars]]


def plot_metric(root: Path, rows: list[dict], axes: list[str], metric: str) -> str | None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  values = [(r['point'], r['overrides'], r['metrics'].get(metric)) for r in rows]
  values = [v for v in values if v[2] is not None]
  if not values:
    return None
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  if all(isinstance(v, (list, tuple)) for _, _, v in values):  # one curve per point
    for name, _, v in values:
      ys = [y for y in map(_scalar, v)]
      xs = [i for i, y in enumerate(ys) if y]
      ys = [y for y in ys if y]
      ax.errorbar(xs, [y[0] for y in ys], yerr=_yerr(ys), marker='o', capsize=3, label=name)
    ax.set_xlabel('index')
    ax.legend(fontsize=7)
  else:
    scalars = [(name, o, _scalar(v)) for name, o, v in values if _scalar(v)]
    if not scalars:
      plt.close(fig)
      return None
    numeric_axis = len(axes) == 1 and all(
        isinstance(o.get(axes[0]), (int, float)) and not isinstance(o.get(axes[0]), bool)
        for _, o, _ in scalars
    )
    if numeric_axis:
      xs = [o[axes[0]] for _, o, _ in scalars]
      ax.errorbar(
          xs,
          [s[0] for *_, s in scalars],
          yerr=_yerr([s for *_, s in scalars]),
          marker='o',
          capsize=3,
      )
      ax.set_xlabel(axes[0])
    else:
      names = [n for n, _, _ in scalars]
      ax.bar(
          range(len(names)),
          [s[0] for *_, s in scalars],
          yerr=_yerr([s for *_, s in scalars]),
          capsize=3,
      )
      ax.set_xticks(range(len(names)), names, rotation=20, ha='right', fontsize=8)
  ax.set_ylabel(metric)
  ax.set_title(metric, fontsize=9)
  fig.tight_layout()
  name = f'{_slug(metric)}.png'
  fig.savefig(root / name, dpi=100)
  plt.close(fig)
  return name


def run_sweep(
    sweep_path: str | Path,
    *,
    workdir_root: str | Path,
    base: str | None = None,
    points: str | None = None,
    sets: dict | None = None,
    run_stages: str | None = None,
    dry_run: bool = False,
    timeout: float | None = None,
) -> list[dict]:
  """Runs the sweep's points in order; returns one result row per point."""
  from cai_jax import bookkeeping, pipeline

  sweep_path = Path(sweep_path)
  sweep = _load_module(sweep_path, f'_sweep_{sweep_path.stem}')
  sweep_name = getattr(sweep, 'NAME', sweep_path.stem)
  base = base or getattr(sweep, 'BASE', 'tiny')
  workdir_root = Path(workdir_root).resolve()
  root, cache = workdir_root / sweep_name, workdir_root / '_stages'
  all_points = sweep_points(sweep)
  chosen = select_points(all_points, points)
  axes = list(dict.fromkeys(k for _, p in all_points for k in p))
  metrics = dict(getattr(sweep, 'METRICS', {}))
  shared = dict(getattr(sweep, 'OVERRIDES', {}))
  stage_list = run_stages or getattr(sweep, 'STAGES', None)
  if stage_list:
    shared['stages'] = stage_list if isinstance(stage_list, str) else ','.join(stage_list)
  shared.update(sets or {})

  rows, seen = [], {}
  for name, point in chosen:
    overrides = {**shared, **point}
    config = load_config(base)
    for k, v in overrides.items():
      set_field(config, k, v)
    try:
      to_run = pipeline.parse_stage_list(config.stages)
    except bookkeeping.StageError as e:
      raise SweepError(str(e)) from None
    workdir = root / name
    fps = stage_fingerprints(config, cache)
    shared_with = {s: seen[(s, fps[s])] for s in to_run if (s, fps[s]) in seen}
    cmd = point_command(base, workdir, overrides)
    print(f'[{name}] {" ".join(f"{k}={cli_value(v)}" for k, v in point.items())}', flush=True)
    for s in to_run:
      cached = (cache / f'{s}-{fps[s]}' / 'DONE.json').exists()
      note = (
          'cached'
          if cached
          else f'same as point {shared_with[s]}'
          if s in shared_with
          else 'to run'
      )
      print(f'  {s:<18} {fps[s]}  {note}', flush=True)
      seen.setdefault((s, fps[s]), name)
    if dry_run:
      print('  ' + ' '.join(cmd), flush=True)
      continue
    link_stages(workdir, cache, config, to_run)
    rc, seconds = run_point(cmd, workdir, timeout, workdir_root / '_jax_cache')
    timings = workdir / 'timings.json'
    done = json.loads(timings.read_text()) if rc == 0 and timings.exists() else []
    ran = [s for s, status, _ in done if status == 'ran']
    reused = [s for s, status, _ in done if status == 'reused']
    status = 'ok' if rc == 0 else f'failed (exit {rc}, see {workdir / "sweep_log.txt"})'
    if rc == 0:
      for s in to_run:  # the subprocess must have seen the same config as we did
        recorded = json.loads((workdir / s / 'fingerprint.json').read_text())['fingerprint']
        if recorded != fps[s]:
          raise SweepError(
              f'point {name}: stage {s} ran with fingerprint {recorded}, expected '
              f'{fps[s]}: an override did not survive the command line: {cmd}'
          )
    else:
      tail = (workdir / 'sweep_log.txt').read_text().strip().splitlines()[-5:]
      print('  ' + '\n  '.join(tail), flush=True)
    row = {
        'point': name,
        'base': base,
        'overrides': point,
        'status': status,
        'ran': ran,
        'reused': reused,
        'seconds': seconds,
        'workdir': str(workdir),
        'metrics': {m: read_metric(workdir, spec) for m, spec in metrics.items()},
    }
    print(
        f'  {status} in {seconds:.1f}s; ran: {", ".join(ran) or "-"}; reused: {", ".join(reused) or "-"}; '
        + '; '.join(f'{m}={format_value(v)}' for m, v in row['metrics'].items()),
        flush=True,
    )
    rows.append(row)
  if rows:
    table = merge_rows(root, rows, [n for n, _ in all_points])
    write_results(root, sweep_name, table, axes, list(metrics))
    print(f'results: {root / "results.md"}', flush=True)
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog='python -m experiments.sweep', description=__doc__.split('\n')[0]
  )
  p.add_argument('sweep', help='experiments/sweeps/<name>.py')
  p.add_argument(
      '--workdir_root',
      default='/tmp/cai_jax_sweeps',
      help='sweeps write ROOT/<sweep>/<point>; stage cache ROOT/_stages (default %(default)s)',
  )
  p.add_argument(
      '--base',
      default=None,
      help="'tiny', 'demo' or a config path[:arg] (default: the sweep's BASE)",
  )
  p.add_argument(
      '--points', default=None, help='comma-separated point names or indices (default: all)'
  )
  p.add_argument(
      '--set',
      action='append',
      default=[],
      metavar='FIELD=VALUE',
      help='override a config field at every point (a Python literal or a string)',
  )
  p.add_argument(
      '--stages', default=None, help="stages each point runs (default: the sweep's STAGES)"
  )
  p.add_argument(
      '--timeout', type=float, default=None, help='seconds per point before it is killed'
  )
  p.add_argument(
      '--dry_run', action='store_true', help='print points, fingerprints and commands only'
  )
  args = p.parse_args(argv)
  sets = {}
  for item in args.set:
    field, eq, value = item.partition('=')
    if not eq:
      p.error(f'--set {item!r}: expected FIELD=VALUE')
    sets[field.strip()] = value  # parsed against the field's type by set_field
  try:
    rows = run_sweep(
        args.sweep,
        workdir_root=args.workdir_root,
        base=args.base,
        points=args.points,
        sets=sets,
        run_stages=args.stages,
        dry_run=args.dry_run,
        timeout=args.timeout,
    )
  except SweepError as e:
    print(f'sweep: error: {e}', file=sys.stderr)
    return 2
  return 0 if all(r['status'] == 'ok' for r in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
