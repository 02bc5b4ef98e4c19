"""The programs `python -m cai_jax.aot` compiles: every jitted function the stages run, built
from the same functions the stages call, on abstract models and placed abstract arguments.

Each program is built from the function its stage calls (the sampler's `_prefill`/`_decode`
and `_score_options_fn` through `sampling.common.jitted`, `train_lib.make_train_step` with the
stage's loss, `preference_model._rewards`, `ppo_learner.make_rollout_fn`) on abstract models (the
`ModelConfig` preset named by `config.model.architecture`) and abstract arguments carrying the
NamedShardings that the logical-axis rules give on the topology's mesh. Shapes are the
largest buckets a stage can reach: the peak of a bucketed program is at its largest shape, so
smaller buckets are not compiled. Prompt lengths are bounded by what the stage's code allows
(`model.max_len - max_new_tokens`; evaluate's prompts by the same bound).

Each program also names the state that stays resident during its stage without being one of its
arguments: the frozen models the stage's Context keeps (`Context.load` caches them for the
stage; a trained model's loaded copy is dropped once the train state holds its copy, and the
cache is emptied between stages) and in PPO the learner's state.

Nothing here imports jax at module level: cai_jax/aot.py sets libtpu's environment first.

Why one module of ~1,050 lines: each stage's builder mirrors that stage's own code (its shapes, its
bounds, the models it keeps resident), and they all share the abstract models, placed arguments
and FLOP counts at the top; a program list split by stage would scatter those shared bounds,
while tests/test_aot.py checks the whole list against what the stages compile.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


class AotError(Exception):
  """Bad input: a config, topology or installation the check cannot run with."""


# ---- abstract models and arguments -----------------------------------------------------------


def model_config(config, *, frozen: bool = False):
  """The ModelConfig preset `config.model.architecture` with the config's dtypes and remat, as
  `Context.load` builds it (frozen: model.frozen_param_dtype)."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  from cai_jax import bookkeeping
  from cai_jax.models import attention
  from cai_jax.models.decoder import ModelConfig

  m = config.model
  preset = getattr(ModelConfig, m.architecture, None) if m.architecture else None
  if preset is None or not isinstance(preset, Callable):
    raise AotError(
        f'config.model.architecture={m.architecture!r} is not a ModelConfig preset '
        '(e.g. gemma2_2b, llama3_2_3b, qwen2_5_7b)'
    )
  # As Context.load builds it: a LoRA run's trained models are adapters on a frozen base, and a
  # frozen model (or that base) is in frozen_param_dtype, its matrices in frozen_quantization.
  cfg = preset(dtype=m.dtype, **bookkeeping.load_fields(m, frozen=frozen))
  # The kernel the config would run on the TPU, not on this host's CPU.
  return cfg.replace(
      attention=attention.resolve(m.get('attention', 'auto'), 'tpu', cfg.attn_softcap)
  )


def abstract_module(ctor: Callable[[], Any], mesh):
  """(graphdef, params): the module's state as ShapeDtypeStructs placed by the logical rules."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax
  from flax import nnx

  from cai_jax.utils import sharding

  box = {}

  def build():
    box['graphdef'], state = nnx.split(ctor())
    return state

  with nnx.use_eager_sharding(False):
    state = jax.eval_shape(build)
  placed = sharding.state_shardings(state, mesh)
  params = jax.tree.map(
      lambda v, s: v.replace(
          jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=s.get_value())
      ),
      state,
      placed,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  return box['graphdef'], params


def decoder(cfg, mesh):
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  from flax import nnx

  from cai_jax.models.decoder import Decoder

  return abstract_module(lambda: Decoder(cfg, rngs=nnx.Rngs(0)), mesh)


def scalar_head_model(cfg, mesh):
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  from flax import nnx

  from cai_jax.models.decoder import ScalarHeadModel

  return abstract_module(lambda: ScalarHeadModel(cfg, rngs=nnx.Rngs(0)), mesh)


def rows(mesh, shape, dtype, names=('batch', 'length')):
  """A [B, ...] argument with its rows over the mesh's batch axes (as the stages place them)."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax
  from jax.sharding import NamedSharding

  from cai_jax.utils import sharding

  names = tuple(names[: len(shape)]) + (None,) * (len(shape) - len(names))
  return jax.ShapeDtypeStruct(
      shape, dtype, sharding=NamedSharding(mesh, sharding.logical_to_spec(names, shape, mesh))
  )


def replicated(mesh, shape, dtype):
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P

  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def kv_cache(cfg, mesh, batch: int, length: int):
  """The sampler's KV cache (`model.init_cache`) as placed arguments, laid out by its axis names."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax.numpy as jnp

  from cai_jax.models import decoder as model_lib

  size = {'batch': batch, 'kv_heads': cfg.n_kv_heads, 'head_dim': cfg.head_dim, 'length': length}
  names = model_lib._CACHE_NAMES  # init_cache's layout; it places through a concrete mesh only
  return [
      {
          kv: rows(mesh, tuple(size[n] for n in names[kv]), jnp.dtype(cfg.dtype), names[kv])
          for kv in ('k', 'v')
      }
      for _ in range(cfg.n_layers)
  ]


def placed(abstract, shardings):
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  from cai_jax.training import train_lib

  return train_lib.abstract_state(abstract, shardings)


def tree_bytes(tree) -> int:
  """Bytes the most loaded device holds of a tree of placed ShapeDtypeStructs."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  from cai_jax.utils import sharding

  return sharding.per_device_bytes(tree)['max']


