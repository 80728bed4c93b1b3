"""Count accuracy of refined modes with one split, for every threshold on the
split's gain at once (RESULTS.md, "One window tried as two").

  PYTHONPATH=. python results/split_gains.py --checkpoint=pretrained/air \
    --data_dir=$TFDS_DATA_DIR --builder_config=pyro --split=train [--num=2000]

For the first `num` canvases: the modes refined by 3 flips and 3 rounds
(`refinement.refine_modes`, as `refinement.refine` does), then each
image's best split of its largest window (`refinement.split_objects`
taking any candidate) and the gain of that split in the model's objective
g (`objectives.set_objective`). A threshold t keeps the split where the
gain exceeds t, as `--refine_split_gain=t` does. Prints the accuracy for
each threshold.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from air_jax import checkpointing
from air_jax import configuration
from air_jax import objectives
from air_jax import refinement
from results import canvases

THRESHOLDS = (0, 5, 10, 20, 30, 50, 100)


def main():
  parser = canvases.parser(__doc__)
  parser.add_argument('--batch_size', type=int, default=250)
  args = parser.parse_args()
  config, model, params = checkpointing.load_model(args.checkpoint)
  model = model.clone(skip_finished=False)
  step = config.num_train_steps
  set_config = refinement.objects_as_set(configuration.loss_config(config))

  @jax.jit
  def counts_and_gain(images):
    # refinement.refine with the split taken whatever its gain.
    out = model.apply({'params': params}, images, deterministic=True)
    objects_at = functools.partial(
      model.apply, {'params': params}, images, method='objects_at'
    )
    search = refinement.Search(
      set_config, step, objects_at, model.z_where_bounds(), 3, 3
    )
    refined = refinement.refine_modes(out, images, search)
    split = refinement.split_objects(refined, images, search, min_gain=-jnp.inf)
    gain = objectives.set_objective(
      split, images, set_config, step
    ) - objectives.set_objective(refined, images, set_config, step)
    return refined.count, split.count, gain

  data, images = canvases.first_canvases(args)
  parts = [
    jax.device_get(
      counts_and_gain(jnp.asarray(images[i : i + args.batch_size]))
    )
    for i in range(0, len(images), args.batch_size)
  ]
  kept, split, gain = (np.concatenate(p) for p in zip(*parts))
  true = data.num_objects[: len(images)]
  print(f'no split: {np.mean(kept == true):.4f}')
  for t in THRESHOLDS:
    count = np.where(gain > t, split, kept)
    print(f'gain > {t:>3}: {np.mean(count == true):.4f}')


if __name__ == '__main__':
  main()
