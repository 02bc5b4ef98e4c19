"""Stage `evaluate`: the helpful, SL-CAI (sft) and RL-CAI (ppo) models compared on held-out prompts.

Every model answers the same test-split red-team and helpful prompts with the same sampling
settings and seed; a prompt that continues a multi-turn red-team conversation is shown with the
turns before it, and the PM and the judge read that conversation too. Then (Bai et al. 2022,
section 4.3 and figures 2, 5, 8):

* harmlessness: the preference model's (the RL PM's) reward of each red-team response, mean ±
  stderr -- the very reward PPO maximized, so it favors RL-CAI by construction; beside it, when
  their stages ran, the evaluation PM's reward (a PM trained on comparisons the RL PM never saw:
  the Goodhart gauge) and the harmfulness model's predicted 0-4 red-team rating (section 4.5);
* helpfulness proxy: the PM's reward of each helpful-prompt response (the PM learned
  helpfulness pairs too: HH-RLHF's human ones with `preference.helpful_mix.path`, else the
  feedback stage's AI-labeled substitute) and the AI judge's pairwise preference under
  `helpfulness_principle` (below);
* refusals: the share of responses a keyword classifier (`REFUSAL_PATTERNS`) calls a refusal,
  on red-team prompts (harmless but evasive?) and helpful prompts (over-refusal);
* AI-judge win rates: the judge (`judge_source`; by default the feedback model, which the report
  then calls the labeler) sees both models' responses to one prompt as options (A)/(B) under a
  principle drawn from the *evaluation* principles (`evaluate.constitution`, held out from
  training), in both orders -- the labeler (`labeler.Labeler`) and
  `labeler.label_from_logprobs` with debiasing on (`labels.debias` cancels position bias) --
  and p(first model's response is better) is one soft comparison; Elo is fitted to all of them
  (`elo.fit_elo`) with percentile intervals from a bootstrap by prompt (`elo.bootstrap`: the
  model pairs on one prompt are resampled together, seeded);
* curves over RL (`rl_curve_every`, figures 8 and 10): the same measures of PPO's policy every K
  steps (ppo's snapshots), step 0 being the policy it started from;
* PM score vs number of revisions: the PM's reward of critique_revision's initial responses
  (revision 0) and of each round's revision, mean ± stderr per round (paper figure 5).

The report opens with what each signal is independent of (training labels, training principles,
the RL PM, the labeler model).

Outputs in the stage directory: `responses_<model>.jsonl` (cached per model: a restart skips
models already answered), `judge_<kind>.jsonl` (cached judgements), `curve_*.jsonl` (the same for
the RL curve), `summary.json` (every number), `report.md` with the tables and the PNG plots it
embeds.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging

from cai_jax import sampling
from cai_jax.bookkeeping import StageError, roles_line
from cai_jax.evaluation.judge import (
    MODEL_TITLES,
    elo_table,
    independence_rows,
    judge_comparisons,
    judge_principles,
    judge_rule,
    judge_source,
    labeler_source,
    write_cache,
)
from cai_jax.evaluation.report import curve_name, strict_json, write_report
from cai_jax.evaluation.scores import (
    KINDS,
    mean_stderr,
    model_metrics,
    pm_rewards,
    revision_curve,
    revision_pairs,
    score_all,
    scorer_status,
)
from cai_jax.method import comparisons as comparisons_lib
from cai_jax.method import constitution as constitution_lib
from cai_jax.method import conversation, data
from cai_jax.method import snapshots
from cai_jax.method import stage_inputs
from cai_jax.utils import records as records_lib

STAGE = 'evaluate'

# ---- steps ------------------------------------------------------------------------------------


def held_out_prompts(ctx) -> dict[str, list[dict]]:
  """The first N records of the held-out test splits, {'redteam': [...], 'helpful': [...]}."""
  cfg = ctx.config.evaluate
  out = {}
  for kind, n in (('redteam', cfg.num_redteam_prompts), ('helpful', cfg.num_helpful_prompts)):
    if n == 0:
      out[kind] = []
      continue
    split = data.stage_prompts(ctx, kind)['test']
    out[kind] = split if n < 0 else split[:n]
    if 0 < len(split) < n:
      logging.warning(
          '%s: asked for %d %s test prompts, the test split has %d', STAGE, n, kind, len(split)
      )
  if not out['redteam']:
    raise StageError(
        f'{STAGE}: no red-team test prompts (config.evaluate.num_redteam_prompts='
        f'{cfg.num_redteam_prompts}, config.data.test_fraction={ctx.config.data.test_fraction})'
    )
  return out


def sampled_turns(record: dict, tokenizer, fmt: str, budget: int) -> list[conversation.Turn]:
  """A test prompt as a model is asked it: the record's conversation (`data.prompt_turns`),
  shedding its oldest exchanges to fit `budget` tokens (`conversation.fit_turns`)."""
  return conversation.fit_turns(data.prompt_turns(record), fmt, tokenizer, budget)


def model_responses(ctx, role: str, prompts: dict[str, list[dict]], stage_dir: Path) -> list[dict]:
  """The model's responses to every test prompt, generated once and cached in the stage dir."""
  cfg = ctx.config.evaluate
  return sample_responses(
      ctx,
      role,
      ctx.model_source(role),
      prompts,
      stage_dir / f'responses_{role}.jsonl',
      cfg.max_new_tokens,
  )


