"""The entry point: config printing, model summary, stage-name validation (run as a user would)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_main(*args, timeout=180):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'cai_jax.main', '--config', 'configs/tiny.py', *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=timeout,
      env=env,
  )


def test_prints_config_and_model_summary(tmp_path):
  r = run_main(
      '--workdir',
      str(tmp_path),
      '--config.stages=critique_revision',
      '--config.critique_revision.num_prompts=1',
      '--config.critique_revision.n_rounds=1',
  )
  assert r.returncode == 0, r.stderr
  assert 'source: random:tiny' in (tmp_path / 'config.txt').read_text()  # the resolved config
  assert 'Closing _NonBlockingMetadataStore' not in r.stderr  # orbax INFO: in log.txt only
  assert 'INFO' in (tmp_path / 'log.txt').read_text()
  summary = [l for l in r.stdout.splitlines() if l.startswith('model random:tiny')]
  assert len(summary) == 1, r.stdout
  assert (
      'M params' in summary[0] and 'float32 (trained)' in summary[0] and 'cpu device' in summary[0]
  )
  assert 'models: helpful = pretrained: random:tiny' in r.stdout.splitlines()  # both roles


def test_banner_names_each_role_and_model(tmp_path):
  r = run_main(
      '--workdir',
      str(tmp_path),
      '--config.stages=critique_revision',
      '--config.model.helpful_source=random:tiny-gemma2',
      '--config.critique_revision.num_prompts=1',
      '--config.critique_revision.n_rounds=1',
  )
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  assert 'models: pretrained: random:tiny; helpful: random:tiny-gemma2' in lines
  assert [l.split(':')[0] for l in lines if l.startswith('model ')] == [
      'model random',
      'model random',
  ]  # random:tiny (llama), then random:tiny-gemma2
  assert any(l.startswith('model random:tiny-gemma2: gemma2,') for l in lines), r.stdout


def test_banner_of_a_ppo_run_from_its_own_policy_describes_that_policy(tmp_path):
  """`ppo.policy_source` (ppo_toy, or PPO from any checkpoint): the banner names the policy, and
  a run of PPO alone reports the trained adapters and precision on the policy's own line."""
  from cai_jax import main, pipeline
  from cai_jax.utils import sharding
  from configs import tiny

  config = tiny.get_config()
  config.stages, config.ppo.policy_source = 'ppo', 'random:tiny-gemma2'
  config.model.lora.rank = 4
  ctx = pipeline.context(config, tmp_path, sharding.make_mesh(config.mesh.shape))
  lines = main._model_banner(ctx).splitlines()
  assert lines[0] == 'models: helpful = pretrained: random:tiny; ppo policy: random:tiny-gemma2'
  assert lines[1].startswith('model random:tiny: llama,') and 'LoRA' not in lines[1]
  assert lines[2].startswith('model random:tiny-gemma2: gemma2,')
  assert 'LoRA rank 4 on q k v o gate up down' in lines[2]
  config.stages = 'sft,ppo'  # two trained models: the line of the pretrained one, as before
  lines = main._model_banner(ctx).splitlines()
  assert 'LoRA rank 4' in lines[1] and 'LoRA' not in lines[2]


def test_unloadable_pretrained_source_names_its_role_before_the_workdir(tmp_path):
  r = run_main(
      '--workdir',
      str(tmp_path / 'w'),
      '--config.stages=sft',
      '--config.model.pretrained_source=random:huge',
  )
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1] == (
      'cai_jax: error: config.model.pretrained_source (the pretrained model: SFT init, feedback, '
      "PM init) 'random:huge' cannot be loaded: unknown random preset 'huge'"
  )
  assert 'Traceback' not in r.stderr and not (tmp_path / 'w').exists()


def test_unknown_stage_lists_valid_ones(tmp_path):
  r = run_main('--workdir', str(tmp_path), '--config.stages=sft,rlhf')
  assert r.returncode != 0
  err = r.stderr.strip().splitlines()[-1]
  assert "unknown stage(s) 'rlhf'" in err and 'critique_revision' in err and 'evaluate' in err
  assert 'Traceback' not in r.stderr


def test_bad_mesh_shape_is_one_clear_line(tmp_path):
  r = run_main('--workdir', str(tmp_path), '--config.stages=sft', '--config.mesh.shape=(-1,-1,1)')
  assert r.returncode != 0
  assert 'at most one is allowed' in r.stderr and 'Traceback' not in r.stderr


def test_missing_model_path_is_one_clear_line(tmp_path):
  r = run_main(
      '--workdir',
      str(tmp_path / 'w'),
      '--config.stages=sft',
      f'--config.model.source={tmp_path}/nope',
  )
  assert r.returncode != 0
  assert r.stderr.strip().splitlines()[-1] == (
      'cai_jax: error: config.model.source (the pretrained and helpful model: SFT init, feedback, '
      'PM init; initial responses, critiques, revisions, helpful samples) '
      f"'{tmp_path}/nope' cannot be loaded: no such file or directory (expected an HF directory, "
      "a .gguf file, 'smollm2-135m' or 'random:<preset>')"
  )
  assert 'Traceback' not in r.stderr and not (tmp_path / 'w').exists()


def test_ci_runs_exactly_the_readme_commands():
  """README's first lines are the two commands (demo, tests); .ci/run reads both from there,
  runs the demo in a virtualenv of its own with `pip check` after it, and ends with the tests."""
  readme = (REPO / 'README.md').read_text().splitlines()
  block = readme[readme.index('```bash') + 1 : readme.index('```', readme.index('```bash') + 1)]
  assert len(block) == 2 and 'python -m cai_jax.main --config configs/demo.py' in block[0]
  assert 'python -m pytest' in block[1] and '[test]' not in block[0]
  ci = [
      line.strip()
      for line in (REPO / '.ci' / 'run').read_text().splitlines()
      if line.strip() and not line.lstrip().startswith('#')
  ]
  # The two lines .ci/run extracts, extracted by its own code.
  extract = [line for line in ci if line.startswith(('demo_cmd=', 'test_cmd='))]
  script = '\n'.join(extract + ['printf "%s\\n%s" "$demo_cmd" "$test_cmd"'])
  out = subprocess.run(['bash', '-c', script], cwd=REPO, capture_output=True, text=True, check=True)
  assert out.stdout.splitlines() == block
  venv = next(i for i, line in enumerate(ci) if line.startswith('python3 -m venv'))
  demo = ci.index('bash -c "$demo_cmd"')
  assert venv < demo < ci.index('pip check') < ci.index('bash -c "$test_cmd"') == len(ci) - 1
