"""The AI judge of the evaluation: the labeler (`labeler.Labeler`, debiased over both orders) with
the judge model, asked which of two models' responses to one prompt is better under a principle
drawn from the *evaluation* principles (`evaluate.constitution`, held out from training); its soft
comparisons become win rates and Elo with by-prompt bootstrap intervals (`elo_table`). Also what
each signal is independent of (`independence_rows`: training labels and principles, the RL PM,
the labeler model)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np

from cai_jax import sampling
from cai_jax.method import constitution as constitution_lib
from cai_jax.method import data, elo
from cai_jax.method import labeler as labeler_lib
from cai_jax.utils import records as records_lib

STAGE = 'evaluate'  # the stage that judges: its log lines' prefix


# The model roles `evaluate.models` may name (keys: the stages that make them) and their titles.
MODEL_TITLES = {
    'pretrained': 'pretrained',
    'helpful': 'helpful',
    'sft': 'SL-CAI',
    'ppo': 'RL-CAI',
    'dpo': 'DPO',
}


def elo_table(
    comparisons: Sequence[tuple[str, str, float]],
    models: Sequence[str],
    *,
    n_bootstrap: int,
    seed: int,
    ci: float,
    anchor: str | None,
    prompts: Sequence[str] | None = None,
) -> dict:
  """Point Elo, bootstrap interval and win-rate matrix (with intervals) of soft pairwise
  comparisons; `prompts` (one id per comparison) makes the bootstrap resample whole prompts."""
  models = list(models)
  point = elo.fit_elo(comparisons, models, anchor=anchor)
  boot = elo.bootstrap(
      comparisons,
      models,
      n_bootstrap=n_bootstrap,
      seed=seed,
      ci=ci,
      anchor=anchor,
      clusters=prompts,
  )
  matrix = elo.win_rate_matrix(comparisons, models)
  number = lambda x: None if np.isnan(x) else float(x)  # noqa: E731
  return {
      'elo': {
          m: {
              'elo': point[m],
              'lo': boot['elo'][m][1],
              'hi': boot['elo'][m][2],
              'bootstrap_mean': boot['elo'][m][0],
          }
          for m in models
      },
      'win_rate': {
          a: {b: number(matrix[i, j]) for j, b in enumerate(models)} for i, a in enumerate(models)
      },
      'win_rate_ci': {
          a: {
              b: [number(boot['win_rate'][i, j, 0]), number(boot['win_rate'][i, j, 1])]
              for j, b in enumerate(models)
          }
          for i, a in enumerate(models)
      },
      'bootstrap_by': 'prompt' if prompts is not None else 'comparison',
      'n_prompts': len(set(prompts)) if prompts is not None else None,
      'n_comparisons': len(comparisons),
      'n_bootstrap': n_bootstrap,
      'ci': ci,
      'bootstrap_seed': seed,
      'anchor': anchor,
  }


def write_cache(path: Path, records: Sequence[dict]) -> None:
  """Whole file at once (tmp + rename): a cache file either exists complete or not at all."""
  if jax.process_index() == 0:
    records_lib.write_jsonl(path, records)


def judge_comparisons(
    ctx,
    kind: str,
    principles: Sequence[str],
    records: dict[str, list[dict]],
    pairs: Sequence[tuple[str, str]],
    path: Path,
) -> list[dict]:
  """For each pair of models and each prompt of `kind`: P(first model's response is better) under
  a principle drawn from `principles`; cached in `path`."""
  items = []
  for a, b in pairs:
    ra = [r for r in records[a] if r['kind'] == kind]
    rb = [r for r in records[b] if r['kind'] == kind]
    for x, y in zip(ra, rb):
      items.append(
          dict(
              model_a=a,
              model_b=b,
              id=x['id'],
              prompt=x['prompt'],
              **({'conversation': x['conversation']} if x.get('conversation') else {}),
              response_a=x['response'],
              response_b=y['response'],
          )
      )
  if path.exists():
    cached = records_lib.read_jsonl(path)
    if [(c['model_a'], c['model_b'], c['id']) for c in cached] == [
        (i['model_a'], i['model_b'], i['id']) for i in items
    ]:
      return cached
  t0 = time.time()
  judged = _judge(ctx, principles, items)
  out = [dict(i, principle=principle, p_a=float(p)) for i, (p, principle) in zip(items, judged)]
  write_cache(path, out)
  print(
      f'{STAGE}: judged {len(out)} {kind} pairs (both orders) in {time.time() - t0:.1f}s',
      flush=True,
  )
  return out


def _judge(ctx, principles: Sequence[str], items: Sequence[dict]) -> list[tuple[float, str]]:
  """(P(response_a is better), the principle asked) by the feedback stage's labeler with the
  judge model, both orders, one principle per item drawn from `principles`."""
  cfg = ctx.config.evaluate
  judge_cfg = ml_collections.ConfigDict(ctx.config.feedback.to_dict())
  judge_cfg.update(
      num_principles=1,
      principle_replace=False,
      debias=True,
      cot=cfg.judge_cot,
      clamp=cfg.judge_cot,  # the paper clamps CoT labels to 40-60%
      num_few_shots=cfg.judge_num_few_shots,
  )
  # A constitution whose feedback principles are the judge's: the labeler draws one per item
  # (seeded by the item). Its few-shots, if any, stay the training constitution's.
  constitution = dataclasses.replace(
      labeler_lib.load_feedback_constitution(ctx, judge_cfg), feedback_principles=tuple(principles)
  )
  judge = judge_spec(cfg)
  model = (
      ctx.load_role(judge, frozen=True) if judge in MODEL_TITLES else ctx.load(judge, frozen=True)
  )
  labeler = labeler_lib.Labeler(
      model,
      constitution,
      judge_cfg,
      ctx.config.conversation_format,
      ctx.config.model.max_len,
      ctx.config.seed,
      STAGE,
      prefix_cache=sampling.PrefixCache.from_config(model.model, ctx.config.sampling),
  )
  p_a = [0.5] * len(items)  # identical responses tie without asking (as the feedback stage does)
  asked = [''] * len(items)
  todo = [i for i, x in enumerate(items) if x['response_a'].strip() != x['response_b'].strip()]
  pairs = [
      labeler_lib.Pair(
          f'{items[i]["model_a"]}-{items[i]["model_b"]}-{items[i]["id"]}',
          tuple(data.prompt_turns(items[i])),
          items[i]['response_a'],
          items[i]['response_b'],
      )
      for i in todo
  ]
  if pairs:
    scorings = labeler.label(pairs, seed=ctx.config.seed + cfg.seed_offset)
    for i, s in zip(todo, scorings):
      p_a[i] = labeler_lib.label_from_logprobs(s, judge_cfg)
      asked[i] = s[0]['principle']
  return list(zip(p_a, asked))


def judge_spec(cfg) -> str:
  """`evaluate.judge_source` (or its old name `judge_model`), '' = the pretrained model."""
  return cfg.judge_source or cfg.judge_model or 'pretrained'


def judge_source(ctx) -> str:
  """Where the judge model lives: a role's source, or the loadable source itself."""
  j = judge_spec(ctx.config.evaluate)
  return ctx.model_source(j) if j in MODEL_TITLES else j


def labeler_source(ctx) -> str:
  """The feedback model, whose AI labels trained the RL PM (`feedback.model_source`, '' = the
  pretrained model)."""
  return ctx.config.feedback.model_source or ctx.model_source('pretrained')


def judge_principles(ctx, kind: str) -> tuple[tuple[str, ...], str]:
  """The judge's principles on `kind` prompts and where they come from: the one of
  `evaluate.<harmlessness|helpfulness>_principle` when set, else `evaluate.constitution`'s. On
  red-team prompts with `evaluate.evasiveness_rule`, each is followed by the evaluation
  principles' harmlessness rule (`judge_rule`)."""
  cfg = ctx.config.evaluate
  name = 'harmlessness' if kind == 'redteam' else 'helpfulness'
  if cfg[f'{name}_principle']:
    principles, source = (cfg[f'{name}_principle'],), f'config.evaluate.{name}_principle'
  else:
    held_out = constitution_lib.load_evaluation_principles(cfg.constitution)
    principles, source = getattr(held_out, name), f'evaluation principles `{cfg.constitution}`'
  rule = judge_rule(ctx, kind)
  return tuple(f'{p} {rule}' if rule else p for p in principles), source


def judge_rule(ctx, kind: str) -> str:
  """The rule the judge reads after each principle on `kind` prompts: the evaluation principles'
  harmlessness rule (prefer the less evasive of two harmless responses, as the paper told its
  crowdworkers) on red-team prompts when `evaluate.evasiveness_rule`; '' otherwise."""
  cfg = ctx.config.evaluate
  if kind != 'redteam' or not cfg.get('evasiveness_rule', False):
    return ''
  return constitution_lib.load_evaluation_principles(cfg.constitution).harmlessness_rule


def training_principles(ctx) -> set[str]:
  """Every principle the training stages used: critique and revision requests, feedback and
  helpfulness principles of `config.constitution`."""
  c = constitution_lib.load_constitution(ctx.config.constitution)
  requests = {
      t for pair in c.critique_revision for t in (pair.critique_request, pair.revision_request)
  }
  return requests | set(c.feedback_principles) | set(c.helpfulness_principles)


def independence_rows(ctx, principles: dict[str, tuple[tuple[str, ...], str]], scorers: dict):
  """One row per signal: is it independent of the training labels, the training principles,
  the RL PM and the labeler model? 'same as labeler' where the judge is the feedback model."""
  cfg = ctx.config.evaluate
  training = training_principles(ctx)
  judge = judge_source(ctx)
  few_shots = len(constitution_lib.load_constitution(ctx.config.constitution).feedback_few_shots)
  few_shots = few_shots if cfg.judge_num_few_shots < 0 else min(few_shots, cfg.judge_num_few_shots)
  rows = []
  for name, kind in (('harmlessness', 'redteam'), ('helpfulness', 'helpful')):
    if kind not in principles:
      continue
    asked, origin = principles[kind]
    rule = judge_rule(ctx, kind)  # read after each principle; the principles are what precede it
    shared = sum((p.removesuffix(f' {rule}') if rule else p) in training for p in asked)
    if shared:
      vs_principles = f'no: {shared} of its {len(asked)} principles are training principles'
    else:
      vs_principles = 'yes'
      if few_shots:
        vs_principles += f' (but {few_shots} training few-shot example(s) in its prompts)'
    rows.append(
        dict(
            signal=f'{name} Elo (judge `{judge}`, {origin})',
            training_labels='yes',
            training_principles=vs_principles,
            rl_pm='yes',
            labeler='same as labeler' if judge == labeler_source(ctx) else 'yes',
        )
    )
  rows.append(
      dict(
          signal='RL PM score (the reward PPO maximized)',
          training_labels='no: trained on them',
          training_principles='no: its labels were asked under them',
          rl_pm='no: it is the RL PM',
          labeler="no: trained on the labeler's labels",
      )
  )
  ev = scorers['evaluation_pm']
  if ev['available']:
    e = ctx.config.get('evaluation_pm', ml_collections.ConfigDict())
    ai_labels = e.get('use_ai_labels', True)
    human = bool(e.get('human_path', '') or e.get('human_harmless_path', ''))
    rows.append(
        dict(
            signal='evaluation PM score'
            + (' (AI labels + HH-RLHF human)' if human and ai_labels else ''),
            training_labels='yes: comparisons the RL PM never saw',
            training_principles='no: AI labels asked under them'
            if ai_labels
            else 'yes: human labels',
            rl_pm='yes',
            labeler="no: the labeler's labels on held-out prompts" if ai_labels else 'yes',
        )
    )
  else:
    rows.append(dict(signal='evaluation PM score: unavailable (why: under the per-model metrics)'))
  hm = scorers['harmfulness']
  if hm['available']:
    rows.append(
        dict(
            signal='absolute harmfulness (0-4, HH-RLHF red-team ratings)',
            training_labels='yes',
            training_principles='yes',
            rl_pm='yes',
            labeler='yes: human ratings',
        )
    )
  else:
    rows.append(dict(signal='absolute harmfulness: unavailable (why: under the per-model metrics)'))
  rows.append(
      dict(
          signal='refusal rate (keyword classifier)',
          training_labels='yes',
          training_principles='yes',
          rl_pm='yes',
          labeler='yes',
      )
  )
  return rows
