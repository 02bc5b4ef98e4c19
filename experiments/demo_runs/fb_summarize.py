"""Accuracy / ECE of an evaluate_feedback run so far, finished or not (records.jsonl is a prefix
of the comparisons in file order, written a chunk at a time).

  python experiments/demo_runs/fb_summarize.py WORKDIR [WORKDIR ...]
  python experiments/demo_runs/fb_summarize.py --primary_order_only DEBIAS_WORKDIR

--primary_order_only recomputes every label from each principle's first scoring alone: a
debiased run's primary-order scorings are exactly the prompts a single-order run scores, so
this gives the single-principle, not-debiased accuracy of the same comparisons.
"""

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cai_jax.method import labeler as labeler_lib
from cai_jax.method import labels  # noqa: E402
from cai_jax.stages import evaluate_feedback  # noqa: E402


def complete_records(path: Path) -> list[dict]:
  lines = path.read_text(encoding='utf-8').split('\n') if path.exists() else []
  return [json.loads(line) for line in lines[:-1] if line.strip()]  # the last piece may be torn


def primary_order_only(record: dict) -> dict:
  firsts = {}
  for sc in record['scorings']:
    firsts.setdefault(sc['k'], sc)
  p = labeler_lib.label_from_logprobs(list(firsts.values()), {})
  return dict(record, p_chosen=p, correct=labels.hard_label(p), scorings=list(firsts.values()))


def main(workdirs):
  primary = workdirs and workdirs[0] == '--primary_order_only'
  if primary:
    workdirs = workdirs[1:]
  print(
      '| run | n | accuracy (95% CI) | ECE | mean p_chosen | P(first preferred) | finished | seconds |'
  )
  print('|---|---:|---|---:|---:|---:|---|---:|')
  for w in workdirs:
    d = Path(w) / 'evaluate_feedback'
    records = complete_records(d / 'records.jsonl')
    if not records:
      print(f'| {w} | 0 | | | | | no | |')
      continue
    if primary:
      records = [primary_order_only(r) for r in records]
    s = evaluate_feedback.summarize(records)
    n, acc = s['n'], s['accuracy']
    half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)
    done = d / 'DONE.json'
    seconds = json.loads(done.read_text())['seconds'] if done.exists() else float('nan')
    print(
        f'| {Path(w).name}{" (primary order only)" if primary else ""} | {n} | {acc:.3f} ({acc - half:.3f}-{acc + half:.3f}) | {s["ece"]:.3f} | '
        f'{s["mean_p_chosen"]:.3f} | {s["frac_first_preferred"]:.3f} | '
        f'{"yes" if done.exists() else "no"} | {seconds:.0f} |'
    )


if __name__ == '__main__':
  main(sys.argv[1:])
