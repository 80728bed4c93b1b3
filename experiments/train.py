r"""Trains AIR. Thin binary: flags -> air_jax.train.train_and_evaluate.

  python -m experiments.train --config=configs/default.py --workdir=/tmp/air \
      [--config.seed=1 --config.learning_rate=3e-4 ...]

If JAX's multi-process environment variables are set (coordinator address,
process count and id), jax.distributed is initialised first and each process
feeds its own shard of the data.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from air_jax import train
from air_jax import writers

_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Where checkpoints and logs go.'
)
config_flags.DEFINE_config_file(
  'config', None, 'A configs/*.py file.', lock_config=True
)
flags.mark_flags_as_required(['config', 'workdir'])

_MULTIPROCESS_ENV = (
  'JAX_COORDINATOR_ADDRESS',
  'JAX_NUM_PROCESSES',
  'JAX_PROCESS_ID',
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError('Too many command-line arguments.')
  writers.quiet_library_logs()
  if all(os.environ.get(k) for k in _MULTIPROCESS_ENV):
    jax.distributed.initialize()
  logging.info(
    'JAX process %d/%d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  train.train_and_evaluate(flags.FLAGS.config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
