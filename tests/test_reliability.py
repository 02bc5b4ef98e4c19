"""Nothing lost, ever: bad input is refused before the workdir is touched, `force` keeps what it
replaces until the redo has finished, trainers stop at the first non-finite step, one run holds a
workdir at a time, a full disk ends the run in seconds with one line, and an edited input file
redoes exactly the stages that read it."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cai_jax import bookkeeping
from cai_jax.training import metrics as metrics_lib
from cai_jax.training import train_lib
from helpers_stages import tiny_main_cmd

pytestmark = pytest.mark.slow  # subprocess runs of the pipeline: minutes in all

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    '--config.critique_revision.num_prompts=4',
    '--config.sft.num_steps=6',
    '--config.sft.checkpoint_every=2',
    '--config.sft.eval_every=3',
]


def run_main(workdir, *args, timeout=600):
  cmd = tiny_main_cmd(workdir, *SMALL, *args)
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def errors(proc) -> list[str]:
  return [line for line in proc.stderr.splitlines() if line.startswith('cai_jax: error:')]


RUN_FILES = (
    bookkeeping.LOCK_FILE,
    'config.txt',
    'log.txt',
)  # about the latest command, not a stage


def tree_digest(root: Path) -> dict[str, str]:
  """sha256 of every stage output under `root`."""
  return {
      str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
      for p in sorted(root.rglob('*'))
      if p.is_file() and p.name not in RUN_FILES
  }


@pytest.fixture(scope='module')
def finished(tmp_path_factory) -> Path:
  """A workdir where critique_revision and sft have finished."""
  workdir = tmp_path_factory.mktemp('reliability') / 'run'
  proc = run_main(workdir, '--config.stages=critique_revision,sft')
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture
def copy_of(finished, tmp_path) -> Path:
  shutil.copytree(finished, tmp_path / 'run')
  return tmp_path / 'run'


# ---- validation before anything is written --------------------------------------------------


def test_every_bad_value_is_reported_at_once_and_nothing_is_written(tmp_path):
  workdir = tmp_path / 'never'
  proc = run_main(
      workdir,
      '--config.sft.batch_size=-5',
      '--config.critique_revision.n_rounds=0',
      '--config.model.dtype=float7',
      '--config.conversation_format=bogus',
      '--config.sft.optimizer.learning_rate=nan',
      '--config.ppo.temperature=-1.0',
      '--config.ppo.guard.max_kl=-1.0',
  )
  assert proc.returncode != 0
  assert errors(proc) == [
      "cai_jax: error: model.dtype='float7' is not a dtype we run; valid: float32, bfloat16, float16",
      "cai_jax: error: config.conversation_format='bogus': expected one of transcript, chat_template",
      'cai_jax: error: config.sft.batch_size=-5: expected an integer >= 1',
      'cai_jax: error: config.sft.optimizer.learning_rate=nan: expected a finite number in (0, inf]',
      'cai_jax: error: config.ppo.guard.max_kl=-1.0: expected a finite number in [0, inf]',
      'cai_jax: error: config.ppo.temperature=-1.0: expected a finite number in [0, inf]',
      'cai_jax: error: config.critique_revision: n_rounds must be >= 1 (the paper uses 4), got 0',
  ]
  assert 'Traceback' not in proc.stderr
  assert not workdir.exists()


def test_empty_stage_list_and_missing_paths_are_errors(tmp_path):
  proc = run_main(tmp_path / 'w', '--config.stages=')
  assert proc.returncode != 0 and errors(proc) == [
      'cai_jax: error: config.stages is empty: name one or more of prompt_generation, '
      'critique_revision, sft, feedback, preference, evaluate_feedback, ppo, dpo, evaluation_pm, '
      'harmfulness, evaluate'
  ]
  proc = run_main(
      tmp_path / 'w',
      '--config.stages=preference',
      '--config.preference.helpful_mix.path=/nonexistent/helpful.jsonl',
      '--config.constitution=/nonexistent/c.json',
  )
  assert proc.returncode != 0
  assert errors(proc) == [
      'cai_jax: error: config.preference.helpful_mix.path: no such file or '
      "directory '/nonexistent/helpful.jsonl'"
  ]
  assert not (tmp_path / 'w').exists()


def test_unreadable_input_files_are_one_line_before_anything_is_written(tmp_path, copy_of):
  not_utf8 = tmp_path / 'latin1.json'
  not_utf8.write_bytes(b'{"description": "caf\xe9 \xff"}')
  model = tmp_path / 'model'
  model.mkdir()
  (model / 'config.json').write_text('{\n "model_type": "llama",\n}\n')
  comparisons = tmp_path / 'comparisons.jsonl'
  comparisons.write_bytes(b'{"conversation": "\xff"}\n')
  cases = {
      f'--config.constitution={not_utf8}': (
          f'cai_jax: error: config.constitution: {not_utf8}: not valid UTF-8 JSON: '
          "'utf-8' codec can't decode byte 0xe9"
      ),
      f'--config.model.source={model}': (
          'cai_jax: error: config.model.source (the pretrained model: SFT init, feedback, PM '
          f"init) '{model}' cannot be loaded: {model}/config.json: not valid UTF-8 JSON "
          '(Expecting property name enclosed in double quotes: line 3'
      ),
      f'--config.evaluate_feedback.comparisons={comparisons}': (
          f'cai_jax: error: config.evaluate_feedback.comparisons: {comparisons} is not UTF-8 '
          "text ('utf-8' codec can't decode byte 0xff"
      ),
  }
  before = tree_digest(copy_of)
  for flag, expected in cases.items():
    for workdir in (tmp_path / 'never', copy_of):
      proc = run_main(workdir, flag, '--config.stages=critique_revision,sft,evaluate_feedback')
      assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
      (line,) = errors(proc)
      assert line.startswith(expected), line
  assert not (tmp_path / 'never').exists()
  assert tree_digest(copy_of) == before


def test_an_unknown_field_or_config_path_is_one_line(tmp_path):
  workdir = tmp_path / 'never'
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config(:\n')
  cases = [
      (
          tiny_main_cmd(workdir, '--config.sft.bogus=1'),
          "cai_jax: error: --config.sft.bogus: 'bogus' is not a field of the config",
      ),
      (
          tiny_main_cmd(workdir, '--config.sft.optimizer.nope=1'),
          "cai_jax: error: --config.sft.optimizer.nope: 'nope' is not a field of the config",
      ),
      (
          [
              sys.executable,
              '-m',
              'cai_jax.main',
              '--config',
              'configs/tyni.py',
              '--workdir',
              str(workdir),
          ],
          'cai_jax: error: --config configs/tyni.py: no such file',
      ),
      (
          [sys.executable, '-m', 'cai_jax.main', f'--config={broken}', '--workdir', str(workdir)],
          f"cai_jax: error: --config {broken}: cannot load it: SyntaxError('invalid syntax'",
      ),
  ]
  for cmd, expected in cases:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().startswith(expected), proc.stderr[-3000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
  assert not workdir.exists()


def test_api_arguments_of_the_wrong_kind_are_one_value_error(tmp_path):
  from cai_jax import sampling
  from cai_jax.models import checkpoint

  pt = checkpoint.load_pretrained('random:tiny')
  for prompts, match in (
      ('hello', r'^prompt_tokens is a string'),
      (['hello'], r"^prompt_tokens\[0\] is 'hello', not a list of token ids"),
      ([[5, 6], [1, 'x']], r'^prompt_tokens\[1\] is .*not a list of token ids'),
  ):
    with pytest.raises(ValueError, match=match):
      sampling.generate(pt.model, prompts, max_new_tokens=2)
  for conversation, match in (
      ([], r'^prompts\[0\] is an empty conversation$'),
      ([('human', '')], r'^prompts\[0\]: its last human turn is empty'),
      ([('human', 'hi'), ('assistant', 'ok'), ('human', ' \n')], 'last human turn is empty'),
      ('  ', r'^prompts\[0\] is an empty prompt$'),
  ):
    with pytest.raises(ValueError, match=match):
      sampling.generate_responses(pt, [conversation], max_new_tokens=2)
  a_file = tmp_path / 'model'
  a_file.write_text('not a directory')
  with pytest.raises(ValueError, match='is a file, not a directory'):
    checkpoint.save_pretrained(pt, str(a_file))
  assert a_file.read_text() == 'not a directory'


def test_a_rejected_value_in_a_finished_workdir_changes_nothing(copy_of):
  before = tree_digest(copy_of)
  proc = run_main(copy_of, '--config.force=sft', '--config.stages=sft', '--config.sft.batch_size=0')
  assert proc.returncode != 0
  assert errors(proc) == ['cai_jax: error: config.sft.batch_size=0: expected an integer >= 1']
  assert tree_digest(copy_of) == before


def test_force_keeps_what_it_replaces_until_the_redo_has_finished(copy_of):
  before = tree_digest(copy_of)
  # evaluate needs every stage that force=critique_revision moves aside: the redo fails...
  proc = run_main(copy_of, '--config.force=critique_revision', '--config.stages=evaluate')
  assert proc.returncode != 0
  assert errors(proc) == [
      f"cai_jax: error: stage 'evaluate' needs the output of stage 'critique_revision', which has "
      f'not finished in {copy_of}: run --config.stages=critique_revision first (same config and '
      'workdir)'
  ]
  # ... and both finished stages are back, byte for byte.
  assert tree_digest(copy_of) == before
  # A redo that succeeds replaces the stage and empties the trash.
  proc = run_main(copy_of, '--config.force=sft', '--config.stages=sft')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (copy_of / bookkeeping.TRASH).exists()
  assert (copy_of / 'sft' / 'DONE.json').exists()


# ---- non-finite losses ------------------------------------------------------------------------


def test_sft_stops_at_the_first_non_finite_step_and_exports_nothing(copy_of):
  shutil.rmtree(copy_of / 'sft')
  # The divergence guard would stop this run a step before its NaN (param_norm at step 1): off,
  # so the NaN guard is what stops it.
  proc = run_main(
      copy_of,
      '--config.stages=sft',
      '--config.sft.optimizer.learning_rate=1e6',
      '--config.sft.guard.param_norm_jump=0',
      '--config.sft.guard.loss_jump=0',
  )
  assert proc.returncode != 0
  (line,) = errors(proc)
  assert line.startswith('cai_jax: error: sft: non-finite ') and ' at step ' in line
  assert 'without saving this state or exporting a model' in line
  assert not (copy_of / 'sft' / 'DONE.json').exists() and not (copy_of / 'sft' / 'export').exists()
  step = int(line.split(' at step ')[1].split(';')[0])
  saved = [int(p.name) for p in (copy_of / 'sft' / 'checkpoints').iterdir() if p.name.isdigit()]
  assert all(s < step for s in saved)  # only steps before the bad one were checkpointed


def test_check_finite_names_the_step_and_the_last_good_checkpoint():
  train_lib.check_finite('sft', 3, {'loss': 1.0, 'grad_norm': 2.0})  # finite: nothing happens
  with pytest.raises(
      train_lib.NonFiniteError,
      match=r'^sft: non-finite loss=nan at step 7; .*no checkpoint had been saved',
  ):
    train_lib.check_finite('sft', 7, {'loss': float('nan'), 'grad_norm': 1.0})


# ---- the workdir lock -------------------------------------------------------------------------


def test_the_guard_stops_a_finite_run_gone_off_a_cliff_and_names_the_bound(tmp_path):
  from configs.stages import guard as guard_config

  cfg = guard_config.guard('tiny', rl=True)
  (tmp_path / 'metrics.jsonl').write_text(json.dumps({'step': 1, 'loss': 2.0, 'entropy': 1.5}))
  guard = train_lib.Guard('ppo', cfg, tmp_path, params={'w': np.full((4,), 5.0)})  # norm 10
  healthy = {'loss': 1500.0, 'entropy': 3.4, 'kl': 99.0, 'param_norm': 900.0, 'other': 1e30}
  assert guard.broken(healthy) == []
  guard.check(7, healthy)
  for metric, value, bound in (
      ('loss', 2001.0, 'over guard.loss_jump=1000 x max(1, 2) at the start'),
      ('entropy', 3.6, "up 2.1 from the first step's 1.5, over guard.entropy_rise=2"),
      ('kl', 101.0, 'over guard.max_kl=100'),
      ('param_norm', 1001.0, 'over guard.param_norm_jump=100 x max(1, 10) at the start'),
  ):
    with pytest.raises(train_lib.DivergedError) as e:
      guard.check(7, {**healthy, metric: value})
    assert str(e.value).startswith(f'ppo: diverged at step 7: {metric}=')
    assert bound in str(e.value) and 'no checkpoint had been saved' in str(e.value)
  off = train_lib.Guard('sft', {'loss_jump': 0.0}, None)  # 0 turns a bound off
  assert off.broken({'loss': 1e30}) == []


def test_ppo_at_a_learning_rate_of_1e6_stops_at_its_first_step(tmp_path):
  """The issue's case: finite all along (no NaN), every weight ~1e6, the policy noise."""
  workdir = tmp_path / 'run'
  cmd = [
      sys.executable,
      '-m',
      'cai_jax.main',
      '--config',
      str(REPO / 'configs' / 'ppo_toy.py'),
      '--workdir',
      str(workdir),
      '--config.ppo.steps=3',
      '--config.ppo.policy_optimizer.learning_rate=1e6',
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]
  (line,) = errors(proc)
  assert line.startswith('cai_jax: error: ppo: diverged at step 1: param_norm='), line
  assert 'over guard.param_norm_jump=100' in line and 'no checkpoint had been saved' in line
  assert not (workdir / 'ppo' / 'export').exists() and not (workdir / 'ppo' / 'DONE.json').exists()
  assert not list((workdir / 'ppo' / 'checkpoints').glob('[0-9]*'))


