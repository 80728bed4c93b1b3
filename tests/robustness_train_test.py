"""air-train against bad input and faults.

The binary runs in subprocesses on the tiny `test` config (one base run to
step 6, copied by the tests that resume it; independent runs are started
together, the machine has few cores). Training writes its progress to
stderr by design: absl INFO records (with their continuation lines) and
progress-bar lines are that noise; every other line is a problem line, and
the promise is exactly one of them (`error: ...` when the run is refused or
stops, the fallback warning when a damaged checkpoint is set aside).
"""

import hashlib
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

from absl import flags
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from air_jax import checkpointing
from air_jax import cli
from air_jax import workdir as workdir_lib
from air_jax.cli import train as train_cli
from tests import helpers
from tests import robustness_infer_test as shared

TIMEOUT = 420
_INFO = re.compile(r'I\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ')
_OTHER_RECORD = re.compile(r'[WEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ')
_PROGRESS = re.compile(r'\[[#.]+\] \d+/\d+ ')


def problem_lines(stderr: str) -> list[str]:
  """stderr without absl INFO records (and their continuation lines) and
  progress-bar lines."""
  out, in_info = [], False
  for line in stderr.splitlines():
    if _INFO.match(line):
      in_info = True
      continue
    if _PROGRESS.match(line):
      in_info = False
      continue
    if _OTHER_RECORD.match(line) or line.startswith('error: '):
      in_info = False
    if not in_info and line.strip():
      out.append(line)
  return out


def _command(workdir, data_dir, cache, *args):
  mnist = helpers.mnist_flag()
  return [
    sys.executable,
    '-m',
    'experiments.train',
    '--config=configs/test.py',
    f'--workdir={workdir}',
    f'--config.data.data_dir={data_dir}',
    *([mnist] if mnist else []),
    f'--compilation_cache={cache}',
    *args,
  ]


