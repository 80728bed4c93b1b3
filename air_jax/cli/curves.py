r"""Draws eval count accuracy and ELBO curves of runs into one PNG.

  air-curves --workdirs=runs/a,runs/b --output=curves.png

Four panels: count accuracy and ELBO on the eval split, against training
step and against wall time (from the train records' `train/unix_time`,
when present).
"""

from absl import flags

from air_jax import cli
from air_jax import visualization

_WORKDIRS = flags.DEFINE_list('workdirs', None, 'Run directories.')
_OUTPUT = cli.define_string('output', None, 'PNG path.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Eval split of the metrics.')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}.')
  if not _WORKDIRS.value or not _OUTPUT.value:
    cli.fail('--workdirs and --output are required.')
  for workdir in _WORKDIRS.value:
    cli.check_input('workdirs', workdir, folder=True)
  cli.check_output_file('output', _OUTPUT.value, _WORKDIRS.value)
  with cli.one_line_errors(ValueError, KeyError):
    image = visualization.curves_png(_WORKDIRS.value, _SPLIT.value)
    visualization.save_png(_OUTPUT.value, image)
  print(f'wrote {_OUTPUT.value}')


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
