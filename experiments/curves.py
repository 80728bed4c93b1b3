r"""Draws eval count accuracy and ELBO curves of runs into one PNG.

  python -m experiments.curves --workdirs=runs/a,runs/b --output=curves.png

Four panels: count accuracy and ELBO on the eval split, against training
step and against wall time (from the train records' `train/unix_time`,
when present).
"""

from absl import app
from absl import flags

from air_jax import visualization

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Run directories.')
_OUTPUT = flags.DEFINE_string('output', None, 'PNG path.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Eval split of the metrics.')
flags.mark_flags_as_required(['workdirs', 'output'])


def main(argv):
  del argv
  image = visualization.curves_png(_WORKDIRS.value, _SPLIT.value)
  visualization.save_png(_OUTPUT.value, image)
  print(f'wrote {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
