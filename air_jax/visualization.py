"""Host-side pictures: inputs with attention boxes, reconstructions, grids.

Glossary of shapes: B batch, N steps, H, W image.
"""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw

from air_jax import air
from air_jax import files
from air_jax import spatial_transformer

__all__ = [
  'STEP_COLOURS',
  'boxes_from_z_where',
  'curves_png',
  'draw_boxes',
  'reconstruction_grid',
  'reconstructions',
  'save_png',
]

# One colour per AIR step (red, green, blue, then more).
STEP_COLOURS = (
  (230, 50, 50),
  (50, 200, 50),
  (60, 110, 255),
  (240, 200, 40),
  (200, 60, 220),
  (40, 210, 210),
  (255, 140, 0),
  (160, 160, 160),
)


def boxes_from_z_where(z_where: np.ndarray, image_size: int) -> np.ndarray:
  """[..., 3] (s, x, y) -> [..., 4] (top, left, height, width) in pixels."""
  box = spatial_transformer.z_where_to_box(jnp.asarray(z_where), image_size)
  return np.stack([np.asarray(v) for v in box], axis=-1)


def draw_boxes(
  image: np.ndarray,
  z_pres: np.ndarray,
  z_where: np.ndarray,
  zoom: int = 4,
) -> np.ndarray:
  """One image with each present step's window as a coloured box.

  Args:
    image: [H, W] float in [0, 1].
    z_pres: [N].
    z_where: [N, 3].
    zoom: integer upscaling for visibility.

  Returns:
    [zoom H, zoom W, 3] uint8.
  """
  h = image.shape[0]
  grey = (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
  pic = (
    Image.fromarray(grey)
    .convert('RGB')
    .resize((zoom * image.shape[1], zoom * h), Image.NEAREST)
  )
  draw = ImageDraw.Draw(pic)
  for step, (present, box) in enumerate(
    zip(z_pres, boxes_from_z_where(z_where, h))
  ):
    if present < 0.5:
      continue
    top, left, height, width = box * zoom
    colour = STEP_COLOURS[step % len(STEP_COLOURS)]
    draw.rectangle(
      [left, top, left + width - 1, top + height - 1], outline=colour, width=2
    )
  return np.asarray(pic)


def reconstruction_grid(
  images: np.ndarray,
  canvas: np.ndarray,
  z_pres: np.ndarray,
  z_where: np.ndarray,
  max_images: int = 16,
  zoom: int = 3,
) -> np.ndarray:
  """Pairs of (input with boxes, reconstruction with boxes) in a grid.

  Args:
    images: [B, H, W] inputs in [0, 1].
    canvas: [B, H, W] reconstructions.
    z_pres: [B, N].
    z_where: [B, N, 3].
    max_images: how many examples to show.
    zoom: integer upscaling.

  Returns:
    [rows, cols, 3] uint8, 4 examples (8 tiles) per row.
  """
  tiles = []
  for i in range(min(max_images, len(images))):
    tiles.append(draw_boxes(images[i], z_pres[i], z_where[i], zoom))
    tiles.append(draw_boxes(canvas[i], z_pres[i], z_where[i], zoom))
  per_row = 8
  th, tw, _ = tiles[0].shape
  pad = 2
  rows = -(-len(tiles) // per_row)
  grid = np.full(
    (rows * (th + pad) + pad, per_row * (tw + pad) + pad, 3), 255, np.uint8
  )
  for k, tile in enumerate(tiles):
    r, c = divmod(k, per_row)
    y, x = pad + r * (th + pad), pad + c * (tw + pad)
    grid[y : y + th, x : x + tw] = tile
  return grid


def reconstructions(model: air.AIR, params, images: np.ndarray) -> np.ndarray:
  """`reconstruction_grid` of a model's posterior modes on images [B, H, W]."""
  out = jax.device_get(air.posterior_modes(model, params, jnp.asarray(images)))
  return reconstruction_grid(images, out.canvas, out.z_pres, out.z_where)


def save_png(path: str, image: np.ndarray) -> None:
  """Writes an [H, W] or [H, W, 3] uint8 array as a PNG, atomically."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  files.write_bytes(path, buffer.getvalue())


def _read_curves(workdir: str, split: str):
  """(steps, accuracies, elbos, seconds or None) of a run's eval records."""
  evals, times = [], {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if f'eval_{split}/count_accuracy' in record:
        evals.append(record)
      if 'train/unix_time' in record:
        times[record['step']] = record['train/unix_time']
  steps = np.array([r['step'] for r in evals], float)
  acc = np.array([r[f'eval_{split}/count_accuracy'] for r in evals])
  elbo = np.array([r[f'eval_{split}/elbo'] for r in evals])
  seconds = None
  if times and all(int(s) in times for s in steps):
    start = min(times.values())
    seconds = np.array([times[int(s)] - start for s in steps])
  return steps, acc, elbo, seconds


def _panel(series, title, x_label, size=(420, 300)):
  """A line chart of [(x, y, colour, name)] on white, axes labelled."""
  width, height = size
  pic = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(pic)
  left, right, top, bottom = 50, width - 10, 25, height - 35
  xs = np.concatenate([s[0] for s in series if len(s[0])] or [np.zeros(1)])
  ys = np.concatenate([s[1] for s in series if len(s[1])] or [np.zeros(1)])
  x0, x1 = float(xs.min()), float(xs.max()) or 1.0
  y0, y1 = float(ys.min()), float(ys.max())
  if y1 - y0 < 1e-9:
    y1 = y0 + 1.0

  def to_px(x, y):
    px = left + (x - x0) / max(x1 - x0, 1e-9) * (right - left)
    py = bottom - (y - y0) / (y1 - y0) * (bottom - top)
    return px, py

  draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
  draw.text((left, 5), title, fill=(0, 0, 0))
  draw.text(
    (left, bottom + 18), f'{x_label}: {x0:.0f} .. {x1:.0f}', fill=(0, 0, 0)
  )
  draw.text((2, top), f'{y1:.3g}', fill=(0, 0, 0))
  draw.text((2, bottom - 10), f'{y0:.3g}', fill=(0, 0, 0))
  for k, (x, y, colour, name) in enumerate(series):
    if len(x) == 0:
      continue
    points = [to_px(a, b) for a, b in zip(x, y)]
    if len(points) > 1:
      draw.line(points, fill=colour, width=2)
    draw.text((right - 120, top + 5 + 12 * k), name, fill=colour)
  return np.asarray(pic)


def curves_png(workdirs, split: str = 'test') -> np.ndarray:
  """Accuracy and ELBO against steps and wall time for several runs."""
  runs = []
  for k, workdir in enumerate(workdirs):
    colour = STEP_COLOURS[k % len(STEP_COLOURS)]
    name = os.path.basename(os.path.normpath(workdir))
    runs.append((name, colour, *_read_curves(workdir, split)))
  panels = []
  for metric, index in (('count accuracy', 3), ('ELBO', 4)):
    panels.append(
      _panel(
        [(r[2], r[index], r[1], r[0]) for r in runs],
        f'{split} {metric}',
        'step',
      )
    )
    timed = [(r[5], r[index], r[1], r[0]) for r in runs if r[5] is not None]
    panels.append(_panel(timed, f'{split} {metric}', 'seconds'))
  top = np.concatenate(panels[0:2], axis=1)
  bottom = np.concatenate(panels[2:4], axis=1)
  return np.concatenate([top, bottom], axis=0)
