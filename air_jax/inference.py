"""Applying a trained AIR to anyone's images: loading, checking, records.

Glossary of shapes: M images, H, W image (50 x 50 for the shipped models),
N steps.
"""

import json
import os
import pathlib
import re
import struct
from typing import Any
import warnings
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from air_jax import air
from air_jax import checkpointing
from air_jax import files
from air_jax import refinement
from air_jax import spatial_transformer
from air_jax import visualization

__all__ = [
  'InputError',
  'PICTURE_NAME',
  'check_images',
  'image_shape',
  'infer',
  'infer_records',
  'is_pictures_folder',
  'load',
  'load_images',
  'modes',
  'records_json',
  'render_pictures',
  'write_json',
  'write_pictures',
]


class InputError(ValueError):
  """Images or a checkpoint that cannot be used; the message says why."""


_NPY_MAGIC = b'\x93NUMPY'
_ZIP_MAGICS = (b'PK\x03\x04', b'PK\x05\x06')
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
# A PNG of the model's size is a few kB; anything past this is not one.
_MAX_PNG_BYTES = 16 << 20


def _memory_bytes() -> int:
  """Half the machine's physical memory: the most an input may take."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2
  except (ValueError, OSError, AttributeError):
    return 8 << 30


def image_shape(image_size) -> tuple[int, int]:
  """(H, W) from a config's `model.image_size` (H = W, or (H, W))."""
  if isinstance(image_size, int | np.integer):
    return int(image_size), int(image_size)
  height, width = (int(v) for v in image_size)
  return height, width


def _expected(shape) -> str:
  return f'expected "images" of shape (N, {shape[0]}, {shape[1]})'


def load_images(path: str, image_size=50) -> np.ndarray:
  """Reads images from a .npz / .npy file, a PNG file or a folder of PNGs.

  Every claim a file makes (array shape and dtype, PNG size and bit depth)
  is checked before anything is allocated or decoded; object arrays are
  refused without unpickling.

  Args:
    path: a `.npz` holding an array `images`, a `.npy` array, a PNG file, or
      a folder of `.png` files (sorted by name). PNGs must be greyscale
      (8 or 16 bit, or fewer), or colour/palette/alpha images whose pixels
      are all grey and opaque; 16-bit values are divided by 65535, 1-8 bit
      values by 2^bits - 1, exactly.
    image_size: the H = W, or (H, W), the model expects.

  Returns:
    [M, H, W] float32 in [0, 1].

  Raises:
    InputError: on a missing, empty, truncated or malformed file, a wrong
      shape or dtype, NaN or infinite values, values outside [0, 255]
      (uint8) / [0, 1] (float), colour or transparency, or a size beyond
      memory; the message names the file and what was expected.
  """
  shape = image_shape(image_size)
  p = pathlib.Path(path)
  if not p.exists():
    raise InputError(f'{path}: no such file or folder.')
  if p.is_dir():
    return check_images(_load_png_folder(p, shape), shape, str(p))
  if not p.is_file():
    raise InputError(f'{path}: not a regular file or folder.')
  if p.stat().st_size == 0:
    raise InputError(
      f'{path}: empty file; expected a .npz with an array "images", a .npy '
      'array or PNG files.'
    )
  with open(p, 'rb') as f:
    magic = f.read(8)
  if magic.startswith(_PNG_MAGIC):
    images = _read_png(p, shape)[None]
  elif magic.startswith(_NPY_MAGIC):
    images = _read_npy(p, shape)
  elif magic[:4] in _ZIP_MAGICS:
    images = _read_npz(p, shape)
  else:
    raise InputError(
      f'{path}: not a .npz, .npy or PNG file; {_expected(shape)}.'
    )
  return check_images(images, shape, source=str(path))


def _check_header(source, shape, dtype, image: tuple[int, int]) -> int:
  """Checks an array's header claims; returns its data size in bytes."""
  if dtype.hasobject or dtype.fields is not None:
    raise InputError(
      f'{source}: an array of dtype {dtype} (objects or records are refused, '
      'they would need unpickling); expected uint8 (0-255) or float (0-1).'
    )
  if len(shape) != 3 or tuple(shape[1:]) != image:
    raise InputError(f'{source}: shape {tuple(shape)}, {_expected(image)}.')
  count = int(np.prod(shape, dtype=np.int64)) if shape else 1
  nbytes = count * dtype.itemsize
  need = nbytes + count * 4  # The array and its float32 copy.
  if need > _memory_bytes():
    raise InputError(
      f'{source}: {shape[0]} images would take {need / 2**30:.1f} GiB, more '
      'than this machine has; split them into smaller files.'
    )
  return nbytes


