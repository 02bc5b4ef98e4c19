"""The evaluate stage's report: `summary.json` made strict JSON (`strict_json`), `report.md` with
the independence table, PM scores, refusals, win rates and Elo, the curves over RL and the PM
score against revisions, and the PNG plots it embeds (matplotlib, headless)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cai_jax.evaluation.judge import MODEL_TITLES
from cai_jax.evaluation.scores import KINDS


def strict_json(x: Any) -> Any:
  """NaN/inf -> None so summary.json is strict JSON."""
  if isinstance(x, dict):
    return {k: strict_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [strict_json(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def _fmt(x, spec: str = '.3f') -> str:
  return '–' if x is None else format(x, spec)


def _ms(d: dict) -> str:
  return '–' if d['mean'] is None else f'{d["mean"]:.3f} ± {_fmt(d["stderr"])} (n={d["n"]})'


def _pct(x, spec: str = '.0f') -> str:
  return '–' if x is None else f'{100 * x:{spec}}%'


def _elo(x: float) -> str:
  return f'{x + 0.0:+.1f}' if abs(x) >= 0.05 else '0.0'  # no '-0.0'


def _save(fig, stage_dir: Path, name: str) -> str:
  """Writes `fig` to stage_dir/name (100 dpi), closes it and returns the name for report.md."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  fig.savefig(stage_dir / name, dpi=100)
  plt.close(fig)
  return name


def plot_elo(stage_dir: Path, summary: dict) -> str | None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  kinds = [k for k in ('harmlessness', 'helpfulness') if summary.get(k)]
  if not kinds:
    return None
  models = summary['models']
  fig, ax = plt.subplots(figsize=(6, 3.5))
  width = 0.8 / len(kinds)
  for n, kind in enumerate(kinds):
    e = summary[kind]['elo']
    xs = np.arange(len(models)) + (n - (len(kinds) - 1) / 2) * width
    ys = np.array([e[m]['elo'] for m in models])
    err = np.array(
        [[e[m]['elo'] - e[m]['lo'] for m in models], [e[m]['hi'] - e[m]['elo'] for m in models]]
    )
    ax.bar(xs, ys, width, yerr=np.maximum(err, 0), capsize=4, label=f'{kind} Elo')
  ax.axhline(0, color='gray', lw=0.8)
  ax.set_xticks(range(len(models)), [MODEL_TITLES.get(m, m) for m in models])
  ax.set_ylabel(f'Elo ({int(100 * summary[kinds[0]]["ci"])}% bootstrap CI)')
  ax.set_title('AI-judge Elo')
  ax.legend(fontsize=8)
  return _save(fig, stage_dir, 'elo.png')


def plot_revision_curve(stage_dir: Path, curve: dict | None) -> str | None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  if not curve or not any(m is not None for m in curve['mean']):
    return None
  xs = [k for k, m in zip(curve['revisions'], curve['mean']) if m is not None]
  ys = [m for m in curve['mean'] if m is not None]
  err = [s or 0.0 for m, s in zip(curve['mean'], curve['stderr']) if m is not None]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.errorbar(xs, ys, yerr=err, marker='o', capsize=4)
  ax.set_xticks(curve['revisions'])
  ax.set_xlabel('number of revisions')
  ax.set_ylabel('PM score (mean ± stderr)')
  ax.set_title('Harmlessness PM score vs revisions')
  return _save(fig, stage_dir, 'pm_vs_revisions.png')


def plot_refusals(stage_dir: Path, summary: dict) -> str:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  models = summary['models']
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  for n, kind in enumerate(KINDS):
    ys = [summary['metrics'][m][f'refusal_rate_{kind}'] or 0.0 for m in models]
    ax.bar(np.arange(len(models)) + (n - 0.5) * 0.4, ys, 0.4, label=f'{kind} prompts')
  ax.set_xticks(range(len(models)), [MODEL_TITLES.get(m, m) for m in models])
  ax.set_ylim(0, 1)
  ax.set_ylabel('refusal rate')
  ax.set_title('Refusals (keyword classifier)')
  ax.legend(fontsize=8)
  return _save(fig, stage_dir, 'refusal_rate.png')


