"""The multi_mnist TFDS builder and its generator."""

import hashlib
import pathlib
import shutil
import socket

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from air_jax import input_pipeline
from air_jax.datasets import multi_mnist
from air_jax.datasets.multi_mnist import generate
from tests import helpers


def _refuse_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  monkeypatch.setattr(tfds.download.DownloadManager, 'download', refuse)


@pytest.fixture
def no_network(monkeypatch):
  """Fails the test if anything opens a connection or asks TFDS to download."""
  _refuse_network(monkeypatch)


def _subset():
  data = np.load(helpers.TESTDATA / 'mnist_subset.npz')
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
  src = helpers.mnist_dir()
  dst = tmp_path / 'mnist'
  dst.mkdir()
  for name in multi_mnist.multi_mnist.MNIST_FILES:
    shutil.copy(src / name, dst / name)
  return dst


def _built_files(data_dir: pathlib.Path):
  return [
    p for p in data_dir.rglob('*') if p.is_file() and 'array_record' in p.name
  ]


@helpers.requires_mnist
def test_builds_offline_from_a_local_folder(tmp_path, no_network):
  del no_network
  builder = input_pipeline.prepare(
    str(tmp_path / 'tfds'), str(helpers.mnist_dir()), 'small'
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


@helpers.requires_mnist
def test_environment_variable_names_the_folder(
  tmp_path, monkeypatch, no_network
):
  del no_network
  monkeypatch.setenv('AIR_MNIST_DIR', str(helpers.mnist_dir()))
  builder = tfds.builder('multi_mnist/small', data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert builder.info.splits['test_3'].num_examples == 500


@helpers.requires_mnist
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


@helpers.requires_mnist
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


@helpers.requires_mnist
def test_same_seed_gives_identical_bytes(tmp_path, small_data_dir):
  input_pipeline.prepare(str(tmp_path), str(helpers.mnist_dir()), 'small')
  first, second = _digest(pathlib.Path(small_data_dir)), _digest(tmp_path)
  assert first and first == second


@helpers.requires_mnist
def test_full_config_examples_from_the_real_files(mnist_parts):
  # The `full` config's split table, and a stride of each split's examples
  # made from the real files by the function its build runs per example
  # (`make_example`; the build itself is exercised on `small`, which
  # differs only in the number of examples: building all 150,000 canvases
  # here would take two minutes).
  config = {c.name: c for c in multi_mnist.MultiMnist.BUILDER_CONFIGS}['full']
  sizes = {
    name: config.num_train if part == 'train' else config.num_test
    for name, part, _, _ in config.splits
  }
  assert sizes == {
    'train': 60000,
    'test': 10000,
    'test_3': 10000,
    'train_013': 60000,
    'test_2': 10000,
  }
  pools = {
    part: multi_mnist.multi_mnist.digit_pool(
      config.placement, *mnist_parts[part]
    )
    for part in ('train', 'test')
  }
  for name, part, counts, split_id in config.splits:
    made = [
      multi_mnist.multi_mnist.make_example(
        config, pools[part], counts, split_id, index
      )
      for index in range(0, sizes[name], sizes[name] // 600)
    ]
    for canvas in made:
      _check_canvas(canvas)
      assert canvas.num_objects in counts, (name, canvas.num_objects)
    # The counts are drawn uniformly: each within 5 standard deviations.
    seen = np.array([c.num_objects for c in made])
    k = len(counts)
    sd = np.sqrt(len(seen) * (1 / k) * (1 - 1 / k))
    for count in counts:
      assert abs(np.sum(seen == count) - len(seen) / k) <= 5 * sd, (name, seen)


# The `pyro` and `many` configs.

_NEW_SPLITS = {
  'pyro_small': {
    'train': (2000, {0, 1, 2}),
    'test': (500, {0, 1, 2}),
    'test_2': (500, {2}),
    'test_3': (500, {3}),
  },
  'many_small': {
    'train': (2000, set(range(10))),
    'test': (500, set(range(10))),
    'train_0to5': (2000, set(range(6))),
    'test_6to9': (500, set(range(6, 10))),
  },
}
_SHAPES = {'pyro_small': (50, 3), 'many_small': (48, 9)}


def _check_ink_boxes(image, boxes, labels, n):
  """Boxes lie in the canvas, hold all its ink and have ink on every edge.

  Args:
    image: [S, S] uint8.
    boxes: [K, 4] (top, left, height, width), -1 padded after n.
    labels: [K], -1 padded after n.
    n: number of digits.
  """
  size = image.shape[0]
  assert np.all(boxes[n:] == -1) and np.all(labels[n:] == -1)
  assert np.all((labels[:n] >= 0) & (labels[:n] <= 9))
  covered = np.zeros(image.shape, bool)
  for top, left, h, w in boxes[:n]:
    assert top >= 0 and left >= 0 and h > 0 and w > 0
    assert top + h <= size and left + w <= size
    covered[top : top + h, left : left + w] = True
    patch = image[top : top + h, left : left + w]
    # Every digit's ink is <= the canvas (sum or max of nonnegative digits),
    # so a tight box has canvas ink on each of its four edges.
    assert (
      patch[0].any()
      and patch[-1].any()
      and patch[:, 0].any()
      and patch[:, -1].any()
    )
  assert not image[~covered].any(), 'ink outside the boxes'


def _check_layers(layers, canvas, combine):
  """The canvas is the sum / max of its digits; each box is its digit's ink box.

  Args:
    layers: generate.Layers with n digits on [S, S].
    canvas: the generate.Canvas made from them.
    combine: 'sum' or 'max'.
  """
  n = len(layers.digits)
  assert canvas.num_objects == n
  image = canvas.image[..., 0].astype(np.int64)
  if n:
    stack = layers.digits.astype(np.int64)
    expected = stack.sum(0) if combine == 'sum' else stack.max(0)
  else:
    expected = np.zeros_like(image)
  # For 'sum' this is the no-clipping rule: canvas == exact integer sum.
  np.testing.assert_array_equal(image, expected)
  np.testing.assert_array_equal(canvas.boxes[:n], layers.boxes)
  np.testing.assert_array_equal(canvas.labels[:n], layers.labels)
  for digit, (top, left, h, w) in zip(layers.digits, layers.boxes):
    rows = np.flatnonzero(digit.any(axis=1))
    cols = np.flatnonzero(digit.any(axis=0))
    assert (rows[0], cols[0]) == (top, left)
    assert (rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1) == (h, w)


def _check_overlap_bound(boxes, num_objects, bound=0.25):
  """No two ink boxes of a canvas intersect by more than bound x smaller area.

  Args:
    boxes: [M, K, 4].
    num_objects: [M].
    bound: the allowed fraction of the smaller box's area.
  """
  k = boxes.shape[1]
  valid = np.arange(k)[None] < num_objects[:, None]
  pair = valid[:, :, None] & valid[:, None, :] & ~np.eye(k, dtype=bool)
  inter = generate.intersection_areas(boxes[:, :, None], boxes[:, None, :])
  area = boxes[..., 2] * boxes[..., 3]
  smaller = np.minimum(area[:, :, None], area[:, None, :])
  assert np.all(inter[pair] <= bound * smaller[pair])


def test_pyro_resize_is_pils_default_call():
  images, _ = _subset()
  for size in (19, 21, 24):
    pyro = np.asarray(Image.fromarray(images[0]).resize((size, size)))
    np.testing.assert_array_equal(generate.pyro_resize(images[0], size), pyro)


def test_pyro_canvases_from_the_committed_subset():
  images, labels = _subset()
  sides = []
  for i in range(200):
    n = i % 4
    layers = generate.pyro_layers(
      generate.example_rng(0, 0, i), images, labels, n
    )
    canvas = generate.make_pyro_canvas(
      generate.example_rng(0, 0, i), images, labels, n
    )
    assert canvas.image.shape == (50, 50, 1) and canvas.image.dtype == np.uint8
    assert canvas.boxes.shape == (3, 4) and canvas.labels.shape == (3,)
    _check_layers(layers, canvas, 'sum')
    _check_ink_boxes(canvas.image[..., 0], canvas.boxes, canvas.labels, n)
    sides.extend(layers.boxes[:, 2:].ravel())
  # Digits shrunk by about 1.3: ink boxes of 28 / 1.3 ~ 21 pixels or less.
  assert 10 < np.mean(sides) < 22 and np.max(sides) <= 27


def test_pyro_redraws_instead_of_clipping():
  # Two all-255 squares overlap often: every canvas kept has none.
  digits = np.zeros((1, 28, 28), np.uint8)
  digits[0, 4:24, 4:24] = 255
  for i in range(20):
    layers = generate.pyro_layers(
      generate.example_rng(0, 0, i), digits, np.zeros(1), 2
    )
    assert layers.digits.astype(int).sum(0).max() <= 255


def test_downscale_2x_is_the_rounded_block_mean():
  rng = np.random.default_rng(0)
  digits = rng.integers(0, 256, (5, 28, 28)).astype(np.uint8)
  means = digits.reshape(5, 14, 2, 14, 2).astype(float).mean(axis=(2, 4))
  expected = np.floor(means + 0.5).astype(np.uint8)
  np.testing.assert_array_equal(generate.downscale_2x(digits), expected)
  assert generate.downscale_2x(np.full((1, 28, 28), 255, np.uint8)).min() == 255


def test_intersection_areas():
  a = np.array([0, 0, 4, 4])
  assert generate.intersection_areas(a, [2, 3, 4, 4]) == 2 * 1
  assert generate.intersection_areas(a, [4, 0, 2, 2]) == 0  # Touching.
  assert generate.intersection_areas(a, [1, 1, 1, 1]) == 1  # Inside.
  np.testing.assert_array_equal(
    generate.intersection_areas(a, np.array([[0, 0, 4, 4], [9, 9, 1, 1]])),
    [16, 0],
  )


def test_many_canvases_from_the_committed_subset():
  images, labels = _subset()
  digits = generate.downscale_2x(images)
  boxes, counts = [], []
  for i in range(100):
    n = i % 10
    layers = generate.many_layers(
      generate.example_rng(0, 0, i), digits, labels, n
    )
    canvas = generate.make_many_canvas(
      generate.example_rng(0, 0, i), digits, labels, n
    )
    assert canvas.image.shape == (48, 48, 1) and canvas.image.dtype == np.uint8
    assert canvas.boxes.shape == (9, 4) and canvas.labels.shape == (9,)
    _check_layers(layers, canvas, 'max')
    _check_ink_boxes(canvas.image[..., 0], canvas.boxes, canvas.labels, n)
    boxes.append(canvas.boxes)
    counts.append(n)
  _check_overlap_bound(np.stack(boxes), np.array(counts))


@pytest.fixture(scope='module')
def new_data_dir(tmp_path_factory):
  """A TFDS data dir holding pyro_small and many_small, built offline."""
  if helpers.mnist_dir() is None:
    pytest.skip('real MNIST files not found')
  data_dir = tmp_path_factory.mktemp('tfds_new_configs')
  with pytest.MonkeyPatch.context() as monkeypatch:
    _refuse_network(monkeypatch)
    for config in _NEW_SPLITS:
      input_pipeline.prepare(str(data_dir), str(helpers.mnist_dir()), config)
  return data_dir


@pytest.fixture(scope='module')
def mnist_parts():
  """{'train' | 'test': (images, labels)} of the real MNIST files."""
  paths = multi_mnist.multi_mnist.verify_mnist_dir(helpers.mnist_dir())
  return multi_mnist.multi_mnist.load_mnist(paths)


@helpers.requires_mnist
@pytest.mark.parametrize('config', sorted(_NEW_SPLITS))
def test_new_configs_build_offline_with_their_splits(new_data_dir, config):
  builder = tfds.builder(f'multi_mnist/{config}', data_dir=str(new_data_dir))
  expected = _NEW_SPLITS[config]
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == {
    k: v[0] for k, v in expected.items()
  }
  size, k = _SHAPES[config]
  for name, (num, allowed) in expected.items():
    source = tfds.data_source(
      f'multi_mnist/{config}', split=name, data_dir=str(new_data_dir)
    )
    example = source[0]
    assert example['image'].shape == (size, size, 1)
    assert example['image'].dtype == np.uint8
    assert (
      example['boxes'].shape == (k, 4) and example['boxes'].dtype == np.int32
    )
    assert (
      example['labels'].shape == (k,) and example['labels'].dtype == np.int32
    )
    split = input_pipeline.load_split(name, str(new_data_dir), config)
    assert split.images.shape == (num, size, size)
    assert split.boxes.shape == (num, k, 4) and split.labels.shape == (num, k)
    # Uniform over the allowed counts: all of them appear, nothing else.
    assert set(np.unique(split.num_objects)) == allowed


@helpers.requires_mnist
@pytest.mark.parametrize('config', sorted(_NEW_SPLITS))
def test_new_configs_follow_their_rules(new_data_dir, mnist_parts, config):
  builder_config = multi_mnist.MultiMnist.builder_configs[config]
  pyro = builder_config.placement == 'pyro'
  pools = {
    part: multi_mnist.multi_mnist.digit_pool(builder_config.placement, *data)
    for part, data in mnist_parts.items()
  }
  for name, part, counts, split_id in builder_config.splits:
    split = input_pipeline.load_split(name, str(new_data_dir), config)
    for i in range(split.size):
      _check_ink_boxes(
        split.images[i], split.boxes[i], split.labels[i], split.num_objects[i]
      )
    if not pyro:
      _check_overlap_bound(split.boxes, split.num_objects)
    # The first canvases again from their digits: the sum (pyro) or max
    # (many) of the digits equals the stored canvas, and the stored boxes are
    # each digit's own ink box.
    for i in range(40):
      canvas = multi_mnist.multi_mnist.make_example(
        builder_config, pools[part], counts, split_id, i
      )
      np.testing.assert_array_equal(canvas.image[..., 0], split.images[i])
      np.testing.assert_array_equal(canvas.boxes, split.boxes[i])
      np.testing.assert_array_equal(canvas.labels, split.labels[i])
      rng = generate.example_rng(builder_config.seed, split_id, i)
      n = int(counts[rng.integers(len(counts))])
      layers_fn = generate.pyro_layers if pyro else generate.many_layers
      layers = layers_fn(rng, *pools[part], n, builder_config.canvas_size)
      _check_layers(layers, canvas, 'sum' if pyro else 'max')


@helpers.requires_mnist
@pytest.mark.parametrize('config', sorted(_NEW_SPLITS))
def test_new_configs_are_deterministic(tmp_path, new_data_dir, config):
  input_pipeline.prepare(str(tmp_path), str(helpers.mnist_dir()), config)
  first = _digest(pathlib.Path(new_data_dir) / 'multi_mnist' / config)
  second = _digest(tmp_path / 'multi_mnist' / config)
  assert first and first == second


def test_unreachable_download_fails_at_once_in_one_line(tmp_path, monkeypatch):
  """MNIST neither given nor downloadable: one line with the fix, before
  TFDS's download retries."""

  def unreachable(*args, **kwargs):
    raise OSError('network is unreachable')

  monkeypatch.delenv('AIR_MNIST_DIR', raising=False)
  monkeypatch.setattr(socket, 'create_connection', unreachable)
  monkeypatch.setattr(
    tfds.download.DownloadManager,
    'download',
    lambda *a, **k: pytest.fail('TFDS download attempted'),
  )
  with pytest.raises(multi_mnist.MnistFilesError) as err:
    input_pipeline.prepare(str(tmp_path / 'tfds'), None, 'small')
  message = str(err.value)
  assert '\n' not in message and 'AIR_MNIST_DIR' in message
  assert not list((tmp_path / 'tfds').rglob('*.array_record*'))