def _read_header(f, source):
  try:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
      return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f'unsupported .npy format version {version}')
  except (ValueError, OSError, SyntaxError, EOFError) as e:
    raise InputError(f'{source}: not a readable .npy array ({e}).') from e


def _read_npy(p: pathlib.Path, image: tuple[int, int]) -> np.ndarray:
  with open(p, 'rb') as f:
    shape, _, dtype = _read_header(f, str(p))
    nbytes = _check_header(str(p), shape, dtype, image)
    available = p.stat().st_size - f.tell()
    if available < nbytes:
      raise InputError(
        f'{p}: truncated .npy file (its header promises {nbytes} bytes of '
        f'data, the file holds {available}).'
      )
    f.seek(0)
    try:
      return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError) as e:
      raise InputError(f'{p}: not a readable .npy array ({e}).') from e


def _read_npz(p: pathlib.Path, image: tuple[int, int]) -> np.ndarray:
  try:
    with zipfile.ZipFile(p) as archive:
      names = archive.namelist()
      name = next((n for n in ('images.npy', 'images') if n in names), None)
      if name is None:
        found = [n.removesuffix('.npy') for n in names]
        raise InputError(
          f'{p}: .npz has no array "images" (found {found}); '
          f'{_expected(image)}.'
        )
      info = archive.getinfo(name)
      source = f'{p}["images"]'
      with archive.open(info) as member:
        shape, _, dtype = _read_header(member, source)
        nbytes = _check_header(source, shape, dtype, image)
        header = member.tell() if member.seekable() else None
        if header is not None and info.file_size != header + nbytes:
          raise InputError(
            f'{source}: the array claims {nbytes} bytes of data but the '
            f'archive member holds {info.file_size - header}.'
          )
      with archive.open(info) as member:
        return np.lib.format.read_array(member, allow_pickle=False)
  except InputError:
    raise
  except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as e:
    raise InputError(f'{p}: not a readable .npz file ({e}).') from e
  except (EOFError, zlib.error, NotImplementedError) as e:
    raise InputError(f'{p}: truncated or damaged .npz file ({e}).') from e


def _load_png_folder(p: pathlib.Path, image: tuple[int, int]) -> np.ndarray:
  paths = sorted(
    f for f in p.iterdir() if f.suffix.lower() == '.png' and f.is_file()
  )
  if not paths:
    raise InputError(
      f'{p}: folder holds no .png files; expected PNG files of '
      f'{image[1]}x{image[0]} (width x height) pixels.'
    )
  return np.stack([_read_png(f, image) for f in paths])


def _png_header(path: pathlib.Path):
  """(width, height, bit depth, colour type) from the IHDR chunk."""
  with open(path, 'rb') as f:
    head = f.read(33)
  if (
    len(head) < 33
    or not head.startswith(_PNG_MAGIC)
    or head[12:16] != (b'IHDR')
  ):
    raise InputError(f'{path}: not a PNG file (no PNG header).')
  width, height = struct.unpack('>II', head[16:24])
  return width, height, head[24], head[25]


def _read_png(path: pathlib.Path, image: tuple[int, int]) -> np.ndarray:
  """One PNG as [H, W] float64 in [0, 1], converted exactly, or refused."""
  width, height, depth, colour = _png_header(path)
  if (height, width) != image:
    raise InputError(
      f'{path}: a {width}x{height} (width x height) PNG; expected '
      f'{image[1]}x{image[0]} pixels.'
    )
  if path.stat().st_size > _MAX_PNG_BYTES:
    raise InputError(f'{path}: {path.stat().st_size} bytes, not a plain PNG.')
  if depth == 16 and colour != 0:
    raise InputError(
      f'{path}: a 16-bit colour or alpha PNG cannot be read exactly; save it '
      'as 16-bit greyscale or as 8 bits.'
    )
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(path, formats=['PNG']) as im:
        if getattr(im, 'n_frames', 1) > 1:
          raise InputError(f'{path}: an animated PNG; expected one image.')
        im.load()
        return _png_to_float(im, depth, path)
  except InputError:
    raise
  except (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    zlib.error,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
  ) as e:
    raise InputError(
      f'{path}: unreadable PNG ({type(e).__name__}: {e}).'
    ) from e


