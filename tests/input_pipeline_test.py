"""Batches: a pure function of (seed, step); eval batches cover each example once."""

import numpy as np

from air_jax import input_pipeline


def _split(size=50):
  images = np.arange(size, dtype=np.uint8)[:, None, None] * np.ones(
    (1, 50, 50), np.uint8
  )
  return input_pipeline.Split(
    images=images,
    num_objects=np.arange(size, dtype=np.int32) % 3,
    boxes=np.full((size, 3, 4), -1, np.int32),
    labels=np.full((size, 3), -1, np.int32),
  )


def _ids(batch):
  return np.round(batch.images[:, 0, 0] * 255).astype(int)


def test_batches_are_a_function_of_seed_and_step():
  split = _split()
  it = input_pipeline.TrainIterator(split, seed=3, batch_size=8, start_step=0)
  batches = [next(it) for _ in range(20)]
  for step in (0, 5, 6, 7, 19):  # 6 steps per epoch: crosses epochs.
    again = input_pipeline.train_batch(split, 3, step, 8)
    np.testing.assert_array_equal(_ids(again), _ids(batches[step]))
  resumed = input_pipeline.TrainIterator(
    split, seed=3, batch_size=8, start_step=7
  )
  np.testing.assert_array_equal(_ids(next(resumed)), _ids(batches[7]))


def test_an_epoch_visits_distinct_examples_and_epochs_differ():
  split = _split()
  epoch0 = np.concatenate(
    [_ids(input_pipeline.train_batch(split, 0, s, 8)) for s in range(6)]
  )
  epoch1 = np.concatenate(
    [_ids(input_pipeline.train_batch(split, 0, s, 8)) for s in range(6, 12)]
  )
  assert len(set(epoch0)) == 48 and len(set(epoch1)) == 48
  assert not np.array_equal(epoch0, epoch1)


def test_images_are_float_in_unit_range():
  batch = input_pipeline.train_batch(_split(), 0, 0, 8)
  assert batch.images.dtype == np.float32
  assert batch.images.min() >= 0 and batch.images.max() <= 1
  assert batch.num_objects.dtype == np.int32


def test_eval_batches_cover_every_example_once():
  split = _split(23)
  seen = []
  for batch, valid in input_pipeline.eval_batches(split, 10):
    assert batch.images.shape[0] == 10
    seen.extend(_ids(batch)[:valid])
  assert seen == list(range(23))


def test_overlap_stats_counts_canvases_with_overlapping_ink_boxes():
  pad = [-1, -1, -1, -1]
  boxes = np.array(
    [
      [[0, 0, 4, 4], [2, 2, 4, 4], pad],  # One overlapping pair.
      [[0, 0, 4, 4], [4, 0, 4, 4], [0, 4, 4, 4]],  # Touching only.
      [[0, 0, 4, 4], [1, 1, 1, 1], [2, 2, 5, 5]],  # Two of three pairs.
      [pad, pad, pad],  # Empty canvas.
      [[0, 0, 4, 4], pad, pad],  # One digit.
    ],
    np.int32,
  )
  split = input_pipeline.Split(
    images=np.zeros((5, 8, 8), np.uint8),
    num_objects=np.array([2, 3, 3, 0, 1], np.int32),
    boxes=boxes,
    labels=np.zeros((5, 3), np.int32),
  )
  assert input_pipeline.overlap_stats(split) == {
    'num_canvases': 5,
    'num_overlapping': 2,
    'fraction_overlapping': 0.4,
    'num_overlapping_pairs': 3,
  }
