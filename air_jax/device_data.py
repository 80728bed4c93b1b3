"""Where training data and state live: on one device (jitted steps) or with
a leading [D] axis on several (pmapped steps, also whenever several
processes train together).

Glossary of shapes: D local devices, M training examples, H, W image.
"""

from typing import NamedTuple

import flax.jax_utils
import jax
import jax.numpy as jnp
import numpy as np

from air_jax import air
from air_jax import input_pipeline
from air_jax import workdir

__all__ = [
  'TrainingData',
  'data_shape',
  'load_data',
  'pmapped',
  'replicate',
  'unreplicate',
]


def pmapped(num_devices: int) -> bool:
  """Whether steps are pmapped: over several local devices, or whenever
  several processes train together (each may hold a single device)."""
  return num_devices > 1 or jax.process_count() > 1


def replicate(tree, num_devices: int):
  """Puts a host tree in the layout `compile_train_steps` expects."""
  if pmapped(num_devices):
    return flax.jax_utils.replicate(tree)
  return jax.tree.map(jnp.asarray, tree)


def unreplicate(tree, num_devices: int):
  """The host copy of a tree in `compile_train_steps`'s layout."""
  if pmapped(num_devices):
    tree = jax.tree.map(lambda x: x[0], tree)
  return jax.device_get(tree)


class TrainingData(NamedTuple):
  """The training images on the device(s) and what the loop needs of them."""

  images: jax.Array  # [M, H, W] uint8 ([D, M, H, W] under pmap).
  first_device_images: jax.Array  # [M, H, W] uint8.
  counts: jax.Array  # [M] int32.
  size: int
  eval_split: input_pipeline.Split
  picture_images: np.ndarray  # [P, H, W] float32.


def load_data(config, num_devices: int) -> TrainingData:
  """The training split (all of `builder_config` and `extra_train_configs`)
  on the device(s), the evaluation split and the picture images."""
  data = config.data
  train_configs = [data.builder_config, *data.extra_train_configs]
  for name in train_configs:
    input_pipeline.prepare(data.data_dir, data.mnist_dir, name)
  # Every process holds the whole split and takes its share of each global
  # batch: the same examples and order for any number of processes.
  train = input_pipeline.load_split(
    data.train_split, data.data_dir, train_configs, shard=False
  )
  images = replicate(train.images, num_devices)
  size, counts = train.size, jnp.asarray(train.num_objects)
  del train  # The device copy is all the loop needs.
  workdir.release_free_memory()
  eval_split = input_pipeline.load_split(
    data.eval_split, data.data_dir, data.builder_config, shard=False
  )
  pictures = eval_split.images[: config.num_picture_images]
  return TrainingData(
    images=images,
    first_device_images=images[0] if pmapped(num_devices) else images,
    counts=counts,
    size=size,
    eval_split=eval_split,
    picture_images=pictures.astype(np.float32) / 255.0,
  )


def data_shape(config, num_devices: int) -> jax.ShapeDtypeStruct:
  """The training images' shape (from the TFDS metadata, without reading
  them), in `replicate`'s layout."""
  data = config.data
  names = [data.builder_config, *data.extra_train_configs]
  num = 0
  for name in names:
    input_pipeline.prepare(data.data_dir, data.mnist_dir, name)
    num += input_pipeline.split_size(
      data.train_split, data.data_dir, name, shard=False
    )
  lead = (num_devices,) if pmapped(num_devices) else ()
  shape = air.pair(config.model.image_size)
  return jax.ShapeDtypeStruct((*lead, num, *shape), jnp.uint8)
