"""The multi_mnist TFDS builder and its generator."""

import hashlib
import pathlib
import shutil
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from air_jax import input_pipeline
from air_jax.datasets import multi_mnist
from air_jax.datasets.multi_mnist import generate
from tests import conftest


@pytest.fixture
def no_network(monkeypatch):
  """Fails the test if anything opens a connection or asks TFDS to download."""

  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', refuse)


def _subset():
  data = np.load(conftest.TESTDATA / 'mnist_subset.npz')
  return data['train_images'], data['train_labels']


def _check_canvas(canvas, digit_crops=None):
  image = canvas.image[..., 0]
  assert image.shape == (50, 50) and image.dtype == np.uint8
  n = canvas.num_objects
  boxes = canvas.boxes
  assert np.all(boxes[n:] == -1) and np.all(canvas.labels[n:] == -1)
  assert np.all((canvas.labels[:n] >= 0) & (canvas.labels[:n] <= 9))
  covered = np.zeros((50, 50), bool)
  for top, left, h, w in boxes[:n]:
    assert top >= 0 and left >= 0 and top + h <= 50 and left + w <= 50
    region = covered[top : top + h, left : left + w]
    assert not region.any(), 'ink boxes overlap'
    region[:] = True
    patch = image[top : top + h, left : left + w]
    # The box is the ink's bounding box: ink on each of its four edges.
    assert (
      patch[0].any()
      and patch[-1].any()
      and patch[:, 0].any()
      and patch[:, -1].any()
    )
  assert not image[~covered].any(), 'ink outside the boxes'


def test_generated_canvases_from_the_committed_subset():
  images, labels = _subset()
  crops = generate.crop_all(images)
  counts = []
  for i in range(300):
    rng = generate.example_rng(0, 0, i)
    n = int(rng.integers(3))
    canvas = generate.make_canvas(rng, crops, labels, n)
    _check_canvas(canvas)
    assert canvas.num_objects == n
    counts.append(n)
  # Same (seed, split, index) -> identical canvas.
  a = generate.make_canvas(generate.example_rng(0, 0, 5), crops, labels, 2)
  b = generate.make_canvas(generate.example_rng(0, 0, 5), crops, labels, 2)
  assert a.image.tobytes() == b.image.tobytes() and np.array_equal(
    a.boxes, b.boxes
  )


def test_three_digits_always_fit():
  images, labels = _subset()
  crops = generate.crop_all(images)
  for i in range(100):
    _check_canvas(
      generate.make_canvas(generate.example_rng(1, 2, i), crops, labels, 3)
    )


def test_crop_to_ink():
  digit = np.zeros((28, 28), np.uint8)
  digit[5:9, 10:13] = 7
  assert generate.crop_to_ink(digit).shape == (4, 3)


def _copy_mnist(tmp_path) -> pathlib.Path:
  src = conftest.mnist_dir()
  dst = tmp_path / 'mnist'
  dst.mkdir()
  for name in multi_mnist.multi_mnist.MNIST_FILES:
    shutil.copy(src / name, dst / name)
  return dst


def _built_files(data_dir: pathlib.Path):
  return [
    p for p in data_dir.rglob('*') if p.is_file() and 'array_record' in p.name
  ]


@conftest.requires_mnist
def test_builds_offline_from_a_local_folder(tmp_path, no_network):
  del no_network
  builder = input_pipeline.prepare(
    str(tmp_path / 'tfds'), str(conftest.mnist_dir()), 'small'
  )
  assert set(builder.info.splits.keys()) == {
    'train',
    'test',
    'test_3',
    'train_013',
    'test_2',
  }
  source = tfds.data_source(
    'multi_mnist/small', split='train', data_dir=str(tmp_path / 'tfds')
  )
  assert len(source) == 2000
  example = source[0]
  assert (
    example['image'].shape == (50, 50, 1) and example['image'].dtype == np.uint8
  )
  assert example['boxes'].shape == (3, 4) and example['labels'].shape == (3,)


