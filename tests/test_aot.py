"""cai_jax.aot on libtpu without a TPU: bad input fails in one line, and a TPU config's programs
all compile for its slice with plausible per-device memory.

The full-size models take minutes per program on a 2-core CPU, so the compile test swaps in the
tiny architecture (every program, every stage, the config's mesh and shardings); the real
configs' tables are in the commit that sized them.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GEMMA_V5E = 'configs/tpu_gemma2_2b_v5e8.py'
TINY = ['--config.model.architecture=tiny', '--config.model.max_len=512']


def run_aot(*args, timeout=600, prelude='pass'):
  code = (
      f'import sys, runpy; {prelude}; sys.argv = ["cai_jax.aot", *{list(args)!r}]; '
      'runpy.run_module("cai_jax.aot", run_name="__main__")'
  )
  return subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, timeout=timeout, cwd=REPO
  )


def one_line_error(r, *needles):
  assert r.returncode != 0, r.stdout[-2000:]
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('aot: error: '), r.stderr[-2000:]
  for needle in needles:
    assert needle in last, last
  return last


def test_unknown_topology_lists_valid_ones():
  r = run_aot('--config', GEMMA_V5E, '--config.tpu_topology=v9z:2x4')
  last = one_line_error(r, 'v9z:2x4', 'v5e:2x4', 'v4:2x2x1', 'v5p:2x2x2', 'v6e:2x4')
  assert 'unknown TPU topology' in last


def test_config_without_topology():
  one_line_error(run_aot('--config', GEMMA_V5E, '--config.tpu_topology='), 'tpu_topology is empty')


def test_mesh_that_does_not_cover_the_slice():
  one_line_error(
      run_aot('--config', GEMMA_V5E, '--config.mesh.shape=(1,4,1)'),
      '4 slots',
      '8 devices',
      'v5e:2x4',
  )


def test_libtpu_not_installed():
  # None in sys.modules makes `import libtpu` fail as if the package were absent.
  r = run_aot('--config', GEMMA_V5E, prelude='sys.modules["libtpu"] = None')
  one_line_error(r, 'pip install "jax[tpu]==0.10.2"')


def test_every_listed_topology_exists():
  code = (
      'from cai_jax import aot\n'
      'for name in aot.VALID_TOPOLOGIES:\n'
      '  print(name, len(aot.topology_devices(name)))'
  )
  r = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=REPO
  )
  assert r.returncode == 0, r.stderr[-3000:]
  counts = dict(line.split() for line in r.stdout.strip().splitlines())
  # Megacore v4 and v5p: one device per chip, as on a TPU VM (a v4-8 is 4 chips).
  assert counts == {'v4:2x2x1': '4', 'v5e:2x4': '8', 'v5p:2x2x2': '8', 'v6e:2x4': '8'}


def _rows(stdout):
  """The table's rows: {'stage/program': {column: cell}}."""
  lines = [line for line in stdout.splitlines() if line.startswith('| ')]
  head = [c.strip() for c in lines[0].strip('|').split('|')]
  out = {}
  for line in lines[1:]:
    cells = dict(zip(head, (c.strip() for c in line.strip('|').split('|'))))
    out[f"{cells['stage']}/{cells['program']}"] = cells
  return out


@pytest.fixture(scope='module')
def tiny_v5e(tmp_path_factory):
  out = tmp_path_factory.mktemp('aot') / 'programs.json'
  r = run_aot('--config', GEMMA_V5E, *TINY, f'--json={out}')
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  return r.stdout, {f"{p['stage']}/{p['program']}": p for p in json.loads(out.read_text())}


@pytest.mark.slow
def test_every_stage_program_compiles_and_fits(tiny_v5e):
  stdout, programs = tiny_v5e
  last = stdout.strip().splitlines()[-1]
  found = re.fullmatch(
      r'aot: (\d+) programs compiled for v5e:2x4, peak ([\d.]+) GiB of '
      r'15\.8 GiB HBM per device',
      last,
  )
  assert found, last
  rows = _rows(stdout)
  assert int(found.group(1)) == len(rows) == len(programs)
  for name in (
      'prompt_generation/pretrained prefill',  # full configs generate prompts first
      'prompt_generation/pretrained decode',
      'critique_revision/helpful prefill',
      'critique_revision/helpful decode',
      'sft/SL-CAI train step',
      'feedback/SL-CAI prefill',
      'feedback/feedback-model score_options',
      'preference/PM train step',
      'ppo/policy prefill',
      'ppo/policy decode',
      'ppo/PM rewards',
      'ppo/rollout forward',
      'ppo/learner train step',
      'evaluate/evaluated model decode',
      'evaluate/judge score_options',
      'evaluate/PM rewards',
  ):
    assert name in rows and name in programs, (name, sorted(rows))
    assert programs[name]['memory']['program'] > 0 and programs[name]['error'] is None
  # The stage shapes: the largest buckets of the 'full' stage configs at model.max_len=512
  # (critiques: 192 new tokens after a prompt of up to 320, bucketed to 384).
  assert rows['critique_revision/helpful prefill']['shape'] == 'B=64 P=384 N=192'
  assert rows['sft/SL-CAI train step']['shape'].startswith(
      'B=32 T=512'
  )  # tpu_common: half the batch
  assert rows['ppo/learner train step']['shape'].startswith('B=16 T=512')  # 64 / 4 minibatches
  # Identical programs compile once: evaluate samples exactly as feedback does.
  assert '(= feedback/SL-CAI prefill)' in rows['evaluate/evaluated model prefill']['compile s']


