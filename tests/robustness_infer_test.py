"""air-infer against bad input and faults: one line, exit 1, nothing written.

Most cases call `air_jax.cli.infer.infer` (the program without its flag
parsing) in-process: a refusal is `SystemExit(1)` with one `error:` line on
stderr. A few run the real binary in subprocesses to check that stderr is
exactly one line there too (JAX, orbax and absl stay quiet).
"""

import hashlib
import io
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import zipfile
import zlib

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from air_jax import air
from air_jax import checkpointing
from air_jax import configuration
from air_jax import files
from air_jax import inference
from air_jax.cli import infer
from air_jax.configs import test as test_config
from tests import helpers

# --- Shared helpers (robustness_evaluate_test uses them too) --------------


def tree_digest(root) -> dict[str, str]:
  """{relative path: sha256 (files) or 'dir'} of everything under root."""
  root = pathlib.Path(root)
  out = {}
  for path in sorted(root.rglob('*')):
    rel = str(path.relative_to(root))
    if path.is_symlink() or not (path.is_file() or path.is_dir()):
      out[rel] = 'special'
    elif path.is_dir():
      out[rel] = 'dir'
    else:
      out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
  return out


def refused(capsys, fn, *args, **kwargs) -> str:
  """Calls a program function that must refuse: returns its one line."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    fn(*args, **kwargs)
  err = capsys.readouterr().err
  assert exit_info.value.code == 1, err
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  return lines[0]


def make_run(directory, config, params, steps, nan_steps=()) -> None:
  """A workdir: config.json and orbax checkpoints of `params` at `steps`
  (those in `nan_steps` made NaN), written with plain orbax (our manager
  refuses non-finite states)."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  checkpointing.save_config(config, str(directory))
  host = jax.tree.map(np.asarray, jax.device_get(params))
  with ocp.CheckpointManager(
    os.path.abspath(directory / checkpointing.CHECKPOINT_DIR),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=None, enable_async_checkpointing=False
    ),
  ) as manager:
    for step in steps:
      tree = host
      if step in nan_steps:
        tree = jax.tree.map(lambda x: np.full_like(x, np.nan), host)
      state = {
        'step': np.int32(step),
        'params': tree,
        'opt_state': {'mu': jax.tree.map(np.zeros_like, tree)},
      }
      manager.save(step, args=ocp.args.StandardSave(state))