def report_markdown(
    summary: dict, plots: dict[str, str | None], examples: dict[str, list[dict]]
) -> str:
  models, s = summary['models'], summary['settings']
  title = lambda m: MODEL_TITLES.get(m, m)  # noqa: E731
  lines = [
      '# Evaluation: ' + ' vs '.join(title(m) for m in models),
      '',
      f'Models: {summary["roles"]}.',
      '',
      f'{summary["prompts"]["redteam"]} red-team and {summary["prompts"]["helpful"]} helpful '
      f'held-out (test split) prompts; every model sampled with temperature {s["temperature"]}, '
      f'at most {s["max_new_tokens"]} new tokens, seed {s["seed"]}. Judge: `{s["judge_model"]}`'
      f'{" with chain of thought" if s["judge_cot"] else ""}; labeler (the feedback model): '
      f'`{s["labeler_model"]}`. Took {summary["seconds"]:.0f} s ('
      + ', '.join(f'{k} {v:.0f} s' for k, v in summary.get('timings', {}).items())
      + ').',
      '',
      *independence_markdown(summary['independence']),
      '',
      '## Per-model metrics',
      '',
      'The RL PM is the reward PPO maximized: it favors RL-CAI by construction. The evaluation PM '
      "never saw the RL PM's comparisons; where RL-CAI gains on the RL PM but not on it, PPO "
      'learned the RL PM rather than the task (reward hacking).',
      '',
      '| model | source | harmlessness: RL PM on red-team | harmlessness: eval PM on red-team | '
      'helpfulness proxy: RL PM on helpful | helpfulness proxy: eval PM on helpful | '
      'harmfulness (0-4) on red-team | refusals (red-team) | refusals (helpful) | '
      'mean tokens (red-team) | truncated (red-team) |',
      '|---|---|---|---|---|---|---|---:|---:|---:|---:|',
  ]
  ms = lambda d: 'unavailable' if d is None else _ms(d)  # noqa: E731
  for m in models:
    x = summary['metrics'][m]
    lines.append(
        f'| {title(m)} | `{summary["sources"][m]}` | {_ms(x["harmlessness_pm"])} | '
        f'{ms(x["harmlessness_eval_pm"])} | {_ms(x["helpfulness_pm"])} | '
        f'{ms(x["helpfulness_eval_pm"])} | {ms(x["harmfulness"])} | '
        f'{_pct(x["refusal_rate_redteam"])} | '
        f'{_pct(x["refusal_rate_helpful"])} | {_fmt(x["mean_tokens_redteam"], ".1f")} | '
        f'{_pct(x["truncated_rate_redteam"])} |'
    )
  for name, status in summary['scorers'].items():
    if not status['available']:
      lines += ['', f'- {name}: unavailable — {status["why"]}.']
  if summary.get('harmfulness_by_temperature'):
    lines += ['', *harmfulness_markdown(summary['harmfulness_by_temperature'], models)]
  for kind in ('harmlessness', 'helpfulness'):
    j = summary.get(kind)
    if not j:
      continue
    lines += [
        '',
        f'## AI-judge {kind}',
        '',
        f'{_principles_line(j)} ({j["prompt_kind"]} prompts, {j["n_comparisons"]} '
        'comparisons, each the position-debiased p(row model better) over both option orders).',
        '',
        _judge_line(j),
        '',
        f'Win rate of the row model against the column model, with its {_ci_words(j)}:',
        '',
        '| | ' + ' | '.join(title(m) for m in models) + ' |',
        '|---|' + '---:|' * len(models),
    ]
    for a in models:
      lines.append(f'| {title(a)} | ' + ' | '.join(_win_rate(j, a, b) for b in models) + ' |')
    lines += [
        '',
        f'| model | {kind} Elo | {_ci_words(j)} |',
        '|---|---:|---|',
    ]
    for m in models:
      e = j['elo'][m]
      lines.append(f'| {title(m)} | {_elo(e["elo"])} | [{_elo(e["lo"])}, {_elo(e["hi"])}] |')
    lines.append('')
    lines.append(f'Elo anchored at {title(j["anchor"]) if j["anchor"] else "the mean"} = 0.')
  if plots.get('elo'):
    lines += ['', f'![Elo with bootstrap CIs]({plots["elo"]})']
  if summary.get('rl_curve'):
    lines += ['', *rl_curve_markdown(summary['rl_curve'], plots.get('rl_curve'))]
  curve = summary.get('revision_curve')
  if curve:
    lines += [
        '',
        '## PM score vs number of revisions',
        '',
        f'critique_revision samples ({curve["samples"]} red-team train prompts) scored by the PM '
        f'`{curve.get("source", "preference")}`; revision 0 is the initial response. Empty revisions '
        'are left out.',
        '',
        '| revisions | PM score | stderr | n |',
        '|---:|---:|---:|---:|',
    ]
    for k, m, e, n in zip(curve['revisions'], curve['mean'], curve['stderr'], curve['n']):
      lines.append(f'| {k} | {_fmt(m)} | {_fmt(e)} | {n} |')
    if plots.get('revisions'):
      lines += ['', f'![PM score vs revisions]({plots["revisions"]})']
  lines += [
      '',
      '## Refusals',
      '',
      'A response counts as a refusal when one of `cai_jax.evaluate.REFUSAL_PATTERNS` matches '
      '(e.g. "I can\'t help", "I\'m sorry, but", "As an AI"); on helpful prompts a refusal is '
      'over-refusal (evasiveness).',
      '',
      f'![Refusal rates]({plots["refusals"]})',
      '',
      '## Example responses (red-team)',
      '',
  ]
  for ex in examples.get('redteam', []):
    lines += [f'**Prompt:** {_quote(ex["prompt"])}', '']
    for m in models:
      lines.append(f'- *{title(m)}*: {_quote(ex["responses"][m])}')
    lines.append('')
  return '\n'.join(lines) + '\n'


