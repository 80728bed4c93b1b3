r"""Exports a run's checkpoint as float32 inference parameters + config.

  python -m experiments.export --checkpoint=runs/default --output=pretrained/air

The export (params.msgpack + config.json, no optimiser state and no baseline
network) loads in `experiments.evaluate` and `experiments.infer`.
"""

from absl import app
from absl import flags

from air_jax import train
from air_jax import writers

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A training workdir.')
_OUTPUT = flags.DEFINE_string('output', None, 'Directory to write.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')
flags.mark_flags_as_required(['checkpoint', 'output'])


def main(argv):
  del argv
  writers.quiet_library_logs()
  config, _, params = train.load_model(_CHECKPOINT.value, _STEP.value)
  train.save_params(params, _OUTPUT.value, config)
  print(f'exported {_CHECKPOINT.value} -> {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
