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

Splits:
  train      60,000 canvases of MNIST train digits, 0, 1 or 2 digits.
  test       10,000 canvases of MNIST test digits, 0, 1 or 2 digits.
  test_3     10,000 canvases of MNIST test digits, exactly 3 digits.
  train_013  60,000 canvases of MNIST train digits, 0, 1 or 3 digits.
  test_2     10,000 canvases of MNIST test digits, exactly 2 digits.
(The `small` config has 2,000 training and 500 test canvases per split.)

Features: image (50, 50, 1) uint8; num_objects int32; boxes (3, 4) int32
(top, left, height, width) of each digit's ink box, -1 padded; labels (3,)
int32, -1 padded. The same version and seed give byte-identical data.
"""

import dataclasses
import hashlib
import os
import pathlib

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
# split -> (MNIST part, allowed counts, split id for the RNG)
SPLITS = {
  'train': ('train', (0, 1, 2), 0),
  'test': ('test', (0, 1, 2), 1),
  'test_3': ('test', (3,), 2),
  'train_013': ('train', (0, 1, 3), 3),
  'test_2': ('test', (2,), 4),
}


class MnistFilesError(FileNotFoundError):
  """An MNIST file is missing or does not match its checksum."""


@dataclasses.dataclass
class MultiMnistConfig(tfds.core.BuilderConfig):
  """Sizes and seed of a multi-MNIST build."""

  num_train: int = 60_000
  num_test: int = 10_000
  seed: int = 0


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


class MultiMnist(tfds.core.GeneratorBasedBuilder):
  """AIR's multi-MNIST: 50x50 canvases with a few non-overlapping digits."""

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
    size = generate.CANVAS_SIZE
    k = generate.MAX_OBJECTS
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
    downloaded = dl_manager.download(
      {name: _URL + name for name in MNIST_FILES}
    )
    return {name: pathlib.Path(path) for name, path in downloaded.items()}

  def _split_generators(self, dl_manager):
    mnist = load_mnist(self._mnist_paths(dl_manager))
    crops = {
      part: generate.crop_all(images) for part, (images, _) in mnist.items()
    }
    config = self.builder_config
    generators = {}
    for name, (part, counts, split_id) in SPLITS.items():
      num = config.num_train if part == 'train' else config.num_test
      generators[name] = self._generate_examples(
        crops[part], mnist[part][1], counts, num, split_id
      )
    return generators

  def _generate_examples(self, crops, labels, counts, num, split_id):
    seed = self.builder_config.seed
    for index in range(num):
      rng = generate.example_rng(seed, split_id, index)
      n = int(counts[rng.integers(len(counts))])
      canvas = generate.make_canvas(rng, crops, labels, n)
      yield (
        index,
        {
          'image': canvas.image,
          'num_objects': np.int32(canvas.num_objects),
          'boxes': canvas.boxes,
          'labels': canvas.labels,
        },
      )