# ---- programs ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Program:
  stage: str
  name: str
  shape: str  # the bucket it is compiled at, in words
  lower: Callable[[], Any]  # -> jax.stages.Lowered
  resident: dict[str, int]  # other state on the device meanwhile: name -> bytes
  then: Callable[[Any, Any], list[Program]] | None = None  # (out_info, out_shardings) -> more
  # Model FLOPs of one call, all devices together (`forward_flops`; x3 for a train step); None
  # where the program runs no model (a train state's creation).
  model_flops: float | None = None
  per_step: bool = False  # a decode loop: its FLOPs, time and MFU are one step's
  # The engine's page pool (`engine_programs`): its bytes per device, one page's, pages in it,
  # pages one request of max_len takes, the config's slots; `aot` reports what would fit.
  pool: dict[str, int] | None = None
  # A train step's state per device, split as it trains: 'trained' (the parameters that get
  # gradients, with their AdamW moments) and 'frozen' (a LoRA run's base); bytes.
  state: dict[str, int] | None = None


# ---- model FLOPs -------------------------------------------------------------------------------


def forward_flops(cfg, tokens: int, context: int, logits: int = 0, trunks: int = 1) -> float:
  """Model FLOPs of a forward pass: 2 per matmul parameter per token (the LM head only for the
  `logits` tokens that compute it) plus attention's two matmuls, 4 x layers x heads x head_dim
  per query per slot of the `context` it reads (dense, as PaLM's 6N + 12LHQT counts it).
  Embedding lookups, norms and softmaxes are not counted; remat's recompute is not either.
  """
  d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
  layer = d * h * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + (3 if cfg.mlp == 'gated' else 2) * d * f
  attention = 4 * cfg.n_layers * cfg.n_heads * h * context
  return trunks * tokens * (2 * cfg.n_layers * layer + attention) + logits * 2 * cfg.vocab_size * d


def _strategy(temperature, top_k, top_p):
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  from cai_jax.sampling import decoding

  greedy = temperature == 0.0
  return decoding._Strategy(
      greedy=greedy,
      top_k=None if greedy or not top_k else int(top_k),
      top_p=bool(top_p is not None and top_p < 1.0 and not greedy),
  )


def sampler_programs(
    stage,
    who,
    cfg,
    model,
    mesh,
    resident,
    *,
    batch_size,
    max_new_tokens,
    max_prompt_len,
    temperature,
    top_k=None,
    top_p=None,
    min_prompt_bucket=None,
    prefix=None,
    engine=None,
):
  """`sampling.generate`'s prefill and decode at the largest (batch, prompt, new-token) bucket;
  with `prefix` (a `PrefixSpec`: the stage passes a PrefixCache), also the shared prefix's prefill
  and the rows' prefill and decode over it. With `engine` (an `EngineConfig`:
  `config.sampling.engine` is on) the stage samples through the engine instead: its programs."""
  if engine is not None:
    return engine_programs(
        stage, who, cfg, model, mesh, resident, engine=engine, temperature=temperature,
        top_k=top_k, top_p=top_p,
    )  # fmt: skip
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax
  import jax.numpy as jnp

  from cai_jax.sampling import common, decoding

  graphdef, params = model
  b = common.batch_bucket(batch_size)
  limit = min(max_prompt_len, cfg.max_positions - max_new_tokens)
  p = common.length_bucket(limit, min_prompt_bucket or common.MIN_LEN_BUCKET)
  n = common.length_bucket(max_new_tokens)
  strategy = _strategy(temperature, top_k, top_p)
  stop_ids = replicated(mesh, (decoding._STOP_ID_SLOTS,), jnp.int32)
  f32, i32 = (replicated(mesh, (), t) for t in (jnp.float32, jnp.int32))
  knobs = decoding.Knobs(temperature=f32, top_p=f32, max_new=i32, stop_ids=stop_ids)

  def programs(shared, sp):
    """Prefill, then decode, with a shared prefix of sp slots (None: the plain path)."""
    extra = (shared, i32)  # generate passes both, None for no prefix
    shape = f'B={b} P={p} N={n}' + (f' prefix={sp}' if sp else '')
    over = ' over a shared prefix' if sp else ''
    stay = resident if prefix is None else resident | prefix.resident  # for the whole stage

    def prefill():
      return common.jitted(decoding._prefill, graphdef, strategy, donate_argnums=(3,)).lower(
          params,
          rows(mesh, (b, p), jnp.int32, ('batch',)),
          rows(mesh, (b, p), bool, ('batch',)),
          kv_cache(cfg, mesh, b, p + n),
          rows(mesh, (b,), jnp.int32),
          replicated(mesh, (), jnp.uint32),
          knobs,
          rows(mesh, (b,), bool),
          *extra,
      )

    def decode(out_info, out_shardings):
      state = jax.tree.map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
          out_info,
          out_shardings,
      )
      jit = common.jitted(decoding._decode, graphdef, strategy, donate_argnums=(1,))
      lower = lambda: jit.lower(params, state, i32, knobs, i32, shared)
      flops = forward_flops(cfg, b, p + n + sp, logits=b)
      return [Program(stage, f'{who} decode{over}', shape, lower, stay, None, flops, True)]

    flops = forward_flops(cfg, b * p, p + sp, logits=b)
    return Program(stage, f'{who} prefill{over}', shape, prefill, stay, decode, flops)

  out = [programs(None, 0)]
  if prefix is not None:
    sp = prefix.slots(limit)
    if sp:
      out += [prefix.program(stage, who, cfg, model, mesh, resident, 1, sp)]
      out += [programs(prefix.shared(cfg, mesh, 1, sp), sp)]
  return out