def launch(workdir, data_dir, cache, *args, env=None, limit_size=False):
  command = _command(workdir, data_dir, cache, *args)
  if limit_size:
    command = [sys.executable, '-c', _LIMITED, *command[1:]]
  return subprocess.Popen(
    command,
    cwd=helpers.REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def finish(proc) -> tuple[int, list[str]]:
  _, err = proc.communicate(timeout=TIMEOUT)
  return proc.returncode, problem_lines(err)


def one_error(code, lines, says):
  assert code == 1, lines
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert says in lines[0], lines
  return lines[0]


def digest(path) -> dict[str, str]:
  return shared.tree_digest(path)


def file_hash(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  """The run's XLA cache (tests/conftest.py), else one for the module:
  only the first run compiles."""
  return os.environ.get('JAX_COMPILATION_CACHE_DIR') or str(
    tmp_path_factory.mktemp('xla')
  )


@pytest.fixture(scope='module')
def base_run(tmp_path_factory, small_data_dir, cache):
  """A finished tiny run: checkpoints 3 and 6, config.json, export."""
  workdir = tmp_path_factory.mktemp('base') / 'run'
  code, lines = finish(launch(workdir, small_data_dir, cache))
  assert code == 0 and not lines, lines
  steps = checkpointing.steps(str(workdir / checkpointing.CHECKPOINT_DIR))
  assert steps == [6, 3], steps
  return workdir


def copy_of(base_run, tmp_path, name):
  target = tmp_path / name
  shutil.copytree(base_run, target)
  return target


# --- Bad input: refused before anything is written -------------------------

_CONFIG_FILES = {
  'syntax.py': 'def get_config(:\n',
  'unknown.py': (
    'from air_jax.configs import test\n'
    'def get_config():\n'
    '  c = test.get_config()\n'
    '  c.lerning_rate = 1.0\n'
    '  return c\n'
  ),
  'missing.py': (
    'from air_jax.configs import test\n'
    'def get_config():\n'
    '  c = test.get_config()\n'
    "  del c['batch_size']\n"
    '  return c\n'
  ),
  'illtyped.py': (
    'from air_jax.configs import test\n'
    'def get_config():\n'
    '  c = test.get_config()\n'
    "  c.batch_size = '8'\n"
    '  return c\n'
  ),
  'returns_none.py': 'def get_config():\n  return None\n',
}


def _bad_cases(root, new):
  """(arguments, what the one line says); the first is --config."""
  test = 'configs/test.py'
  return [
    ([f'--workdir={new}'], '--config is required'),
    ([f'--config={root / "nowhere.py"}', f'--workdir={new}'], 'No such file'),
    ([f'--config={root}', f'--workdir={new}'], 'Is a directory'),
    ([f'--config={root / "syntax.py"}', f'--workdir={new}'], 'syntax error'),
    ([f'--config={root / "unknown.py"}', f'--workdir={new}'], 'lerning_rate'),
    ([f'--config={root / "missing.py"}', f'--workdir={new}'], 'batch_size'),
    ([f'--config={root / "illtyped.py"}', f'--workdir={new}'], 'batch_size'),
    ([f'--config={root / "returns_none.py"}', f'--workdir={new}'], 'None'),
    (
      [f'--config={test}', f'--workdir={new}', '--config.lerning_rate=1'],
      'did you mean --config.learning_rate',
    ),
    (
      [f'--config={test}', f'--workdir={new}', '--config.batch_size=abc'],
      'batch_size=abc',
    ),
    (
      [f'--config={test}', f'--workdir={new}', '--config.batch_size=0'],
      'batch_size must be > 0',
    ),
    (
      [f'--config={test}', f'--workdir={new}', '--config.learning_rate=nan'],
      'learning_rate must be finite',
    ),
    (
      [f'--config={test}', f'--workdir={new}', '--config.learning_rate=-inf'],
      'learning_rate must be finite',
    ),
    (
      [f'--config={test}', f'--workdir={new}', '--config.model.lstm_size=-4'],
      'lstm_size must be > 0',
    ),
    (
      [f'--config={test}', f'--workdir={new}', '--config.init_step=600'],
      'init_step (600) must be <= num_train_steps',
    ),
    ([f'--config={test}', f'--workdir={new}', 'stray'], 'unexpected'),
    ([f'--config={test}', f'--workdir={new}', '--no_such'], 'no_such'),
    ([f'--config={test}'], '--workdir is required'),
    ([f'--config={test}', f'--workdir={root / "a_file"}'], 'not a folder'),
    ([f'--config={test}', f'--workdir={root}'], 'holds other files'),
    (
      [f'--config={test}', f'--workdir={root / "a_file" / "run"}'],
      'not a folder',
    ),
    (
      [
        f'--config={test}',
        f'--workdir={new}',
        '--config.data.mnist_dir=/no/such/mnist',
      ],
      '/no/such/mnist',
    ),
    (
      [
        f'--config={test}',
        f'--workdir={new}',
        f'--compilation_cache={root / "a_file" / "x"}',
      ],
      'compilation_cache',
    ),
  ]


def _run_in_process(capsys, monkeypatch, argv) -> tuple[int, str]:
  """The binary's flag parsing and main, in this process (config_flags
  reads sys.argv to learn which --config.<field> overrides to accept)."""
  capsys.readouterr()
  argv = cli.resolve_config_arg(['air-train', *argv])
  monkeypatch.setattr(sys, 'argv', argv)
  try:
    with pytest.raises(SystemExit) as exit_info:
      train_cli.main(cli.parse_flags(argv))
  finally:
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):  # The overrides that parse defined.
      if name.startswith('config.'):
        delattr(flags.FLAGS, name)
  return exit_info.value.code, capsys.readouterr().err


def test_an_empty_compilation_cache_turns_off_the_environments(tmp_path):
  """--compilation_cache='' means no cache, even where
  JAX_COMPILATION_CACHE_DIR (which jax reads itself) names one."""
  before = (
    jax.config.jax_compilation_cache_dir,
    jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  try:
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'env'))
    train_cli.enable_compilation_cache('')
    assert jax.config.jax_compilation_cache_dir is None
    train_cli.enable_compilation_cache(str(tmp_path / 'mine'))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'mine')
    assert (tmp_path / 'mine').is_dir()
  finally:
    jax.config.update('jax_compilation_cache_dir', before[0])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', before[1])


