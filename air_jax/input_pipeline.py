"""multi-MNIST from TFDS -> numpy batches, sharded per JAX process.

A split is read once through `tfds.data_source` (random access over
array_record, no TensorFlow) into host memory as uint8 (60,000 x 50 x 50 is
150 MB), its canvas size S and maximum number of objects K taken from the
build's features (50 and 3 for `full`, 48 and 9 for `many`), then batched
from memory: epochs are permutations drawn from (seed, epoch), so the batch
at any step is a pure function of (seed, step) and a resumed run reads
exactly what an uninterrupted one would.
"""

from collections.abc import Sequence
import functools
import os
from typing import NamedTuple

import jax
import numpy as np
import tensorflow_datasets as tfds

from air_jax.datasets import multi_mnist
from air_jax.datasets.multi_mnist import generate

__all__ = [
  'batch_indices',
  'Batch',
  'Split',
  'TrainIterator',
  'epoch_permutation',
  'eval_batches',
  'load_split',
  'overlap_stats',
  'prepare',
  'split_size',
  'to_batch',
  'train_batch',
]

_READ_CHUNK = 4096


class Split(NamedTuple):
  """A whole split in memory.

  Attributes:
    images: [M, S, S] uint8.
    num_objects: [M] int32.
    boxes: [M, K, 4] int32 (top, left, height, width), -1 padded.
    labels: [M, K] int32, -1 padded.
  """

  images: np.ndarray
  num_objects: np.ndarray
  boxes: np.ndarray
  labels: np.ndarray

  @property
  def size(self) -> int:
    return len(self.images)


class Batch(NamedTuple):
  """A batch as the train step sees it: images [B, H, W] float32 in [0, 1]."""

  images: np.ndarray
  num_objects: np.ndarray  # [B] int32


def prepare(
  data_dir: str | None,
  mnist_dir: str | None = None,
  builder_config: str = 'full',
) -> tfds.core.DatasetBuilder:
  """Builds `multi_mnist/<config>` under data_dir if needed (no network when
  `mnist_dir` or AIR_MNIST_DIR names the MNIST files)."""
  builder = tfds.builder(f'multi_mnist/{builder_config}', data_dir=data_dir)
  mnist_dir = mnist_dir or os.environ.get(multi_mnist.multi_mnist.MNIST_DIR_ENV)
  download_config = tfds.download.DownloadConfig(manual_dir=mnist_dir)
  builder.download_and_prepare(download_config=download_config)
  return builder


def split_size(
  split: str, data_dir: str | None, builder_config: str, shard: bool = True
) -> int:
  """How many examples `load_split(split, ...)` of one config returns."""
  size = len(
    tfds.data_source(
      f'multi_mnist/{builder_config}', split=split, data_dir=data_dir
    )
  )
  if shard and jax.process_count() > 1:
    size //= jax.process_count()
  return size


def load_split(
  split: str,
  data_dir: str | None,
  builder_config: str | Sequence[str] = 'full',
  shard: bool = True,
) -> Split:
  """Reads a prepared split into memory.

  Args:
    split: a split of the config, e.g. 'train', 'test', 'test_3',
      'train_013' or 'test_2' for 'full' (see `multi_mnist`).
    data_dir: TFDS data directory.
    builder_config: 'full', 'small', 'pyro', 'pyro_small', 'many' or
      'many_small'; or several of them (a mixture: their `split`s one after
      the other, which must have the same image size and object slots).
    shard: keep only this JAX process's contiguous share of the examples
      of each config (process_index of process_count), so multi-host runs
      read disjoint data.

  Returns:
    Split.
  """
  names = (
    [builder_config] if isinstance(builder_config, str) else builder_config
  )
  sources, ranges = [], []
  for name in names:
    source = tfds.data_source(
      f'multi_mnist/{name}', split=split, data_dir=data_dir
    )
    start, stop = 0, len(source)
    if shard and jax.process_count() > 1:
      per_process = len(source) // jax.process_count()
      start = jax.process_index() * per_process
      stop = start + per_process
    sources.append(source)
    ranges.append((start, stop))
  shapes = {
    (s.dataset_info.features['image'].shape[0],)
    + (s.dataset_info.features['boxes'].shape[0],)
    for s in sources
  }
  if len(shapes) != 1:
    raise ValueError(
      f'builder configs {list(names)} differ in image size or object slots '
      f'{sorted(shapes)}; a mixture needs them equal.'
    )
  ((size, k),) = shapes
  # Fill preallocated arrays chunk by chunk: holding all records as Python
  # dicts first (or concatenating parts) would double the peak memory.
  num = sum(stop - start for start, stop in ranges)
  out = Split(
    images=np.empty((num, size, size), np.uint8),
    num_objects=np.empty((num,), np.int32),
    boxes=np.empty((num, k, 4), np.int32),
    labels=np.empty((num, k), np.int32),
  )
  row = 0
  for source, (start, stop) in zip(sources, ranges):
    for lo in range(start, stop, _READ_CHUNK):
      hi = min(lo + _READ_CHUNK, stop)
      for record in source.__getitems__(range(lo, hi)):
        out.images[row] = record['image'][..., 0]
        out.num_objects[row] = record['num_objects']
        out.boxes[row] = record['boxes']
        out.labels[row] = record['labels']
        row += 1
  return out