def engine_pool(cfg, mesh, engine):
  """The engine's page pool (`decoder.init_pages`) as placed arguments."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax.numpy as jnp

  from cai_jax.sampling import engine as engine_lib

  dtype = jnp.dtype(engine.kv_dtype or cfg.dtype)
  names = (None, 'kv_heads', 'head_dim')
  shape = (engine_lib.pool_pages(cfg, engine) * engine.page_size, cfg.n_kv_heads, cfg.head_dim)
  layer = {kv: rows(mesh, shape, dtype, names) for kv in ('k', 'v')}
  if dtype == jnp.int8:
    layer |= {f'{kv}_scale': rows(mesh, shape[:2], jnp.float32, names[:2]) for kv in ('k', 'v')}
  return [dict(layer) for _ in range(cfg.n_layers)]


def engine_programs(stage, who, cfg, model, mesh, resident, *, engine, temperature, top_k, top_p):
  """The engine's prefill (one call: `prefill_rows` prompt chunks) and decode (`decode_chunk`
  steps of every slot) on a pool of `engine.kv_budget_mib`, as `sampling.Engine.run` calls them.
  Slot state and lanes are small and left replicated, as the engine leaves them."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax
  import jax.numpy as jnp

  from cai_jax.sampling import common, decoding
  from cai_jax.sampling import engine as engine_lib

  graphdef, params = model
  ps, s_slots, r_rows = engine.page_size, engine.max_slots, engine.prefill_rows
  c = engine.prefill_chunk
  width = engine_lib.table_width(cfg, engine)
  m = width // ps
  n_pages = engine_lib.pool_pages(cfg, engine)
  pools = engine_pool(cfg, mesh, engine)
  i32 = lambda *shape: replicated(mesh, shape, jnp.int32)  # noqa: E731
  keys = lambda n: jax.tree.map(  # noqa: E731
      lambda k: replicated(mesh, k.shape, k.dtype),
      jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((n,), jnp.uint32))),
  )
  stop = engine_lib._STOP_SLOTS
  state = engine_lib.SlotState(
      last=i32(s_slots), position=i32(s_slots), count=i32(s_slots), max_new=i32(s_slots),
      stop_ids=i32(s_slots, stop), keys=keys(s_slots),
      running=replicated(mesh, (s_slots,), bool),
  )  # fmt: skip
  # tokens, start, valid, page table, slot, final, stop ids, max new tokens, keys: per lane
  lanes = (i32(r_rows, c), i32(r_rows), i32(r_rows), i32(r_rows, m), i32(r_rows),
           replicated(mesh, (r_rows,), bool), i32(r_rows, stop), i32(r_rows),
           keys(r_rows))  # fmt: skip
  f32 = replicated(mesh, (), jnp.float32)
  knobs = decoding.Knobs(temperature=f32, top_p=f32, max_new=i32(), stop_ids=i32(stop))
  statics = (graphdef, _strategy(temperature, top_k, top_p), ps, engine.block)
  pool = dict(
      bytes=tree_bytes(pools),
      page_bytes=tree_bytes(pools) // n_pages,
      pages=n_pages,
      pages_per_request=m,
      slots=s_slots,
  )
  kv = f' kv={engine.kv_dtype}' if engine.kv_dtype else ''
  size = f'S={s_slots} pages={n_pages}x{ps}{kv} max_len={width}'

  def prefill():
    jit = common.jitted(engine_lib._prefill, *statics, donate_argnums=(1, 2))
    return jit.lower(params, pools, state, lanes, knobs)

  def decode():
    jit = common.jitted(engine_lib._decode, *statics, engine.decode_chunk, donate_argnums=(1, 2))
    return jit.lower(params, pools, state, i32(s_slots, m), knobs)

  return [
      Program(stage, f'{who} engine prefill', f'{size} R={r_rows} C={c}', prefill, resident,
              model_flops=forward_flops(cfg, r_rows * c, width, logits=r_rows), pool=pool),
      Program(stage, f'{who} engine decode', size, decode, resident,
              model_flops=forward_flops(cfg, s_slots, width, logits=s_slots), per_step=True,
              pool=pool),
  ]  # fmt: skip


