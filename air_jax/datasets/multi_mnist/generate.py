"""Pure numpy: MNIST idx files -> multi-MNIST canvases.

Three placement rules, one per family of builder configs:

`crop` (configs `full`, `small`; `make_canvas`): AIR's data. Each canvas is
  CANVAS_SIZE x CANVAS_SIZE (50 x 50) uint8 holding a few MNIST digits at
  native resolution, each cropped to the box of its ink and placed uniformly at
  random so that no two ink boxes overlap (rejection sampling).

`pyro` (configs `pyro`, `pyro_small`; `pyro_layers`): the rule of Pyro's AIR
  example (pyro/contrib/examples/multi_mnist.py). On a 50 x 50 canvas, each
  digit is the whole 28 x 28 MNIST frame shrunk by s ~ N(1.3, 0.1) to
  int(28 / s) pixels a side (PIL bicubic, see `pyro_resize`), placed at
  offsets drawn with randint(0, 50 - w) (upper bound excluded, as numpy's
  legacy randint), and the digits are summed. If any summed pixel exceeds 255
  the whole canvas is redrawn, so digits may overlap but no pixel is clipped.

`many` (configs `many`, `many_small`; `many_layers`): crowded scenes modelled
  on SPAIR's comparison set. On a 48 x 48 canvas, each digit is the whole
  28 x 28 frame averaged down to 14 x 14 (`downscale_2x`, a 2 x 2 box filter),
  its 14 x 14 frame placed uniformly at random fully inside the canvas. Two
  digits' ink boxes may intersect by at most MANY_MAX_OVERLAP (25%) of the
  smaller ink box's area: each digit gets up to 1,000 uniformly drawn
  positions, and if none satisfies the rule against every digit placed so far
  the whole canvas is redrawn. Overlapping pixels take the maximum of the
  digits.

Every canvas records, per digit, the box of its ink (nonzero pixels) in canvas
pixels, (top, left, height, width), and its class, both -1 padded to the
config's maximum number of objects K.

Shapes: S canvas side, K maximum objects, n objects on one canvas, M digits.
"""

import gzip
import pathlib
from typing import NamedTuple

import numpy as np
from PIL import Image

CANVAS_SIZE = 50
MAX_OBJECTS = 3
# Pyro's rule: 50 x 50 canvases, digit scale s ~ N(1.3, 0.1).
PYRO_CANVAS_SIZE = 50
PYRO_SCALE_MEAN = 1.3
PYRO_SCALE_STD = 0.1
# The crowded rule: 14 x 14 digits on 48 x 48 canvases, up to 9 of them.
MANY_CANVAS_SIZE = 48
MANY_DIGIT_SIZE = 14
MANY_MAX_OBJECTS = 9
MANY_MAX_OVERLAP = 0.25
# Placement tries per canvas before all its digits are redrawn.
_MAX_TRIES = 1000


class Canvas(NamedTuple):
  image: np.ndarray  # [S, S, 1] uint8
  num_objects: int
  boxes: np.ndarray  # [K, 4] int32 (top, left, height, width), -1 pad
  labels: np.ndarray  # [K] int32, -1 pad


class Layers(NamedTuple):
  """The digits of one canvas, each alone on an empty canvas.

  Attributes:
    digits: [n, S, S] uint8, digit i positioned on a canvas of its own.
    boxes: [n, 4] int32 ink box (top, left, height, width) of each digit.
    labels: [n] int32 class of each digit.
  """

  digits: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray


def read_idx(path: str | pathlib.Path) -> np.ndarray:
  """Reads a gzipped idx file (MNIST's format) into a numpy array."""
  with gzip.open(path, 'rb') as f:
    data = f.read()
  magic = int.from_bytes(data[0:4], 'big')
  if magic >> 8 != 0x08:  # 0x08: unsigned byte data.
    raise ValueError(f'{path}: not an unsigned-byte idx file (magic {magic}).')
  ndim = magic & 0xFF
  shape = tuple(
    int.from_bytes(data[4 + 4 * i : 8 + 4 * i], 'big') for i in range(ndim)
  )
  offset = 4 + 4 * ndim
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def crop_to_ink(digit: np.ndarray) -> np.ndarray:
  """Crops a [28, 28] digit to the bounding box of its nonzero pixels."""
  rows = np.flatnonzero(digit.any(axis=1))
  cols = np.flatnonzero(digit.any(axis=0))
  if rows.size == 0:
    return digit[:1, :1]
  return digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def crop_all(digits: np.ndarray) -> list[np.ndarray]:
  """Crops every digit of [M, 28, 28] to its ink."""
  return [crop_to_ink(d) for d in digits]