def _png_to_float(im, depth: int, path) -> np.ndarray:
  mode = im.mode
  if 'transparency' in im.info and mode in ('L', 'RGB', 'P'):
    im = im.convert('RGBA')
    mode = 'RGBA'
  elif mode == 'P':
    im = im.convert('RGBA' if im.palette.mode == 'RGBA' else 'RGB')
    mode = im.mode
  elif mode == 'PA':
    im = im.convert('RGBA')
    mode = 'RGBA'
  pixels = np.asarray(im)
  if mode == '1':
    return pixels.astype(np.float64)
  if mode in ('I;16', 'I;16B', 'I;16L', 'I') and depth == 16:
    return pixels.astype(np.float64) / 65535.0
  if mode == 'L':
    return pixels.astype(np.float64) / 255.0  # 1-4 bit: scaled to 0-255.
  if mode in ('LA', 'RGB', 'RGBA'):
    alpha = pixels[..., -1] if mode in ('LA', 'RGBA') else None
    if alpha is not None and np.any(alpha != 255):
      raise InputError(
        f'{path}: has transparent pixels; expected an opaque greyscale PNG.'
      )
    colour = pixels[..., :1] if mode == 'LA' else pixels[..., :3]
    if np.any(colour != colour[..., :1]):
      raise InputError(
        f'{path}: a colour PNG; expected greyscale (convert it first, e.g. '
        'with PIL .convert("L")).'
      )
    return colour[..., 0].astype(np.float64) / 255.0
  raise InputError(f'{path}: PNG mode {mode!r} is not supported.')


def check_images(
  images: np.ndarray, image_size=50, source: str = 'images'
) -> np.ndarray:
  """Validates an array of images and converts it to float32 in [0, 1].

  Args:
    images: [M, H, W] uint8 (0-255) or float (0-1).
    image_size: the H = W, or (H, W), the model expects.
    source: where the images came from, for messages.

  Raises:
    InputError: see `load_images`.
  """
  images = np.asarray(images)
  shape = image_shape(image_size)
  expected = f'(N, {shape[0]}, {shape[1]})'
  if images.dtype.hasobject:
    raise InputError(
      f'{source}: an object array; expected uint8 (0-255) or float (0-1).'
    )
  if images.ndim != 3 or images.shape[1:] != shape:
    raise InputError(f'{source}: shape {images.shape}, expected {expected}.')
  if images.shape[0] == 0:
    raise InputError(
      f'{source}: no images (shape {images.shape}), expected {expected} '
      'with N > 0.'
    )
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 255.0
  if not np.issubdtype(images.dtype, np.floating):
    raise InputError(
      f'{source}: dtype {images.dtype}, expected uint8 (0-255) or float (0-1).'
    )
  if not np.all(np.isfinite(images)):
    raise InputError(
      f'{source}: contains NaN or infinite values; expected floats in [0, 1].'
    )
  if images.min() < 0.0 or images.max() > 1.0:
    raise InputError(
      f'{source}: float values in [{images.min():.3g}, {images.max():.3g}], '
      'expected [0, 1].'
    )
  return images.astype(np.float32)


def load(checkpoint: str):
  """(config, model, params) from a workdir or export; InputError if unusable."""
  try:
    return checkpointing.load_model(checkpoint)
  except checkpointing.CheckpointError as e:
    raise InputError(str(e)) from e


def modes(
  model, params, images: jax.Array, refine: refinement.Refiner | None = None
) -> air.AIROutput:
  """The posterior modes of `images`, refined (`refinement.refine`) if
  `refine` is given. To be refined, a sequential AIR computes every step
  (`skip_finished` off): the steps a batch would skip hold placeholders,
  and each absent step is a proposal the refinement may turn on, so an
  image's result would depend on the other images of its batch."""
  if refine is not None and isinstance(model, air.AIR):
    model = model.clone(skip_finished=False)
  out = model.apply({'params': params}, images, deterministic=True)
  if refine is not None:
    out = refinement.refine(model, params, images, out, refine)
  return out


_modes = jax.jit(modes, static_argnames=('model', 'refine'))


