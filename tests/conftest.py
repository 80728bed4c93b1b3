"""Shared test set-up: tidy temp dirs, the MNIST folder, a small TFDS build."""

import os
import pathlib

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


@pytest.fixture(scope='session')
def small_data_dir(tmp_path_factory):
  """A TFDS data dir holding multi_mnist/small, built once per session."""
  directory = mnist_dir()
  if directory is None:
    pytest.skip('real MNIST files not found')
  from air_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path_factory.mktemp('tfds')
  input_pipeline.prepare(str(data_dir), str(directory), 'small')
  return str(data_dir)