@dataclasses.dataclass
class PrefixSpec:
  """A stage's `sampling.PrefixCache` (config.sampling), for the programs that read it."""

  max_tokens: int  # the cache's bound, in slots
  min_tokens: int
  block: int
  resident: dict[str, int]  # the cache at its bound, per device

  @classmethod
  def from_config(cls, config, cfg, mesh):
    s = config.sampling
    if not s.prefix_reuse:
      return None
    # Every kept entry is a batch-1 prefix laid out as _prefix_fn constrains it; at the bound
    # they hold max_tokens slots in all.
    held = cls(s.prefix_cache_tokens, s.min_prefix_tokens, s.prefix_block, {})
    held.resident = {'prefix cache': tree_bytes(held.shared(cfg, mesh, 1, s.prefix_cache_tokens))}
    return held

  def slots(self, limit: int) -> int:
    """The longest shared prefix of prompts of at most `limit` tokens: a block multiple, one
    token short of the shortest prompt (0 if under min_tokens)."""
    sp = (limit - 1) // self.block * self.block
    return sp if sp >= self.min_tokens else 0

  def shared(self, cfg, mesh, groups: int, sp: int, batch: int = 0):
    """A `model.Prefix` of `groups` prefixes of sp slots (batch: the rows naming their group)."""
    # Imported here, as everything in this module: aot.py sets libtpu's environment first.
    import jax.numpy as jnp

    from cai_jax.models import decoder as model_lib
    from cai_jax.sampling import prefix as prefix_lib

    size = {None: groups, 'kv_heads': cfg.n_kv_heads, 'head_dim': cfg.head_dim, 'length': sp}
    names = prefix_lib._PREFIX_NAMES
    kv = [
        {
            kv: rows(mesh, tuple(size[x] for x in names[kv]), jnp.dtype(cfg.dtype), names[kv])
            for kv in ('k', 'v')
        }
        for _ in range(cfg.n_layers)
    ]
    if not batch:
      return model_lib.Prefix(kv, replicated(mesh, (sp,), bool))
    return model_lib.Prefix(
        kv, replicated(mesh, (groups, sp), bool), rows(mesh, (batch,), jnp.int32)
    )

  def program(self, stage, who, cfg, model, mesh, resident, groups, sp):
    """`prefix._prefix_fn`: the keys and values of `groups` prefixes of sp tokens."""
    # Imported here, as everything in this module: aot.py sets libtpu's environment first.
    import jax.numpy as jnp

    from cai_jax.sampling import common, prefix as prefix_lib

    graphdef, params = model
    lower = lambda: common.jitted(prefix_lib._prefix_fn, graphdef).lower(
        params, replicated(mesh, (groups, sp), jnp.int32), replicated(mesh, (groups, sp), bool)
    )
    name = f'{who} prefix prefill' + (' (groups)' if groups > 1 else '')
    flops = forward_flops(cfg, groups * sp, sp)
    return Program(stage, name, f'G={groups} Sp={sp}', lower, resident | self.resident, None, flops)