def sample_responses(
    ctx,
    name: str,
    source: str,
    prompts: dict[str, list[dict]],
    path: Path,
    max_new_tokens: int,
    temperature: float | None = None,
) -> list[dict]:
  """`source`'s responses to `prompts` (every model the same sampling settings and seed), cached
  in `path`: a restart reuses a file that answers the same prompts. `temperature`: None =
  `evaluate.temperature`."""
  items = [(kind, r) for kind in KINDS for r in prompts[kind]]
  if path.exists():
    cached = records_lib.read_jsonl(path)
    if [(c['kind'], c['id']) for c in cached] == [(k, r['id']) for k, r in items]:
      print(f'{STAGE}: {name}: {len(cached)} responses from {path.name}', flush=True)
      return cached
  cfg, fmt = ctx.config.evaluate, ctx.config.conversation_format
  t0 = time.time()
  # Kept loaded when it is also the judge (the pretrained model, by default).
  model = ctx.load(source, cache=source == judge_source(ctx), frozen=True)
  budget = min(ctx.config.model.max_len, model.model.cfg.max_positions) - max_new_tokens
  engine = sampling.Engine.from_config(model.model, ctx.config, model.tokenizer)
  responses = sampling.generate_responses(
      model,
      [sampled_turns(r, model.tokenizer, fmt, budget) for _, r in items],
      fmt=fmt,
      max_new_tokens=max_new_tokens,
      temperature=cfg.temperature if temperature is None else temperature,
      batch_size=cfg.batch_size,
      seed=ctx.config.seed + cfg.seed_offset,
      engine=engine,
  )  # the format's stop strings end a reply
  records = [
      dict(
          kind=kind,
          id=r['id'],
          prompt=r['prompt'],
          **({'conversation': r['conversation']} if r.get('conversation') else {}),
          response=resp.text.strip(),
          tokens=len(resp.tokens),
          finish_reason=resp.finish_reason,
      )
      for (kind, r), resp in zip(items, responses)
  ]
  write_cache(path, records)
  used = ''.join(f', {k} {v}' for k, v in sampling.engine_summary(engine).items())
  print(f'{STAGE}: {name}: {len(records)} responses in {time.time() - t0:.1f}s{used}', flush=True)
  return records