def test_kill_9_in_critique_revision_and_feedback_with_prefix_reuse_writes_the_same_records(
    finished, tmp_path
):
  """Killed halfway through writing a chunk, three times (critique_revision's helpful chunk,
  feedback's second and third), with prefix reuse on: every resume starts with a cold prefix
  cache, and the records come out byte for byte as in an uninterrupted run."""
  args = ['--config.stages=critique_revision,sft,feedback', '--config.sampling.prefix_reuse=True']
  reference = tmp_path / 'reference'
  shutil.copytree(finished, reference)
  proc = run_main(reference, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]

  killed = tmp_path / 'killed'
  shutil.copytree(finished, killed)
  shutil.rmtree(killed / 'critique_revision')  # sft stays finished: its fingerprint is the config's
  for kill_at in (
      2,
      3,
      2,
  ):  # appends: CR red-team, CR helpful | CR helpful, FB 1, FB 2 | FB 2, FB 3
    cmd = [sys.executable, str(REPO / 'tests/scripts/fb_kill_run.py'), str(kill_at)]
    cmd += tiny_main_cmd(killed, *SMALL, *args)[3:]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  assert not (killed / 'feedback' / 'DONE.json').exists()
  proc = run_main(killed, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for rel in (
      'critique_revision/samples.jsonl',
      'critique_revision/helpful.jsonl',
      'feedback/samples.jsonl',
  ):
    assert (killed / rel).read_bytes() == (reference / rel).read_bytes(), rel


def test_kill_9_in_critique_revision_with_the_engine_writes_the_same_records(tmp_path):
  """With the continuous-batching engine, killed halfway through its second red-team chunk: the
  resumed run (a cold engine, its page pool empty) writes the records of an uninterrupted run,
  byte for byte."""
  args = [
      '--config.stages=critique_revision',
      '--config.critique_revision.chunk_size=2',
      '--config.sampling.engine=True',
      '--config.sampling.engine_slots=3',  # fewer than a chunk's requests: slots are refilled
      '--config.sampling.engine_kv_budget_mib=16',
  ]
  reference = tmp_path / 'reference'
  proc = run_main(reference, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  killed = tmp_path / 'killed'
  cmd = [sys.executable, str(REPO / 'tests/scripts/fb_kill_run.py'), '2']
  cmd += tiny_main_cmd(killed, *SMALL, *args)[3:]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  torn = (killed / 'critique_revision' / 'samples.jsonl').read_text()
  assert torn.count('\n') >= 2 and not torn.endswith('\n')  # one chunk of 2, half the next
  proc = run_main(killed, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for rel in ('critique_revision/samples.jsonl', 'critique_revision/helpful.jsonl'):
    assert (killed / rel).read_bytes() == (reference / rel).read_bytes(), rel


def test_a_cpu_run_prints_nothing_from_libtpu(tmp_path):
  """libtpu (the test extra) is installed but there is no TPU: the console has our lines only."""
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}  # conftest sets it
  cmd = tiny_main_cmd(
      tmp_path / 'run',
      '--config.stages=critique_revision',
      '--config.critique_revision.num_prompts=2',
  )
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  console = proc.stdout + proc.stderr
  for marker in ('host bounds', 'worker hostname', 'InitGoogle', 'libtpu', 'E0000', 'TPU'):
    assert marker not in console, (marker, console[:3000])
  assert console.startswith('config: '), console[:3000]


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_stale_lock_taken_over(copy_of):
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  try:
    lock = copy_of / bookkeeping.LOCK_FILE
    lock.write_text(
        json.dumps(
            {'pid': holder.pid, 'host': os.uname().nodename, 'started': '2026-01-01 00:00:00'}
        )
    )
    before = tree_digest(copy_of)
    proc = run_main(copy_of, '--config.stages=critique_revision,sft')
    assert proc.returncode != 0
    (line,) = errors(proc)
    assert line.startswith(f'cai_jax: error: {copy_of} is in use by pid {holder.pid} on ')
    assert tree_digest(copy_of) == before and lock.exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The holder is gone (kill -9): its lock is stale; the next run takes it over and reuses both.
  proc = run_main(copy_of, '--config.stages=critique_revision,sft')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'taking over the stale lock' in proc.stderr
  assert '| critique_revision | reused |' in proc.stdout and '| sft | reused |' in proc.stdout
  assert not lock.exists()


def test_a_second_run_while_the_first_is_running_refuses(tmp_path):
  """The race the lock closes: two runs in one workdir at once (they used to train side by side,
  or one died on a TFDS rename)."""
  workdir = tmp_path / 'w'
  args = ['--config.stages=critique_revision,sft', '--config.sft.num_steps=300']
  first = subprocess.Popen(
      tiny_main_cmd(workdir, *SMALL, *args),
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  deadline = time.time() + 120
  while not (workdir / bookkeeping.LOCK_FILE).exists() and time.time() < deadline:
    time.sleep(0.05)
  second = run_main(workdir, *args)
  still_running = first.poll() is None
  # The first run has made its point by outliving the second: it is not waited for (its 300 SFT
  # steps are minutes of CPU), only stopped once it has written some SFT rows of its own.
  while first.poll() is None and len(_metric_rows(workdir)) < 2 and time.time() < deadline + 480:
    time.sleep(0.1)
  first.kill()
  _, err = first.communicate(timeout=60)
  assert still_running, 'the first run ended before the second started: the test proves nothing'
  assert first.returncode in (0, -signal.SIGKILL), err[-3000:]
  assert second.returncode != 0 and 'Traceback' not in second.stderr
  (line,) = errors(second)
  assert line.startswith(f'cai_jax: error: {workdir} is in use by pid {first.pid} on ')
  rows = _metric_rows(workdir)
  assert rows and [r['step'] for r in rows] == list(range(1, len(rows) + 1))  # one run's, once


def _metric_rows(workdir: Path) -> list[dict]:
  return metrics_lib.read_metrics(workdir / 'sft' / 'metrics.jsonl')


# ---- a full disk --------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
  if os.geteuid() != 0:
    return False
  path.mkdir(parents=True, exist_ok=True)
  return (
      subprocess.run(
          ['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True
      ).returncode
      == 0
  )


def test_a_full_disk_ends_the_run_in_seconds_and_a_rerun_with_space_resumes(tmp_path, finished):
  mnt = tmp_path / 'small'
  if not _mount_tmpfs(mnt, '2m'):
    pytest.skip('mounting a tmpfs needs root (the simulated ENOSPC test below runs instead)')
  try:
    workdir = mnt / 'run'
    shutil.copytree(finished / 'critique_revision', workdir / 'critique_revision')
    t0 = time.time()
    proc = run_main(workdir, '--config.stages=critique_revision,sft', timeout=300)
    assert proc.returncode != 0 and time.time() - t0 < 120
    (line,) = errors(proc)
    assert line.startswith('cai_jax: error: no space left on device writing ')
    assert 'MiB free on its filesystem' in line
    # orbax's failed background writes stay in the log: the console ends with that one line.
    for noise in ('Traceback', 'Logging error', 'Event loop is closed', 'RESOURCE_EXHAUSTED'):
      assert noise not in proc.stderr, (noise, proc.stderr[-3000:])
    assert proc.stderr.rstrip().splitlines()[-1] == line
    assert not (workdir / 'sft' / 'DONE.json').exists()
    subprocess.run(['mount', '-o', 'remount,size=256m', str(mnt)], check=True)
    proc = run_main(workdir, '--config.stages=critique_revision,sft')
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = lambda w: [json.loads(x) for x in (w / 'sft' / 'metrics.jsonl').read_text().splitlines()]
    strip = lambda rs: [{k: v for k, v in r.items() if 'seconds' not in k} for r in rs]
    assert strip(rows(workdir)) == strip(rows(finished))
    assert tree_digest(workdir / 'sft' / 'export') == tree_digest(finished / 'sft' / 'export')
  finally:
    subprocess.run(['umount', '-l', str(mnt)], capture_output=True)


def test_a_writer_thread_killed_by_enospc_is_raised_not_waited_on(tmp_path):
  """What keeps the run above from hanging: the OSError that ends tensorboardX's writer thread
  is raised in the main thread at the next write."""
  import threading

  def dies():
    raise OSError(28, 'No space left on device')

  t = threading.Thread(target=dies)
  t.start()
  t.join()
  writer = metrics_lib.MetricsWriter(tmp_path, tensorboard=False)
  try:
    with pytest.raises(OSError, match='No space left on device'):
      writer.write(1, {'loss': 1.0})
  finally:
    metrics_lib._BACKGROUND_IO_ERRORS.clear()
    writer.close()


# ---- input files are part of the fingerprint ------------------------------------------------


def test_an_edited_constitution_redoes_exactly_the_stages_that_read_it(tmp_path):
  constitution = tmp_path / 'constitution.json'
  shutil.copy(REPO / 'cai_jax' / 'assets' / 'constitutions' / 'tiny.json', constitution)
  args = ['--config.stages=critique_revision,sft', f'--config.constitution={constitution}']
  workdir = tmp_path / 'run'
  assert run_main(workdir, *args).returncode == 0
  proc = run_main(workdir, *args)  # unchanged: everything reused
  assert proc.returncode == 0
  assert '| critique_revision | reused |' in proc.stdout and '| sft | reused |' in proc.stdout
  data = json.loads(constitution.read_text())
  data['critique_revision'][0]['critique_request'] += ' Be specific.'
  constitution.write_text(json.dumps(data, indent=1))
  proc = run_main(workdir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '| critique_revision | ran |' in proc.stdout and '| sft | ran |' in proc.stdout
  assert 'stage critique_revision: inputs.constitution:' in proc.stderr
  rounds = [
      json.loads(x)['rounds']
      for x in (workdir / 'critique_revision' / 'samples.jsonl').read_text().splitlines()
  ]
  assert any('Be specific.' in r['critique_request'] for rs in rounds for r in rs)