def _overlaps(box, boxes) -> bool:
  top, left, h, w = box
  for other_top, other_left, other_h, other_w in boxes:
    if (
      top < other_top + other_h
      and other_top < top + h
      and left < other_left + other_w
      and other_left < left + w
    ):
      return True
  return False


def make_canvas(
  rng: np.random.Generator,
  crops: list[np.ndarray],
  labels: np.ndarray,
  num_objects: int,
  canvas_size: int = CANVAS_SIZE,
  max_objects: int = MAX_OBJECTS,
) -> Canvas:
  """Draws `num_objects` random digits onto an empty canvas without overlap.

  Args:
    rng: numpy Generator (the canvas is a function of its state only).
    crops: ink-cropped digits to draw from (uniformly, with replacement).
    labels: [len(crops)] digit classes.
    num_objects: how many digits to place (<= max_objects).
    canvas_size: side of the square canvas.
    max_objects: K, the length boxes and labels are padded to.

  Returns:
    A Canvas.
  """
  image = np.zeros((canvas_size, canvas_size), np.uint8)
  boxes = np.full((max_objects, 4), -1, np.int32)
  out_labels = np.full((max_objects,), -1, np.int32)
  placed = []
  while len(placed) < num_objects:
    index = int(rng.integers(len(crops)))
    crop = crops[index]
    h, w = crop.shape
    for _ in range(_MAX_TRIES):
      top = int(rng.integers(canvas_size - h + 1))
      left = int(rng.integers(canvas_size - w + 1))
      if not _overlaps((top, left, h, w), placed):
        break
    else:  # No room for this digit next to the others: start again.
      image[:] = 0
      boxes[:] = -1
      out_labels[:] = -1
      placed = []
      continue
    k = len(placed)
    image[top : top + h, left : left + w] = crop
    boxes[k] = (top, left, h, w)
    out_labels[k] = labels[index]
    placed.append((top, left, h, w))
  return Canvas(image[:, :, None], num_objects, boxes, out_labels)


def example_rng(seed: int, split_id: int, index: int) -> np.random.Generator:
  """The Generator of one example: a function of (seed, split, index) only."""
  return np.random.default_rng([seed, split_id, index])


def ink_box(digit: np.ndarray) -> tuple[int, int, int, int]:
  """The (top, left, height, width) box of a digit's nonzero pixels.

  Args:
    digit: [h, w] uint8.

  Returns:
    The box in the digit's pixels; the whole digit if it has no ink (no MNIST
    digit is blank, so this is only a guard).
  """
  rows = np.flatnonzero(digit.any(axis=1))
  cols = np.flatnonzero(digit.any(axis=0))
  if rows.size == 0:
    return 0, 0, digit.shape[0], digit.shape[1]
  return (
    int(rows[0]),
    int(cols[0]),
    int(rows[-1] - rows[0] + 1),
    int(cols[-1] - cols[0] + 1),
  )