def infer_records(
  model,
  params,
  images: np.ndarray,
  batch_size: int = 256,
  refine: refinement.Refiner | None = None,
) -> list[dict[str, Any]]:
  """AIR's reading of each image as JSON-ready records.

  Posterior modes are used (z_pres = q > 0.5, z_where = its mean), refined
  if `refine` is given.

  Args:
    model: AIR module.
    params: its parameters.
    images: [M, H, W] float32 in [0, 1].
    batch_size: images per forward pass.
    refine: optional `refinement.Refiner`.

  Returns:
    One record per image: {"index", "count", "objects": [{"step",
    "z_pres_prob", "box", "window"}]}: `box` is the box of the input's
    ink the object explains (`air.ink_boxes`), `window` its square
    attention window, both [top, left, height, width] in pixel coordinates
    of the input (pixel i spans [i, i + 1]). `box` is cut to the image;
    `window` is not.
  """
  records = []
  for lo in range(0, len(images), batch_size):
    batch = jnp.asarray(images[lo : lo + batch_size])
    out = _modes(model, params, batch, refine)
    size = tuple(images.shape[1:])
    windows = np.stack(
      spatial_transformer.z_where_to_box(out.z_where, size), -1
    )
    boxes = _clip_boxes(np.asarray(air.ink_boxes(out, batch)), size)
    out = jax.device_get(out)
    for i in range(len(out.z_pres)):
      objects = [
        {
          'step': int(t),
          'z_pres_prob': float(out.z_pres_prob[i, t]),
          'box': [float(v) for v in boxes[i, t]],
          'window': [float(v) for v in windows[i, t]],
        }
        for t in range(out.z_pres.shape[1])
        if out.z_pres[i, t] > 0.5
      ]
      records.append(
        {'index': lo + i, 'count': len(objects), 'objects': objects}
      )
  return records


def _clip_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[..., 4] boxes cut to the image [0, H] x [0, W]: only pixels inside it
  are rendered (a box wholly outside becomes empty, at the nearest edge)."""
  top, left, height, width = np.moveaxis(boxes, -1, 0)
  top2, left2 = np.clip(top, 0, size[0]), np.clip(left, 0, size[1])
  bottom = np.clip(top + height, 0, size[0])
  right = np.clip(left + width, 0, size[1])
  return np.stack([top2, left2, bottom - top2, right - left2], axis=-1)


def infer(checkpoint: str, images: np.ndarray) -> list[dict[str, Any]]:
  """Loads a checkpoint and returns `infer_records` for `images`.

  Args:
    checkpoint: a training workdir or a params export (config.json inside).
    images: [M, H, W] uint8 (0-255) or float (0-1).
  """
  config, model, params = load(checkpoint)
  images = check_images(images, config.model.image_size)
  return infer_records(model, params, images)


PICTURE_NAME = re.compile(r'\d{5,}\.png')


def is_pictures_folder(directory: str) -> bool:
  """Whether a folder holds only pictures `write_pictures` names (so an
  earlier output may be replaced by a new one)."""
  try:
    names = os.listdir(directory)
  except OSError:
    return False
  return all(
    PICTURE_NAME.fullmatch(n) and os.path.isfile(os.path.join(directory, n))
    for n in names
  )


def render_pictures(
  model,
  params,
  images: np.ndarray,
  directory: str,
  batch_size: int = 256,
  refine: refinement.Refiner | None = None,
) -> list[str]:
  """Writes `00000.png`, ... (each present step's window drawn on the
  input) into the existing folder `directory` (modes refined if `refine`
  is given)."""
  paths = []
  for lo in range(0, len(images), batch_size):
    batch = images[lo : lo + batch_size]
    out = jax.device_get(_modes(model, params, jnp.asarray(batch), refine))
    for i in range(len(batch)):
      pic = visualization.draw_boxes(batch[i], out.z_pres[i], out.z_where[i])
      path = os.path.join(directory, f'{lo + i:05d}.png')
      visualization.save_png(path, pic)
      paths.append(path)
  return paths


def write_pictures(
  model,
  params,
  images: np.ndarray,
  directory: str,
  refine: refinement.Refiner | None = None,
) -> list[str]:
  """One PNG per image with each present step's window drawn on the input.

  The pictures are written into a temp folder beside `directory`, which is
  renamed to `directory` when all are done: `directory` must not exist, or
  be empty, or hold only an earlier output (`is_pictures_folder`), which is
  then replaced. `refine`: see `infer_records`.
  """
  with files.temp_dir_beside(directory) as tmp:
    render_pictures(model, params, images, tmp, refine=refine)
    files.publish_dir(tmp, directory, may_replace=is_pictures_folder)
  return [os.path.join(directory, f'{i:05d}.png') for i in range(len(images))]


def records_json(records) -> str:
  return json.dumps(records, indent=1)


def write_json(records, path: str) -> None:
  """Writes records atomically (a temp file renamed into place)."""
  files.write_text(path, records_json(records))
