"""Differentiable spatial transformer for scale-and-shift windows.

Glossary of shapes:
  L: any number of leading batch axes (none for a single example), N: objects,
  H, W: image rows and columns, h, w: window rows and columns,
  C: optional trailing channel axes.

  Every function reads the leading axes L from z_where ([*L, 3]) and requires
  the other arguments to start with the same axes, so a function works on one
  example, on a batch, on several batch axes and under jax.vmap alike; the
  batched work is one call on the flattened leading axes (B = prod(L)), not a
  loop. Because trailing channel axes are allowed, L comes from z_where alone:
  images [B, H, W] with a single z_where [3] would be read as one image with
  H = B rows and W = H columns of W channels, so pass z_where [B, 3].

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

__all__ = [
  'Box',
  'MIN_SCALE',
  'box_to_z_where',
  'image_to_window',
  'image_to_windows',
  'interpolation_matrix',
  'mask_box',
  'object_image_products',
  'object_boxes',
  'window_to_image',
  'windows_to_canvas',
  'z_where_to_box',
]

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


def _leading_axes(z_where: jax.Array, spec: str, rank: int) -> tuple[int, ...]:
  """The leading axes L of z_where, whose last `rank` axes `spec` names."""
  if z_where.ndim < rank or z_where.shape[-1] != 3:
    raise ValueError(
      f'z_where must have shape {spec} (s, x, y), got {z_where.shape}.'
    )
  return tuple(z_where.shape[: z_where.ndim - rank])


def _check_source(
  name: str, array: jax.Array, prefix: tuple[int, ...], spec: str, rank: int
) -> None:
  """Checks that `array` is [*prefix, <rank axes>, ...] (`spec` for messages)."""
  if (
    array.ndim < len(prefix) + rank
    or tuple(array.shape[: len(prefix)]) != prefix
  ):
    raise ValueError(
      f'{name} must have shape {spec} with leading axes {prefix} (those of '
      f'z_where) and at least {rank} more, got {array.shape}.'
    )


def _flatten(array: jax.Array, num_lead: int) -> jax.Array:
  """Merges the first `num_lead` axes into one (adds one if num_lead = 0)."""
  return jnp.reshape(array, (-1, *array.shape[num_lead:]))


def _unflatten(array: jax.Array, lead: tuple[int, ...]) -> jax.Array:
  """Splits the first axis of `array` back into `lead`."""
  return jnp.reshape(array, (*lead, *array.shape[1:]))


def image_to_window(
  images: jax.Array, z_where: jax.Array, window_size: int | tuple[int, int]
) -> jax.Array:
  """Reads the window that `z_where` places on each image (bilinear).

  Args:
    images: [*L, H, W, *C] images (L may be empty: one image [H, W, *C]).
    z_where: [*L, 3] (s, x, y) per example, see the module docstring.
    window_size: h (square window) or (h, w).

  Returns:
    [*L, h, w, *C] windows. Window pixels that fall outside the image are 0.

  Raises:
    ValueError: if z_where is not [*L, 3] or images does not start with L
      followed by at least two axes.
  """
  lead = _leading_axes(z_where, '[*L, 3]', 1)
  _check_source('images', images, lead, '[*L, H, W, *C]', 2)
  images, z_where = _flatten(images, len(lead)), _flatten(z_where, len(lead))
  rows, cols = _read_matrices(z_where, _pair(window_size), images.shape[1:3])
  return _unflatten(_apply_separable(rows, images, cols), lead)


def image_to_windows(
  images: jax.Array, z_where: jax.Array, window_size: int | tuple[int, int]
) -> jax.Array:
  """Reads N windows from each image (bilinear).

  Equal to `image_to_window` of each image repeated N times, without the
  copies: per example the rows of all N windows are read in one matmul.

  Args:
    images: [*L, H, W, *C] images (L may be empty: one image).
    z_where: [*L, N, 3] (s, x, y) of each window.
    window_size: h (square window) or (h, w).

  Returns:
    [*L, N, h, w, *C] windows.

  Raises:
    ValueError: if z_where is not [*L, N, 3] or images does not start with
      L followed by at least two axes.
  """
  lead = _leading_axes(z_where, '[*L, N, 3]', 2)
  _check_source('images', images, lead, '[*L, H, W, *C]', 2)
  images, z_where = _flatten(images, len(lead)), _flatten(z_where, len(lead))
  rows, cols = _read_matrices(z_where, _pair(window_size), images.shape[1:3])
  tmp = jnp.einsum('bnai,bij...->bnaj...', rows, images)  # [B, N, h, W, *C]
  return _unflatten(jnp.einsum('bnaj...,bncj->bnac...', tmp, cols), lead)


def _read_matrices(
  z_where: jax.Array, window: tuple[int, int], image: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
  """Interpolation matrices of a read: rows [..., h, H], cols [..., w, W];
  z_where is [..., 3]."""
  (h, w), (height, width) = window, image
  scale = _safe_scale(z_where[..., 0:1])  # [..., 1]
  x, y = z_where[..., 1:2], z_where[..., 2:3]
  rows_u = y + _pixel_centres(h) / scale  # [..., h]
  cols_u = x + _pixel_centres(w) / scale  # [..., w]
  rows = interpolation_matrix(_to_pixel_index(rows_u, height), height)
  cols = interpolation_matrix(_to_pixel_index(cols_u, width), width)
  return rows, cols


def window_to_image(
  windows: jax.Array, z_where: jax.Array, image_size: int | tuple[int, int]
) -> jax.Array:
  """Draws each window onto an empty image where `z_where` places it.

  Each image pixel samples the window at its own position in window
  coordinates (the inverse transform), bilinearly with zero padding, so the
  result is 0 outside the window's square.

  Args:
    windows: [*L, h, w, *C] windows (L may be empty: one window [h, w, *C]).
    z_where: [*L, 3] (s, x, y) per example, see the module docstring.
    image_size: H (square image) or (H, W).

  Returns:
    [*L, H, W, *C] images.

  Raises:
    ValueError: if z_where is not [*L, 3] or windows does not start with L
      followed by at least two axes.
  """
  lead = _leading_axes(z_where, '[*L, 3]', 1)
  _check_source('windows', windows, lead, '[*L, h, w, *C]', 2)
  windows, z_where = _flatten(windows, len(lead)), _flatten(z_where, len(lead))
  h, w = windows.shape[1:3]
  rows, cols = _write_matrices(z_where, (h, w), _pair(image_size))
  return _unflatten(_apply_separable(rows, windows, cols), lead)


def windows_to_canvas(
  windows: jax.Array,
  z_where: jax.Array,
  weights: jax.Array,
  image_size: int | tuple[int, int],
) -> jax.Array:
  """Draws N windows per example and adds them up, weighted.

  Equal to sum_n weights[..., n] * window_to_image(windows[..., n, :, :],
  z_where[..., n, :]) without materialising the N images: per example it is
  one matmul whose contraction runs over objects and window columns together,
  canvas = [R_1 W_1, ..., R_N W_N] @ [C_1, ..., C_N]^T. Trailing channel axes
  are carried through, as in `window_to_image`.

  Args:
    windows: [*L, N, h, w, *C] windows (L may be empty: one example).
    z_where: [*L, N, 3] (s, x, y) of each window.
    weights: [*L, N] weight of each window (z_pres in AIR).
    image_size: H (square image) or (H, W).

  Returns:
    [*L, H, W, *C] canvases.

  Raises:
    ValueError: if z_where is not [*L, N, 3], weights not [*L, N], or windows
      does not start with [*L, N] followed by at least two axes.
  """
  lead = _leading_axes(z_where, '[*L, N, 3]', 2)
  if tuple(weights.shape) != tuple(z_where.shape[:-1]):
    raise ValueError(
      f'weights must have shape [*L, N] = {tuple(z_where.shape[:-1])} to match '
      f'z_where {z_where.shape}, got {weights.shape}.'
    )
  _check_source(
    'windows', windows, (*z_where.shape[:-1],), '[*L, N, h, w, *C]', 2
  )
  windows, z_where, weights = (
    _flatten(a, len(lead)) for a in (windows, z_where, weights)
  )
  h, w = windows.shape[2:4]
  rows, cols = _write_matrices(z_where, (h, w), _pair(image_size))
  weighted = rows * weights[..., None, None]  # [B, N, H, h]
  # [B, N, H, w, *C]
  tmp = jnp.einsum('bnah,bnhw...->bnaw...', weighted, windows)
  canvas = jnp.einsum('bnaw...,bncw->bac...', tmp, cols)  # [B, H, W, *C]
  return _unflatten(canvas, lead)


def object_image_products(
  windows: jax.Array, z_where: jax.Array, images: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Inner products of drawn objects with an image, without drawing them.

  With O_n = window_to_image(windows[..., n, :, :], z_where[..., n, :])
  returns <images, O_n> and ||O_n||^2 (sums over the H x W pixels). Both
  are computed in window space: <I, R W C^T> = <R^T I C, W> and
  ||R W C^T||^2 = <(R^T R) W (C^T C), W> for the write matrices R, C.

  Args:
    windows: [*L, N, h, w].
    z_where: [*L, N, 3].
    images: [*L, H, W].

  Returns:
    (dot [*L, N], squared norm [*L, N]).
  """
  lead = _leading_axes(z_where, '[*L, N, 3]', 2)
  _check_source('windows', windows, (*z_where.shape[:-1],), '[*L, N, h, w]', 2)
  _check_source('images', images, lead, '[*L, H, W]', 2)
  windows, z_where, images = (
    _flatten(a, len(lead)) for a in (windows, z_where, images)
  )
  rows, cols = _write_matrices(
    z_where, windows.shape[2:4], images.shape[1:3]
  )  # [B, N, H, h], [B, N, W, w]
  read = jnp.einsum('bnah,bac->bnhc', rows, images)
  read = jnp.einsum('bnhc,bncw->bnhw', read, cols)
  dot = jnp.sum(read * windows, axis=(-2, -1))
  gram_rows = jnp.einsum('bnah,bnak->bnhk', rows, rows)
  gram_cols = jnp.einsum('bncw,bncv->bnwv', cols, cols)
  spread = jnp.einsum('bnhk,bnkw->bnhw', gram_rows, windows)
  spread = jnp.einsum('bnhw,bnwv->bnhv', spread, gram_cols)
  sq_norm = jnp.sum(spread * windows, axis=(-2, -1))
  return _unflatten(dot, lead), _unflatten(sq_norm, lead)


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


