"""Host-side pictures: inputs with attention boxes, reconstructions, grids.

Glossary of shapes: B batch, N steps, H, W image.
"""

import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw

from air_jax import spatial_transformer

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


def save_png(path: str, image: np.ndarray) -> None:
  Image.fromarray(image).save(path)
