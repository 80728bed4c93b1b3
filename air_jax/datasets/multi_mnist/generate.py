"""Pure numpy: MNIST idx files -> multi-MNIST canvases.

Each canvas is CANVAS_SIZE x CANVAS_SIZE uint8 holding a few MNIST digits at
native resolution, each cropped to the box of its ink and placed uniformly at
random so that no two ink boxes overlap (rejection sampling).
"""

import gzip
import pathlib
from typing import NamedTuple

import numpy as np

CANVAS_SIZE = 50
MAX_OBJECTS = 3
# Placement tries per canvas before all its digits are redrawn.
_MAX_TRIES = 1000


class Canvas(NamedTuple):
  image: np.ndarray  # [50, 50, 1] uint8
  num_objects: int
  boxes: np.ndarray  # [MAX_OBJECTS, 4] int32 (top, left, height, width), -1 pad
  labels: np.ndarray  # [MAX_OBJECTS] int32, -1 pad


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
) -> Canvas:
  """Draws `num_objects` random digits onto an empty canvas without overlap.

  Args:
    rng: numpy Generator (the canvas is a function of its state only).
    crops: ink-cropped digits to draw from (uniformly, with replacement).
    labels: [len(crops)] digit classes.
    num_objects: how many digits to place (<= MAX_OBJECTS).
    canvas_size: side of the square canvas.

  Returns:
    A Canvas.
  """
  image = np.zeros((canvas_size, canvas_size), np.uint8)
  boxes = np.full((MAX_OBJECTS, 4), -1, np.int32)
  out_labels = np.full((MAX_OBJECTS,), -1, np.int32)
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