def damage_step(run_dir, step) -> None:
  """Truncates every data file of a checkpoint step (a crash mid-copy)."""
  folder = pathlib.Path(run_dir) / checkpointing.CHECKPOINT_DIR / str(step)
  data = [p for p in folder.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert data, list(folder.rglob('*'))
  for path in data:
    with open(path, 'r+b') as f:
      f.truncate(min(64, path.stat().st_size // 2))


def no_temp_files(root) -> None:
  left = [
    p for p in pathlib.Path(root).rglob('*') if files.TEMP_PREFIX in p.name
  ]
  assert not left, left


# --- Fixtures --------------------------------------------------------------


@pytest.fixture(scope='module')
def model_setup():
  config = test_config.get_config()
  model = configuration.create_model(config)
  params = air.init_params(model, 0)
  return config, params


@pytest.fixture(scope='module')
def shape(model_setup):
  return inference.image_shape(model_setup[0].model.image_size)


@pytest.fixture(scope='module')
def originals(tmp_path_factory, model_setup):
  """An export and a workdir (checkpoints 1, 2), built once; tests copy."""
  config, params = model_setup
  root = tmp_path_factory.mktemp('originals')
  checkpointing.save_params(params, str(root / 'export'), config)
  make_run(root / 'run', config, params, steps=(1, 2))
  make_run(root / 'nan_run', config, params, steps=(1, 2), nan_steps=(1, 2))
  make_run(root / 'nan_newest', config, params, steps=(1, 2), nan_steps=(2,))
  return root


@pytest.fixture
def work(tmp_path, originals, shape):
  """tmp_path holding copies of the originals and good images."""
  for name in ('export', 'run', 'nan_run', 'nan_newest'):
    shutil.copytree(originals / name, tmp_path / name)
  rng = np.random.default_rng(0)
  images = (rng.random((3, *shape)) * 255).astype(np.uint8)
  np.savez(tmp_path / 'images.npz', images=images)
  return tmp_path


# --- PNG and array readers -------------------------------------------------


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


def _png_cases(h, w):
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


def test_png_bit_depths_and_layouts_are_exact_or_refused(tmp_path, shape):
  h, w = shape
  for name, (data, want) in _png_cases(h, w).items():
    path = tmp_path / f'{name}.png'
    path.write_bytes(data)
    if want is None:
      with pytest.raises(inference.InputError, match=name + '.png'):
        inference.load_images(str(path), shape)
    else:
      got = inference.load_images(str(path), shape)
      np.testing.assert_array_equal(got[0], np.float32(want), err_msg=name)


def test_png_size_claims_are_refused_before_decoding(
  tmp_path, shape, monkeypatch
):
  path = tmp_path / 'huge.png'
  # A header claiming 10^6 x 10^6 pixels (a terabyte), with a tiny body.
  path.write_bytes(png_bytes([[0]], 8, 0, width=10**6, height=10**6))
  monkeypatch.setattr(
    Image, 'open', lambda *a, **k: pytest.fail('decoded a refused PNG')
  )
  with pytest.raises(inference.InputError, match='1000000x1000000'):
    inference.load_images(str(path), shape)


class _Marker:
  """Unpickling this touches a file: proof that something was unpickled."""

  def __init__(self, path):
    self.path = pathlib.Path(path)

  def __reduce__(self):
    return (pathlib.Path.touch, (self.path,))


def _forged_npy(shape_claim, dtype='|u1') -> bytes:
  header = {'descr': dtype, 'fortran_order': False, 'shape': shape_claim}
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, header)
  return buffer.getvalue() + b'\0' * 64


def _bad_images(case, directory, shape):
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
    array[0, 0, 0] = _Marker(marker)
    np.savez(path, images=array)
  elif case == 'object_npy':
    path = directory / 'object.npy'
    array = np.empty((1, h, w), object)
    array[0, 0, 0] = _Marker(marker)
    np.save(path, array)
  elif case == 'huge_npy':
    path = directory / 'huge.npy'
    path.write_bytes(_forged_npy((10**9, h, w)))
  elif case == 'huge_npz':
    with zipfile.ZipFile(path, 'w') as archive:
      archive.writestr('images.npy', _forged_npy((10**9, h, w)))
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
    path.write_bytes(_png_cases(h, w)['rgb_colour'][0])
  elif case == 'png_huge_claim':
    path = directory / 'huge.png'
    path.write_bytes(png_bytes([[0]], 8, 0, width=10**6, height=10**6))
  elif case == 'fifo':
    path = directory / 'fifo.npy'
    os.mkfifo(path)
  else:
    raise ValueError(case)
  return path


BAD_IMAGES = [
  'missing',
  'empty',
  'shape',
  'dtype',
  'nan',
  'range',
  'no_key',
  'no_images',
  'object_npz',
  'object_npy',
  'huge_npy',
  'huge_npz',
  'truncated_npy',
  'truncated_npz',
  'garbage_npz',
  'not_an_array',
  'png_folder_empty',
  'png_folder_mixed_sizes',
  'png_colour',
  'png_huge_claim',
  'fifo',
]


@pytest.mark.parametrize('case', BAD_IMAGES)
def test_bad_images_one_line_nothing_written(work, shape, capsys, case):
  bad_dir = work / 'bad'
  bad_dir.mkdir()
  path = _bad_images(case, bad_dir, shape)
  before = tree_digest(work)
  out = work / 'out.json'
  pictures = work / 'pictures'
  line = refused(
    capsys,
    infer.infer,
    str(work / 'export'),
    str(path),
    str(out),
    str(pictures),
  )
  assert path.name in line, line
  assert tree_digest(work) == before  # Nothing written, nothing changed.
  assert not (bad_dir / 'UNPICKLED').exists()  # Never unpickled.


def test_huge_claims_are_refused_before_allocating(work, shape, monkeypatch):
  for case in ('huge_npy', 'huge_npz'):
    path = _bad_images(case, work, shape)
    monkeypatch.setattr(
      np.lib.format,
      'read_array',
      lambda *a, **k: pytest.fail('read a refused array'),
    )
    with pytest.raises(inference.InputError, match='GiB'):
      inference.load_images(str(path), shape)


# --- Paths -----------------------------------------------------------------


def test_outputs_that_are_inputs_or_not_files_are_refused(work, capsys):
  images = work / 'images.npz'
  export = work / 'export'
  folder = work / 'pngs'
  folder.mkdir()
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / '0.png')
  (work / 'foreign').mkdir()
  (work / 'foreign' / 'keep.txt').write_text('mine')
  (work / 'a_file').write_text('mine')
  (work / 'empty').mkdir()
  os.mkfifo(work / 'fifo')
  (work / 'link.json').symlink_to(images)
  before = tree_digest(work)
  run = str(export)
  cases = [
    # (images, output, pictures, what the line says)
    (images, images, None, 'is an input'),
    (images, work / 'link.json', None, 'is an input'),
    (images, export / checkpointing.CONFIG_FILE, None, 'is an input'),
    (images, export / checkpointing.PARAMS_FILE, None, 'is an input'),
    (folder, folder / '0.png', None, 'is an input'),
    (images, work, None, 'is a folder'),
    (images, work / 'fifo', None, 'not a regular file'),
    (images, work / 'nowhere' / 'out.json', None, 'does not exist'),
    (images, work / 'a_file' / 'out.json', None, 'does not exist'),
    (folder, work / 'out.json', folder, 'holds other files'),
    (images, work / 'out.json', work / 'foreign', 'holds other files'),
    (images, work / 'out.json', work / 'a_file', 'not a folder'),
    (images, work / 'out.json', export, 'holds other files'),
    (images, work / 'empty' / 'out.json', work / 'empty', 'lies in'),
  ]
  for source, output, pictures, says in cases:
    line = refused(
      capsys,
      infer.infer,
      run,
      str(source),
      str(output),
      str(pictures) if pictures else None,
    )
    assert says in line, (output, line)
  assert tree_digest(work) == before
  no_temp_files(work)


# --- Checkpoints -----------------------------------------------------------


def _write_nan_export(directory):
  path = directory / checkpointing.PARAMS_FILE
  raw = flax.serialization.msgpack_restore(path.read_bytes())
  raw = jax.tree.map(lambda x: np.full_like(x, np.nan), raw)
  path.write_bytes(flax.serialization.msgpack_serialize(raw))


def test_bad_checkpoints_are_refused(work, capsys):
  images = str(work / 'images.npz')
  out = work / 'out.json'
  export = work / 'export'
  # An export whose config.json is not JSON, has an unknown field, or a
  # negative size; a params file that is garbage; parameters that are NaN.
  broken = {}
  for name in ('not_json', 'unknown_field', 'bad_value', 'garbage', 'nan'):
    broken[name] = work / name
    shutil.copytree(export, broken[name])
  config_path = checkpointing.CONFIG_FILE
  (broken['not_json'] / config_path).write_text('{"model": ')
  config = json.loads((export / config_path).read_text())
  (broken['unknown_field'] / config_path).write_text(
    json.dumps({**config, 'lerning_rate': 1.0})
  )
  config['model']['lstm_size'] = -3
  (broken['bad_value'] / config_path).write_text(json.dumps(config))
  (broken['garbage'] / checkpointing.PARAMS_FILE).write_bytes(b'\x93garbage')
  _write_nan_export(broken['nan'])
  before = tree_digest(work)
  expectations = {
    'not_json': 'unreadable config',
    'unknown_field': 'lerning_rate',
    'bad_value': 'lstm_size',
    'garbage': 'unreadable',
    'nan': 'NaN',
  }
  for name, says in expectations.items():
    line = refused(capsys, infer.infer, str(broken[name]), images, str(out))
    assert says in line, (name, line)
  line = refused(capsys, infer.infer, str(work / 'nowhere'), images, str(out))
  assert 'no such file' in line
  # A workdir whose every checkpoint holds NaN parameters.
  line = refused(capsys, infer.infer, str(work / 'nan_run'), images, str(out))
  assert 'step 2' in line and 'step 1' in line and 'NaN' in line, line
  assert tree_digest(work) == before


def test_damaged_or_nan_newest_checkpoint_falls_back(work, caplog):
  images = str(work / 'images.npz')
  damage_step(work / 'run', 2)
  for name in ('run', 'nan_newest'):
    before = tree_digest(work / name)
    out = work / f'{name}.json'
    caplog.clear()
    with caplog.at_level('WARNING'):
      records = infer.infer(str(work / name), images, str(out))
    assert len(records) == 3 and json.loads(out.read_text()) == records
    warnings = [
      r.getMessage() for r in caplog.records if r.levelname == 'WARNING'
    ]
    assert len(warnings) == 1, warnings
    assert 'step 2 is damaged' in warnings[0], warnings
    assert 'using step 1' in warnings[0], warnings
    assert tree_digest(work / name) == before  # A reader moves nothing.
  no_temp_files(work)


# --- Outputs ---------------------------------------------------------------


def test_json_and_pictures_appear_together(work, capsys, monkeypatch):
  images = str(work / 'images.npz')
  export = str(work / 'export')
  out, pictures = work / 'out.json', work / 'pictures'
  records = infer.infer(export, images, str(out), str(pictures))
  assert json.loads(out.read_text()) == records
  names = sorted(p.name for p in pictures.iterdir())
  assert names == ['00000.png', '00001.png', '00002.png']
  no_temp_files(work)
  # A second run replaces an earlier output folder of pictures.
  infer.infer(export, images, str(out), str(pictures))
  assert sorted(p.name for p in pictures.iterdir()) == names
  # A disk that fills up while the pictures are drawn: neither output
  # changes, no temp file or folder is left.
  before = tree_digest(work)
  calls = []

  def full_disk(path, image):
    calls.append(path)
    if len(calls) > 1:
      raise OSError(28, 'No space left on device', path)
    files.write_bytes(path, b'partial')

  monkeypatch.setattr(inference.visualization, 'save_png', full_disk)
  line = refused(
    capsys,
    infer.infer,
    export,
    images,
    str(work / 'new.json'),
    str(work / 'new'),
  )
  assert 'No space left' in line
  assert tree_digest(work) == before
  assert not (work / 'new.json').exists() and not (work / 'new').exists()
  line = refused(capsys, infer.infer, export, images, str(out), str(pictures))
  assert tree_digest(work) == before
  no_temp_files(work)


def test_a_failed_run_leaves_an_earlier_output_whole(work, shape, capsys):
  out = work / 'out.json'
  out.write_text('[{"earlier": true}]')
  bad = _bad_images('nan', work, shape)
  refused(capsys, infer.infer, str(work / 'export'), str(bad), str(out))
  assert out.read_text() == '[{"earlier": true}]'


# --- The real binary: stderr is one line -----------------------------------


def _binary(checkpoint, images, output):
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'experiments.infer',
      f'--checkpoint={checkpoint}',
      f'--images={images}',
      f'--output={output}',
    ],
    cwd=helpers.REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_binary_stderr_is_one_line(work, shape):
  bad = _bad_images('object_npz', work, shape)
  damage_step(work / 'run', 2)
  images = work / 'images.npz'
  runs = {  # Started together: the machine has few cores to wait on.
    'bad_images': _binary(work / 'export', bad, work / 'a.json'),
    'nan_checkpoint': _binary(work / 'nan_run', images, work / 'b.json'),
    'damaged_newest': _binary(work / 'run', images, work / 'c.json'),
    'bad_flag': _binary(work / 'export', images, ''),
  }
  results = {name: p.communicate(timeout=300) for name, p in runs.items()}
  codes = {name: p.returncode for name, p in runs.items()}
  for name in ('bad_images', 'nan_checkpoint', 'bad_flag'):
    err = results[name][1]
    assert codes[name] == 1, (name, err)
    assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  err = results['damaged_newest'][1]
  assert codes['damaged_newest'] == 0, err
  assert len(err.splitlines()) == 1, err
  assert 'step 2 is damaged' in err and 'using step 1' in err, err
  assert not (work / 'a.json').exists() and not (work / 'b.json').exists()
  assert len(json.loads((work / 'c.json').read_text())) == 3
