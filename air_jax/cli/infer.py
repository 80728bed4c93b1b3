r"""Runs a trained AIR on your images and writes what it found as JSON.

  air-infer --checkpoint=pretrained/air --images=my_images.npz \
      --output=out.json [--pictures=out_pngs/]

--images: a .npz holding `images` (N, H, W), a .npy of that shape (uint8
0-255 or float 0-1), a PNG file or a folder of PNG files (greyscale, 1-16
bit, converted exactly), H x W the checkpoint's image size. Bad input prints
one line saying what was expected, exits with status 1 and writes nothing.
The JSON schema: README.md.

--pictures and --output appear together or not at all: the pictures are
drawn into a temp folder beside --pictures and the JSON into a temp file
beside --output; only when both are complete are they renamed into place
(the pictures first, the JSON last). --pictures must be a new or empty
folder, or one holding only an earlier run's pictures (then replaced).

--refine_flips=K: the posterior modes
refined by up to K single z_pres flips, each raising the model's own objective
(`refinement.greedy_z_pres`), as `air-evaluate --refine_flips` counts;
--refine_rounds=R then moves every z_where up that objective and flips
again, R times (`refinement.refine_modes`); --refine_drops=K then tries
each of the K least probable present objects as absent, taken where the
objective rises (`refinement.drop_objects`); --refine_splits=K then tries
each of the K largest present windows as two, taken where the objective
rises by more than --refine_split_gain nats (`refinement.split_objects`).
"""

from absl import flags

from air_jax import checkpointing
from air_jax import cli
from air_jax import files
from air_jax import inference
from air_jax import refinement
from air_jax.cli import refine as refine_cli

_CHECKPOINT = cli.define_string('checkpoint', None, 'Workdir or export dir.')
_IMAGES = cli.define_string(
  'images', None, '.npz / .npy / PNG file / folder of PNGs.'
)
_OUTPUT = cli.define_string('output', None, 'Where to write the JSON records.')
_PICTURES = cli.define_string(
  'pictures', None, 'Optional new folder for PNGs with boxes.'
)
_MAX_STEPS = flags.DEFINE_integer(
  'max_steps',
  None,
  'Attend to at most this many objects (default: the trained max_steps). '
  'The recurrence shares its parameters over steps, so more steps need no '
  'retraining (DAIR extrapolates to more objects than it was trained on). '
  'Sequential models only: a grid model proposes one object per cell.',
)
_REFINE = refine_cli.define_flags()


def check_paths(checkpoint, images, output, pictures) -> None:
  """Fails (one line) before any work on paths that cannot be used."""
  cli.check_input('checkpoint', checkpoint, folder=True)
  cli.check_input('images', images)
  inputs = (images, checkpoint)
  cli.check_output_file('output', output, inputs)
  if pictures:
    cli.check_output_folder(
      'pictures', pictures, inputs, inference.is_pictures_folder
    )
    if files.is_within(output, pictures):
      cli.fail(f'--output {output} lies in --pictures {pictures}.')


def infer(
  checkpoint: str | None,
  images: str | None,
  output: str | None,
  pictures: str | None = None,
  max_steps: int | None = None,
  refine_flips: int = 0,
  refine_rounds: int = 0,
  refine_splits: int = 0,
  refine_split_gain: float = refinement.SPLIT_GAIN,
  refine_drops: int = 0,
) -> list:
  """The program without its flags: checks everything, infers, writes the
  JSON (and pictures); every failure ends in `cli.fail` (one line, exit 1)
  with nothing written."""
  check_paths(checkpoint, images, output, pictures)
  if max_steps is not None and max_steps < 1:
    cli.fail(f'--max_steps must be >= 1, got {max_steps}.')
  with cli.one_line_errors():
    # The images first: a bad file is refused before any model is built.
    config = checkpointing.load_valid_config(checkpoint)
    pixels = inference.load_images(images, config.model.image_size)
    config, model, params = inference.load(checkpoint)
    if max_steps is not None:
      if config.model.kind != 'air':
        cli.fail(
          '--max_steps applies to the sequential models (model.kind '
          f"'air'); this checkpoint's model is {config.model.kind!r}."
        )
      model = model.clone(max_steps=max_steps)
    refine = refine_cli.refiner(
      config,
      refine_flips,
      refine_rounds,
      refine_splits,
      refine_split_gain,
      refine_drops,
    )
    records = inference.infer_records(model, params, pixels, refine=refine)
    data = inference.records_json(records).encode('utf-8')
    with files.staged_bytes(output, data) as commit:
      if pictures:
        inference.write_pictures(model, params, pixels, pictures, refine)
      commit()
  return records


def main(argv):
  cli.start_quiet(argv)  # The output is the JSON.
  records = infer(
    _CHECKPOINT.value,
    _IMAGES.value,
    _OUTPUT.value,
    _PICTURES.value,
    _MAX_STEPS.value,
    *(holder.value for holder in _REFINE),
  )
  print(f'{len(records)} images -> {_OUTPUT.value}')


def run():
  cli.run(main)


if __name__ == '__main__':
  run()
