"""What several test modules share: paths, the MNIST folder, markers."""

import os
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / 'shared' / 'data' / 'mnist'
TESTDATA = REPO / 'tests' / 'testdata'


def mnist_dir() -> pathlib.Path | None:
  """The real MNIST files: AIR_MNIST_DIR, else ../shared/data/mnist."""
  env = os.environ.get('AIR_MNIST_DIR')
  for candidate in (env, SHARED_MNIST):
    if (
      candidate
      and (pathlib.Path(candidate) / 'train-images-idx3-ubyte.gz').is_file()
    ):
      return pathlib.Path(candidate)
  return None


requires_mnist = pytest.mark.skipif(
  mnist_dir() is None, reason='real MNIST files not found'
)


def mnist_subset() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The committed subset in `load_mnist`'s form: {'train' | 'test':
  (images [M, 28, 28] uint8, labels [M] uint8)}."""
  data = np.load(TESTDATA / 'mnist_subset.npz')
  return {
    part: (data[f'{part}_images'], data[f'{part}_labels'])
    for part in ('train', 'test')
  }


def mnist_flag() -> str:
  """`--config.data.mnist_dir=...` for a training subprocess, or nothing
  extra (the data dir is then already built) without real MNIST."""
  directory = mnist_dir()
  return f'--config.data.mnist_dir={directory}' if directory else ''
