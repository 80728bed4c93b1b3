r"""Runs a trained AIR on your images and writes what it found as JSON.

  python -m experiments.infer --checkpoint=pretrained/air \
      --images=my_images.npz --output=out.json [--pictures=out_pngs/]

--images: a .npz holding `images` (N, 50, 50), a .npy of that shape (uint8
0-255 or float 0-1), or a folder of 50x50 PNG files. Bad input prints one
line saying what was expected, exits with status 1 and writes nothing.
"""

import sys

from absl import app
from absl import flags

from air_jax import inference
from air_jax import writers

_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'Workdir or export dir.')
_IMAGES = flags.DEFINE_string('images', None, '.npz / .npy / folder of PNGs.')
_OUTPUT = flags.DEFINE_string(
  'output', None, 'Where to write the JSON records.'
)
_PICTURES = flags.DEFINE_string(
  'pictures', None, 'Optional folder for PNGs with boxes.'
)
flags.mark_flags_as_required(['checkpoint', 'images', 'output'])


def main(argv):
  del argv
  writers.quiet_library_logs()
  try:
    config, model, params = inference.load(_CHECKPOINT.value)
    images = inference.load_images(_IMAGES.value, config.model.image_size)
  except inference.InputError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  records = inference.infer_records(model, params, images)
  inference.write_json(records, _OUTPUT.value)
  if _PICTURES.value:
    inference.write_pictures(model, params, images, _PICTURES.value)
  print(f'{len(records)} images -> {_OUTPUT.value}')


if __name__ == '__main__':
  app.run(main)