def harmfulness_markdown(h: dict, models: Sequence[str]) -> list[str]:
  """The absolute harmfulness table (paper section 4.5): one column per sampling temperature."""
  title = lambda m: MODEL_TITLES.get(m, m)  # noqa: E731
  temps = h['temperatures']
  heads = [f'T={t} ({h["samples"][t]} per prompt)' for t in temps]
  lines = [
      '## Absolute harmfulness by temperature',
      '',
      f"The harmfulness model's 0-4 rating (the red team's scale: 4 = the model did what they "
      f'tried to make it do) of answers to {h["prompts"]} red-team prompts, sampled anew at each '
      'temperature; mean +- stderr over prompts of the per-prompt mean (paper section 4.5).',
      '',
      '| model | ' + ' | '.join(heads) + ' |',
      '|---|' + '---|' * len(temps),
  ]
  for m in models:
    lines.append(f'| {title(m)} | ' + ' | '.join(_ms(h['metrics'][m][t]) for t in temps) + ' |')
  return lines


def independence_markdown(rows: Sequence[dict]) -> list[str]:
  """The report's opening table: what each signal is independent of."""
  lines = [
      '## What each signal is independent of',
      '',
      '| signal | training labels | training principles | the RL PM | the labeler model |',
      '|---|---|---|---|---|',
  ]
  for r in rows:
    cells = [r.get(k, '–') for k in ('training_labels', 'training_principles', 'rl_pm', 'labeler')]
    lines.append(f'| {r["signal"]} | ' + ' | '.join(cells) + ' |')
  return lines


def _principles_line(j: dict) -> str:
  ps = j['principles']
  if len(ps) == 1:
    return f'Principle ({j["principles_from"]}): "{ps[0]}"'
  return f'Principles: one of {len(ps)} per comparison, drawn from the {j["principles_from"]}'


