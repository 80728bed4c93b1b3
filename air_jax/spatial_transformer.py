"""Differentiable spatial transformer for scale-and-shift windows.

Glossary of shapes:
  B: batch, H, W: image rows and columns, h, w: window rows and columns,
  C: optional trailing channel axes.

Convention (`z_where = (s, x, y)`):
  Coordinates are normalised to [-1, 1] across the image, x along columns
  (rightward) and y along rows (downward). The window covers the square
  centred at (x, y) with half-width 1/s: s = 1, x = y = 0 is the whole image,
  s = 2 its middle half.

  Pixels are squares (align_corners=False): pixel i of an axis of n pixels
  spans [i, i + 1] in continuous pixel coordinates, and its centre i + 0.5 sits
  at u = (2 i + 1) / n - 1 in normalised coordinates. With this convention
  `image_to_window` with s = 1, x = y = 0 and h = H, w = W is the identity, and
  so is `window_to_image`.

Sampling is bilinear with zero padding outside the source. For a scale and a
shift the bilinear kernel is separable, so each read is two batched matmuls
with small interpolation matrices (exact, no gather):

  window = R_rows @ image @ R_cols^T,  R[a, i] = max(0, 1 - |i - r_a|)

where r_a is the (fractional) source pixel index that output pixel a maps to.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Smallest |s| used in a division; keeps everything finite for s near 0.
MIN_SCALE = 1e-4


class Box(NamedTuple):
  """Axis-aligned boxes in continuous pixel coordinates, each [...]."""

  top: jax.Array
  left: jax.Array
  height: jax.Array
  width: jax.Array


def _safe_scale(scale: jax.Array) -> jax.Array:
  """Returns `scale` with its magnitude clamped to at least MIN_SCALE."""
  sign = jnp.where(scale >= 0, 1.0, -1.0)
  return jnp.where(jnp.abs(scale) < MIN_SCALE, sign * MIN_SCALE, scale)


def _pixel_centres(n: int) -> jax.Array:
  """Normalised coordinates of the n pixel centres of an axis. [n]."""
  return (2.0 * jnp.arange(n, dtype=jnp.float32) + 1.0) / n - 1.0


def _to_pixel_index(u: jax.Array, n: int) -> jax.Array:
  """Maps normalised coordinates to fractional pixel indices (centre = i)."""
  return ((u + 1.0) * n - 1.0) / 2.0


def interpolation_matrix(index: jax.Array, size: int) -> jax.Array:
  """Bilinear (triangle-kernel) weights of `size` source pixels.

  Args:
    index: [..., n] fractional source pixel indices to read.
    size: number of source pixels along the axis.

  Returns:
    [..., n, size] weights; rows are zero where `index` falls outside the
    source by a pixel or more (zero padding).
  """
  source = jnp.arange(size, dtype=index.dtype)
  return jax.nn.relu(1.0 - jnp.abs(index[..., :, None] - source))


def _apply_separable(
  rows: jax.Array, source: jax.Array, cols: jax.Array
) -> jax.Array:
  """out[b, a, c, ...] = sum_ij rows[b, a, i] source[b, i, j, ...] cols[b, c, j]."""
  tmp = jnp.einsum('bai,bij...->baj...', rows, source)
  return jnp.einsum('baj...,bcj->bac...', tmp, cols)


def _check_z_where(z_where: jax.Array, batch: int) -> None:
  if z_where.shape != (batch, 3):
    raise ValueError(
      f'z_where must have shape [B, 3] = {(batch, 3)}, got {z_where.shape}.'
    )


def image_to_window(
  images: jax.Array, z_where: jax.Array, window_size: int | tuple[int, int]
) -> jax.Array:
  """Reads the window that `z_where` places on each image (bilinear).

  Args:
    images: [B, H, W, *C] images.
    z_where: [B, 3] (s, x, y) per example, see the module docstring.
    window_size: h (square window) or (h, w).

  Returns:
    [B, h, w, *C] windows. Window pixels that fall outside the image are 0.
  """
  h, w = _pair(window_size)
  batch, height, width = images.shape[:3]
  _check_z_where(z_where, batch)
  scale = _safe_scale(z_where[:, 0:1])  # [B, 1]
  x, y = z_where[:, 1:2], z_where[:, 2:3]
  rows_u = y + _pixel_centres(h) / scale  # [B, h]
  cols_u = x + _pixel_centres(w) / scale  # [B, w]
  rows = interpolation_matrix(_to_pixel_index(rows_u, height), height)
  cols = interpolation_matrix(_to_pixel_index(cols_u, width), width)
  return _apply_separable(rows, images, cols)


def window_to_image(
  windows: jax.Array, z_where: jax.Array, image_size: int | tuple[int, int]
) -> jax.Array:
  """Draws each window onto an empty image where `z_where` places it.

  Each image pixel samples the window at its own position in window
  coordinates (the inverse transform), bilinearly with zero padding, so the
  result is 0 outside the window's square.

  Args:
    windows: [B, h, w, *C] windows.
    z_where: [B, 3] (s, x, y) per example, see the module docstring.
    image_size: H (square image) or (H, W).

  Returns:
    [B, H, W, *C] images.
  """
  batch, h, w = windows.shape[:3]
  _check_z_where(z_where, batch)
  rows, cols = _write_matrices(z_where, (h, w), _pair(image_size))
  return _apply_separable(rows, windows, cols)


def windows_to_canvas(
  windows: jax.Array,
  z_where: jax.Array,
  weights: jax.Array,
  image_size: int | tuple[int, int],
) -> jax.Array:
  """Draws N windows per example and adds them up, weighted.

  Equal to sum_n weights[:, n] * window_to_image(windows[:, n], z_where[:, n])
  without materialising the N images: per example it is one matmul whose
  contraction runs over objects and window columns together,
  canvas = [R_1 W_1, ..., R_N W_N] @ [C_1, ..., C_N]^T.

  Args:
    windows: [B, N, h, w] windows.
    z_where: [B, N, 3] (s, x, y) of each window.
    weights: [B, N] weight of each window (z_pres in AIR).
    image_size: H (square image) or (H, W).

  Returns:
    [B, H, W] canvases.
  """
  batch, num, h, w = windows.shape
  if z_where.shape != (batch, num, 3) or weights.shape != (batch, num):
    raise ValueError(
      f'z_where must be [B, N, 3] and weights [B, N] for windows '
      f'{windows.shape}, got {z_where.shape} and {weights.shape}.'
    )
  rows, cols = _write_matrices(z_where, (h, w), _pair(image_size))
  weighted = rows * weights[..., None, None]  # [B, N, H, h]
  tmp = jnp.einsum('bnah,bnhw->bnaw', weighted, windows)  # [B, N, H, w]
  return jnp.einsum('bnaw,bncw->bac', tmp, cols)


def _write_matrices(
  z_where: jax.Array, window: tuple[int, int], image: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
  """Interpolation matrices of a write: rows [..., H, h], cols [..., W, w].

  Each image pixel samples the window at its own position in window
  coordinates (the inverse transform); z_where is [..., 3].
  """
  (h, w), (height, width) = window, image
  scale = z_where[..., 0:1]  # Multiplying needs no guard.
  x, y = z_where[..., 1:2], z_where[..., 2:3]
  rows_v = (_pixel_centres(height) - y) * scale  # [..., H]
  cols_v = (_pixel_centres(width) - x) * scale  # [..., W]
  rows = interpolation_matrix(_to_pixel_index(rows_v, h), h)
  cols = interpolation_matrix(_to_pixel_index(cols_v, w), w)
  return rows, cols


def z_where_to_box(
  z_where: jax.Array, image_size: int | tuple[int, int]
) -> Box:
  """The square a `z_where` covers, in continuous pixel coordinates.

  Args:
    z_where: [..., 3] (s, x, y).
    image_size: H or (H, W).

  Returns:
    A Box of [...] arrays: pixel i spans [i, i + 1], so a window covering the
    whole image is (top=0, left=0, height=H, width=W).
  """
  height, width = _pair(image_size)
  scale = _safe_scale(z_where[..., 0])
  x, y = z_where[..., 1], z_where[..., 2]
  half = 1.0 / jnp.abs(scale)
  return Box(
    top=(y - half + 1.0) * height / 2.0,
    left=(x - half + 1.0) * width / 2.0,
    height=height * half,
    width=width * half,
  )


def box_to_z_where(box: Box, image_size: int | tuple[int, int]) -> jax.Array:
  """Inverse of `z_where_to_box` for square boxes (uses the box's height).

  Args:
    box: Box of [...] arrays in continuous pixel coordinates.
    image_size: H or (H, W).

  Returns:
    [..., 3] (s, x, y).
  """
  height, width = _pair(image_size)
  scale = height / box.height
  y = 2.0 * (box.top + box.height / 2.0) / height - 1.0
  x = 2.0 * (box.left + box.width / 2.0) / width - 1.0
  return jnp.stack([scale, x, y], axis=-1)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  return int(size[0]), int(size[1])