def object_boxes(
  windows: jax.Array,
  z_where: jax.Array,
  image_size: int | tuple[int, int],
  threshold: float = 0.5,
) -> Box:
  """Tight boxes around the window pixels brighter than `threshold`.

  Window pixel j of an axis of h pixels is the square [j, j + 1] in window
  pixel coordinates; `window_to_image` puts the window's edge coordinate
  c in [0, h] at image pixel coordinate H / 2 * (1 + y + (2 c / h - 1) / s)
  (x and W along columns). The box is the union of these spans over the
  pixels with intensity > threshold (strictly), so it equals the bounding box
  of the object `window_to_image` draws, before the bilinear smear: the
  identity z_where (s = 1, x = y = 0, h = H, w = W) gives exactly the pixel
  box of the above-threshold region. Boxes are not clipped to the image.

  Args:
    windows: [*L, h, w] window intensities in [0, 1] (the decoder output; L
      is any number of leading axes, e.g. [B, N]).
    z_where: [*L, 3] (s, x, y) of each window.
    image_size: H (square image) or (H, W).
    threshold: intensity a pixel must exceed to count as the object.

  Returns:
    A Box of [*L] arrays in continuous image pixel coordinates, as
    `z_where_to_box`. A window with no pixel above threshold gets
    height = width = 0 at its centre (top, left = the centre of its square).

  Raises:
    ValueError: if z_where is not [*L, 3] or windows is not [*L, h, w].
  """
  lead = _leading_axes(z_where, '[*L, 3]', 1)
  if windows.ndim != len(lead) + 2 or tuple(windows.shape[:-2]) != lead:
    raise ValueError(
      f'windows must have shape [*L, h, w] with L = {lead} (the leading axes '
      f'of z_where) and no channel axis, got {windows.shape}.'
    )
  height, width = _pair(image_size)
  h, w = windows.shape[-2:]
  mask = windows > threshold
  scale = _safe_scale(z_where[..., 0])
  x, y = z_where[..., 1], z_where[..., 2]
  top, box_height, found_rows = _object_extent(
    jnp.any(mask, axis=-1), y, scale, height
  )
  left, box_width, found_cols = _object_extent(
    jnp.any(mask, axis=-2), x, scale, width
  )
  del found_cols  # A pixel found along rows is also found along columns.
  return Box(
    top=jnp.where(found_rows, top, (1.0 + y) * height / 2.0),
    left=jnp.where(found_rows, left, (1.0 + x) * width / 2.0),
    height=jnp.where(found_rows, box_height, 0.0),
    width=jnp.where(found_rows, box_width, 0.0),
  )


