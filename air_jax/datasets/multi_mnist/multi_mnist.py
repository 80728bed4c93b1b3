"""The `multi_mnist` TFDS builder: AIR's 50x50 multi-digit canvases.

Built from the four original MNIST idx `.gz` files, written as array_record
and read with `tfds.data_source`: no TensorFlow anywhere.

Where MNIST comes from, in order:
  1. the manual directory (`DownloadConfig(manual_dir=...)`) if it exists and
     is not empty;
  2. the folder named by the environment variable AIR_MNIST_DIR;
  3. otherwise TFDS's download manager fetches the files (size and sha256
     checked against `checksums.tsv`, the checksums TFDS uses for `mnist`).
In cases 1 and 2 nothing is downloaded: a missing or corrupted file raises
MnistFilesError naming the file, the folder and the expected checksum,
before anything is written.

Configs (each is one placement rule of `generate`, a canvas size S, a
maximum number of objects K and a table of splits; a split not in a config's
table does not exist for it):

`full` (the default) and `small`: AIR's canvases, 50 x 50, K = 3, digits
cropped to their ink at native size, ink boxes never overlap.
  train      60,000 canvases of MNIST train digits, 0, 1 or 2 digits.
  test       10,000 canvases of MNIST test digits, 0, 1 or 2 digits.
  test_3     10,000 canvases of MNIST test digits, exactly 3 digits.
  train_013  60,000 canvases of MNIST train digits, 0, 1 or 3 digits.
  test_2     10,000 canvases of MNIST test digits, exactly 2 digits.

`pyro` and `pyro_small`: the rule of Pyro's AIR example, 50 x 50, K = 3:
whole digits shrunk by s ~ N(1.3, 0.1) (PIL bicubic), summed, overlap allowed
as long as no summed pixel exceeds 255 (else the canvas is redrawn).
  train 60,000 (0-2 digits), test 10,000 (0-2), test_2 10,000 (exactly 2),
  test_3 10,000 (exactly 3).

`many` and `many_small`: crowded scenes after SPAIR's comparison set,
48 x 48, K = 9: whole digits averaged down to 14 x 14 (2 x 2 box filter),
ink boxes of two digits intersect by at most 25% of the smaller one's area
(rejection sampling, redraw), overlapping pixels take the maximum.
  train 60,000 (0-9 digits), test 10,000 (0-9), train_0to5 60,000 (0-5),
  test_6to9 10,000 (6-9).

The `*_small` configs have 2,000 canvases per training split and 500 per test
split, the first canvases of the full config's splits. MNIST train digits
make the train splits, test digits the test splits; counts are uniform over
the allowed set.

Features: image (S, S, 1) uint8; num_objects int32; boxes (K, 4) int32
(top, left, height, width) of each digit's ink box in canvas pixels, -1
padded; labels (K,) int32, -1 padded. Example i of a split is a function of
(seed, split id, i) only, so the same version and seed give identical
records. (Two builds in one process also give byte-identical files; across
processes the array_record bytes can differ, because the order in which
TFDS's serializer writes the feature map's entries varies, while every
decoded record is the same.)
"""

import dataclasses
import hashlib
import os
import pathlib
import socket
import urllib.parse

import numpy as np
import tensorflow_datasets as tfds

from air_jax.datasets.multi_mnist import generate

MNIST_DIR_ENV = 'AIR_MNIST_DIR'
_URL = 'https://storage.googleapis.com/cvdf-datasets/mnist/'
# name -> (bytes, sha256), the same as TFDS's `mnist` checksums.
MNIST_FILES = {
  'train-images-idx3-ubyte.gz': (
    9912422,
    '440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609',
  ),
  'train-labels-idx1-ubyte.gz': (
    28881,
    '3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c',
  ),
  't10k-images-idx3-ubyte.gz': (
    1648877,
    '8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6',
  ),
  't10k-labels-idx1-ubyte.gz': (
    4542,
    'f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6',
  ),
}
# split -> (MNIST part, allowed counts, split id for the RNG), per family.
# Split ids differ across families so that no two configs share a stream.
SPLITS = {
  'train': ('train', (0, 1, 2), 0),
  'test': ('test', (0, 1, 2), 1),
  'test_3': ('test', (3,), 2),
  'train_013': ('train', (0, 1, 3), 3),
  'test_2': ('test', (2,), 4),
}
PYRO_SPLITS = {
  'train': ('train', (0, 1, 2), 10),
  'test': ('test', (0, 1, 2), 11),
  'test_2': ('test', (2,), 12),
  'test_3': ('test', (3,), 13),
}
MANY_SPLITS = {
  'train': ('train', tuple(range(10)), 20),
  'test': ('test', tuple(range(10)), 21),
  'train_0to5': ('train', tuple(range(6)), 22),
  'test_6to9': ('test', tuple(range(6, 10)), 23),
}
# The placement rules of `generate`.
PLACEMENTS = ('crop', 'pyro', 'many')


