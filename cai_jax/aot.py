"""Ahead-of-time check of a TPU config: compiles every jitted program the stages run, with
libtpu's compiler and no TPU, for `config.tpu_topology`, and reports per-device memory.

  python -m cai_jax.aot --config configs/tpu_gemma2_2b_v5e8.py [--config.sft.batch_size=64]

The programs, their shapes and the state resident beside each are built in
cai_jax/aot_programs.py. Programs whose lowered text is identical (e.g. feedback's and
evaluate's sampler) compile once. `--lower_only` stops after lowering: the program list and each
program's argument shapes (what tests/test_aot_coverage.py compares with a pipeline run) in
seconds, without memory, FLOPs or the fit check.

Memory per device = the compiled program (arguments + temporaries + outputs - aliased) plus that
resident state. Not counted: XLA's fragmentation, hence the 10% margin. The HBM is what libtpu
reports as available (it says so when a program does not fit); an out-of-memory message whose
size cannot be read fails the program.

Time and MFU, per device: model FLOPs are the analytic count (`aot_programs.forward_flops`: 6 x
matmul parameters x tokens for a train step, 2 x for a forward, plus attention; remat's
recompute excluded); hardware FLOPs and bytes accessed are the compiler's (remat included; a
loop body, such as the chunked LM head, the decode step or an FSDP matmul that libtpu splits
over the shards, counted once). The time is libtpu's cost model where it gives one, never below
the FLOPs at peak; where it gives none, the roofline bound max(FLOPs / peak, bytes accessed / HBM
bandwidth), marked >=, and the MFU beside it is then an upper bound (<=; `-` where that bound is
the model FLOPs at peak, i.e. 100%). MFU = model FLOPs / time / the chip's peak, at most 100% by
construction. Decode rows are one step of the loop.

With `--config.sampling.engine=True` the stages' samplers are continuous-batching engines: their
prefill and decode programs take the page pool (`sampling.engine_kv_budget_mib`) as an argument,
and a line per engine gives the largest pool that would still leave 10% of HBM free, the requests
of `model.max_len` it holds at once, and the decode step's time estimate.
"""

from __future__ import annotations

import os

# libtpu takes a machine-wide lock unless told several processes may load it; no TPU is used.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # no metadata server to ask
os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the host runs jax on CPU; libtpu only compiles
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import dataclasses  # noqa: E402
import gc  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from cai_jax.aot_programs import AotError, Program, stage_programs  # noqa: E402
from cai_jax.bookkeeping import StageError  # noqa: E402
from cai_jax.utils import compile_log  # noqa: E402
from cai_jax.utils import memory, sharding  # noqa: E402