def intersection_areas(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
  """Pixel areas of the intersections of boxes, broadcast over leading axes.

  Args:
    boxes_a: [..., 4] (top, left, height, width).
    boxes_b: [..., 4], broadcastable against boxes_a.

  Returns:
    [...] int64, 0 where the boxes do not intersect.
  """
  a = np.asarray(boxes_a, np.int64)
  b = np.asarray(boxes_b, np.int64)
  rows = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(
    a[..., 0], b[..., 0]
  )
  cols = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(
    a[..., 1], b[..., 1]
  )
  return np.maximum(rows, 0) * np.maximum(cols, 0)


def to_canvas(layers: Layers, max_objects: int, combine: str) -> Canvas:
  """Combines positioned digits into a Canvas.

  Args:
    layers: Layers with n <= max_objects digits on [S, S] canvases.
    max_objects: K, the length boxes and labels are padded to.
    combine: 'sum' (the sum must not exceed 255: it is checked) or 'max'.

  Returns:
    A Canvas with an [S, S, 1] image and [K, 4] boxes, [K] labels.
  """
  n, size = len(layers.digits), layers.digits.shape[-1]
  if n == 0:
    image = np.zeros((size, size), np.uint8)
  elif combine == 'sum':
    total = layers.digits.astype(np.int32).sum(axis=0)
    if total.max() > 255:
      raise ValueError('Summed digits exceed 255.')
    image = total.astype(np.uint8)
  elif combine == 'max':
    image = layers.digits.max(axis=0)
  else:
    raise ValueError(f'Unknown combine {combine!r}.')
  boxes = np.full((max_objects, 4), -1, np.int32)
  labels = np.full((max_objects,), -1, np.int32)
  boxes[:n] = layers.boxes
  labels[:n] = layers.labels
  return Canvas(image[:, :, None], n, boxes, labels)


def _positioned(patch: np.ndarray, top: int, left: int, size: int):
  """A [size, size] canvas holding `patch` at (top, left), and its ink box."""
  canvas = np.zeros((size, size), np.uint8)
  h, w = patch.shape
  canvas[top : top + h, left : left + w] = patch
  box_top, box_left, box_h, box_w = ink_box(patch)
  return canvas, (top + box_top, left + box_left, box_h, box_w)


def pyro_resize(digit: np.ndarray, size: int) -> np.ndarray:
  """Resizes a digit to [size, size] as Pyro's `imresize` does.

  Pyro calls `Image.fromarray(arr).resize(size)` without a filter; for a
  uint8 ('L' mode) image PIL's default is bicubic, which is named here so a
  change of PIL's default cannot change the data. (A different Pillow whose
  bicubic kernel differs could; the determinism tests would show it.)

  Args:
    digit: [28, 28] uint8.
    size: side of the output.

  Returns:
    [size, size] uint8.
  """
  image = Image.fromarray(np.ascontiguousarray(digit))
  return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


def _stack_layers(layers, boxes, classes, canvas_size: int) -> Layers:
  """Layers from per-digit lists (empty lists give no digits)."""
  num = len(layers)
  digits = np.zeros((num, canvas_size, canvas_size), np.uint8)
  if num:
    digits = np.stack(layers)
  return Layers(
    digits,
    np.asarray(boxes, np.int32).reshape(num, 4),
    np.asarray(classes, np.int32),
  )


def pyro_layers(
  rng: np.random.Generator,
  digits: np.ndarray,
  labels: np.ndarray,
  num_objects: int,
  canvas_size: int = PYRO_CANVAS_SIZE,
) -> Layers:
  """Draws `num_objects` digits by the rule of Pyro's AIR example.

  Per digit, in Pyro's order: a digit uniformly (with replacement), a scale
  s ~ N(1.3, 0.1), side w = int(28 / s) (clipped to [1, canvas_size - 1], a
  guard Pyro does not have, active only beyond 7 standard deviations), then
  top and left offsets uniform in [0, canvas_size - w). If the sum of the
  positioned digits exceeds 255 anywhere, all of them are redrawn.

  Args:
    rng: numpy Generator (the canvas is a function of its state only).
    digits: [M, 28, 28] uint8 whole MNIST frames.
    labels: [M] digit classes.
    num_objects: n, how many digits to place.
    canvas_size: S, side of the square canvas.

  Returns:
    Layers of n digits on [S, S] canvases; their sum never exceeds 255.
  """
  while True:
    layers, boxes, classes = [], [], []
    for _ in range(num_objects):
      index = int(rng.integers(len(digits)))
      scale = PYRO_SCALE_MEAN + PYRO_SCALE_STD * rng.standard_normal()
      side = digits.shape[1] / scale if scale > 0 else np.inf
      size = int(np.clip(side, 1, canvas_size - 1))
      patch = pyro_resize(digits[index], size)
      top = int(rng.integers(0, canvas_size - size))
      left = int(rng.integers(0, canvas_size - size))
      layer, box = _positioned(patch, top, left, canvas_size)
      layers.append(layer)
      boxes.append(box)
      classes.append(labels[index])
    result = _stack_layers(layers, boxes, classes, canvas_size)
    if result.digits.astype(np.int32).sum(axis=0).max(initial=0) <= 255:
      return result


def make_pyro_canvas(
  rng: np.random.Generator,
  digits: np.ndarray,
  labels: np.ndarray,
  num_objects: int,
  canvas_size: int = PYRO_CANVAS_SIZE,
  max_objects: int = MAX_OBJECTS,
) -> Canvas:
  """A canvas by Pyro's rule: `pyro_layers`, summed.

  Args:
    rng: numpy Generator (the canvas is a function of its state only).
    digits: [M, 28, 28] uint8 whole MNIST frames.
    labels: [M] digit classes.
    num_objects: n <= max_objects.
    canvas_size: S.
    max_objects: K.

  Returns:
    A Canvas.
  """
  layers = pyro_layers(rng, digits, labels, num_objects, canvas_size)
  return to_canvas(layers, max_objects, 'sum')


def downscale_2x(digits: np.ndarray) -> np.ndarray:
  """Halves the side of digits with a 2 x 2 box filter.

  Each output pixel is the mean of a 2 x 2 block, rounded half up: the
  area-averaging (anti-aliased) resize, the same filter as PIL's
  `Resampling.BOX` for an exact factor of 2 up to rounding, computed in
  integers so the result cannot depend on a library version.

  Args:
    digits: [M, 28, 28] uint8 (any even sides).

  Returns:
    [M, 14, 14] uint8.
  """
  m, h, w = digits.shape
  blocks = digits.reshape(m, h // 2, 2, w // 2, 2).astype(np.int32)
  return ((blocks.sum(axis=(2, 4)) + 2) // 4).astype(np.uint8)


def many_layers(
  rng: np.random.Generator,
  digits: np.ndarray,
  labels: np.ndarray,
  num_objects: int,
  canvas_size: int = MANY_CANVAS_SIZE,
  max_overlap: float = MANY_MAX_OVERLAP,
) -> Layers:
  """Draws `num_objects` digits with limited overlap of their ink boxes.

  Per digit: a digit uniformly (with replacement), then up to 1,000 positions
  of its frame, top and left uniform in [0, canvas_size - side], until its
  ink box intersects every ink box placed so far by at most
  `max_overlap` times the smaller of the two boxes' areas. If no position
  fits, the whole canvas is redrawn.

  Args:
    rng: numpy Generator (the canvas is a function of its state only).
    digits: [M, d, d] uint8, e.g. `downscale_2x` of MNIST (d = 14).
    labels: [M] digit classes.
    num_objects: n, how many digits to place.
    canvas_size: S.
    max_overlap: the largest allowed intersection, as a fraction of the
      smaller ink box's area.

  Returns:
    Layers of n digits on [S, S] canvases.
  """
  side = digits.shape[1]
  layers, boxes, classes = [], [], []
  while len(layers) < num_objects:
    index = int(rng.integers(len(digits)))
    patch = digits[index]
    box_top, box_left, box_h, box_w = ink_box(patch)
    placed = np.asarray(boxes, np.int64).reshape(-1, 4)
    placed_areas = placed[:, 2] * placed[:, 3]
    for _ in range(_MAX_TRIES):
      top = int(rng.integers(canvas_size - side + 1))
      left = int(rng.integers(canvas_size - side + 1))
      box = (top + box_top, left + box_left, box_h, box_w)
      smaller = np.minimum(placed_areas, box_h * box_w)
      if np.all(intersection_areas(placed, box) <= max_overlap * smaller):
        break
    else:  # No room for this digit next to the others: start again.
      layers, boxes, classes = [], [], []
      continue
    layer, box = _positioned(patch, top, left, canvas_size)
    layers.append(layer)
    boxes.append(box)
    classes.append(labels[index])
  return _stack_layers(layers, boxes, classes, canvas_size)


def make_many_canvas(
  rng: np.random.Generator,
  digits: np.ndarray,
  labels: np.ndarray,
  num_objects: int,
  canvas_size: int = MANY_CANVAS_SIZE,
  max_objects: int = MANY_MAX_OBJECTS,
  max_overlap: float = MANY_MAX_OVERLAP,
) -> Canvas:
  """A crowded canvas: `many_layers`, overlapping pixels take the maximum.

  Args:
    rng: numpy Generator (the canvas is a function of its state only).
    digits: [M, 14, 14] uint8 (`downscale_2x` of MNIST).
    labels: [M] digit classes.
    num_objects: n <= max_objects.
    canvas_size: S.
    max_objects: K.
    max_overlap: see `many_layers`.

  Returns:
    A Canvas.
  """
  layers = many_layers(
    rng, digits, labels, num_objects, canvas_size, max_overlap
  )
  return to_canvas(layers, max_objects, 'max')