@pytest.mark.slow
def test_memory_is_what_the_arguments_hold(tiny_v5e):
  """Train steps' arguments hold the float32 params and two AdamW moments, 1/8 of them each."""
  sys.path.insert(0, str(REPO))
  from cai_jax.models.decoder import ModelConfig

  params = ModelConfig.tiny().num_params() * 4  # float32 master weights
  _, programs = tiny_v5e
  sft = programs['sft/SL-CAI train step']['memory']
  assert sft['argument'] >= 3 * params / 8
  assert sft['argument'] < 3 * params  # sharded, not replicated
  # PPO's learner holds the policy, the value net and their moments: twice SFT's state.
  learner = programs['ppo/learner train step']
  assert learner['memory']['argument'] >= 2 * 3 * params / 8
  # While it runs, only the frozen reference and the PM stay resident, in bfloat16 (the PM's
  # scalar head adds d_model + 1 parameters); the loaded float32 policy and PM are dropped once
  # the train state holds their copies, and SFT keeps nothing beside its train state.
  assert set(learner['resident']) == {'reference', 'PM'}
  for name in ('reference', 'PM'):
    assert params / 2 / 8 <= learner['resident'][name] <= 1.01 * params / 2
  assert learner['total'] == learner['memory']['program'] + sum(learner['resident'].values())
  assert programs['sft/SL-CAI train step']['resident'] == {}


def test_a_program_that_does_not_fit_fails_naming_it():
  r = run_aot(
      '--config',
      GEMMA_V5E,
      *TINY,
      '--programs=sft',
      '--config.model.max_len=4096',
      '--config.sft.loss_chunk=0',
      '--config.sft.batch_size=8192',
      '--config.model.remat=none',
  )
  assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
  # The train state's creation, then the step.
  assert r.stdout.strip().splitlines()[-1].startswith('aot: 2 programs compiled for v5e:2x4')
  error = [line for line in r.stderr.splitlines() if line.startswith('aot: error: ')]
  assert len(error) == 1, r.stderr[-3000:]
  assert 'sft/SL-CAI train step' in error[0] and '15.75 GiB HBM' in error[0]
  assert '--config.model.remat=full' in error[0]


AGREEMENT = """
from cai_jax import aot, aot_programs
from cai_jax.models.decoder import ModelConfig
from cai_jax.utils import sharding

devices = aot.topology_devices('v5e:1x1')
mesh = sharding.make_mesh((1, 1, 1), devices=devices)
# 4 of SmolLM2's 30 layers: the count is per layer (the PM has no LM head), the compile 7x shorter.
# Dense attention: libtpu does not count a Pallas kernel's FLOPs, so under 'auto' (splash) its
# count drops by the attention scores (0.1367 of 0.1546 TFLOP here) and the check would be loose.
cfg = ModelConfig.smollm2_135m(
    dtype='bfloat16', param_dtype='bfloat16', n_layers=4, attention='dense'
)
with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
  pm = aot_programs.scalar_head_model(cfg, mesh)
  program = aot_programs.rewards_program('test', 'PM', cfg, pm, mesh, {}, batch_size=4, length=1024)
  [result] = aot.compile_all([program], log=lambda s: None)
print(program.model_flops, result.flops)
"""


@pytest.mark.slow
def test_model_flops_of_a_forward_agree_with_the_compiler():
  """SmolLM2-135M's PM forward at 4 of its 30 layers (no remat, no loop; attention is a quarter
  of it at 1,024 tokens) on one v5e chip: the analytic count is within 15% of the compiler's.
  It prints both counts (pytest -s). (On a sharded mesh libtpu
  may split an FSDP matmul into a loop over the shards, whose body it counts once: SmolLM2's PM
  forward at 1,024 tokens on v5e:2x4 counts 0.64 of the analytic FLOPs, at 256 tokens 1.01.)"""
  r = subprocess.run(
      [sys.executable, '-c', AGREEMENT], capture_output=True, text=True, timeout=900, cwd=REPO
  )
  assert r.returncode == 0, r.stderr[-3000:]
  model, hardware = (float(x) for x in r.stdout.split())
  print(
      f'PM forward, 4 x 1,024 tokens, 4 layers: model {model / 1e12:.4f} TFLOP, libtpu {hardware / 1e12:.4f}'
  )
  assert abs(model / hardware - 1) < 0.15, (model, hardware)


