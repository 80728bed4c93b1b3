"""Fixtures: a small multi_mnist build shared by the tests of a session.

The suite's time is mostly XLA compiling many small programs, not running
them: LLVM's optimisations are skipped (the same math, about half the
time; speed is measured by `make bench`, never here). Set before jax starts
its backend; subprocesses inherit it (`helpers.xla_flags`).
"""

import os
import shutil
import tempfile

import pytest

if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(
    [os.environ.get('XLA_FLAGS', ''), '--xla_backend_optimization_level=0']
  ).strip()

# One persistent compilation cache for the whole run, made here in the
# first process (the xdist controller, whose workers and every subprocess
# inherit the environment): many tests compile the same programs (the test
# config's train step, in-process and in each launched run), and a hit is
# read back in milliseconds. Only programs that took a second or more to
# compile are written. A cache the caller names is used as it is.
_CACHE_PREFIX = 'air_jax_tests_xla_'
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(
    prefix=_CACHE_PREFIX
  )
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

from tests import helpers  # noqa: E402 (after the environment above)


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


def pytest_sessionfinish(session):
  """The run's own compilation cache goes when the run ends (in the xdist
  controller once every worker is done, or in the one process)."""
  if hasattr(session.config, 'workerinput'):
    return
  cache = os.environ.get('JAX_COMPILATION_CACHE_DIR', '')
  if os.path.basename(cache).startswith(_CACHE_PREFIX):
    shutil.rmtree(cache, ignore_errors=True)
