r"""Evaluates a checkpoint on multi-MNIST splits; writes a JSON report.

  python -m experiments.evaluate --checkpoint=pretrained/air \
      --output=report.json [--splits=test,test_3,test_2] [--iwae_samples=100]

Reports per split: count accuracy (posterior modes, and one sample),
the confusion matrix (true rows, inferred columns), the ELBO, the IWAE bound
with K samples, and inference time per image.
"""

from absl import app
from absl import flags

from air_jax import evaluation
from air_jax import writers

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Workdir or export dir.')
_OUTPUT = flags.DEFINE_string('output', None, 'JSON report path.')
_SPLITS = flags.DEFINE_list(
  'splits', ['test', 'test_3', 'test_2'], 'Splits to evaluate.'
)
_IWAE = flags.DEFINE_integer(
  'iwae_samples', 100, 'K of the IWAE bound (0: skip).'
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir', None, 'TFDS data dir (default: TFDS_DATA_DIR).'
)
_MNIST_DIR = flags.DEFINE_string(
  'mnist_dir', None, 'MNIST files (default: AIR_MNIST_DIR).'
)
_BUILDER_CONFIG = flags.DEFINE_string(
  'builder_config', 'full', "'full' or 'small'."
)
_MAX_EXAMPLES = flags.DEFINE_integer('max_examples', 0, 'Per split; 0: all.')
flags.mark_flags_as_required(['checkpoint', 'output'])


def main(argv):
  del argv
  writers.quiet_library_logs()
  report = evaluation.evaluate_checkpoint(
    _CHECKPOINT.value,
    splits=_SPLITS.value,
    data_dir=_DATA_DIR.value,
    mnist_dir=_MNIST_DIR.value,
    builder_config=_BUILDER_CONFIG.value,
    iwae_samples=_IWAE.value,
    max_examples=_MAX_EXAMPLES.value or None,
  )
  evaluation.write_report(report, _OUTPUT.value)
  print(evaluation.format_table(report))


if __name__ == '__main__':
  app.run(main)