def test_an_out_of_memory_of_unknown_size_fails_the_program():
  code = (
      'from cai_jax import aot\n'
      'from cai_jax.aot_programs import Program\n'
      'p = Program("sft", "SL-CAI train step", "B=32", None, {"SL-CAI": 1 << 30})\n'
      'said = aot.Result(p, 1.0, None, None, None, error="RESOURCE_EXHAUSTED: Ran out of memory '
      'in memory space hbm. Used 20.5G of 15.75G hbm.")\n'
      'sized = aot.Result(p, 1.0, None, None, None, error="RESOURCE_EXHAUSTED: XLA:TPU compile '
      'permanent error. Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm. Exceeded '
      'hbm capacity by 4.75G. Total hbm usage >= 20.75G: reserved 256.00M program 20.50G '
      'arguments 0B. Output size 0B; shares 0B with arguments. Program hbm requirement 20.50G: '
      'global 0B; HLO temp 20.50G (some required for x (20.50G)).")\n'
      'print(said.memory_from_error(), sized.memory_from_error())\n'
      'for e in aot.fit_errors([said, sized], 16 << 30, ["a smaller batch"]):\n'
      '  print(e)\n'
  )
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = r.stdout.strip().splitlines()
  assert lines[0] == f'None {int(20.5 * 2**30)}'
  assert len(lines) == 3, lines
  assert 'did not say by how much' in lines[1] and 'sft/SL-CAI train step' in lines[1]
  assert 'needs at least 21.50 GiB' in lines[2]


def test_an_mfu_bound_of_100_percent_prints_as_no_figure():
  code = (
      'from cai_jax import aot\n'
      'print(aot.mfu_cell(1.0, True), aot.mfu_cell(0.996, True), aot.mfu_cell(0.62, True), '
      'aot.mfu_cell(1.0, False), aot.mfu_cell(0.62, False), aot.mfu_cell(None, False))\n'
  )
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ['-', '-', '<=62%', '100%', '62%', '-']


@pytest.mark.slow
def test_no_mfu_over_100_percent(tiny_v5e):
  stdout, programs = tiny_v5e
  for p in programs.values():
    assert p['mfu'] is None or 0 < p['mfu'] <= 1, p
    if p['model_flops']:
      assert p['seconds'] >= p['model_flops'] / 197e12, p  # v5e's peak
  cells = [row['MFU'] for row in _rows(stdout).values()]
  assert any(c != '-' for c in cells)
  for c in cells:
    if c != '-':
      assert int(c.lstrip('<=').rstrip('%')) < 100, c  # a bound of 100% prints '-'
  decode = [p for p in programs.values() if p['program'].endswith('decode')]
  assert decode and all(p['per_step'] for p in decode)
  assert all('/step' in _rows(stdout)[f"{p['stage']}/{p['program']}"]['est. ms'] for p in decode)


@pytest.mark.slow
def test_lower_only_lists_what_the_compile_lists(tiny_v5e, tmp_path):
  """`--lower_only` (what tests/test_aot_coverage.py runs) gives the programs, their argument
  shapes and their identical-program links that the compiling run gives, on a sharded mesh."""
  out = tmp_path / 'lowered.json'
  r = run_aot('--config', GEMMA_V5E, *TINY, '--lower_only', f'--json={out}')
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert r.stdout.strip().splitlines()[-1] == (
      f'aot: {len(tiny_v5e[1])} programs lowered for v5e:2x4 (--lower_only: not compiled)'
  )
  lowered = json.loads(out.read_text())
  compiled = list(tiny_v5e[1].values())
  key = lambda p: (p['stage'], p['program'], p['shape'], p['same_as'], p['lowered'])
  assert [key(p) for p in lowered] == [key(p) for p in compiled]
  assert all(p['memory'] is None and p['hardware_flops'] is None for p in lowered)


