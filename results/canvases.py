"""The canvases the scripts of this folder measure: the first `num` of a
split of a `multi_mnist` config, and the flags that choose them and the
checkpoint."""

import argparse

import numpy as np

from air_jax import input_pipeline


def parser(description: str) -> argparse.ArgumentParser:
  """Flags --checkpoint, --data_dir, --builder_config, --split, --num."""
  flags = argparse.ArgumentParser(description=description)
  flags.add_argument('--checkpoint', required=True)
  flags.add_argument('--data_dir', default=None)
  flags.add_argument('--builder_config', default='full')
  flags.add_argument('--split', default='train')
  flags.add_argument('--num', type=int, default=2000)
  return flags


def first_canvases(
  args: argparse.Namespace,
) -> tuple[input_pipeline.Split, np.ndarray]:
  """(the split's data, its first `args.num` images [num, H, W] float32 in
  [0, 1])."""
  data = input_pipeline.load_split(
    args.split, args.data_dir, args.builder_config, shard=False
  )
  return data, data.images[: args.num].astype(np.float32) / 255.0
