"""Markdown tables from `python -m cai_jax.aot --json=FILE` outputs (one file per stage or config).

  python experiments/aot_tables.py gemma_*_auto.json              # one table: every row of them
  python experiments/aot_tables.py --compare gemma_sft_dense.json gemma_sft_auto.json

Columns per program, per device: GiB (the compiled program's arguments + temporaries + outputs -
aliased, plus the state resident beside it) and its % of the HBM libtpu reports; model TFLOP
(analytic, remat excluded), HW TFLOP (libtpu's count: remat included, loop bodies once, Pallas
kernels such as splash not at all), est. ms (libtpu's cost model, or `>=` the roofline bound) and
MFU (model FLOPs / est. time / peak; `<=` where the time is a bound, `-` where that bound is
100%). Decode rows are one step.
`--compare A B` puts two runs of the same programs side by side (e.g. attention=dense vs auto):
temporaries and total per program.
"""

from __future__ import annotations

import argparse
import json

from cai_jax.aot import mfu_cell

GIB = 2**30


def load(paths):
  rows = []
  for path in paths:
    with open(path) as f:
      rows += json.load(f)
  return rows


def _tflop(x, step):
  if x is None:
    return '-'
  return f'{x / 1e12:.3g}{step}' if x > 0 else '0'  # libtpu can report a tiny negative count


def _gib(x):
  return f'{x / GIB:.2f}'


def total_cell(r):
  """Total GiB per device; for an out-of-memory program, the least it needs (or unknown)."""
  if r['memory']:
    return _gib(r['total'])
  return f'>{_gib(r["total"])} (OOM)' if r['total'] > sum(r['resident'].values()) else 'OOM'


def table(rows) -> str:
  hbm = rows[0]['hbm']
  head = (
      '| stage | program | shape | compile s | temp GiB | GiB / device (resident incl.) | % HBM '
      '| model TFLOP | HW TFLOP | est. ms | MFU |'
  )
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    step = '/step' if r['per_step'] else ''
    if r['seconds']:
      est = f'{">=" if r["seconds_is_roofline_bound"] else ""}{r["seconds"] * 1e3:.3g}{step}'
    else:
      est = '-'
    mfu = mfu_cell(r['mfu'], r['seconds_is_roofline_bound'])
    temp = _gib(r['memory']['temp']) if r['memory'] else '-'
    compile_s = f'{r["compile_seconds"]:.0f}' + (f' (= {r["same_as"]})' if r['same_as'] else '')
    lines.append(
        f'| {r["stage"]} | {r["program"]} | {r["shape"]} | {compile_s} | {temp} | '
        f'{total_cell(r)} | {r["total"] / hbm:.0%} | {_tflop(r["model_flops"], step)} | '
        f'{_tflop(r["hardware_flops"], step)} | {est} | {mfu} |'
    )
  peak = max(rows, key=lambda r: r['total'])
  lines.append('')
  lines.append(
      f'Peak: {_gib(peak["total"])} of {_gib(hbm)} GiB HBM per device ({peak["total"] / hbm:.0%}), '
      f'{peak["stage"]}/{peak["program"]}; {rows[0]["devices"]} x {rows[0]["chip"]}.'
  )
  return '\n'.join(lines)


def compare(a_rows, b_rows, a_name, b_name) -> str:
  hbm = a_rows[0]['hbm']
  b_by = {(r['stage'], r['program']): r for r in b_rows}
  head = (
      f'| stage | program | shape | temp GiB {a_name} | temp GiB {b_name} | GiB / device {a_name} '
      f'| GiB / device {b_name} | % HBM {a_name} | % HBM {b_name} |'
  )
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for a in a_rows:
    b = b_by.get((a['stage'], a['program']))
    temp = lambda r: _gib(r['memory']['temp']) if r and r['memory'] else '-'
    lines.append(
        f'| {a["stage"]} | {a["program"]} | {a["shape"]} | {temp(a)} | {temp(b)} | '
        f'{total_cell(a)} | {total_cell(b) if b else "-"} | {a["total"] / hbm:.0%} | '
        + (f'{b["total"] / hbm:.0%} |' if b else '- |')
    )
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('files', nargs='+')
  ap.add_argument('--compare', action='store_true', help='two files: side by side')
  ap.add_argument('--names', default='dense,auto', help='column names for --compare')
  ap.add_argument('--stage', default='', help="only this stage's rows (a file of several stages)")
  args = ap.parse_args()

  def rows(files):
    return [r for r in load(files) if not args.stage or r['stage'] == args.stage]

  if args.compare:
    if len(args.files) != 2:
      ap.error('--compare takes two files')
    a, b = args.names.split(',')
    print(compare(rows(args.files[:1]), rows(args.files[1:]), a, b))
  else:
    print(table(rows(args.files)))


if __name__ == '__main__':
  main()