_PYRO_DESCRIPTION = (
  "Pyro's AIR example: 50x50, 28x28 digits shrunk by s ~ N(1.3, 0.1) "
  '(PIL bicubic) to int(28/s), placed at randint(0, 50 - w), summed; '
  'overlap allowed, a canvas with a summed pixel over 255 is redrawn. '
  'Splits train, test (0-2 digits), test_2, test_3.'
)
_MANY_DESCRIPTION = (
  'Crowded scenes after SPAIR: 48x48, whole digits averaged to 14x14 (2x2 '
  'box filter), placed uniformly; two ink boxes may intersect by at most '
  "25% of the smaller box's area (rejection sampling, redraw); overlapping "
  'pixels take the maximum. Splits train, test (0-9 digits), train_0to5, '
  'test_6to9.'
)
_SMALL = ' 2,000 training / 500 test canvases per split.'


class MnistFilesError(FileNotFoundError):
  """An MNIST file is missing or does not match its checksum."""


def _frozen(splits: dict) -> tuple:
  return tuple((name, *spec) for name, spec in splits.items())


@dataclasses.dataclass
class MultiMnistConfig(tfds.core.BuilderConfig):
  """Everything that defines a multi-MNIST build.

  Attributes:
    num_train: canvases per split made of MNIST train digits.
    num_test: canvases per split made of MNIST test digits.
    seed: the seed of every example's Generator.
    canvas_size: S, side of the square canvas.
    max_objects: K, the length boxes and labels are padded to.
    placement: the rule of `generate`: 'crop', 'pyro' or 'many'.
    splits: ((name, MNIST part, allowed counts, split id), ...).
  """

  num_train: int = 60_000
  num_test: int = 10_000
  seed: int = 0
  canvas_size: int = generate.CANVAS_SIZE
  max_objects: int = generate.MAX_OBJECTS
  placement: str = 'crop'
  splits: tuple = _frozen(SPLITS)

  def __post_init__(self):
    if self.placement not in PLACEMENTS:
      raise ValueError(f'Unknown placement {self.placement!r}.')
    for _, _, counts, _ in self.splits:
      if max(counts) > self.max_objects:
        raise ValueError(f'Counts {counts} exceed max_objects.')


def _check_reachable(url: str, timeout_s: float = 5.0) -> None:
  """Raises MnistFilesError at once when the download host cannot be
  reached (TFDS would otherwise retry for minutes)."""
  host = urllib.parse.urlparse(url).hostname
  try:
    socket.create_connection((host, 443), timeout=timeout_s).close()
  except OSError as e:
    raise MnistFilesError(
      f'MNIST is not given and {host} cannot be reached ({e}): put the four '
      f'MNIST .gz files in a folder and set {MNIST_DIR_ENV} (or '
      'config.data.mnist_dir) to it.'
    ) from e


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def verify_mnist_dir(directory: str | os.PathLike) -> dict[str, pathlib.Path]:
  """Checks the four MNIST files in a folder; returns their paths.

  Raises:
    MnistFilesError: naming the first file that is missing, has the wrong
      size or the wrong sha256, where it was looked for and what was expected.
  """
  directory = pathlib.Path(directory)
  paths = {}
  for name, (size, sha) in MNIST_FILES.items():
    path = directory / name
    if not path.is_file():
      raise MnistFilesError(
        f'MNIST file {name} not found in {directory} (expected {size} '
        f'bytes, sha256 {sha}). Put the original file there, or unset the '
        f'manual directory / {MNIST_DIR_ENV} to download it.'
      )
    actual_size = path.stat().st_size
    actual = _sha256(path)
    if actual_size != size or actual != sha:
      raise MnistFilesError(
        f'MNIST file {path} is corrupted: expected {size} bytes with sha256 '
        f'{sha}, found {actual_size} bytes with sha256 {actual}.'
      )
    paths[name] = path
  return paths


def load_mnist(paths: dict[str, pathlib.Path]) -> dict[str, tuple]:
  """{'train' | 'test': (images [M, 28, 28] uint8, labels [M] uint8)}."""
  return {
    part: (
      generate.read_idx(paths[f'{prefix}-images-idx3-ubyte.gz']),
      generate.read_idx(paths[f'{prefix}-labels-idx1-ubyte.gz']),
    )
    for part, prefix in (('train', 'train'), ('test', 't10k'))
  }


def digit_pool(placement: str, images: np.ndarray, labels: np.ndarray):
  """The digits a placement rule draws from: (digits, labels).

  Args:
    placement: 'crop', 'pyro' or 'many'.
    images: [M, 28, 28] uint8 MNIST digits.
    labels: [M] uint8 classes.

  Returns:
    ('crop') a list of M ink-cropped digits, ('pyro') the [M, 28, 28]
    frames, ('many') the [M, 14, 14] halved frames; and the labels.
  """
  if placement == 'crop':
    return generate.crop_all(images), labels
  if placement == 'pyro':
    return images, labels
  if placement == 'many':
    return generate.downscale_2x(images), labels
  raise ValueError(f'Unknown placement {placement!r}.')


