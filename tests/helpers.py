"""What several test modules share: paths, the MNIST folder, markers, bad
image files."""

import functools
import io
import os
import pathlib
import struct
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from air_jax import configuration
from air_jax import input_pipeline
from air_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_MNIST = REPO.parent / 'shared' / 'data' / 'mnist'
TESTDATA = REPO / 'tests' / 'testdata'


def xla_flags(*flags: str) -> str:
  """XLA_FLAGS for a subprocess: this session's (tests/conftest.py) and
  `flags`."""
  return ' '.join([os.environ.get('XLA_FLAGS', ''), *flags]).strip()


@functools.partial(jax.jit, static_argnames=('model', 'deterministic'))
def apply_jitted(
  model, params, images, key=None, keys=None, deterministic=False
):
  """`model.apply` (AIR or GridAIR) jitted: eagerly a model runs op by op
  (seconds per call). `key` seeds the 'sample' stream, `keys` are
  per-example keys."""
  rngs = {} if key is None else {'sample': key}
  return model.apply(
    {'params': params},
    images,
    deterministic=deterministic,
    keys=keys,
    rngs=rngs,
  )


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


# --- Bad input for the image readers ---------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
  crc = zlib.crc32(kind + data) & 0xFFFFFFFF
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', crc)


def _pack(values, depth: int) -> bytes:
  values = [int(v) for v in values]
  if depth == 16:
    return b''.join(struct.pack('>H', v) for v in values)
  if depth == 8:
    return bytes(values)
  bits = ''.join(format(v, f'0{depth}b') for v in values)
  bits += '0' * (-len(bits) % 8)
  return bytes(int(bits[i : i + 8], 2) for i in range(0, len(bits), 8))


def png_bytes(rows, depth, colour, width=None, height=None, extra=b''):
  """A PNG written by hand (any bit depth and colour type, even those PIL
  does not write). rows: [H, W * channels] sample values; width and height
  override the header's claim."""
  channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
  width = len(rows[0]) // channels if width is None else width
  height = len(rows) if height is None else height
  ihdr = struct.pack('>IIBBBBB', width, height, depth, colour, 0, 0, 0)
  raw = b''.join(b'\0' + _pack(r, depth) for r in rows)
  return (
    b'\x89PNG\r\n\x1a\n'
    + _chunk(b'IHDR', ihdr)
    + extra
    + _chunk(b'IDAT', zlib.compress(raw))
    + _chunk(b'IEND', b'')
  )