def harmfulness_by_temperature(ctx, models: list[str], redteam: list[dict], stage_dir: Path):
  """The paper's absolute harmfulness (section 4.5) at each of `harmfulness_temperatures`: every
  model answers each red-team prompt once greedily (T = 0) and `harmfulness_samples` times at a
  T > 0 (prompt i's copies draw different keys), cached per model and temperature; the
  harmfulness model rates each answer 0-4. Per (model, T): mean +- stderr over prompts of the
  prompt's mean rating (its samples averaged first, so stderr is by prompt)."""
  cfg = ctx.config.evaluate
  temperatures = [float(t) for t in cfg.harmfulness_temperatures]
  sampled = {}
  for m in models:
    for temp in temperatures:
      n = 1 if temp == 0 else cfg.harmfulness_samples
      sampled[m, temp] = sample_responses(
          ctx,
          f'{m} for harmfulness at T={temp:g}, {n} per prompt',
          ctx.model_source(m),
          {'redteam': [r for r in redteam for _ in range(n)], 'helpful': []},
          stage_dir / f'harmfulness_{m}_t{temp:g}.jsonl',
          cfg.max_new_tokens,
          temperature=temp,
      )
  rater = ctx.load_role('harmfulness', scalar_head=True, cache=False, frozen=True)
  ratings = pm_rewards(
      ctx,
      rater,
      [
          comparisons_lib.response_conversation(r, r['response'])
          for g in sampled.values()
          for r in g
      ],
  )
  del rater
  metrics, start = {m: {} for m in models}, 0
  for (m, temp), g in sampled.items():
    per_prompt = ratings[start : start + len(g)].reshape(len(redteam), -1).mean(axis=1)
    metrics[m][f'{temp:g}'] = mean_stderr(per_prompt)
    start += len(g)
  return dict(
      temperatures=[f'{t:g}' for t in temperatures],
      samples={f'{t:g}': 1 if t == 0 else cfg.harmfulness_samples for t in temperatures},
      prompts=len(redteam),
      metrics=metrics,
  )


# ---- curves over RL ---------------------------------------------------------------------------


def rl_curve_points(ctx) -> list[tuple[int, str]]:
  """(PPO step, model source) of the curve: step 0 the policy PPO started from, each kept
  snapshot (snapshots.snapshot_steps) at a multiple of `rl_curve_every`, the last step its export.
  None when off, or when RL-CAI is not among the models evaluated (an SL-only evaluation)."""
  c = ctx.config
  if not c.evaluate.rl_curve_every or 'ppo' not in _models(c.evaluate):
    return []
  points = [(0, c.ppo.policy_source or ctx.model_source('sft'))]
  for step in snapshots.snapshot_steps(c):
    path = snapshots.snapshot_path(ctx.stage_dir('ppo'), step)
    if not path.exists():
      raise StageError(
          f'{STAGE}: config.evaluate.rl_curve_every={c.evaluate.rl_curve_every} but {path} is '
          'missing: rerun --config.force=ppo'
      )
    points.append((step, str(path)))
  return points + [(c.ppo.steps, ctx.model_source('ppo'))]


def curve_prompts(ctx, prompts: dict[str, list[dict]]) -> dict[str, list[dict]]:
  n = ctx.config.evaluate.rl_curve_prompts
  return {k: (v if n < 0 else v[:n]) for k, v in prompts.items()}


def curve_tokens(cfg) -> int:
  return cfg.rl_curve_max_new_tokens or cfg.max_new_tokens


def curve_records(ctx, points, prompts, stage_dir: Path, records: dict) -> dict[str, list[dict]]:
  """Each curve point's responses; a point that is one of the compared models (step 0 = sft, the
  last = ppo) under the same prompts and length reuses that model's."""
  cfg = ctx.config.evaluate
  same = cfg.rl_curve_prompts < 0 and curve_tokens(cfg) == cfg.max_new_tokens
  out = {}
  for step, source in points:
    role = {0: 'sft', ctx.config.ppo.steps: 'ppo'}.get(step)
    if same and role in records and source == ctx.model_source(role):
      out[curve_name(step)] = records[role]
      continue
    path = stage_dir / f'curve_responses_{curve_name(step)}.jsonl'
    out[curve_name(step)] = sample_responses(
        ctx, f'PPO step {step}', source, prompts, path, curve_tokens(cfg)
    )
  return out