# ml_collections loads config files with importlib's deprecated load_module.
@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_bad_input_is_refused_in_one_line_writing_nothing(
  tmp_path, capsys, monkeypatch
):
  root = tmp_path / 'inputs'
  root.mkdir()
  for name, text in _CONFIG_FILES.items():
    (root / name).write_text(text)
  (root / 'a_file').write_text('mine')
  before = digest(tmp_path)
  for argv, says in _bad_cases(root, tmp_path / 'new'):
    code, err = _run_in_process(capsys, monkeypatch, argv)
    assert code == 1, (argv, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), (argv, err)
    assert says in lines[0], (argv, lines)
  assert digest(tmp_path) == before  # No workdir, no file, nothing.


def test_binary_refuses_bad_input_in_one_line(tmp_path, small_data_dir, cache):
  """Two of them through the real binary: stderr is that one line."""
  syntax = tmp_path / 'syntax.py'
  syntax.write_text(_CONFIG_FILES['syntax.py'])
  workdir = tmp_path / 'new'
  nan = _command(workdir, small_data_dir, cache, '--config.learning_rate=nan')
  bad_file = [
    f'--config={syntax}' if a.startswith('--config=') else a
    for a in _command(workdir, small_data_dir, cache)
  ]
  procs = [
    (
      subprocess.Popen(
        command,
        cwd=helpers.REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
      ),
      says,
    )
    for command, says in ((nan, 'learning_rate'), (bad_file, 'syntax error'))
  ]
  for proc, says in procs:
    _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 1, err
    assert len(err.splitlines()) == 1 and err.startswith('error: '), err
    assert says in err, err
  assert not workdir.exists()


# --- Resuming: a refused resume changes nothing ----------------------------


def test_failed_resumes_leave_the_run_untouched(
  tmp_path, base_run, small_data_dir, cache
):
  two_devices = dict(
    os.environ,
    XLA_FLAGS=helpers.xla_flags('--xla_force_host_platform_device_count=2'),
  )
  cases = {
    # name: (arguments, environment, what the line says)
    'other_size_allowed': (
      ['--config.model.lstm_size=48', '--allow_config_change'],
      None,
      'does not fit',
    ),
    'other_size': (['--config.model.lstm_size=48'], None, 'another config'),
    'indivisible_batch': (
      ['--config.batch_size=7', '--allow_config_change'],
      two_devices,
      'not divisible',
    ),
    'nan_learning_rate': (
      ['--config.learning_rate=nan', '--allow_config_change'],
      None,
      'learning_rate must be finite',
    ),
  }
  workdirs = {name: copy_of(base_run, tmp_path, name) for name in cases}
  before = digest(workdirs['other_size'])
  procs = {
    name: launch(workdirs[name], small_data_dir, cache, *args, env=env)
    for name, (args, env, _) in cases.items()
  }
  for name, (_, _, says) in cases.items():
    code, lines = finish(procs[name])
    one_error(code, lines, says)
    # config.json, checkpoints, metrics: all as they were; no history.
    assert digest(workdirs[name]) == before, name


# --- One training per workdir ----------------------------------------------

_HOLD_LOCK = """
import sys, time
from air_jax import workdir as workdir_lib
with workdir_lib.lock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
"""