def make_example(
  config: MultiMnistConfig, pool, counts, split_id: int, index: int
) -> generate.Canvas:
  """Example `index` of a split: a function of (config, split, index) only.

  Args:
    config: the builder config (placement rule, sizes, seed).
    pool: `digit_pool(config.placement, ...)` of the split's MNIST part.
    counts: the allowed numbers of digits (drawn uniformly).
    split_id: the split's id in the config's table.
    index: the example's index in the split.

  Returns:
    A Canvas.
  """
  digits, labels = pool
  rng = generate.example_rng(config.seed, split_id, index)
  n = int(counts[rng.integers(len(counts))])
  if config.placement == 'crop':
    make = generate.make_canvas
  elif config.placement == 'pyro':
    make = generate.make_pyro_canvas
  else:
    make = generate.make_many_canvas
  return make(
    rng,
    digits,
    labels,
    n,
    canvas_size=config.canvas_size,
    max_objects=config.max_objects,
  )


class MultiMnist(tfds.core.GeneratorBasedBuilder):
  """Multi-MNIST canvases: AIR's, Pyro's and crowded ones (one per config)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
    MultiMnistConfig(name='full', description='The paper-sized splits.'),
    MultiMnistConfig(
      name='small',
      description='2,000 training / 500 test canvases per split.',
      num_train=2_000,
      num_test=500,
    ),
    MultiMnistConfig(
      name='pyro',
      description=_PYRO_DESCRIPTION,
      placement='pyro',
      splits=_frozen(PYRO_SPLITS),
    ),
    MultiMnistConfig(
      name='pyro_small',
      description=_PYRO_DESCRIPTION + _SMALL,
      placement='pyro',
      splits=_frozen(PYRO_SPLITS),
      num_train=2_000,
      num_test=500,
    ),
    MultiMnistConfig(
      name='many',
      description=_MANY_DESCRIPTION,
      canvas_size=generate.MANY_CANVAS_SIZE,
      max_objects=generate.MANY_MAX_OBJECTS,
      placement='many',
      splits=_frozen(MANY_SPLITS),
    ),
    MultiMnistConfig(
      name='many_small',
      description=_MANY_DESCRIPTION + _SMALL,
      canvas_size=generate.MANY_CANVAS_SIZE,
      max_objects=generate.MANY_MAX_OBJECTS,
      placement='many',
      splits=_frozen(MANY_SPLITS),
      num_train=2_000,
      num_test=500,
    ),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    'Place the four original MNIST idx .gz files (train-images-idx3-ubyte.gz,'
    ' train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, '
    f't10k-labels-idx1-ubyte.gz) in the manual dir, or set {MNIST_DIR_ENV}.'
  )

  def __init__(self, *, file_format=None, **kwargs):
    # array_record: random access through tfds.data_source, no TensorFlow.
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.canvas_size
    k = self.builder_config.max_objects
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
          'num_objects': tfds.features.Scalar(dtype=np.int32),
          'boxes': tfds.features.Tensor(shape=(k, 4), dtype=np.int32),
          'labels': tfds.features.Tensor(shape=(k,), dtype=np.int32),
        }
      ),
      # Canvases are already in random order; TFDS's shuffle would only
      # cost build time.
      disable_shuffling=True,
      homepage='https://arxiv.org/abs/1603.08575',
      citation=(
        'Eslami et al., Attend, Infer, Repeat, NIPS 2016. MNIST: LeCun, '
        'Cortes, Burges (2010), CC BY-SA 3.0.'
      ),
    )

  def _mnist_paths(self, dl_manager) -> dict[str, pathlib.Path]:
    manual = getattr(dl_manager, '_manual_dir', None)
    if manual is not None and manual.exists() and any(manual.iterdir()):
      return verify_mnist_dir(manual)
    env = os.environ.get(MNIST_DIR_ENV)
    if env:
      return verify_mnist_dir(env)
    _check_reachable(_URL)
    downloaded = dl_manager.download(
      {name: _URL + name for name in MNIST_FILES}
    )
    return {name: pathlib.Path(path) for name, path in downloaded.items()}

  def _split_generators(self, dl_manager):
    mnist = load_mnist(self._mnist_paths(dl_manager))
    config = self.builder_config
    pools = {
      part: digit_pool(config.placement, images, labels)
      for part, (images, labels) in mnist.items()
    }
    generators = {}
    for name, part, counts, split_id in config.splits:
      num = config.num_train if part == 'train' else config.num_test
      generators[name] = self._generate_examples(
        pools[part], counts, num, split_id
      )
    return generators

  def _generate_examples(self, pool, counts, num, split_id):
    for index in range(num):
      canvas = make_example(self.builder_config, pool, counts, split_id, index)
      yield (
        index,
        {
          'image': canvas.image,
          'num_objects': np.int32(canvas.num_objects),
          'boxes': canvas.boxes,
          'labels': canvas.labels,
        },
      )