def _curve_judgements(ctx, principles, records, steps, stage_dir, summary_kind) -> dict | None:
  """Each curve point against step 0, by the judge: Elo (anchored at step 0) and win rates."""
  cfg = ctx.config.evaluate
  kind = 'redteam' if summary_kind == 'harmlessness' else 'helpful'
  if kind not in principles or not any(r['kind'] == kind for r in records[curve_name(0)]):
    return None
  names = [curve_name(s) for s in steps]
  pairs = [(n, names[0]) for n in names[1:]]
  judged = judge_comparisons(
      ctx, kind, principles[kind][0], records, pairs, stage_dir / f'curve_judge_{kind}.jsonl'
  )
  return elo_table(
      [(j['model_a'], j['model_b'], j['p_a']) for j in judged],
      names,
      n_bootstrap=cfg.n_bootstrap,
      seed=cfg.bootstrap_seed,
      ci=cfg.ci,
      anchor=names[0],
      prompts=[j['id'] for j in judged],
  )


# ---- the stage --------------------------------------------------------------------------------


# What the stage reads (the table, cai_jax/pipeline.py, and the bookkeeping use these).
READS = ('critique_revision', 'sft', 'preference', 'ppo', 'dpo')
MODELS = ('pretrained', 'helpful')  # the judge (by default the labeler) and the helpful model
# The DPO model joins the contestants, and the trained scorers score, when they ran.
OPTIONAL = ('dpo', 'evaluation_pm', 'harmfulness')


def upstream_unused(config, upstream: str) -> bool:
  """ppo and dpo are needed only when `evaluate.models` names them (a finished dpo joins anyway:
  OPTIONAL)."""
  if 'evaluate' not in config:
    return False
  models = config.evaluate.models
  names = models.split(',') if isinstance(models, str) else models
  return upstream in ('ppo', 'dpo') and upstream not in [m.strip() for m in names]


def inputs(config) -> dict:
  """The files it hashes into its fingerprint: the constitution, the prompt sources and the
  judge's evaluation principles (`evaluate.constitution`)."""
  out = stage_inputs.files(config)
  if 'evaluate' in config:
    path = constitution_lib.evaluation_path(config.evaluate.constitution)
    if path.exists():
      out['evaluate.constitution'] = path
  return out


def check_config(config) -> None:
  """Fails on evaluate settings that cannot work (run before anything is written)."""
  cfg = config.evaluate
  _models(cfg)
  for field, low in (
      ('rl_curve_every', 0),
      ('rl_curve_prompts', -1),
      ('rl_curve_max_new_tokens', 0),
  ):
    if cfg[field] < low:
      raise StageError(f'config.evaluate.{field}: expected an integer >= {low}, got {cfg[field]}')
  if any(float(t) < 0 for t in cfg.harmfulness_temperatures) or cfg.harmfulness_samples < 1:
    raise StageError(
        'config.evaluate.harmfulness_temperatures must be >= 0 and harmfulness_samples >= 1, got '
        f'{tuple(cfg.harmfulness_temperatures)} and {cfg.harmfulness_samples}'
    )
  if cfg.rl_curve_every and cfg.rl_curve_prompts == 0:
    raise StageError(
        'config.evaluate.rl_curve_prompts: 0 prompts leave the RL curve empty; -1 = all'
    )
  if not (cfg.harmlessness_principle and cfg.helpfulness_principle):
    try:
      constitution_lib.load_evaluation_principles(cfg.constitution)
    except constitution_lib.ConstitutionError as e:
      raise StageError(f'config.evaluate.constitution: {e}') from None


def _models(cfg) -> list[str]:
  models = [m.strip() for m in cfg.models.split(',') if m.strip()]
  unknown = [m for m in models if m not in MODEL_TITLES]
  if len(models) < 2 or unknown:
    raise StageError(
        f'config.evaluate.models: expected two or more of {", ".join(MODEL_TITLES)}, '
        f'got {cfg.models!r}'
    )
  if cfg.elo_anchor and cfg.elo_anchor not in models:
    raise StageError(
        f'config.evaluate.elo_anchor={cfg.elo_anchor!r} is not one of the models {models}'
    )
  return models


