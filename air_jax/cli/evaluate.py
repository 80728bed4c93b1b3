r"""Evaluates a checkpoint on multi-MNIST splits; writes a JSON report.

  air-evaluate --checkpoint=pretrained/air --output=report.json \
      [--splits=test,test_3,test_2] [--iwae_samples=100]

Reports per split: count accuracy (posterior modes, and one sample), the
confusion matrix (true rows, inferred columns), the ELBO, the IWAE bound with
K samples, and inference time per image. --refine_flips=K counts with
the posterior modes refined by up to K
single z_pres flips that each raise the model's objective
(`refinement.greedy_z_pres`), and --refine_rounds=R then moves every
z_where up that objective and flips again, R times
(`refinement.refine_modes`); --refine_drops=K then tries each of the K
least probable present objects as absent, taken where the objective rises
(`refinement.drop_objects`); --refine_splits=K then tries each of the K
largest present windows as two, taken where the objective rises by more
than --refine_split_gain nats (`refinement.split_objects`). The data
configuration (TFDS data dir, builder config) is the checkpoint's own
unless a flag names another.

Every argument is checked before the evaluation starts; the report is
written atomically (an old report at --output stays whole until the new one
replaces it) and never over an input. A checkpoint with non-finite
parameters is refused; a damaged newest checkpoint of a workdir is skipped
with one warning line naming the step used.
"""

import os

from absl import flags

from air_jax import checkpointing
from air_jax import cli
from air_jax import evaluation
from air_jax import refinement
from air_jax.cli import refine as refine_cli
from air_jax.datasets.multi_mnist import multi_mnist

_CHECKPOINT = cli.define_string('checkpoint', None, 'Workdir or export dir.')
_OUTPUT = cli.define_string('output', None, 'JSON report path.')
_SPLITS = flags.DEFINE_list(
  'splits', ['test', 'test_3', 'test_2'], 'Splits to evaluate.'
)
_IWAE = flags.DEFINE_integer(
  'iwae_samples', 100, 'K of the IWAE bound (0: skip).'
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir', None, "TFDS data dir (default: the checkpoint's, else TFDS's)."
)
_MNIST_DIR = flags.DEFINE_string(
  'mnist_dir', None, 'MNIST files (default: AIR_MNIST_DIR).'
)
_BUILDER_CONFIG = flags.DEFINE_string(
  'builder_config',
  None,
  "multi_mnist builder config (default: the checkpoint's).",
)
_MAX_EXAMPLES = flags.DEFINE_integer('max_examples', 0, 'Per split; 0: all.')
_BATCH = flags.DEFINE_integer('batch_size', 500, 'Images per batch.')
_REFINE = refine_cli.define_flags()


def check_split_names(builder_config: str, splits) -> None:
  """Fails (one line) on a builder config or split multi_mnist lacks."""
  configs = {c.name: c for c in multi_mnist.MultiMnist.BUILDER_CONFIGS}
  if builder_config not in configs:
    cli.fail(
      f'builder config {builder_config!r} does not exist; one of '
      f'{sorted(configs)}.'
    )
  known = [spec[0] for spec in configs[builder_config].splits]
  for split in splits:
    if split not in known:
      cli.fail(
        f'--splits: {split!r} is not a split of multi_mnist/'
        f'{builder_config}; one of {known}.'
      )


def evaluate(
  checkpoint: str | None,
  output: str | None,
  splits=('test', 'test_3', 'test_2'),
  iwae_samples: int = 100,
  data_dir: str | None = None,
  mnist_dir: str | None = None,
  builder_config: str | None = None,
  max_examples: int = 0,
  batch_size: int = 500,
  refine_flips: int = 0,
  refine_rounds: int = 0,
  refine_splits: int = 0,
  refine_split_gain: float = refinement.SPLIT_GAIN,
  refine_drops: int = 0,
) -> dict:
  """The program without its flags: checks everything, evaluates, writes
  the report; every failure ends in `cli.fail` (one line, exit 1)."""
  cli.check_input('checkpoint', checkpoint, folder=True)
  for flag, value in (('data_dir', data_dir), ('mnist_dir', mnist_dir)):
    if value and os.path.exists(value) and not os.path.isdir(value):
      cli.fail(f'--{flag} {value} is not a folder.')
  if mnist_dir and not os.path.isdir(mnist_dir):
    cli.fail(f'--mnist_dir {mnist_dir}: no such folder.')
  cli.check_output_file('output', output, (checkpoint, data_dir, mnist_dir))
  if min(iwae_samples, max_examples, refine_flips) < 0 or batch_size <= 0:
    cli.fail(
      '--iwae_samples, --max_examples and --refine_flips must be >= 0, '
      '--batch_size > 0.'
    )
  splits = [s.strip() for s in splits or [] if s.strip()]
  if not splits:
    cli.fail('--splits is empty.')
  if builder_config:
    check_split_names(builder_config, splits)
  with cli.one_line_errors(multi_mnist.MnistFilesError):
    config = checkpointing.load_valid_config(checkpoint)
    if not builder_config:  # The checkpoint's.
      check_split_names(config.data.builder_config, splits)
    refine = refine_cli.settings(  # Checks the flags (one line).
      config,
      refine_flips,
      refine_rounds,
      refine_splits,
      refine_split_gain,
      refine_drops,
    )
    report = evaluation.evaluate_checkpoint(
      checkpoint,
      splits=splits,
      data_dir=data_dir,
      mnist_dir=mnist_dir,
      builder_config=builder_config,
      iwae_samples=iwae_samples,
      max_examples=max_examples or None,
      batch_size=batch_size,
      refine=refine,
    )
    evaluation.write_report(report, output)
  return report


def main(argv):
  cli.start_quiet(argv)  # The output is the report.
  report = evaluate(
    _CHECKPOINT.value,
    _OUTPUT.value,
    splits=_SPLITS.value,
    iwae_samples=_IWAE.value,
    data_dir=_DATA_DIR.value,
    mnist_dir=_MNIST_DIR.value,
    builder_config=_BUILDER_CONFIG.value,
    max_examples=_MAX_EXAMPLES.value,
    batch_size=_BATCH.value,
    refine_flips=_REFINE.flips.value,
    refine_rounds=_REFINE.rounds.value,
    refine_splits=_REFINE.splits.value,
    refine_split_gain=_REFINE.split_gain.value,
    refine_drops=_REFINE.drops.value,
  )
  print(evaluation.format_table(report))


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
