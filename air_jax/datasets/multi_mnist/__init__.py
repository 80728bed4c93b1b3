"""Multi-MNIST TFDS builder; importing this registers `multi_mnist`."""

from air_jax.datasets.multi_mnist.multi_mnist import MnistFilesError
from air_jax.datasets.multi_mnist.multi_mnist import MultiMnist

__all__ = ['MnistFilesError', 'MultiMnist']
