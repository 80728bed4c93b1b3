r"""Exports a run's checkpoint as float32 inference parameters + config.

  air-export --checkpoint=runs/default --output=pretrained/air

The export (params.msgpack + config.json, no optimiser state and no baseline
network) loads in `air-evaluate` and `air-infer`. --output is a new folder,
or one holding only an earlier export (its two files are replaced, each
atomically); never the checkpoint itself or a folder inside its checkpoints/.
"""

import os

from absl import flags

from air_jax import checkpointing
from air_jax import cli
from air_jax import files

_CHECKPOINT = cli.define_string('checkpoint', None, 'A training workdir.')
_OUTPUT = cli.define_string('output', None, 'Directory to write.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: latest).')

_EXPORT_FILES = {checkpointing.CONFIG_FILE, checkpointing.PARAMS_FILE}


def check_paths(checkpoint: str | None, output: str | None) -> None:
  """Fails (one line) on paths that cannot be used, before any work."""
  cli.check_input('checkpoint', checkpoint, folder=True)
  if not output:
    cli.fail('--output is required.')
  orbax_dir = os.path.join(checkpoint, checkpointing.CHECKPOINT_DIR)
  if files.is_within(checkpoint, output) or files.is_within(output, orbax_dir):
    cli.fail(
      f'--output {output} is, holds or lies in the checkpoints of '
      f'{checkpoint}; name another folder (e.g. {checkpoint}/export).'
    )
  if os.path.lexists(output):
    if not os.path.isdir(output):
      cli.fail(f'--output {output} exists and is not a folder.')
    extra = set(os.listdir(output)) - _EXPORT_FILES
    if extra:
      cli.fail(
        f'--output {output} holds other files ({sorted(extra)[:3]}); name '
        'a new folder or an earlier export.'
      )
  else:
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
      cli.fail(f'--output {output}: folder {parent} does not exist.')


def main(argv):
  cli.start_quiet(argv)
  check_paths(_CHECKPOINT.value, _OUTPUT.value)
  with cli.one_line_errors():
    config, _, params = checkpointing.load_model(_CHECKPOINT.value, _STEP.value)
    checkpointing.save_params(params, _OUTPUT.value, config)
  print(f'exported {_CHECKPOINT.value} -> {_OUTPUT.value}')


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