def test_a_locked_workdir_is_refused_and_a_killed_holder_frees_it(
  tmp_path, base_run, small_data_dir, cache
):
  workdir = copy_of(base_run, tmp_path, 'run')
  # The lock the training binary takes, held by another process (as a
  # running training holds it).
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLD_LOCK, str(workdir)],
    cwd=helpers.REPO,
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'locked'
    before = digest(workdir)
    code, lines = finish(
      launch(workdir, small_data_dir, cache, '--config.num_train_steps=9')
    )
    one_error(code, lines, 'in use by another training process')
    assert digest(workdir) == before
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # No stale lock: the kernel dropped it with the process.
  with workdir_lib.lock(str(workdir)):
    pass
  assert not any(p.name.startswith('.') for p in workdir.iterdir())


def test_workdir_lock_excludes_a_second_holder(tmp_path):
  with workdir_lib.lock(str(tmp_path / 'w')):
    with pytest.raises(checkpointing.TrainingError, match='in use'):
      with workdir_lib.lock(str(tmp_path / 'w')):
        pass
  # A workdir the lock created and nothing used is removed again.
  assert not (tmp_path / 'w').exists()


# --- Faults during a run ---------------------------------------------------


# Runs a command with no file larger than 1 MiB (the tiny model's checkpoint
# files are larger): a full disk at the first checkpoint save. SIGXFSZ is
# ignored, so a write fails with EFBIG instead of killing the process. (Not
# preexec_fn: forking this process, where JAX runs threads, is unsafe.)
_LIMITED = """
import os, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
"""


def _newest_items(workdir):
  folder = workdir / checkpointing.CHECKPOINT_DIR
  return sorted(p.name for p in folder.iterdir())


def test_faults_during_runs(tmp_path, base_run, small_data_dir, cache):
  """Three resumed runs at once: a damaged newest checkpoint, a full disk
  at the next save, and a learning rate that makes the parameters blow up.
  """
  damaged = copy_of(base_run, tmp_path, 'damaged')
  shared.damage_step(damaged, 6)
  damaged_bytes = digest(damaged / checkpointing.CHECKPOINT_DIR / '6')
  full = copy_of(base_run, tmp_path, 'full')
  full_before = digest(full / checkpointing.CHECKPOINT_DIR)
  huge = copy_of(base_run, tmp_path, 'huge')
  procs = {
    'damaged': launch(
      damaged, small_data_dir, cache, '--config.num_train_steps=9'
    ),
    # No compilation cache: its files would meet the size limit first.
    'full': launch(
      full,
      small_data_dir,
      '',
      '--config.num_train_steps=9',
      limit_size=True,
    ),
    'huge': launch(
      huge,
      small_data_dir,
      cache,
      '--config.num_train_steps=12',
      '--config.learning_rate=1e30',
      '--allow_config_change',
    ),
  }
  results = {name: finish(p) for name, p in procs.items()}

  # The damaged newest checkpoint is set aside (never deleted), the run
  # resumes from the older one and saves past it; one line says all that.
  code, lines = results['damaged']
  assert code == 0, lines
  assert len(lines) == 1, lines
  for words in ('checkpoint step 6 is damaged', 'damaged-6', 'from step 3'):
    assert words in lines[0], lines
  assert _newest_items(damaged) == ['3', '6', '9', 'damaged-6']
  assert (
    digest(damaged / checkpointing.CHECKPOINT_DIR / 'damaged-6')
    == damaged_bytes
  )
  step, _, bad = checkpointing.newest_usable(
    str(damaged / checkpointing.CHECKPOINT_DIR), with_optimiser=True
  )
  assert step == 9 and not bad

  # A full disk stops the run at that save; the earlier checkpoints stay
  # exactly as they were and no partial step is left.
  code, lines = results['full']
  one_error(code, lines, 'saving the checkpoint of step 9 failed')
  assert digest(full / checkpointing.CHECKPOINT_DIR) == full_before

  # A learning rate of 1e30 (finite, so valid) blows the parameters up: the
  # run stops in one line naming the last finite checkpoint, which is kept;
  # every checkpoint left is finite.
  code, lines = results['huge']
  line = one_error(code, lines, 'step 6')
  assert 'kept' in line or 'finite' in line, line
  folder = str(huge / checkpointing.CHECKPOINT_DIR)
  assert 6 in checkpointing.steps(folder)
  step, _, bad = checkpointing.newest_usable(folder, with_optimiser=True)
  assert step == max(checkpointing.steps(folder)) and not bad