@conftest.requires_mnist
def test_environment_variable_names_the_folder(
  tmp_path, monkeypatch, no_network
):
  del no_network
  monkeypatch.setenv('AIR_MNIST_DIR', str(conftest.mnist_dir()))
  builder = tfds.builder('multi_mnist/small', data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert builder.info.splits['test_3'].num_examples == 500


@conftest.requires_mnist
@pytest.mark.parametrize('damage', ['corrupt', 'missing'])
def test_bad_files_give_one_clear_error_and_leave_nothing(
  tmp_path, no_network, damage
):
  del no_network
  mnist = _copy_mnist(tmp_path)
  name = 'train-labels-idx1-ubyte.gz'
  if damage == 'corrupt':
    data = bytearray((mnist / name).read_bytes())
    data[100] ^= 0xFF
    (mnist / name).write_bytes(bytes(data))
  else:
    (mnist / name).unlink()
  data_dir = tmp_path / 'tfds'
  with pytest.raises(multi_mnist.MnistFilesError) as info:
    input_pipeline.prepare(str(data_dir), str(mnist), 'small')
  message = str(info.value)
  assert name in message and str(mnist) in message
  assert (
    multi_mnist.multi_mnist.MNIST_FILES[name][1] in message
  )  # Expected sha256.
  assert not _built_files(data_dir)
  assert not list(data_dir.rglob('dataset_info.json'))


@conftest.requires_mnist
def test_small_build_contents(small_data_dir):
  split = input_pipeline.load_split('train', small_data_dir, 'small')
  counts = np.bincount(split.num_objects, minlength=3)
  assert counts.sum() == 2000 and len(counts) == 3
  # Uniform over {0, 1, 2}: each within 5 standard deviations of 2000 / 3.
  sd = np.sqrt(2000 * (1 / 3) * (2 / 3))
  assert np.all(np.abs(counts - 2000 / 3) < 5 * sd), counts
  for i in range(300):
    _check_canvas(
      generate.Canvas(
        split.images[i][..., None],
        split.num_objects[i],
        split.boxes[i],
        split.labels[i],
      )
    )
  for name, allowed in (
    ('test_3', {3}),
    ('test_2', {2}),
    ('train_013', {0, 1, 3}),
  ):
    part = input_pipeline.load_split(name, small_data_dir, 'small')
    assert set(np.unique(part.num_objects)) == allowed


def _digest(data_dir: pathlib.Path) -> dict[str, str]:
  return {
    p.name: hashlib.sha256(p.read_bytes()).hexdigest()
    for p in sorted(_built_files(data_dir))
  }


@conftest.requires_mnist
def test_same_seed_gives_identical_bytes(tmp_path, small_data_dir):
  input_pipeline.prepare(str(tmp_path), str(conftest.mnist_dir()), 'small')
  first, second = _digest(pathlib.Path(small_data_dir)), _digest(tmp_path)
  assert first and first == second


@conftest.requires_mnist
def test_full_build_from_the_real_files(tmp_path):
  builder = input_pipeline.prepare(
    str(tmp_path), str(conftest.mnist_dir()), 'full'
  )
  sizes = {k: v.num_examples for k, v in builder.info.splits.items()}
  assert sizes == {
    'train': 60000,
    'test': 10000,
    'test_3': 10000,
    'train_013': 60000,
    'test_2': 10000,
  }
  test = input_pipeline.load_split('test', str(tmp_path), 'full')
  assert test.images.shape == (10000, 50, 50)
  counts = np.bincount(test.num_objects, minlength=3)
  sd = np.sqrt(10000 * (1 / 3) * (2 / 3))
  assert np.all(np.abs(counts - 10000 / 3) < 5 * sd), counts
  for i in range(0, 10000, 97):
    _check_canvas(
      generate.Canvas(
        test.images[i][..., None],
        test.num_objects[i],
        test.boxes[i],
        test.labels[i],
      )
    )