def _object_extent(
  hit: jax.Array, offset: jax.Array, scale: jax.Array, size: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Image extent along one axis of the window pixels where `hit` is true.

  Args:
    hit: [..., n] bool, which window pixels along the axis are the object.
    offset: [...] x or y of z_where.
    scale: [...] s of z_where, nonzero.
    size: H or W, image pixels along the axis.

  Returns:
    (start [...], length [...], found [...] bool) in image pixel coordinates;
    start and length are meaningless where nothing is found.
  """
  n = hit.shape[-1]
  first, end, found = _hit_span(hit)

  def to_image(c):
    # size / 2 * (1 + offset + (2 c / n - 1) / s), written so that the
    # identity (s = 1, offset = 0, n = size) maps c to c exactly.
    return size / 2.0 * (1.0 + offset) + size * (c - n / 2.0) / (n * scale)

  a, b = to_image(first), to_image(end)  # b < a when s < 0 (a flip).
  return jnp.minimum(a, b), jnp.abs(b - a), found


def _hit_span(hit: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(first, end, found) of the true entries of `hit` [..., n] along its
  last axis: the index of the first, one past the last, and whether there
  is any (first and end are meaningless where there is none)."""
  first = jnp.argmax(hit, axis=-1)
  end = hit.shape[-1] - jnp.argmax(hit[..., ::-1], axis=-1)
  return first, end, jnp.any(hit, axis=-1)


def mask_box(mask: jax.Array) -> Box:
  """The pixel box of the true pixels of each mask.

  Args:
    mask: [..., H, W] bool.

  Returns:
    A Box of [...] arrays: the first row and column holding a true pixel and
    the number of rows and columns from there to the last (pixel i spans
    [i, i + 1], as in `object_boxes`). An empty mask gets top = left =
    height = width = 0.
  """

  def extent(hit):  # [..., n] -> (start, length), float32
    first, end, found = _hit_span(hit)
    start = jnp.where(found, first, 0).astype(jnp.float32)
    return start, jnp.where(found, end - first, 0).astype(jnp.float32)

  top, height = extent(jnp.any(mask, axis=-1))
  left, width = extent(jnp.any(mask, axis=-2))
  return Box(top, left, height, width)


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