def to_batch(split: Split, indices: np.ndarray) -> Batch:
  """Gathers examples and converts images to float32 in [0, 1]."""
  images = split.images[indices].astype(np.float32) * np.float32(1.0 / 255.0)
  return Batch(images=images, num_objects=split.num_objects[indices])


def epoch_permutation(seed: int, epoch: int, size: int) -> np.ndarray:
  """The example order of one epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(size)


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
  return epoch_permutation(seed, epoch, size)


def batch_indices(
  seed: int, first_step: int, num_steps: int, batch_size: int, size: int
) -> np.ndarray:
  """[num_steps, batch_size] the examples of steps first_step, ... .

  The batch of step s is `input_pipeline.train_batch(split, seed, s, B)`'s:
  epochs of whole batches in the order `epoch_permutation(seed, epoch)`.
  """
  per_epoch = size // batch_size
  if per_epoch == 0:
    raise ValueError(f'Split of {size} is smaller than one batch.')
  rows = []
  for step in range(first_step, first_step + num_steps):
    epoch, offset = divmod(step, per_epoch)
    order = _epoch_order(seed, epoch, size)
    rows.append(order[offset * batch_size : (offset + 1) * batch_size])
  return np.stack(rows).astype(np.int32)


def train_batch(split: Split, seed: int, step: int, batch_size: int) -> Batch:
  """The training batch of a step: next(TrainIterator(..., start_step=step))."""
  return next(TrainIterator(split, seed, batch_size, step))


class TrainIterator:
  """Training batches for step = start_step, start_step + 1, ...

  Epochs hold whole batches (the remainder is dropped); the order of epoch e
  is `epoch_permutation(seed, e, split.size)`. The current permutation is
  cached so a step costs one gather.
  """

  def __init__(self, split: Split, seed: int, batch_size: int, start_step: int):
    self._split = split
    self._seed = seed
    self._batch_size = batch_size
    self._step = start_step
    self._epoch = None
    self._order = None
    self._steps_per_epoch = split.size // batch_size
    if self._steps_per_epoch == 0:
      raise ValueError(f'Split of {split.size} is smaller than one batch.')

  def __iter__(self):
    return self

  def __next__(self) -> Batch:
    epoch, offset = divmod(self._step, self._steps_per_epoch)
    if epoch != self._epoch:
      self._epoch = epoch
      self._order = epoch_permutation(self._seed, epoch, self._split.size)
    lo = offset * self._batch_size
    self._step += 1
    return to_batch(self._split, self._order[lo : lo + self._batch_size])


def eval_batches(split: Split, batch_size: int):
  """Yields (Batch, num_valid) over the split in order, the last batch padded
  by repeating examples (num_valid says how many are real)."""
  size = split.size
  for lo in range(0, size, batch_size):
    idx = np.arange(lo, lo + batch_size)
    valid = min(batch_size, size - lo)
    yield to_batch(split, np.minimum(idx, size - 1)), valid


def overlap_stats(split: Split) -> dict[str, int | float]:
  """Counts canvases whose digits' ink boxes overlap.

  Two ink boxes overlap when their intersection has a positive area in
  pixels (boxes that only touch do not overlap).

  Args:
    split: a Split; only `num_objects` and `boxes` [M, K, 4] are read.

  Returns:
    {'num_canvases': M, 'num_overlapping': canvases with at least one
    overlapping pair, 'fraction_overlapping': their share (0 if M is 0),
    'num_overlapping_pairs': overlapping pairs over all canvases}.
  """
  boxes = split.boxes  # [M, K, 4]
  k = boxes.shape[1]
  valid = np.arange(k)[None, :] < split.num_objects[:, None]  # [M, K]
  areas = generate.intersection_areas(
    boxes[:, :, None, :], boxes[:, None, :, :]
  )  # [M, K, K]
  pairs = (
    valid[:, :, None] & valid[:, None, :] & np.triu(np.ones((k, k), bool), 1)
  )
  overlapping = (areas > 0) & pairs
  num = split.size
  hits = int(overlapping.any(axis=(1, 2)).sum())
  return {
    'num_canvases': num,
    'num_overlapping': hits,
    'fraction_overlapping': hits / num if num else 0.0,
    'num_overlapping_pairs': int(overlapping.sum()),
  }
