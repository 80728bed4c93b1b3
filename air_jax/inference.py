"""Applying a trained AIR to anyone's images: loading, checking, records.

Glossary of shapes: M images, H, W image (50 x 50 for the shipped models),
N steps.
"""

import json
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from air_jax import air
from air_jax import spatial_transformer
from air_jax import train
from air_jax import visualization


class InputError(ValueError):
  """Images or a checkpoint that cannot be used; the message says why."""


def load_images(path: str, image_size: int = 50) -> np.ndarray:
  """Reads images from a .npz / .npy file or a folder of PNG files.

  Args:
    path: a `.npz` holding an array `images`, a `.npy` array, or a folder of
      `.png` files (sorted by name; converted to greyscale).
    image_size: the H = W the model expects.

  Returns:
    [M, H, W] float32 in [0, 1].

  Raises:
    InputError: on a missing or empty file, a wrong shape or dtype, NaN or
      infinite values, or values outside [0, 255] (uint8) / [0, 1] (float).
  """
  p = pathlib.Path(path)
  if not p.exists():
    raise InputError(f'{path}: no such file or folder.')
  if p.is_dir():
    files = sorted(p.glob('*.png'))
    if not files:
      raise InputError(f'{path}: folder holds no .png files.')
    try:
      arrays = [np.asarray(Image.open(f).convert('L')) for f in files]
    except OSError as e:
      raise InputError(f'{path}: cannot read PNG ({e}).') from e
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
      raise InputError(
        f'{path}: PNG files differ in size {sorted(shapes)}; expected all {image_size}x{image_size}.'
      )
    images = np.stack(arrays)
  else:
    if p.stat().st_size == 0:
      raise InputError(
        f'{path}: empty file; expected a .npz with an array "images" or a .npy array.'
      )
    try:
      loaded = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
      raise InputError(f'{path}: not a readable .npy/.npz file ({e}).') from e
    if isinstance(loaded, np.lib.npyio.NpzFile):
      if 'images' not in loaded.files:
        raise InputError(
          f'{path}: .npz has no array "images" (found {loaded.files}); expected "images" of shape (N, {image_size}, {image_size}).'
        )
      images = loaded['images']
    else:
      images = loaded
  return check_images(images, image_size, source=str(path))


def check_images(
  images: np.ndarray, image_size: int = 50, source: str = 'images'
) -> np.ndarray:
  """Validates an array of images and converts it to float32 in [0, 1].

  Raises:
    InputError: see `load_images`.
  """
  images = np.asarray(images)
  expected = f'(N, {image_size}, {image_size})'
  if images.ndim != 3 or images.shape[1:] != (image_size, image_size):
    raise InputError(f'{source}: shape {images.shape}, expected {expected}.')
  if images.shape[0] == 0:
    raise InputError(
      f'{source}: no images (shape {images.shape}), expected {expected} with N > 0.'
    )
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise InputError(
      f'{source}: dtype {images.dtype}, expected uint8 (0-255) or float (0-1).'
    )
  if not np.all(np.isfinite(images)):
    raise InputError(
      f'{source}: contains NaN or infinite values; expected floats in [0, 1].'
    )
  if images.min() < 0.0 or images.max() > 1.0:
    raise InputError(
      f'{source}: float values in [{images.min():.3g}, {images.max():.3g}], expected [0, 1].'
    )
  return images.astype(np.float32)


def load(checkpoint: str):
  """(config, model, params) from a workdir or export; InputError if unusable."""
  if not os.path.isdir(checkpoint):
    raise InputError(f'{checkpoint}: no such checkpoint directory.')
  try:
    return train.load_model(checkpoint)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise InputError(f'{checkpoint}: {e}') from e


def infer_records(
  model, params, images: np.ndarray, batch_size: int = 256
) -> list[dict[str, Any]]:
  """AIR's reading of each image as JSON-ready records.

  Posterior modes are used (z_pres = q > 0.5, z_where = its mean).

  Args:
    model: AIR module.
    params: its parameters.
    images: [M, H, W] float32 in [0, 1].
    batch_size: images per forward pass.

  Returns:
    One record per image: {"index", "count", "objects": [{"step",
    "z_pres_prob", "box": [top, left, height, width]}]} with boxes in pixel
    coordinates of the input (pixel i spans [i, i + 1]).
  """
  records = []
  for lo in range(0, len(images), batch_size):
    out = jax.device_get(
      air.posterior_modes(
        model, params, jnp.asarray(images[lo : lo + batch_size])
      )
    )
    boxes = np.stack(
      list(
        spatial_transformer.z_where_to_box(
          jnp.asarray(out.z_where), images.shape[1]
        )
      ),
      -1,
    )
    for i in range(len(out.z_pres)):
      objects = [
        {
          'step': int(t),
          'z_pres_prob': float(out.z_pres_prob[i, t]),
          'box': [float(v) for v in np.asarray(boxes[i, t])],
        }
        for t in range(out.z_pres.shape[1])
        if out.z_pres[i, t] > 0.5
      ]
      records.append(
        {'index': lo + i, 'count': len(objects), 'objects': objects}
      )
  return records


def infer(checkpoint: str, images: np.ndarray) -> list[dict[str, Any]]:
  """Loads a checkpoint and returns `infer_records` for `images`.

  Args:
    checkpoint: a training workdir or a params export (config.json inside).
    images: [M, H, W] uint8 (0-255) or float (0-1).
  """
  config, model, params = load(checkpoint)
  images = check_images(images, config.model.image_size)
  return infer_records(model, params, images)


def write_pictures(
  model, params, images: np.ndarray, directory: str
) -> list[str]:
  """One PNG per image with each present step's box drawn on the input."""
  os.makedirs(directory, exist_ok=True)
  out = jax.device_get(air.posterior_modes(model, params, jnp.asarray(images)))
  paths = []
  for i in range(len(images)):
    pic = visualization.draw_boxes(images[i], out.z_pres[i], out.z_where[i])
    path = os.path.join(directory, f'{i:05d}.png')
    visualization.save_png(path, pic)
    paths.append(path)
  return paths


def write_json(records, path: str) -> None:
  """Writes records atomically (a temp file renamed into place)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(records, f, indent=1)
  os.replace(tmp, path)