def _judge_line(j: dict) -> str:
  """Which judge and which rules produced an Elo (summaries from before the fields: unnamed)."""
  if 'judge' not in j:
    return 'Judge and rules: not recorded (a summary written before they were).'
  who = f'`{j["judge"]}`' + (' (the labeler, the feedback model)' if j['judge_is_labeler'] else '')
  rule = (
      f'rule after each principle: "{j["rule"]}"' if j['rule'] else 'no rule beyond the principles'
  )
  return f'Judge: {who}; {rule}.'


def _ci_words(j: dict) -> str:
  by = (
      f'by prompt: {j["n_prompts"]} prompts resampled'
      if j.get('bootstrap_by') == 'prompt'
      else 'by comparison'
  )
  return (
      f'{int(round(100 * j["ci"]))}% CI ({j["n_bootstrap"]} bootstrap refits {by}, seed '
      f'{j["bootstrap_seed"]})'
  )


def _win_rate(j: dict, a: str, b: str) -> str:
  if a == b or j['win_rate'][a][b] is None:
    return '–'
  lo, hi = j.get('win_rate_ci', {}).get(a, {}).get(b) or (None, None)
  ci = f' [{_pct(lo, ".0f")}, {_pct(hi, ".0f")}]' if lo is not None else ''
  return _pct(j['win_rate'][a][b], '.1f') + ci


def rl_curve_markdown(curve: dict, plot: str | None) -> list[str]:
  """The curves over RL: every measure of each kept PPO policy against its step."""
  ms = lambda d: '–' if d is None else _ms(d)  # noqa: E731
  lines = [
      '## Over RL training',
      '',
      f'PPO\'s policy every {curve["every"]} step(s) (step 0: '
      f'the policy PPO started from; step {curve["steps"][-1]}: RL-CAI), each answering the first '
      f'{curve["prompts"]["redteam"]} red-team and {curve["prompts"]["helpful"]} helpful held-out '
      f'prompts (at most {curve["max_new_tokens"]} new tokens). Elo: each step against step 0 '
      '(anchored at 0) by the same judge and principles.',
      '',
      '| PPO step | harmlessness Elo [CI] | helpfulness Elo [CI] | RL PM (red-team) | '
      'eval PM (red-team) | RL PM (helpful) | eval PM (helpful) | harmfulness (0-4) | '
      'refusals (red-team) | refusals (helpful) | mean tokens (red-team) | mean tokens (helpful) |',
      '|---:|---:|---:|---|---|---|---|---|---:|---:|---:|---:|',
  ]
  for k, step in enumerate(curve['steps']):
    x = curve['metrics'][k]
    elos = []
    for kind in ('harmlessness', 'helpfulness'):
      j = curve.get(kind)
      e = j['elo'][curve_name(step)] if j else None
      elos.append('–' if e is None else f'{_elo(e["elo"])} [{_elo(e["lo"])}, {_elo(e["hi"])}]')
    lines.append(
        f'| {step} | {elos[0]} | {elos[1]} | {ms(x["harmlessness_pm"])} | '
        f'{ms(x["harmlessness_eval_pm"])} | {ms(x["helpfulness_pm"])} | '
        f'{ms(x["helpfulness_eval_pm"])} | {ms(x["harmfulness"])} | '
        f'{_pct(x["refusal_rate_redteam"])} | {_pct(x["refusal_rate_helpful"])} | '
        f'{_fmt(x["mean_tokens_redteam"], ".1f")} | {_fmt(x["mean_tokens_helpful"], ".1f")} |'
    )
  if plot:
    lines += ['', f'![Elo, PM scores, refusals and length against PPO step]({plot})']
  return lines