def score_options_program(
    stage, who, cfg, model, mesh, resident, *, batch_size, max_len, prefix=None
):
  """`sampling.score_options` (the (A)/(B) labels) at its largest bucket: prompts that fill
  max_len but for the option tokens, two options of at most 4 tokens. With `prefix` (the stage's
  PrefixCache), also over a prefix the whole batch shares and over per-group prefixes (one per
  conversation's option orders: `prefix.split_groups`), each with its prefix's prefill."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax.numpy as jnp

  from cai_jax.sampling import common, scoring

  graphdef, params = model
  b = common.batch_bucket(batch_size)
  c = common.length_bucket(3, 4)  # ' (A)' / ' (B)': a few tokens in every tokenizer
  limit = min(max_len, cfg.max_positions)
  t = common.length_bucket(limit - 1)

  def one(shared, sp, groups):
    extra = (shared, rows(mesh, (b,), jnp.int32))  # score_options passes both
    lower = lambda: common.jitted(scoring._score_options_fn, graphdef).lower(
        params,
        rows(mesh, (b, t), jnp.int32, ('batch',)),
        rows(mesh, (b, t), bool, ('batch',)),
        rows(mesh, (b, 2, c), jnp.int32, ('batch',)),
        kv_cache(cfg, mesh, b, t + c),
        *extra,
    )
    flops = forward_flops(cfg, b * t, t + sp, logits=b) + 2 * forward_flops(
        cfg, b * (c - 1), t + c + sp, logits=b * (c - 1)
    )
    name = f'{who} score_options' + {0: '', 1: ' over a shared prefix'}.get(
        groups, ' over group prefixes'
    )
    shape = f'B={b} T={t} options=2x{c}' + (f' prefix={groups}x{sp}' if sp else '')
    stay = resident if prefix is None else resident | prefix.resident  # for the whole stage
    return Program(stage, name, shape, lower, stay, None, flops)

  out = [one(None, 0, 0)]
  sp = prefix.slots(limit - 3) if prefix is not None else 0  # each row keeps its option tokens
  if sp:
    # Groups have 2 rows or more: at most b // 2 of them, plus the empty group.
    g = common.batch_bucket(b // 2 + 1)
    out += [
        prefix.program(stage, who, cfg, model, mesh, resident, 1, sp),
        one(prefix.shared(cfg, mesh, 1, sp), sp, 1),
        prefix.program(stage, who, cfg, model, mesh, resident, g, sp),
        one(prefix.shared(cfg, mesh, g, sp, batch=b), sp, g),
    ]
  return out


def rewards_program(stage, who, cfg, model, mesh, resident, *, batch_size, length):
  """`preference_model._rewards`: the PM's reward of each conversation (scoring, no gradients)."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax.numpy as jnp

  from cai_jax.method import preference_model as pm_lib
  from cai_jax.utils import sharding

  graphdef, params = model
  n = sharding.batch_axis_size(mesh)
  b = -(-batch_size // n) * n
  lower = lambda: pm_lib._rewards.lower(
      graphdef, params, rows(mesh, (b, length), jnp.int32), rows(mesh, (b,), jnp.int32)
  )
  flops = forward_flops(cfg, b * length, length)
  return Program(stage, f'{who} rewards', f'B={b} T={length}', lower, resident, None, flops)


def train_program(
    stage, who, graphdef, params, tx, loss_fn, batch, resident, schedule=None, seed=0, *, flops
):
  """`train_lib.make_train_step` as the stage builds it, on the abstract train state, after the
  state's creation from the loaded model (`train_lib.init_state`). `flops`: one forward's."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import functools

  import jax

  from cai_jax.training import train_lib

  abstract, shardings = train_lib.abstract_train_state(params, tx)
  step = train_lib.make_train_step(graphdef, tx, loss_fn, shardings, schedule, seed=seed)
  b, t = batch['tokens'].shape
  shape = f'B={b} T={t}'
  init = jax.jit(functools.partial(train_lib._build_state, tx), out_shardings=shardings)
  state = placed(abstract, shardings)
  trained, frozen = train_lib.split_trained(state.params)
  split = {'trained': tree_bytes((trained, state.opt_state)), 'frozen': tree_bytes(frozen)}
  return (
      [
          Program(stage, f'{who} train state init', '', lambda: init.lower(params), resident),
          Program(
              stage,
              f'{who} train step',
              shape,
              lambda: step.lower(state, batch),
              resident,
              None,
              3 * flops,
              state=split,
          ),
      ],
      abstract,
      shardings,
  )


def pm_programs(stage, section, cfg, mesh, max_len, loss_fn, targets, resident) -> list[Program]:
  """A scalar-head model's training (preference, evaluation_pm, harmfulness: `section` is its
  config) at its own batch sizes: the train step, and the held-out scoring with the train
  state's float32 parameters while the rest of the state stays."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax.numpy as jnp

  from cai_jax.training import loop, train_lib

  pairs = 'p_a' in targets
  length = loop.bucket_length(max_len, max_len, section.min_bucket)
  tx, schedule = train_lib.make_optimizer(section.optimizer, 1000)
  graphdef, params = scalar_head_model(cfg, mesh)
  seqs = 2 * section.batch_size if pairs else section.batch_size
  batch = {
      'tokens': rows(mesh, (seqs, length), jnp.int32),
      'read_index': rows(mesh, (seqs,), jnp.int32),
  } | {k: rows(mesh, (section.batch_size,), jnp.float32) for k in targets}
  who = 'PM' if pairs else 'regressor'
  programs, abstract, shardings = train_program(
      stage,
      who,
      graphdef,
      params,
      tx,
      loss_fn,
      batch,
      resident,
      schedule,
      flops=forward_flops(cfg, seqs * length, length),
  )
  state = placed(abstract, shardings)
  held = {'train state - params': tree_bytes(state) - tree_bytes(state.params)}
  eval_batch = section.eval_batch_size
  score = rewards_program(
      stage,
      f'{who} held-out',
      cfg,
      (graphdef, state.params),
      mesh,
      resident | held,
      batch_size=eval_batch,
      length=length,
  )
  return programs + [score]


