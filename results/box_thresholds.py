"""Box AP of a checkpoint's posterior modes for the thresholds of
`air.ink_boxes` and for the drawing's own box (`air.tight_boxes`), on the
first `num` canvases of a split (RESULTS.md, "Tight boxes"). The thresholds
of the library were chosen with it on **training** canvases.

  PYTHONPATH=. python results/box_thresholds.py --checkpoint=pretrained/air \
    --data_dir=$TFDS_DATA_DIR --builder_config=full --split=train [--num=2000]

Prints one row per (render threshold, ink threshold): AP50, AP50:95 and the
mean IoU of the pairs matched at IoU 0.5 (`metrics.detection_metrics`).
"""

import jax.numpy as jnp
import numpy as np

from air_jax import air
from air_jax import checkpointing
from air_jax import metrics
from results import canvases

RENDER = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
INK = (0.0, 0.05, 0.1, 0.2)


def main():
  args = canvases.parser(__doc__).parse_args()
  _, model, params = checkpointing.load_model(args.checkpoint)
  data, images = canvases.first_canvases(args)
  boxes, scores, valid, counts = {}, [], [], []
  for lo in range(0, len(images), 250):
    batch = jnp.asarray(images[lo : lo + 250])
    out = air.posterior_modes(model, params, batch)
    boxes.setdefault('drawing > 0.2', []).append(
      air.tight_boxes(out, model.image_shape)
    )
    for render in RENDER:
      for ink in INK:
        boxes.setdefault((render, ink), []).append(
          air.ink_boxes(out, batch, render, ink)
        )
    scores.append(out.z_pres_prob)
    valid.append(out.z_pres > 0.5)
    counts.append(out.count)
  num = len(images)
  true_boxes = data.boxes[:num]
  true_valid = np.arange(true_boxes.shape[1]) < data.num_objects[:num, None]
  print('render  ink    AP50  AP50:95  mean IoU')
  for key, parts in boxes.items():
    m = metrics.detection_metrics(
      np.concatenate(parts),
      np.concatenate(scores),
      np.concatenate(valid),
      true_boxes,
      true_valid,
      np.concatenate(counts),
      data.num_objects[:num],
    )
    name = key if isinstance(key, str) else f'{key[0]:<7} {key[1]:<5}'
    print(
      f'{name:13} {m["ap50"]:.4f}  {m["ap50_95"]:.4f}   {m["mean_iou"]:.4f}'
    )


if __name__ == '__main__':
  main()
