"""air-infer against bad input and faults: one line, exit 1, nothing written.

Most cases call `air_jax.cli.infer.infer` (the program without its flag
parsing) in-process: a refusal is `SystemExit(1)` with one `error:` line on
stderr. A few run the real binary in subprocesses to check that stderr is
exactly one line there too (JAX, orbax and absl stay quiet).
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

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
  dair = config.copy_and_resolve_references()
  dair.model.difference = True  # DAIR: the same parameters.
  checkpointing.save_params(params, str(root / 'dair_export'), dair)
  return root


@pytest.fixture
def work(tmp_path, originals, shape):
  """tmp_path holding copies of the originals and good images."""
  for name in ('export', 'run', 'nan_run', 'nan_newest', 'dair_export'):
    shutil.copytree(originals / name, tmp_path / name)
  rng = np.random.default_rng(0)
  images = (rng.random((3, *shape)) * 255).astype(np.uint8)
  np.savez(tmp_path / 'images.npz', images=images)
  return tmp_path


# --- PNG and array readers -------------------------------------------------


def test_png_bit_depths_and_layouts_are_exact_or_refused(tmp_path, shape):
  h, w = shape
  for name, (data, want) in helpers.png_cases(h, w).items():
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
  path.write_bytes(helpers.png_bytes([[0]], 8, 0, width=10**6, height=10**6))
  monkeypatch.setattr(
    Image, 'open', lambda *a, **k: pytest.fail('decoded a refused PNG')
  )
  with pytest.raises(inference.InputError, match='1000000x1000000'):
    inference.load_images(str(path), shape)


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
  path = helpers.bad_images(case, bad_dir, shape)
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
    path = helpers.bad_images(case, work, shape)
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
  # --refine_flips, --refine_rounds, --refine_splits, --refine_split_gain
  # and --refine_drops: not negative (nor NaN), rounds only with flips,
  # splits and drops only with rounds.
  for model, flags, says in (
    ('export', dict(refine_flips=-1), '--refine_flips must be >= 0'),
    ('export', dict(refine_rounds=-1), '--refine_rounds must be >= 0'),
    ('export', dict(refine_rounds=2), '--refine_rounds needs --refine_flips'),
    ('export', dict(refine_splits=-1), '--refine_splits must be >= 0'),
    ('export', dict(refine_drops=-1), '--refine_drops must be >= 0'),
    (
      'export',
      dict(refine_flips=2, refine_drops=1),
      '--refine_drops needs --refine_rounds',
    ),
    (
      'export',
      dict(refine_flips=2, refine_rounds=1, refine_split_gain=float('nan')),
      '--refine_split_gain must be >= 0',
    ),
    (
      'export',
      dict(refine_flips=2, refine_splits=1),
      '--refine_splits needs --refine_rounds',
    ),
  ):
    line = refused(
      capsys, infer.infer, str(work / model), images, str(out), **flags
    )
    assert says in line, (flags, line)
  # A workdir whose every checkpoint holds NaN parameters.
  line = refused(capsys, infer.infer, str(work / 'nan_run'), images, str(out))
  assert 'step 2' in line and 'step 1' in line and 'NaN' in line, line
  assert tree_digest(work) == before


def test_dair_modes_are_refined_through_the_cli(work):
  out = work / 'dair.json'
  records = infer.infer(
    str(work / 'dair_export'),
    str(work / 'images.npz'),
    str(out),
    refine_flips=2,
    refine_rounds=1,
    refine_drops=1,
  )
  assert len(records) == 3 and json.loads(out.read_text()) == records
  for record in records:  # Present objects first, as a DAIR's steps are.
    assert [o['step'] for o in record['objects']] == list(
      range(record['count'])
    )


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
  bad = helpers.bad_images('nan', work, shape)
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
  bad = helpers.bad_images('object_npz', work, shape)
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