def score_program(stage, who, cfg, model, mesh, resident, *, batch_size, length, n_cont):
  """`sampling.score`: log-probs of continuations (DPO's KL samples)."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax.numpy as jnp

  from cai_jax.sampling import common, scoring

  graphdef, params = model
  b = common.batch_bucket(batch_size)
  t = common.length_bucket(length)
  n_cont = common.length_bucket(n_cont, 8)
  lower = lambda: common.jitted(scoring._score_fn, graphdef, static_argnums=(3,)).lower(
      params, rows(mesh, (b, t), jnp.int32), rows(mesh, (b, t), bool), n_cont
  )
  flops = forward_flops(cfg, b * t, t, logits=b * n_cont)
  return Program(stage, f'{who} score', f'B={b} T={t}', lower, resident, None, flops)


def stage_programs(config, mesh, only: str = '') -> list[Program]:
  """Every stage's programs (`only`: comma-separated stages, '' = config.stages), with the
  state each stage keeps resident beside them."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax.numpy as jnp

  from cai_jax import pipeline
  from cai_jax.method import preference_model as pm_lib
  from cai_jax.sampling import engine as engine_lib
  from cai_jax.stages import dpo, harmfulness, sft
  from cai_jax.training import loop, train_lib

  m = config.model
  cfg, frozen_cfg = model_config(config), model_config(config, frozen=True)
  max_len = m.max_len
  # Frozen models (model.frozen_param_dtype): the helpful model as critique_revision samples it
  # and feedback and evaluate judge with it; the sft export as feedback samples it; the PM as PPO
  # and evaluate score. Trained models exist only as their train state.
  helpful = decoder(frozen_cfg, mesh)
  sl_cai = decoder(frozen_cfg, mesh)
  pm = scalar_head_model(frozen_cfg, mesh)
  size = {
      'helpful': tree_bytes(helpful[1]),
      'SL-CAI': tree_bytes(sl_cai[1]),
      'PM': tree_bytes(pm[1]),
  }
  keep = lambda *names: {n: size[n] for n in names}
  # Each stage that samples or judges with few-shot prompts keeps a PrefixCache of its model.
  prefix = PrefixSpec.from_config(config, frozen_cfg, mesh)
  # With config.sampling.engine the samplers are engines (one per model per stage).
  engine = engine_lib.engine_config(config)

  def sample(
      stage, who, model, resident, batch_size, new, temperature, top_k=None, top_p=None, **kw
  ):
    """The sampler's programs for `new` tokens after prompts that fill the rest of max_len."""
    kw.setdefault('engine', engine)
    return sampler_programs(
        stage,
        who,
        frozen_cfg,
        model,
        mesh,
        resident,
        batch_size=batch_size,
        max_new_tokens=new,
        max_prompt_len=max_len - new,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        **kw,
    )

  def score(stage, who, resident, batch_size):
    """(A)/(B) scoring by the helpful model: the feedback model and evaluate's judge."""
    return score_options_program(
        stage,
        who,
        frozen_cfg,
        helpful,
        mesh,
        resident,
        batch_size=batch_size,
        max_len=max_len,
        prefix=prefix,
    )

  def capped(section_len):
    return min(section_len, max_len) if section_len > 0 else max_len

  wanted = pipeline.parse_stage_list(config.stages)
  if only:
    wanted = [s for s in wanted if s in only.split(',')]
  out = []

  if 'prompt_generation' in wanted:
    # The pretrained model (of the helpful model's architecture) continues numbered lists of
    # seed prompts: plain sampling, no shared prefix.
    pg = config.prompt_generation
    out += sample(
        'prompt_generation', 'pretrained', helpful, {}, pg.batch_size, pg.max_new_tokens,
        pg.temperature, prefix=None,
    )  # fmt: skip

  if 'critique_revision' in wanted:
    cr = config.critique_revision
    # Responses and revisions get max_new_tokens, critiques critique_max_new_tokens: the larger
    # cache (prompt bucket + new tokens) is the peak.
    new = max(
        (cr.max_new_tokens, cr.critique_max_new_tokens),
        key=lambda k: _padded(cfg, max_len - k) + _padded(cfg, k),
    )
    out += sample(
        'critique_revision',
        'helpful',
        helpful,
        {},
        cr.batch_size,
        new,
        cr.temperature,
        cr.top_k,
        cr.top_p,
        prefix=prefix,
    )

  if 'sft' in wanted:
    sc = config.sft
    tx, schedule = train_lib.make_optimizer(sc.optimizer, 1000)
    graphdef, params = decoder(cfg, mesh)
    batch = {k: rows(mesh, (sc.batch_size, max_len), jnp.int32) for k in ('tokens', 'loss_mask')}
    tokens = sc.batch_size * max_len
    programs, _, _ = train_program(
        'sft',
        'SL-CAI',
        graphdef,
        params,
        tx,
        sft.make_loss_fn(sc.loss_chunk),
        batch,
        {},
        schedule,
        flops=forward_flops(cfg, tokens, max_len, logits=tokens),
    )
    programs[-1].shape += f' loss_chunk={sc.loss_chunk}'
    out += programs

  if 'feedback' in wanted:
    fb = config.feedback
    # The feedback model's PrefixCache lives as long as the stage: labels and samples alternate;
    # so do the engines' pools (the policy's, and with chains of thought the feedback model's).
    pools = {}
    if engine is not None:
      pools['SL-CAI engine pool'] = tree_bytes(engine_pool(frozen_cfg, mesh, engine))
      if fb.cot:
        pools['feedback-model engine pool'] = pools['SL-CAI engine pool']
    others = lambda mine: {k: v for k, v in pools.items() if k != mine}  # noqa: E731
    out += sample(
        'feedback',
        'SL-CAI',
        sl_cai,
        keep('helpful') | (prefix.resident if prefix else {}) | others('SL-CAI engine pool'),
        fb.batch_size,
        fb.max_new_tokens,
        fb.temperature,
        fb.top_k,
        fb.top_p,
    )
    if fb.cot:
      out += sample(
          'feedback',
          'feedback-model CoT',
          helpful,
          keep('SL-CAI')
          | others('feedback-model engine pool')
          | (prefix.resident if prefix and engine is not None else {}),
          fb.batch_size,
          fb.cot_max_new_tokens,
          fb.cot_temperature,
          prefix=prefix,
      )
    out += score('feedback', 'feedback-model', keep('SL-CAI') | pools, fb.score_batch_size)

  if 'preference' in wanted:
    pc = config.preference
    # initial_pm puts a new head on the pretrained model; the train state holds the only copy.
    out += pm_programs(
        'preference', pc, cfg, mesh, capped(pc.max_len), pm_lib.pair_loss, ('p_a', 'weight'), {}
    )

  if 'ppo' in wanted:
    out += ppo_programs(config, cfg, mesh, helpful, sl_cai, pm, size)

  if 'dpo' in wanted:
    dc = config.dpo
    dpo_len = capped(dc.max_len)
    length = loop.bucket_length(dpo_len, dpo_len, dc.min_bucket)
    tx, schedule = train_lib.make_optimizer(dc.optimizer, 1000)
    graphdef, params = decoder(cfg, mesh)
    pairs, seqs = dc.batch_size, 2 * dc.batch_size
    batch = {
        'tokens': rows(mesh, (seqs, length), jnp.int32),
        'loss_mask': rows(mesh, (seqs, length), jnp.int32),
        'ref_logp': rows(mesh, (seqs,), jnp.float32),
        'target': rows(mesh, (pairs,), jnp.float32),
        'weight': rows(mesh, (pairs,), jnp.float32),
    }
    # The reference's log-probs of every pair first (the frozen SL-CAI model, before training).
    ref_seqs = 2 * dc.eval_batch_size
    ref_lower = lambda: dpo._sequence_logprobs.lower(
        sl_cai[0],
        sl_cai[1],
        rows(mesh, (ref_seqs, length), jnp.int32),
        rows(mesh, (ref_seqs, length), jnp.int32),
        dc.loss_chunk,
    )
    out.append(
        Program(
            'dpo',
            'reference log-probs',
            f'B={ref_seqs} T={length}',
            ref_lower,
            {},
            None,
            forward_flops(frozen_cfg, ref_seqs * length, length, logits=ref_seqs * length),
        )
    )
    # The frozen SL-CAI reference stays beside the train state (it scores the KL samples).
    loss_fn = dpo.make_loss_fn(dc.beta, dc.loss_chunk)
    tokens = seqs * length
    programs, abstract, shardings = train_program(
        'dpo',
        'policy',
        graphdef,
        params,
        tx,
        loss_fn,
        batch,
        keep('SL-CAI'),
        schedule,
        flops=forward_flops(cfg, tokens, length, logits=tokens),
    )
    programs[-1].shape += f' loss_chunk={dc.loss_chunk}'
    out += programs
    # KL(policy || reference) at the end: the policy samples at temperature 1, both score.
    state = placed(abstract, shardings)
    policy = (graphdef, state.params)
    held = keep('SL-CAI') | {'train state - params': tree_bytes(state) - tree_bytes(state.params)}
    kl_new = dc.kl_max_new_tokens
    out += sampler_programs(
        'dpo',
        'policy KL',
        cfg,
        policy,
        mesh,
        held,
        batch_size=dc.kl_prompts,
        max_new_tokens=kl_new,
        max_prompt_len=max_len - kl_new,
        temperature=1.0,
    )
    for who, model, model_cfg in (('policy KL', policy, cfg), ('reference KL', sl_cai, frozen_cfg)):
      out.append(
          score_program(
              'dpo',
              who,
              model_cfg,
              model,
              mesh,
              held,
              batch_size=dc.kl_prompts,
              length=max_len,
              n_cont=kl_new,
          )
      )

  if 'evaluation_pm' in wanted:
    ec = config.evaluation_pm
    # Trained with preference's recipe at its own config's sizes (they are not halved with
    # preference.batch_size).
    out += pm_programs(
        'evaluation_pm',
        ec,
        cfg,
        mesh,
        capped(ec.max_len),
        pm_lib.pair_loss,
        ('p_a', 'weight'),
        {},
    )

  if 'harmfulness' in wanted:
    hc = config.harmfulness
    # Runs only with config.harmfulness.path (HH-RLHF's red-team ratings); compiled either way.
    out += pm_programs(
        'harmfulness',
        hc,
        cfg,
        mesh,
        capped(hc.max_len),
        harmfulness.regression_loss,
        ('rating', 'weight'),
        {},
    )

  if 'evaluate' in wanted:
    ev, pc = config.evaluate, config.preference
    # Each model under evaluation is loaded afresh (cache=False) beside the cached helpful one;
    # then the judge (the helpful model) and a fresh PM, each alone.
    out += sample(
        'evaluate',
        'evaluated model',
        sl_cai,
        keep('helpful'),
        ev.batch_size,
        ev.max_new_tokens,
        ev.temperature,
    )
    out += score('evaluate', 'judge', {}, config.feedback.score_batch_size)
    pm_len = capped(pc.max_len)
    out.append(
        rewards_program(
            'evaluate',
            'PM',
            frozen_cfg,
            pm,
            mesh,
            keep('helpful'),
            batch_size=ev.batch_size,
            length=loop.bucket_length(pm_len, max(pm_len, pc.min_bucket), pc.min_bucket),
        )
    )
  return out