# --- The checkpoint guards, in-process ------------------------------------


def _state(value):
  return {
    'step': np.zeros((), np.int32),
    'params': {'w': np.full((3,), value, np.float32)},
    'opt_state': {'mu': np.zeros((3,), np.float32)},
  }


def test_non_finite_states_are_never_saved(tmp_path):
  manager = checkpointing.checkpoint_manager(str(tmp_path), max_to_keep=1)
  manager.save(1, args=ocp.args.StandardSave(_state(1.0)))
  kept = digest(tmp_path)
  for value in (np.nan, np.inf):
    with pytest.raises(checkpointing.TrainingError, match='step 1'):
      manager.save(2, args=ocp.args.StandardSave(_state(value)))
  # max_to_keep=1: a save would have pruned step 1; nothing was saved.
  assert manager.latest_step() == 1 and digest(tmp_path) == kept
  with pytest.raises(checkpointing.CheckpointError, match='NaN'):
    checkpointing.save_params(
      {'w': np.full((2,), np.nan)}, str(tmp_path / 'export'), None
    )
  assert not (tmp_path / 'export').exists()


def _plain_save(directory, step, value):
  with ocp.CheckpointManager(
    os.path.abspath(directory),
    options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False),
  ) as manager:
    manager.save(step, args=ocp.args.StandardSave(_state(value)))


def test_resume_sets_aside_non_finite_checkpoints(tmp_path, caplog):
  folder = tmp_path / checkpointing.CHECKPOINT_DIR
  _plain_save(folder, 1, 1.0)
  _plain_save(folder, 2, np.nan)  # Written by an older version.
  (folder / '3.orbax-checkpoint-tmp').mkdir()  # A save killed midway.
  manager = checkpointing.checkpoint_manager(str(tmp_path))
  with caplog.at_level('WARNING'):
    restored = checkpointing.restore_train_state(manager, _state(0.0))
  assert float(restored['params']['w'][0]) == 1.0
  assert sorted(os.listdir(folder)) == ['1', 'damaged-2']
  assert 'damaged-2' in caplog.text and 'from step 1' in caplog.text
  # Saving step 2 again works: the set-aside folder is no step of orbax.
  manager.save(2, args=ocp.args.StandardSave(_state(2.0)))
  assert checkpointing.steps(str(folder)) == [2, 1]


def test_resume_moves_nothing_when_no_checkpoint_is_usable(tmp_path):
  folder = tmp_path / checkpointing.CHECKPOINT_DIR
  _plain_save(folder, 1, np.nan)
  _plain_save(folder, 2, np.inf)
  before = digest(tmp_path)
  manager = checkpointing.checkpoint_manager(str(tmp_path))
  with pytest.raises(checkpointing.TrainingError, match='nothing was changed'):
    checkpointing.restore_train_state(manager, _state(0.0))
  assert digest(tmp_path) == before


def test_config_change_is_recorded_only_after_the_restore(tmp_path):
  from air_jax.configs import (
    test as test_config,  # pylint: disable=g-import-not-at-top
  )

  config = test_config.get_config()
  checkpointing.save_config(config, str(tmp_path))
  changed = test_config.get_config()
  changed.learning_rate = 1e-3
  with pytest.raises(checkpointing.TrainingError, match='another config'):
    checkpointing.check_resume_config(changed, str(tmp_path), False)
  checkpointing.check_resume_config(changed, str(tmp_path), True)
  history = tmp_path / checkpointing.HISTORY_FILE
  assert not history.exists()  # Not before config.json is rewritten.
  checkpointing.save_config(changed, str(tmp_path))
  assert 'learning_rate' in history.read_text()