def run(ctx, stage_dir: Path) -> dict:
  t0 = time.time()
  cfg = ctx.config.evaluate
  models = _models(cfg)
  # The DPO model joins once its stage has finished in this workdir with this config (an
  # optional read: a later dpo run changes evaluate's fingerprint, so evaluate is redone).
  if 'dpo' not in models and ctx.optional('dpo')[0] is not None:
    models.append('dpo')
  stage_dir.mkdir(parents=True, exist_ok=True)
  prompts = held_out_prompts(ctx)
  points = rl_curve_points(ctx)
  steps = [step for step, _ in points]

  timings = {}
  records = {m: model_responses(ctx, m, prompts, stage_dir) for m in models}
  curve = curve_records(ctx, points, curve_prompts(ctx, prompts), stage_dir, records)
  timings['responses'] = time.time() - t0

  # One scoring call per scorer for everything: batches of similar lengths, few compiled shapes.
  t = time.time()
  scorers = scorer_status(ctx)
  curve_pairs, curve_where, n_samples = (
      revision_pairs(ctx.stage_dir('critique_revision'), cfg.max_revision_samples)
      if cfg.revision_curve
      else ([], [], 0)
  )
  # A curve point that reuses a compared model's responses (step 0, the last step) takes that
  # model's metrics: scored once, and equal to the bit (a float32 score depends on its batch).
  owner = lambda g: next((m for m in models if records[m] is g), None)  # noqa: E731
  named = [(m, records[m]) for m in models] + [(n, g) for n, g in curve.items() if not owner(g)]
  conversations = [
      comparisons_lib.response_conversation(r, r['response']) for _, g in named for r in g
  ]
  fixed_pm = cfg.get('revision_curve_pm', '')  # one PM for every sweep point's curve
  rewards, scores = score_all(ctx, scorers, conversations, [] if fixed_pm else curve_pairs)
  if fixed_pm and curve_pairs:
    pm = ctx.load(fixed_pm, scalar_head=True, cache=False, frozen=True)
    rewards = np.concatenate([rewards, pm_rewards(ctx, pm, curve_pairs)])
    del pm
  every, start = {}, 0  # name -> metrics, for the models and the curve points
  for name, g in named:
    part = slice(start, start + len(g))
    every[name] = model_metrics(
        g, rewards[part], {k: None if v is None else v[part] for k, v in scores.items()}
    )
    start += len(g)
  every |= {n: every[owner(g)] for n, g in curve.items() if owner(g)}
  metrics = {m: every[m] for m in models}
  revisions = revision_curve(rewards[start:], curve_where, n_samples)
  if revisions:
    revisions['source'] = fixed_pm or ctx.model_source('preference')  # the PM that scored it
  timings['pm'] = time.time() - t

  if scorers['harmfulness']['available'] and cfg.harmfulness_temperatures:
    t = time.time()
    by_temperature = harmfulness_by_temperature(ctx, models, prompts['redteam'], stage_dir)
    timings['harmfulness_by_temperature'] = time.time() - t
  else:
    by_temperature = None

  principles = {}
  for kind in KINDS:
    if prompts[kind]:
      principles[kind] = judge_principles(ctx, kind)
  summary = {
      'models': models,
      'roles': roles_line(ctx.config.model),
      'sources': {m: ctx.model_source(m) for m in models},
      'prompts': {k: len(v) for k, v in prompts.items()},
      'independence': independence_rows(ctx, principles, scorers),
      'scorers': scorers,
      'metrics': metrics,
      'harmfulness_by_temperature': by_temperature,
      'revision_curve': revisions,
  }
  pairs = list(itertools.combinations(models, 2))
  for name, kind in (('harmlessness', 'redteam'), ('helpfulness', 'helpful')):
    if kind not in principles:
      summary[name] = None
      continue
    t = time.time()
    judged = judge_comparisons(
        ctx, kind, principles[kind][0], records, pairs, stage_dir / f'judge_{kind}.jsonl'
    )
    timings[f'judge_{kind}'] = time.time() - t
    summary[name] = dict(
        elo_table(
            [(j['model_a'], j['model_b'], j['p_a']) for j in judged],
            models,
            n_bootstrap=cfg.n_bootstrap,
            seed=cfg.bootstrap_seed,
            ci=cfg.ci,
            anchor=cfg.elo_anchor or None,
            prompts=[j['id'] for j in judged],
        ),
        principles=list(principles[kind][0]),
        principles_from=principles[kind][1],
        rule=judge_rule(ctx, kind),
        judge=judge_source(ctx),
        judge_is_labeler=judge_source(ctx) == labeler_source(ctx),
        prompt_kind=kind,
    )
  if points:
    t = time.time()
    summary['rl_curve'] = dict(
        every=cfg.rl_curve_every,
        steps=steps,
        sources={curve_name(s): src for s, src in points},
        prompts={k: len(v) for k, v in curve_prompts(ctx, prompts).items()},
        max_new_tokens=curve_tokens(cfg),
        metrics=[every[curve_name(s)] for s in steps],
        **{
            name: _curve_judgements(ctx, principles, curve, steps, stage_dir, name)
            for name in ('harmlessness', 'helpfulness')
        },
    )
    timings['rl_curve_judge'] = time.time() - t
  summary['settings'] = dict(
      max_new_tokens=cfg.max_new_tokens,
      temperature=cfg.temperature,
      seed=ctx.config.seed + cfg.seed_offset,
      judge_model=judge_source(ctx),
      labeler_model=labeler_source(ctx),
      judge_cot=cfg.judge_cot,
      judge_num_few_shots=cfg.judge_num_few_shots,
  )
  summary['seconds'] = round(time.time() - t0, 2)
  summary['timings'] = {k: round(v, 2) for k, v in timings.items()}  # includes cache hits (~0 s)
  examples = {
      'redteam': [
          {'prompt': r['prompt'], 'responses': {m: records[m][i]['response'] for m in models}}
          for i, r in enumerate(records[models[0]][:3])
          if r['kind'] == 'redteam'
      ]
  }
  if jax.process_index() == 0:
    write_report(stage_dir, summary, examples)
  return compact_summary(summary)