def _padded(cfg, n):
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  from cai_jax.sampling import common

  return common.length_bucket(min(n, cfg.max_positions))


def ppo_programs(config, cfg, mesh, helpful, reference, pm, size) -> list[Program]:
  """PPO's rollout sampler, PM scoring, rollout forward and learner step (cai_jax/stages/ppo.py,
  cai_jax/method/ppo_learner.py)."""
  # Imported here, as everything in this module: aot.py sets libtpu's environment first.
  import jax.numpy as jnp
  from flax import nnx

  from cai_jax.method import ppo_learner
  from cai_jax.models.decoder import Decoder, ScalarHeadModel
  from cai_jax.sampling import common
  from cai_jax.sampling import engine as engine_lib
  from cai_jax.training import loop, train_lib

  pp, max_len = config.ppo, config.model.max_len
  max_prompt_tokens = min(pp.max_prompt_tokens, max_len - pp.max_new_tokens)
  prompt_len = common.length_bucket(max_prompt_tokens, pp.min_prompt_bucket)

  def actor_critic():
    policy = Decoder(cfg, rngs=nnx.Rngs(0))
    value = ScalarHeadModel(cfg, rngs=nnx.Rngs(1), trunk=policy if pp.value.shared_trunk else None)
    return ppo_learner.ActorCritic(policy, value)

  graphdef, params = abstract_module(actor_critic, mesh)
  n_updates = pp.steps * pp.epochs * pp.minibatches
  policy_tx, policy_lr = train_lib.make_optimizer(pp.policy_optimizer, n_updates)
  value_tx, _ = train_lib.make_optimizer(pp.value_optimizer, n_updates)
  tx = ppo_learner.per_model_optimizer({'policy': policy_tx, 'value': value_tx})
  abstract, shardings = train_lib.abstract_train_state(params, tx)
  state = placed(abstract, shardings)
  state_bytes, param_bytes = tree_bytes(state), tree_bytes(state.params)
  policy_bytes = tree_bytes(state.params['policy'])
  # What the stage holds beside the learner: the policy's frozen-dtype copy as the KL reference
  # (none with LoRA: the learner's base with its adapters off) and the PM that scores (frozen).
  # The policy and value as loaded are dropped once the train state holds their copies.
  cached = {} if cfg.lora_rank else {'reference': size['SL-CAI']}
  if cfg.lora_rank:
    reference = (None, None)
  if pp.reward == 'preference':
    cached['PM'] = size['PM']
  out = []

  # 1. Rollouts: generate() (or the engine) on the policy's parameters inside the train state.
  engine = engine_lib.engine_config(config)
  policy = (decoder(cfg, mesh)[0], state.params['policy'])
  out += sampler_programs(
      'ppo',
      'policy',
      cfg,
      policy,
      mesh,
      {**cached, 'learner state - policy': state_bytes - policy_bytes},
      batch_size=pp.batch_size,
      max_new_tokens=pp.max_new_tokens,
      max_prompt_len=max_prompt_tokens,
      temperature=pp.temperature,
      min_prompt_bucket=prompt_len,
      engine=engine,
  )
  if engine is not None:  # built at the first rollout, its pool stays for the stage
    cached['engine pool'] = tree_bytes(engine_pool(cfg, mesh, engine))
  # 2. The PM's scores of the rendered (prompt, response) conversations.
  if pp.reward == 'preference':
    bucket = min(pp.pm_max_len, 1 << (max_prompt_tokens + pp.max_new_tokens + 8 - 1).bit_length())
    length = loop.bucket_length(pp.pm_max_len, max(pp.pm_max_len, bucket), bucket)
    out.append(
        rewards_program(
            'ppo',
            'PM',
            cfg,
            pm,
            mesh,
            {k: v for k, v in cached.items() if k != 'PM'} | {'learner state': state_bytes},
            batch_size=min(pp.pm_batch_size, pp.batch_size),
            length=length,
        )
    )
  # 3. Old and reference log-probs, values and advantages of the rollout batch.
  total = prompt_len + pp.max_new_tokens

  def rollout_batch(b):
    return {
        'tokens': rows(mesh, (b, total), jnp.int32),
        'positions': rows(mesh, (b, total), jnp.int32),
        'key_mask': rows(mesh, (b, total), bool),
        'response_mask': rows(mesh, (b, pp.max_new_tokens), jnp.float32),
    }

  rollout_fn = ppo_learner.make_rollout_fn(graphdef, reference[0], pp)
  lower = lambda: rollout_fn.lower(
      state.params,
      reference[1],
      rollout_batch(pp.batch_size),
      replicated(mesh, (pp.batch_size,), jnp.float32),
      replicated(mesh, (), jnp.float32),
  )
  out.append(
      Program(
          'ppo',
          'rollout forward',
          f'B={pp.batch_size} T={total}',
          lower,
          {k: v for k, v in cached.items() if k != 'reference'}
          | {'learner state - params': state_bytes - param_bytes},
          None,
          # The policy with its value head (another trunk unless shared) and the reference.
          forward_flops(cfg, pp.batch_size * total, total, 2 * pp.batch_size * pp.max_new_tokens, 2)
          + (0 if pp.value.shared_trunk else forward_flops(cfg, pp.batch_size * total, total)),
      )
  )
  # 4. One learner update on a minibatch.
  mb = pp.batch_size // pp.minibatches
  batch = rollout_batch(mb) | {
      k: rows(mesh, (mb, pp.max_new_tokens), jnp.float32)
      for k in ('old_logp', 'old_values', 'advantages', 'returns')
  }
  flops = forward_flops(cfg, mb * total, total, mb * pp.max_new_tokens)
  if not pp.value.shared_trunk:
    flops += forward_flops(cfg, mb * total, total)
  programs, _, _ = train_program(
      'ppo',
      'learner',
      graphdef,
      params,
      tx,
      ppo_learner.make_loss_fn(pp),
      batch,
      cached,
      policy_lr,
      flops=flops,
  )
  return out + programs