def png_cases(h, w):
  """{name: (PNG bytes, exact [H, W] floats or None if it must be
  refused)}."""
  rng = np.random.default_rng(1)
  cases = {}
  for depth in (1, 2, 4, 8, 16):
    v = rng.integers(0, 2**depth, (h, w))
    cases[f'grey{depth}'] = (png_bytes(v, depth, 0), v / (2**depth - 1))
  v = rng.integers(0, 256, (h, w))
  opaque = np.full((h, w), 255)
  cases['rgb_grey'] = (png_bytes(np.repeat(v, 3, 1), 8, 2), v / 255)
  cases['rgba_opaque_grey'] = (
    png_bytes(np.stack([v, v, v, opaque], -1).reshape(h, -1), 8, 6),
    v / 255,
  )
  cases['la_opaque'] = (
    png_bytes(np.stack([v, opaque], -1).reshape(h, -1), 8, 4),
    v / 255,
  )
  grey_palette = _chunk(b'PLTE', bytes(np.repeat(np.arange(16), 3).tolist()))
  p = rng.integers(0, 16, (h, w))
  cases['palette_grey'] = (png_bytes(p, 4, 3, extra=grey_palette), p / 255)
  # Refused: colour, transparency, 16-bit colour (PIL would drop 8 bits).
  colour = rng.integers(0, 256, (h, w * 3))
  cases['rgb_colour'] = (png_bytes(colour, 8, 2), None)
  cases['rgba_transparent'] = (
    png_bytes(np.stack([v, v, v, opaque // 2], -1).reshape(h, -1), 8, 6),
    None,
  )
  cases['la_transparent'] = (
    png_bytes(np.stack([v, 0 * opaque], -1).reshape(h, -1), 8, 4),
    None,
  )
  cases['rgb16'] = (png_bytes(np.repeat(v * 257, 3, 1), 16, 2), None)
  colour_palette = _chunk(
    b'PLTE', bytes(sum(([i, 0, 255 - i] for i in range(16)), []))
  )
  cases['palette_colour'] = (png_bytes(p, 4, 3, extra=colour_palette), None)
  cases['palette_transparent'] = (
    png_bytes(p, 4, 3, extra=grey_palette + _chunk(b'tRNS', bytes(16))),
    None,
  )
  good = png_bytes(v, 8, 0)
  cases['truncated'] = (good[: len(good) - 40], None)
  cases['bad_crc'] = (good[:40] + bytes([good[40] ^ 0xFF]) + good[41:], None)
  cases['wrong_size'] = (png_bytes(np.zeros((h, w + 1)), 8, 0), None)
  return cases


class Marker:
  """Unpickling this touches a file: proof that something was unpickled."""

  def __init__(self, path):
    self.path = pathlib.Path(path)

  def __reduce__(self):
    return (pathlib.Path.touch, (self.path,))


def forged_npy(shape_claim, dtype='|u1') -> bytes:
  header = {'descr': dtype, 'fortran_order': False, 'shape': shape_claim}
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, header)
  return buffer.getvalue() + b'\0' * 64


def bad_images(case, directory, shape):
  """Writes one kind of bad --images input; returns its path."""
  h, w = shape
  good = np.zeros((2, h, w), np.float32)
  path = directory / f'{case}.npz'
  marker = directory / 'UNPICKLED'
  if case == 'missing':
    path = directory / 'nowhere.npz'
  elif case == 'empty':
    path.write_bytes(b'')
  elif case == 'shape':
    np.savez(path, images=np.zeros((2, h - 1, w), np.float32))
  elif case == 'dtype':
    np.savez(path, images=good.astype(np.int64))
  elif case == 'nan':
    good[0, 0, 0] = np.nan
    np.savez(path, images=good)
  elif case == 'range':
    np.savez(path, images=good + 1.5)
  elif case == 'no_key':
    np.savez(path, pixels=good)
  elif case == 'no_images':
    np.savez(path, images=np.zeros((0, h, w), np.uint8))
  elif case == 'object_npz':
    array = np.empty((1, h, w), object)
    array[0, 0, 0] = Marker(marker)
    np.savez(path, images=array)
  elif case == 'object_npy':
    path = directory / 'object.npy'
    array = np.empty((1, h, w), object)
    array[0, 0, 0] = Marker(marker)
    np.save(path, array)
  elif case == 'huge_npy':
    path = directory / 'huge.npy'
    path.write_bytes(forged_npy((10**9, h, w)))
  elif case == 'huge_npz':
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('images.npy', forged_npy((10**9, h, w)))
  elif case == 'truncated_npy':
    path = directory / 'truncated.npy'
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((4, h, w), np.uint8))
    path.write_bytes(buffer.getvalue()[:-100])
  elif case == 'truncated_npz':
    np.savez_compressed(path, images=np.ones((4, h, w), np.uint8))
    path.write_bytes(path.read_bytes()[:-60])
  elif case == 'garbage_npz':
    path.write_bytes(b'PK\x03\x04' + bytes(range(256)) * 4)
  elif case == 'not_an_array':
    path.write_text('hello')
  elif case == 'png_folder_empty':
    path = directory / 'no_pngs'
    path.mkdir()
    (path / 'readme.txt').write_text('no pictures here')
  elif case == 'png_folder_mixed_sizes':
    path = directory / 'pngs'
    path.mkdir()
    Image.fromarray(np.zeros((h, w), np.uint8)).save(path / 'a.png')
    Image.fromarray(np.zeros((h, w + 2), np.uint8)).save(path / 'b.png')
  elif case == 'png_colour':
    path = directory / 'colour.png'
    path.write_bytes(png_cases(h, w)['rgb_colour'][0])
  elif case == 'png_huge_claim':
    path = directory / 'huge.png'
    path.write_bytes(png_bytes([[0]], 8, 0, width=10**6, height=10**6))
  elif case == 'fifo':
    path = directory / 'fifo.npy'
    os.mkfifo(path)
  else:
    raise ValueError(case)
  return path


# --- Small runs ---------------------------------------------------------------


def one_object_split(images: np.ndarray) -> input_pipeline.Split:
  """An input_pipeline.Split of `images` [M, H, W] uint8, each labelled with
  one object in a fixed box (9 object slots), for end-to-end runs of
  `evaluation.evaluate` on any image size."""
  m = len(images)
  return input_pipeline.Split(
    images=images,
    num_objects=np.ones(m, np.int32),
    boxes=np.tile(np.array([[[5, 6, 10, 8]]], np.int32), (m, 9, 1)),
    labels=np.zeros((m, 9), np.int32),
  )


def train_step_fn(config, model, tx):
  """`train.train_step` of `config` on one device, all but (state, images)
  bound."""
  return functools.partial(
    train.train_step,
    model=model,
    tx=tx,
    loss_config=configuration.loss_config(config),
    seed=config.seed,
    axis_name=None,
  )


def inked_images(b, shape=(50, 50), seed=0):
  """[b, H, W] float32 images, mostly dark with some bright pixels."""
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.random((b, *shape)) ** 8, jnp.float32)
