"""Where a grid model's counts go wrong, on `many` test canvases (RESULTS.md).

  PYTHONPATH=. python results/grid_errors.py --checkpoint=pretrained/many \
    --data_dir=$TFDS_DATA_DIR [--num=1000] [--refine_flips=16] \
    [--refine_rounds=0]

For the (refined) posterior modes of the first `num` test canvases, prints
  * the accuracy, over- and under-count rates on them;
  * over-counted canvases: how many have two present windows whose centres
    are closer than r px, against how many of their true digits are; and
    the gain in the model's objective (`refinement.greedy_z_pres`'s g) of
    keeping the proposal of the closest pair that the objective values
    least: > 0 means the model's own objective prefers the extra object;
  * the share of all true digit pairs closer than r px;
  * under-counted canvases: for each digit that no present object covers
    (IoU of the object's tight box, `air.tight_boxes`, with the digit's ink
    box < 0.5), whether the proposal whose tight box covers it best is
    present already (it then covers the digit badly, e.g. it draws parts
    of two digits) and, where it is absent, the gain of turning it on (< 0:
    the objective prefers to leave it out).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from air_jax import air
from air_jax import configuration
from air_jax import inference
from air_jax import input_pipeline
from air_jax import metrics
from air_jax import objectives
from air_jax import refinement
from air_jax import spatial_transformer
from air_jax.cli import refine as refine_cli


def _centres(boxes):
  """[..., 4] (top, left, height, width) -> [..., 2] (y, x) centres."""
  return np.stack(
    [boxes[..., 0] + boxes[..., 2] / 2, boxes[..., 1] + boxes[..., 3] / 2], -1
  )


def _distances(centres):
  """[K, 2] -> [K, K] distances, inf on the diagonal."""
  d = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
  d[np.eye(len(centres), dtype=bool)] = np.inf
  return d


def _pct(values):
  values = np.asarray(values, float)
  if not len(values):
    return 'none'
  q = np.percentile(values, [10, 25, 50, 75, 90])
  return f'{len(values)} values, 10/25/50/75/90%: ' + ' '.join(
    f'{v:.1f}' for v in q
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--checkpoint', default='pretrained/many')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--num', type=int, default=1000)
  parser.add_argument('--refine_flips', type=int, default=16)
  parser.add_argument('--refine_rounds', type=int, default=0)
  args = parser.parse_args()

  config, model, params = inference.load(args.checkpoint)
  split = input_pipeline.load_split('test', args.data_dir, 'many')
  images = jnp.asarray(split.images[: args.num].astype(np.float32) / 255.0)
  true = split.num_objects[: args.num]
  refine = refine_cli.refiner(config, args.refine_flips, args.refine_rounds)
  loss = configuration.loss_config(config)
  step = int(config.num_train_steps)
  p = np.clip(loss.z_pres_prior(step), 1e-35, 1 - 1e-7)
  prior_logit = np.log(p) - np.log1p(-p)

  @jax.jit
  def modes(x):
    out = model.apply({'params': params}, x, deterministic=True)
    if refine is None:
      return out
    return refinement.refine(model, params, x, out, refine)

  outs, gains = [], []
  for lo in range(0, args.num, 250):
    x = images[lo : lo + 250]
    out = modes(x)
    signal = objectives.local_signal(
      out,
      x,
      loss.z_where_prior(),
      loss.likelihood,
      loss.likelihood_std(step),
      loss.repulsion(step),
    )
    outs.append(jax.device_get(out))
    gains.append(np.asarray(signal) + prior_logit)  # g(z_n = 1) - g(z_n = 0)
  out = jax.tree.map(lambda *a: np.concatenate(a), *outs)
  gain = np.concatenate(gains)
  windows = np.stack(
    spatial_transformer.z_where_to_box(
      jnp.asarray(out.z_where), images.shape[1:]
    ),
    -1,
  )
  tight = np.asarray(
    air.tight_boxes(jax.tree.map(jnp.asarray, out), images.shape[1:])
  )
  present = out.z_pres > 0.5
  counts = present.sum(1)
  print(
    f'{args.num} canvases: accuracy {np.mean(counts == true):.4f}, over '
    f'{np.mean(counts > true):.4f}, under {np.mean(counts < true):.4f}'
  )

  radii = (6, 7, 8, 9)
  over = np.where(counts > true)[0]
  pred_close = {r: 0 for r in radii}
  true_close = {r: 0 for r in radii}
  kept_gain = []
  for i in over:
    on = np.where(present[i])[0]
    d = _distances(_centres(windows[i, on]))
    t = _distances(_centres(split.boxes[i, : true[i]].astype(float)))
    for r in radii:
      pred_close[r] += d.min() < r
      true_close[r] += t.min() < r if true[i] > 1 else 0
    a, b = np.unravel_index(np.argmin(d), d.shape)
    kept_gain.append(min(gain[i, on[a]], gain[i, on[b]]))
  print(f'over-counted canvases: {len(over)}')
  for r in radii:
    print(
      f'  with two present windows < {r} px apart: {pred_close[r]}; '
      f'with two true digits < {r} px apart: {true_close[r]}'
    )
  print(
    f"  gain of the closest pair's weaker proposal (nats): {_pct(kept_gain)}"
  )

  pairs = []
  for i in range(args.num):
    if true[i] > 1:
      d = _distances(_centres(split.boxes[i, : true[i]].astype(float)))
      pairs.extend(d[np.triu_indices(true[i], 1)])
  pairs = np.asarray(pairs)
  print(
    'true digit pairs closer than r px: '
    + ', '.join(f'{r} px {np.mean(pairs < r):.4f}' for r in radii)
  )

  missed_gain, missed_on = [], []
  for i in np.where(counts < true)[0]:
    boxes = split.boxes[i, : true[i]].astype(float)
    iou = metrics.box_iou(boxes[:, None], tight[i][None])  # [K, N]
    for k in range(true[i]):
      if (iou[k][present[i]] >= 0.5).any():
        continue
      best = np.argmax(iou[k])
      missed_gain.append(gain[i, best])
      missed_on.append(present[i, best])
  print(
    f'digits no present window covers on under-counted canvases: {len(missed_gain)}'
  )
  missed_gain, missed_on = np.asarray(missed_gain), np.asarray(missed_on)
  print(
    '  gain of turning on the best-covering proposal, where it is absent: '
    f'{_pct(missed_gain[~missed_on])}'
  )
  print(
    '  best-covering proposal already present (covering badly): '
    f'{np.mean(missed_on):.3f}'
  )


if __name__ == '__main__':
  main()
