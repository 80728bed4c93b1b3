"""Fixtures: a small multi_mnist build shared by the tests of a session.

The suite's time is mostly XLA compiling many small programs, not running
them: LLVM's optimisations are skipped (the same math, about half the
time; speed is measured by `make bench`, never here). Set before jax starts
its backend; subprocesses inherit it (`helpers.xla_flags`).
"""

import os

import pytest

if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']
  ).strip()

from tests import helpers


@pytest.fixture(scope='session')
def small_data_dir(tmp_path_factory):
  """A TFDS data dir holding multi_mnist/small, built once per session.

  From the real MNIST files when they are there, else from the committed
  subset (300 train / 100 test digits; the checksums of the full files do
  not apply to it), so the end-to-end tests never skip.
  """
  from air_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from air_jax.datasets.multi_mnist import (
    multi_mnist,  # pylint: disable=g-import-not-at-top
  )

  data_dir = tmp_path_factory.mktemp('tfds')
  directory = helpers.mnist_dir()
  if directory is not None:
    input_pipeline.prepare(str(data_dir), str(directory), 'small')
    return str(data_dir)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(
      multi_mnist.MultiMnist, '_mnist_paths', lambda self, dl_manager: {}
    )
    patch.setattr(
      multi_mnist, 'load_mnist', lambda paths: helpers.mnist_subset()
    )
    input_pipeline.prepare(str(data_dir), None, 'small')
  return str(data_dir)
