r"""Trains AIR: flags -> air_jax.train.train_and_evaluate.

  air-train --config=default --workdir=/tmp/air [--config.seed=1 ...]
  python -m experiments.train --config=configs/default.py --workdir=/tmp/air

Starting the same command again resumes from the newest intact checkpoint.
Several processes: set JAX_COORDINATOR_ADDRESS (host:port of process 0),
JAX_NUM_PROCESSES and JAX_PROCESS_ID in each process's environment and run
the same command in each (see WORKSPACE.md); each process reads its own
share of the data and only process 0 writes metrics, pictures and exports.
"""

import logging as logging_lib
import os

from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from air_jax import checkpointing
from air_jax import cli
from air_jax import configuration
from air_jax import writers

try:  # The training extras: `pip install 'air_jax[train]'`.
  from air_jax import sweep
  from air_jax import train
  from air_jax.datasets.multi_mnist import multi_mnist
except ImportError as missing:  # pylint: disable=invalid-name
  _MISSING = missing
else:
  _MISSING = None

_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Where checkpoints and logs go.'
)
config_flags.DEFINE_config_file('config', None, cli.CONFIG_HELP)
_PRINT_CONFIG = flags.DEFINE_bool(
  'print_config', False, 'Print the resolved config as JSON and exit.'
)
_ALLOW_CHANGE = flags.DEFINE_bool(
  'allow_config_change',
  False,
  'Resume a workdir whose stored config differs (recorded in '
  'config_history.jsonl).',
)
_SEEDS = flags.DEFINE_list(
  'seeds',
  None,
  'Train one run per seed as a single vmapped program (a sweep), each in '
  '<workdir>/seed_<s>; config.seed is then ignored.',
)
_CACHE = flags.DEFINE_string(
  'compilation_cache',
  os.environ.get('JAX_COMPILATION_CACHE_DIR')
  or os.path.join(
    os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache')),
    'air_jax',
    'xla',
  ),
  "JAX's persistent compilation cache ('' disables it): a second run of a "
  'config starts without compiling. Defaults to JAX_COMPILATION_CACHE_DIR '
  'when that is set.',
)

_MULTIPROCESS_ENV = (
  'JAX_COORDINATOR_ADDRESS',
  'JAX_NUM_PROCESSES',
  'JAX_PROCESS_ID',
)


def enable_compilation_cache(directory: str) -> None:
  """Caches compiled programs on disk (the train step takes seconds); ''
  turns the cache off, even one named by JAX_COMPILATION_CACHE_DIR."""
  if not directory:
    jax.config.update('jax_compilation_cache_dir', None)
    return
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    cli.fail(
      f'--compilation_cache {directory}: {e.strerror or e} '
      "(--compilation_cache='' disables the cache)."
    )
  if not os.access(directory, os.W_OK):
    cli.fail(
      f'--compilation_cache {directory} is not writable '
      "(--compilation_cache='' disables the cache)."
    )
  jax.config.update('jax_compilation_cache_dir', directory)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def check_paths(config, workdir: str | None) -> None:
  """Fails (one line) on a --workdir that cannot be one, or a named MNIST
  folder that does not exist, before anything is computed or written."""
  if not workdir:
    cli.fail('--workdir is required.')
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    cli.fail(f'--workdir {workdir} exists and is not a folder.')
  ancestor = os.path.abspath(workdir)
  while not os.path.lexists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    cli.fail(f'--workdir {workdir}: {ancestor} is not a folder.')
  if not os.access(ancestor, os.W_OK | os.X_OK):
    cli.fail(f'--workdir {workdir}: {ancestor} is not writable.')
  if os.path.isdir(workdir) and not is_run_folder(workdir):
    cli.fail(
      f'--workdir {workdir} holds other files and no air_jax run; name a '
      'new or empty folder (or a run to resume).'
    )
  mnist_dir = config.data.mnist_dir
  if mnist_dir and not os.path.isdir(mnist_dir):
    cli.fail(f'config.data.mnist_dir {mnist_dir}: no such folder.')


def is_run_folder(workdir: str) -> bool:
  """Whether a folder is empty or holds a run (or a sweep's runs): training
  never writes into a folder of other files."""
  names = os.listdir(workdir)
  markers = (checkpointing.CONFIG_FILE, checkpointing.CHECKPOINT_DIR)
  if not names or any(n in names for n in markers):
    return True
  return any(
    n.startswith('seed_')
    and os.path.isfile(os.path.join(workdir, n, checkpointing.CONFIG_FILE))
    for n in names
  )


def kept_checkpoints(workdir: str) -> str:
  """'the newest checkpoint kept is step S' (per seed of a sweep)."""
  found = {}
  for name in [
    '',
    *sorted(os.listdir(workdir) if os.path.isdir(workdir) else []),
  ]:
    if name and not name.startswith('seed_'):
      continue
    path = os.path.join(workdir, name, checkpointing.CHECKPOINT_DIR)
    steps = checkpointing.steps(path)
    if steps:
      found[name] = steps[0]
  if not found:
    return 'no checkpoint was saved'
  if list(found) == ['']:
    return f'the newest checkpoint kept is step {found[""]}'
  return 'the newest checkpoints kept are ' + ', '.join(
    f'{name} step {step}' for name, step in found.items()
  )


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}.')
  if _MISSING is not None:
    cli.fail(
      f'air-train needs the training extras ({_MISSING}): pip install '
      "'air_jax[train]'."
    )
  config = flags.FLAGS.config
  if config is None:
    cli.fail('--config is required. ' + cli.CONFIG_HELP)
  with cli.one_line_errors():
    configuration.validate(config)
  if _PRINT_CONFIG.value:
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    return
  check_paths(config, _WORKDIR.value)
  writers.quiet_library_logs()
  # tensorboardX warns once per NaN scalar; the run's own one-line error
  # says which metric was not finite.
  logging_lib.getLogger('tensorboardX.x2num').setLevel(logging_lib.ERROR)
  if all(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
      coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
      num_processes=int(os.environ['JAX_NUM_PROCESSES']),
      process_id=int(os.environ['JAX_PROCESS_ID']),
    )
  enable_compilation_cache(_CACHE.value)
  logging.info(
    'JAX process %d/%d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )

  errors = (train.TrainingError, multi_mnist.MnistFilesError)
  try:
    _train(config, errors)
  except writers.NonFiniteMetricError as e:
    cli.fail(f'{e}; stopping: {kept_checkpoints(_WORKDIR.value)}.')
  except KeyboardInterrupt:
    cli.fail(
      f'interrupted; {kept_checkpoints(_WORKDIR.value)} (the same command '
      'resumes from it).',
      code=130,
    )


def _train(config, errors):
  with cli.one_line_errors(*errors):
    if _SEEDS.value:
      try:
        seeds = [int(s) for s in _SEEDS.value]
      except ValueError:
        cli.fail(f'--seeds must be integers, got {_SEEDS.value}.')
      sweep.train_sweep(config, _WORKDIR.value, seeds, _ALLOW_CHANGE.value)
    else:
      train.train_and_evaluate(config, _WORKDIR.value, _ALLOW_CHANGE.value)


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