GIB = 2**30
FREE_FRACTION = 0.1  # a program must leave this share of HBM free (fragmentation, runtime buffers)
VALID_TOPOLOGIES = ('v4:2x2x1', 'v5e:2x4', 'v5p:2x2x2', 'v6e:2x4')  # each checked to compile
_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5': 'v5p', 'TPU v6 lite': 'v6e'}
# Chips whose two TensorCores JAX drives as one device on a TPU VM: the topology must say so.
_MEGACORE = ('v4',)

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Path to a config file (configs/*.py).', lock_config=True
)
_JSON = flags.DEFINE_string(
    'json', '', "Also write every program's bytes, FLOPs and seconds " 'to this JSON file'
)
_PROGRAMS = flags.DEFINE_string(
    'programs',
    '',
    'Comma-separated stages to compile (e.g. ' '"sft,ppo"); "" = every stage in config.stages',
)
_MATCH = flags.DEFINE_string(
    'match',
    '',
    'Compile only the programs whose "stage/program" name contains this text (e.g. "engine"); '
    'the state resident beside each is counted as in a whole run',
)
_LOWER_ONLY = flags.DEFINE_bool(
    'lower_only',
    False,
    'Only lower each program (its name and argument shapes, which --json records as "lowered"): '
    'no compile, so no memory, FLOPs or fit check; a program list in seconds instead of minutes',
)


# ---- the topology ----------------------------------------------------------------------------


def chip_kind(topology: str) -> str:
  return topology.split(':', 1)[0].strip().lower()


def topology_devices(topology: str) -> list:
  """The devices of a TPU topology (e.g. 'v5e:2x4'), from libtpu alone."""
  if not topology:
    raise AotError(
        'config.tpu_topology is empty: set it to the slice the config is sized for, '
        f'e.g. --config.tpu_topology=v5e:2x4 (valid: {", ".join(VALID_TOPOLOGIES)})'
    )
  if importlib.util.find_spec('libtpu') is None:
    raise AotError(
        'libtpu is not installed: pip install "jax[tpu]==0.10.2" ' "(or pip install -e '.[test]')"
    )
  import jax
  from jax.experimental import topologies

  kwargs = {'chip_config_name': 'megacore'} if chip_kind(topology) in _MEGACORE else {}
  try:
    try:
      desc = topologies.get_topology_desc(topology_name=topology, platform='tpu', **kwargs)
    except (jax.errors.JaxRuntimeError, ValueError, RuntimeError) as e:
      # A slice smaller than one host's chips (e.g. 'v5e:1x1', the coverage test's): that
      # slice is its own host.
      dims = re.fullmatch(r'[^:]+:(\d+(?:x\d+)*)', topology.strip())
      if 'chips_per_host_bounds' not in str(e) or dims is None:
        raise
      bounds = tuple(int(d) for d in dims.group(1).split('x'))
      desc = topologies.get_topology_desc(
          topology_name=topology,
          platform='tpu',
          chips_per_host_bounds=(bounds + (1, 1))[:3],
          **kwargs,
      )
    return list(desc.devices)
  except (jax.errors.JaxRuntimeError, ValueError, RuntimeError) as e:
    reason = str(e).strip().splitlines()[0][:160]
    raise AotError(
        f'unknown TPU topology {topology!r} ({reason}); valid ones are e.g. '
        f'{", ".join(VALID_TOPOLOGIES)}'
    ) from None


def available_hbm(mesh) -> tuple[int, str]:
  """Bytes of HBM libtpu lets one device use: it says so when a program is too big for it."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  too_big = jax.ShapeDtypeStruct((1 << 40,), jnp.int8, sharding=NamedSharding(mesh, P()))
  try:
    jax.jit(lambda x: x + 1).lower(too_big).compile()
  except jax.errors.JaxRuntimeError as e:
    found = re.search(r'exceeds available HBM \(([\d.]+)([KMGT])\)', str(e))
    if found:
      return int(float(found.group(1)) * 1024 ** 'KMGT'.index(found.group(2)) * 1024), 'libtpu'
  kind = _KINDS.get(mesh.devices.flat[0].device_kind)
  if kind not in memory.AVAILABLE_HBM_GIB:
    raise AotError(f'no HBM size known for {mesh.devices.flat[0].device_kind}')
  return int(memory.AVAILABLE_HBM_GIB[kind] * GIB), 'cai_jax.memory.AVAILABLE_HBM_GIB'


# ---- compiling and reporting -------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  program: Program
  seconds: float
  memory: dict[str, int] | None  # argument, temp, output, alias, program (bytes per device)
  flops: float | None  # the compiler's (hardware) FLOPs per device
  est_seconds: float | None  # libtpu's cost model, where it answers
  same_as: str | None = None  # an identical program compiled earlier
  error: str | None = None  # the compiler's out-of-memory message
  bytes_accessed: float | None = None  # the compiler's, per device
  lowered: list = dataclasses.field(default_factory=list)  # compile_log keys of this lowering

  @property
  def resident(self) -> int:
    return sum(self.program.resident.values())

  @property
  def total(self) -> int:
    needed = self.memory['program'] if self.memory else self.memory_from_error() or 0
    return needed + self.resident

  def memory_from_error(self) -> int | None:
    """The bytes an out-of-memory message says the program needs; None if it does not say."""
    found = re.search(r'required for [^(]*\(([\d.]+)([KMGT])\)', self.error or '')
    if not found:
      return None
    return int(float(found.group(1)) * 1024 ** ('KMGT'.index(found.group(2)) + 1))


@dataclasses.dataclass
class Timing:
  """One program's time and MFU on one device of `kind` (see the module docstring)."""

  model_flops: float | None  # per device
  seconds: float | None
  bound: bool  # seconds is the roofline lower bound (MFU an upper bound)
  mfu: float | None


def timing(r: Result, kind: str, devices: int) -> Timing:
  peak, bandwidth = memory.PEAK_FLOPS.get(kind), memory.HBM_BYTES_PER_S.get(kind)
  model = r.program.model_flops / devices if r.program.model_flops else None
  if not peak or r.flops is None:
    return Timing(model, None, False, None)
  compute = max(r.flops, model or 0) / peak
  if r.est_seconds:
    seconds, bound = max(r.est_seconds, compute), False
  elif bandwidth and r.bytes_accessed:
    seconds, bound = max(compute, r.bytes_accessed / bandwidth), True
  else:
    return Timing(model, None, False, None)
  mfu = model / seconds / peak if model and seconds > 0 else None
  return Timing(model, seconds, bound, mfu)


def mfu_cell(mfu: float | None, bound: bool) -> str:
  """The MFU column: `NN%`, `<=NN%` where the time is a roofline bound, `-` where there is none.

  A bound whose compute term wins with the model FLOPs (model >= hardware FLOPs, e.g. a splash
  forward whose kernel libtpu does not count) is exactly 100%: it says nothing, so it prints `-`.
  """
  if mfu is None or (bound and mfu >= 0.995):
    return '-'
  return f'{"<=" if bound else ""}{mfu:.0%}'


def as_json(r: Result, kind: str = '', devices: int = 1, hbm: int | None = None) -> dict:
  p = r.program
  t = timing(r, kind, devices)
  return {
      'chip': kind,
      'devices': devices,
      'hbm': hbm,  # bytes per device that libtpu lets a program use
      'stage': p.stage,
      'program': p.name,
      'shape': p.shape,
      'compile_seconds': r.seconds,
      'same_as': r.same_as,
      'memory': r.memory,
      'resident': p.resident,
      'state': p.state,
      'total': r.total,
      'hardware_flops': r.flops,
      'bytes_accessed': r.bytes_accessed,
      'cost_model_seconds': r.est_seconds,
      'model_flops': t.model_flops,
      'seconds': t.seconds,
      'seconds_is_roofline_bound': t.bound,
      'mfu': t.mfu,
      'per_step': p.per_step,
      'error': r.error,
      'lowered': r.lowered,
  }


def _replicated_where_unset(out_info):
  """`out_info`'s shardings, replicated where the program leaves them to the compiler: without a
  compile only the shapes of a follow-up's arguments are known, which is all `lower_only` needs."""
  import jax

  mesh = sharding.current_mesh()
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda s: s.sharding or rep, out_info)


def compile_all(programs: list[Program], log=print, done=None, lower_only=False) -> list[Result]:
  """Compiles each program (and its follow-ups) in turn; `done(results)` after each one. With
  `lower_only`, lowers them only (results without memory or FLOPs; a follow-up's arguments take
  replicated shardings where the compiler would have chosen: the same shapes)."""
  import jax

  results, seen, queue = [], {}, list(programs)
  while queue:
    program = queue.pop(0)
    t0 = time.time()
    with compile_log.record() as keys:
      lowered = program.lower()
    key = hashlib.sha1(lowered.as_text().encode()).hexdigest()
    label = f'{program.stage}/{program.name}'
    compiled = None
    if lower_only:
      first = seen[key][0] if key in seen else None  # jax logs a repeated lowering only once
      result = Result(
          program,
          time.time() - t0,
          None,
          None,
          None,
          same_as=f'{first.program.stage}/{first.program.name}' if first else None,
          lowered=keys or (first.lowered if first else []),
      )
      seen.setdefault(key, (result, None))
      log(f'aot: {label} [{program.shape}] lowered in {result.seconds:.1f}s (not compiled)')
      results.append(result)
      if done is not None:
        done(results)
      if program.then is not None:
        queue[0:0] = program.then(lowered.out_info, _replicated_where_unset(lowered.out_info))
      continue
    if key in seen:
      first, follow = seen[key]
      result = dataclasses.replace(
          first,
          program=program,
          seconds=time.time() - t0,
          same_as=f'{first.program.stage}/{first.program.name}',
          lowered=keys or first.lowered,
      )
    else:
      try:
        compiled = lowered.compile()
      except jax.errors.JaxRuntimeError as e:
        if 'RESOURCE_EXHAUSTED' not in str(e):
          raise
        compiled = None
        result = Result(
            program,
            time.time() - t0,
            None,
            None,
            None,
            error=str(e).strip().splitlines()[0],
            lowered=keys,
        )
      if compiled is not None:
        ma = compiled.memory_analysis()
        mem = dict(
            argument=ma.argument_size_in_bytes,
            temp=ma.temp_size_in_bytes,
            output=ma.output_size_in_bytes,
            alias=ma.alias_size_in_bytes,
        )
        mem['program'] = mem['argument'] + mem['temp'] + mem['output'] - mem['alias']
        cost = compiled.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        seconds = cost.get('optimal_seconds')
        result = Result(
            program,
            time.time() - t0,
            mem,
            cost.get('flops'),
            seconds if seconds and seconds > 0 else None,
            bytes_accessed=cost.get('bytes accessed'),
            lowered=keys,
        )
      # Follow-ups need only the output layout; executables are dropped at once (a full-size
      # PPO learner's compile alone takes most of a 24 GiB host).
      follow = None
      if program.then is not None and compiled is not None:
        out = (lowered.out_info, compiled.output_shardings)
        follow = lambda p, out=out: p.then(*out)
      seen[key] = (result, follow)
      del compiled
      gc.collect()
    memory = (
        f'{result.memory["program"] / GIB:.2f} GiB'
        if result.memory
        else f'out of memory ({result.error})'
    )
    log(
        f'aot: {label} [{program.shape}] compiled in {result.seconds:.1f}s'
        + (f' (same program as {result.same_as})' if result.same_as else '')
        + f': {memory} + {result.resident / GIB:.2f} GiB resident per device'
        + (
            f'; train state {program.state["trained"] / GIB:.2f} GiB trained (with AdamW '
            f'moments) + {program.state["frozen"] / GIB:.2f} GiB frozen'
            if program.state
            else ''
        )
    )
    results.append(result)
    if done is not None:
      done(results)
    if program.then is not None and follow is not None:
      queue[0:0] = follow(program)
  return results


def table(results: list[Result], hbm: int, kind: str, devices: int) -> str:
  head = (
      '| stage | program | shape | compile s | args GiB | temp GiB | out-alias GiB '
      '| program GiB | resident GiB (not args) | total GiB | % HBM | model TFLOP | HW TFLOP '
      '| est. ms | MFU |'
  )
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  g = lambda b: f'{b / GIB:.2f}'
  for r in results:
    p = r.program
    resident = ', '.join(f'{k} {v / GIB:.2f}' for k, v in p.resident.items()) or '-'
    if r.memory:
      m = r.memory
      mem = [g(m['argument']), g(m['temp']), g(m['output'] - m['alias']), g(m['program'])]
    else:
      needed = r.memory_from_error()
      mem = ['-', '-', '-', f'>{g(needed)} (OOM)' if needed is not None else 'OOM (size unknown)']
    t = timing(r, kind, devices)
    step = '/step' if p.per_step else ''
    model = f'{t.model_flops / 1e12:.3g}{step}' if t.model_flops else '-'
    hw = f'{r.flops / 1e12:.3g}{step}' if r.flops else '-'
    est = f'{">=" if t.bound else ""}{t.seconds * 1e3:.3g}{step}' if t.seconds else '-'
    mfu = mfu_cell(t.mfu, t.bound)
    compile_s = f'{r.seconds:.1f}' + (f' (= {r.same_as})' if r.same_as else '')
    lines.append(
        f'| {p.stage} | {p.name} | {p.shape} | {compile_s} | '
        + ' | '.join(mem)
        + f' | {g(r.resident)} ({resident}) | {g(r.total)} | {r.total / hbm:.0%} | '
        f'{model} | {hw} | {est} | {mfu} |'
    )
  return '\n'.join(lines)


def fit_errors(results: list[Result], hbm: int, remedies: list[str]) -> list[str]:
  """One line per program that leaves under FREE_FRACTION of `hbm` free, or ran out of memory
  by an amount its message does not say."""
  errors = []
  for r in results:
    if r.error and r.memory_from_error() is None:
      errors.append(
          f'aot: error: {r.program.stage}/{r.program.name} [{r.program.shape}] does not fit, '
          f'and the compiler did not say by how much: {r.error}'
      )
    elif r.total > (1 - FREE_FRACTION) * hbm:
      errors.append(
          f'aot: error: {r.program.stage}/{r.program.name} [{r.program.shape}] needs '
          f'{"" if r.memory else "at least "}{r.total / GIB:.2f} GiB per device '
          f'({r.total} bytes, of which {r.resident / GIB:.2f} GiB resident state) of '
          f'{hbm / GIB:.2f} GiB HBM, leaving under {FREE_FRACTION:.0%} free; try '
          + ', '.join(remedies[:-1])
          + f' or {remedies[-1]}'
      )
  return errors


def engine_lines(results: list[Result], hbm: int, kind: str, devices: int) -> list[str]:
  """Per engine (stage, model) with `config.sampling.engine`: its pool, the largest pool that
  would leave FREE_FRACTION of HBM free beside its larger program, the requests of max_len that
  pool holds at once, and the decode step's time estimate (the table's est. ms)."""
  lines, engines = [], {}
  for r in results:
    if r.program.pool and r.memory:
      engines.setdefault((r.program.stage, r.program.name.rsplit(' engine ', 1)[0]), []).append(r)
  for (stage, who), rs in engines.items():
    pool = rs[0].program.pool
    room = (1 - FREE_FRACTION) * hbm - (max(r.total for r in rs) - pool['bytes'])
    pages = max(int(room // pool['page_bytes']), 0)
    step = [timing(r, kind, devices) for r in rs if r.program.per_step]
    est = (
        f'; decode step {">=" if step[0].bound else ""}{step[0].seconds * 1e3:.3g} ms '
        f'for {pool["slots"]} slots (estimate)'
        if step and step[0].seconds
        else ''
    )
    lines.append(
        f'aot: engine {stage}/{who}: pool {pool["bytes"] / GIB:.2f} GiB per device '
        f'({pool["pages"]} pages); the largest pool leaving {FREE_FRACTION:.0%} free is '
        f'{max(room, 0) / GIB:.2f} GiB = {pages} pages = {pages // pool["pages_per_request"]} '
        f'requests of max_len at once (config: {pool["slots"]} slots){est}'
    )
  return lines


def write_json(path: str, results: list[Result], kind: str, devices: int, hbm: int) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump([as_json(r, kind, devices, hbm) for r in results], f, indent=1)
  os.replace(path + '.tmp', path)


def check(config, json_path: str = '') -> tuple[list[Result], list[str], str, str, int]:
  """Compiles everything; returns the results, the not-fitting errors, the summary line, the
  chip kind and the device count. With `json_path`, the rows so far are written there after
  each program (a compile killed for host memory keeps the programs before it)."""
  topology = config.get('tpu_topology', '')
  devices = topology_devices(topology)
  try:
    shape = sharding.resolve_mesh_shape(config.mesh.shape, len(devices))
  except sharding.ShardingError as e:
    raise AotError(f'{e} of topology {topology}: config.mesh.shape must use all of them') from None
  mesh = sharding.make_mesh(shape, devices=devices)
  kind = _KINDS.get(devices[0].device_kind, chip_kind(topology))
  hbm, hbm_source = available_hbm(mesh)
  print(
      f'aot: {topology}: {len(devices)} x {devices[0].device_kind}, mesh {dict(mesh.shape)}, '
      f'{hbm / GIB:.2f} GiB HBM per device ({hbm_source}), model {config.model.architecture} '
      f'(param {config.model.param_dtype}, compute {config.model.dtype}'
      + ''.join(
          f', {k} {config.model[k]}'
          for k in ('frozen_param_dtype', 'frozen_quantization', 'remat')
          if config.model.get(k)
      )
      + (
          f', LoRA rank {config.model.lora.rank}'
          if config.model.get('lora', {}).get('rank')
          else ''
      )
      + ')',
      flush=True,
  )
  with sharding.use_mesh(mesh, config.logical_axis_rules):
    programs = stage_programs(config, mesh, _PROGRAMS.value)
    programs = [p for p in programs if _MATCH.value in f'{p.stage}/{p.name}']
    if not programs:
      raise AotError(f'no program of {_PROGRAMS.value or "config.stages"} matches {_MATCH.value!r}')
    done = (lambda rs: write_json(json_path, rs, kind, mesh.size, hbm)) if json_path else None
    results = compile_all(
        programs, log=lambda s: print(s, flush=True), done=done, lower_only=_LOWER_ONLY.value
    )
  if _LOWER_ONLY.value:
    summary = f'aot: {len(results)} programs lowered for {topology} (--lower_only: not compiled)'
    return results, [], summary, kind, mesh.size
  remedies = [] if config.model.get('remat', 'none') == 'full' else ['--config.model.remat=full']
  errors = fit_errors(results, hbm, remedies + ['a smaller batch', 'a bigger mesh'])
  peak = max((r.total for r in results), default=0)
  summary = (
      f'aot: {len(results)} programs compiled for {topology}, peak {peak / GIB:.1f} GiB of '
      f'{hbm / GIB:.1f} GiB HBM per device'
  )
  print(table(results, hbm, kind, mesh.size), flush=True)
  for line in engine_lines(results, hbm, kind, mesh.size):
    print(line, flush=True)
  return results, errors, summary, kind, mesh.size


def main(argv):
  del argv
  try:
    results, errors, summary, kind, devices = check(_CONFIG.value, _JSON.value)
  except (AotError, sharding.ShardingError, StageError) as e:
    sys.exit(f'aot: error: {e}')
  for e in errors:
    print(e, file=sys.stderr, flush=True)
  what = 'lowering' if _LOWER_ONLY.value else 'compile'
  print(f'aot: {what} time {sum(r.seconds for r in results):.0f}s', flush=True)
  print(summary, flush=True)
  if errors:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