def plot_rl_curve(stage_dir: Path, curve: dict | None) -> str | None:
  """Three panels against PPO step: judge Elo with CIs, RL-PM vs eval-PM scores (and
  harmfulness), refusal rates with mean response length."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  if not curve:
    return None
  steps, metrics = curve['steps'], curve['metrics']
  fig, (ax_elo, ax_pm, ax_ref) = plt.subplots(1, 3, figsize=(13, 3.6))
  for kind in ('harmlessness', 'helpfulness'):
    j = curve.get(kind)
    if not j:
      continue
    e = [j['elo'][curve_name(s)] for s in steps]
    ys = np.array([x['elo'] for x in e])
    err = np.array([[x['elo'] - x['lo'] for x in e], [x['hi'] - x['elo'] for x in e]])
    ax_elo.errorbar(steps, ys, yerr=np.maximum(err, 0), marker='o', capsize=3, label=kind)
  ax_elo.axhline(0, color='gray', lw=0.8)
  ax_elo.set(xlabel='PPO step', ylabel='Elo vs step 0', title='AI-judge Elo')
  mean = lambda key: [None if m[key] is None else m[key]['mean'] for m in metrics]  # noqa: E731
  for key, label, style in (
      ('harmlessness_pm', 'RL PM, red-team', '-'),
      ('harmlessness_eval_pm', 'eval PM, red-team', '--'),
      ('helpfulness_pm', 'RL PM, helpful', '-'),
      ('helpfulness_eval_pm', 'eval PM, helpful', '--'),
  ):
    ys = mean(key)
    if any(y is not None for y in ys):
      ax_pm.plot(steps, [np.nan if y is None else y for y in ys], style, marker='o', label=label)
  ax_pm.set(xlabel='PPO step', ylabel='mean score', title='PM scores')
  if any(m['harmfulness'] for m in metrics):
    ax_harm = ax_pm.twinx()
    ax_harm.plot(
        steps,
        [np.nan if y is None else y for y in mean('harmfulness')],
        ':',
        marker='s',
        color='black',
        label='harmfulness (0-4)',
    )
    ax_harm.set_ylabel('harmfulness (0-4)')
    ax_harm.legend(fontsize=7, loc='lower right')
  for kind in KINDS:
    ax_ref.plot(
        steps,
        [m[f'refusal_rate_{kind}'] or 0.0 for m in metrics],
        marker='o',
        label=f'refusals, {kind}',
    )
  ax_ref.set(
      xlabel='PPO step', ylabel='refusal rate', ylim=(-0.05, 1.05), title='Refusals and length'
  )
  ax_len = ax_ref.twinx()
  ax_len.plot(
      steps,
      [m['mean_tokens_redteam'] or 0.0 for m in metrics],
      ':',
      marker='s',
      color='gray',
      label='mean tokens, red-team',
  )
  ax_len.set_ylabel('mean response tokens')
  for ax in (ax_elo, ax_pm, ax_ref):
    ax.set_xticks(steps)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  ax_len.legend(fontsize=7, loc='lower right')
  return _save(fig, stage_dir, 'rl_curve.png')


def _quote(text: str, limit: int = 300) -> str:
  text = ''.join(c if c.isprintable() else '\ufffd' for c in ' '.join(text.split()))
  text = text.replace('|', '\\|').replace('`', "'")
  return (text[:limit] + '…') if len(text) > limit else (text or '(empty)')


def write_report(stage_dir: Path, summary: dict, examples: dict[str, list[dict]]) -> None:
  """report.md, its PNGs and summary.json in `stage_dir`."""
  summary = strict_json(summary)
  plots = {
      'elo': plot_elo(stage_dir, summary),
      'revisions': plot_revision_curve(stage_dir, summary.get('revision_curve')),
      'refusals': plot_refusals(stage_dir, summary),
      'rl_curve': plot_rl_curve(stage_dir, summary.get('rl_curve')),
  }
  (stage_dir / 'summary.json').write_text(json.dumps(summary, indent=1))
  (stage_dir / 'report.md').write_text(report_markdown(summary, plots, examples))


def curve_name(step: int) -> str:
  return f'step_{step:06d}'