def compact_summary(summary: dict) -> dict:
  """The DONE.json summary: the headline numbers, flat."""
  out = {'models': summary['roles'], 'prompts': summary['prompts']}
  mean = lambda d: None if d is None else d['mean']  # noqa: E731
  for m in summary['models']:
    x = summary['metrics'][m]
    out[m] = {
        'harmlessness_pm': x['harmlessness_pm']['mean'],
        'helpfulness_pm': x['helpfulness_pm']['mean'],
        'harmlessness_eval_pm': mean(x['harmlessness_eval_pm']),
        'helpfulness_eval_pm': mean(x['helpfulness_eval_pm']),
        'harmfulness': mean(x['harmfulness']),
        'refusal_rate_redteam': x['refusal_rate_redteam'],
        'refusal_rate_helpful': x['refusal_rate_helpful'],
    }
    for kind in ('harmlessness', 'helpfulness'):
      if summary.get(kind):
        out[m][f'{kind}_elo'] = summary[kind]['elo'][m]['elo']
  if summary.get('harmfulness_by_temperature'):
    h = summary['harmfulness_by_temperature']
    for m in summary['models']:
      out[m]['harmfulness_by_temperature'] = {
          t: h['metrics'][m][t]['mean'] for t in h['metrics'][m]
      }
  if summary.get('revision_curve'):
    out['pm_vs_revisions'] = summary['revision_curve']['mean']
  if summary.get('rl_curve'):
    out['rl_curve_steps'] = summary['rl_curve']['steps']
  out['seconds'] = summary['seconds']
  return strict_json(out)