@pytest.mark.slow
def test_engine_programs_take_the_page_pool_and_say_what_pool_would_fit(tmp_path):
  """With `sampling.engine` the samplers are the engine's prefill and decode, the page pool among
  their arguments; PPO keeps the pool resident after its rollouts; a line per engine gives the
  largest pool that leaves 10% of HBM free and the requests of max_len it holds."""
  out = tmp_path / 'engine.json'
  r = run_aot(
      '--config', GEMMA_V5E, *TINY, '--config.sampling.engine=True',
      '--config.sampling.engine_kv_budget_mib=4', '--programs=critique_revision,ppo',
      '--match=engine', f'--json={out}',
  )  # fmt: skip
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  programs = {f"{p['stage']}/{p['program']}": p for p in json.loads(out.read_text())}
  assert 'critique_revision/helpful prefill' not in programs  # the static sampler does not run
  # tiny in bfloat16: 2 layers x (k, v) x 16 slots x 4 KV heads x head_dim 8 x 2 bytes = 4 KiB;
  # 64 engine slots, as tpu_common gives (the static batch).
  pool = 4 * 2**20
  for name in sorted(programs):
    p = programs[name]
    assert p['error'] is None and p['memory']['argument'] >= pool, (name, p['memory'])
    assert 'engine pool' not in p['resident'], name
  assert set(programs) == {
      f'{who} engine {p}' for who in ('critique_revision/helpful', 'ppo/policy')
      for p in ('prefill', 'decode')
  }  # --match  # fmt: skip
  # PPO's later programs hold the pool beside them (their listing, without compiling them).
  r2 = run_aot(
      '--config', GEMMA_V5E, *TINY, '--config.sampling.engine=True',
      '--config.sampling.engine_kv_budget_mib=4', '--programs=ppo', '--lower_only',
      f'--json={tmp_path / "ppo.json"}',
  )  # fmt: skip
  assert r2.returncode == 0, r2.stderr[-3000:]
  ppo = {p['program']: p for p in json.loads((tmp_path / 'ppo.json').read_text())}
  for name in ('PM rewards', 'rollout forward', 'learner train step'):
    assert ppo[name]['resident']['engine pool'] == pool, name
  found = re.search(
      r'aot: engine critique_revision/helpful: pool 0\.00 GiB per device \(1024 pages\); the '
      r'largest pool leaving 10% free is ([\d.]+) GiB = (\d+) pages = (\d+) requests of max_len '
      r'at once \(config: 64 slots\); decode step >=[\d.e+-]+ ms for 64 slots \(estimate\)',
      r.stdout,
  )
  assert found, r.stdout[-3000:]
  gib, pages, requests = float(found.group(1)), int(found.group(2)), int(found.group(3))
  hbm = programs['ppo/policy engine decode']['hbm']
  biggest = max(
      programs[f'critique_revision/helpful engine {p}']['total'] for p in ('prefill', 'decode')
  )
  assert (
      pages == int((0.9 * hbm - (biggest - pool)) // 4096)
      and abs(gib - pages * 4096 / 2**30) < 0.01
  )
  assert requests == pages // 32  # max_len 512 in pages of 16


@pytest.mark.slow
def test_lora_learners_compile_with_adapter_sized_state_and_no_reference(tmp_path):
  """With `model.lora` the train steps compile as the stages run them: adapters on a base held
  like a frozen model (here in int8, `model.frozen_quantization`), AdamW moments of the adapters
  only, and no PPO reference model beside the learner (it is the learner's base with its adapters
  off); each train step's line splits its state into trained and frozen bytes."""
  from cai_jax.models.decoder import ModelConfig, param_bytes

  args = ('--config', GEMMA_V5E, *TINY, '--programs=sft,ppo', '--match=train step')
  lora = ('--config.model.lora.rank=4', '--config.model.frozen_quantization=int8')
  runs = {}
  for name, extra in (('full', ()), ('lora', lora)):
    r = run_aot(*args, *extra, f'--json={tmp_path / name}.json')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    programs = json.loads((tmp_path / f'{name}.json').read_text())
    runs[name] = {f"{p['stage']}/{p['program']}": p for p in programs}
  assert (
      set(runs['lora']) == set(runs['full']) == {'sft/SL-CAI train step', 'ppo/learner train step'}
  )
  for name, p in runs['lora'].items():
    assert p['error'] is None, (name, p['error'])
    assert p['memory']['argument'] < runs['full'][name]['memory']['argument'], name
  assert 'reference' in runs['full']['ppo/learner train step']['resident']
  assert 'reference' not in runs['lora']['ppo/learner train step']['resident']
  sft_full, sft_lora = runs['full']['sft/SL-CAI train step'], runs['lora']['sft/SL-CAI train step']
  # (The tiny model's rank-4 adapters are too narrow to shard 8 ways: a third of the full state.)
  assert sft_full['state']['frozen'] == 0
  assert sft_lora['state']['trained'] < sft_full['state']['trained'] / 2
  # The frozen base: int8 matrices with float32 scales and bfloat16 norms, FSDP over 8 devices
  # (what does not divide by 8 is replicated): under a bfloat16 base's share.
  int8, bf16 = (
      param_bytes(ModelConfig.tiny(param_dtype='bfloat16', quantization=q)) for q in ('int8', '')
  )
  assert int8 / 8 <= sft_lora['state']['frozen'] < bf16 / 8, (sft_lora['state'], int8, bf16)
