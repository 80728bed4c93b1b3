"""experiments.infer and air_jax.inference: records, boxes, bad input."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from air_jax import inference
from air_jax import train
from configs import test as test_config
from tests import conftest


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
  """A params export of a (randomly initialised) tiny model."""
  config = test_config.get_config()
  model = train.create_model(config)
  params = train.init_params(model, 0, 50)
  directory = tmp_path_factory.mktemp('export')
  train.save_params(params, str(directory), config)
  return directory


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  return (rng.random((5, 50, 50)) * 255).astype(np.uint8)


def test_records_schema_and_boxes(export_dir, images):
  records = inference.infer(str(export_dir), images)
  assert [r['index'] for r in records] == list(range(5))
  config, model, params = train.load_model(str(export_dir))
  out = model.apply(
    {'params': params},
    jnp.asarray(images / 255.0, jnp.float32),
    deterministic=True,
    rngs={'sample': jax.random.key(0)},
  )
  for r, z_pres, probs, z_where in zip(
    records,
    np.asarray(out.z_pres),
    np.asarray(out.z_pres_prob),
    np.asarray(out.z_where),
  ):
    assert set(r) == {'index', 'count', 'objects'}
    assert r['count'] == len(r['objects']) == int(z_pres.sum())
    for obj in r['objects']:
      assert set(obj) == {'step', 'z_pres_prob', 'box'}
      s, x, y = z_where[obj['step']]
      # The documented convention: half-width 1/s around (x, y) in [-1, 1].
      expected = [(y - 1 / s + 1) * 25, (x - 1 / s + 1) * 25, 50 / s, 50 / s]
      np.testing.assert_allclose(obj['box'], expected, rtol=1e-4, atol=1e-3)
      assert obj['z_pres_prob'] == pytest.approx(
        float(probs[obj['step']]), rel=1e-6
      )
      assert obj['z_pres_prob'] > 0.5


def _run_infer(checkpoint, images_path, output, *extra):
  return subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.infer',
      f'--checkpoint={checkpoint}',
      f'--images={images_path}',
      f'--output={output}',
      *extra,
    ],
    cwd=conftest.REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_binary_on_npz_and_png_folder(export_dir, images, tmp_path):
  npz = tmp_path / 'in.npz'
  np.savez(npz, images=images)
  folder = tmp_path / 'pngs'
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'{i}.png')
  out_npz, out_png = tmp_path / 'a.json', tmp_path / 'b.json'
  proc = _run_infer(export_dir, npz, out_npz, f'--pictures={tmp_path / "pics"}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  proc = _run_infer(export_dir, folder, out_png)
  assert proc.returncode == 0, proc.stderr[-2000:]
  a, b = json.loads(out_npz.read_text()), json.loads(out_png.read_text())
  assert len(a) == 5 and a == b
  assert len(list((tmp_path / 'pics').glob('*.png'))) == 5


@pytest.mark.parametrize(
  'case', ['shape', 'dtype', 'nan', 'range', 'empty', 'no_key']
)
def test_bad_images_are_refused(export_dir, tmp_path, case):
  path = tmp_path / 'bad.npz'
  good = np.zeros((2, 50, 50), np.float32)
  if case == 'shape':
    np.savez(path, images=np.zeros((2, 40, 50), np.float32))
  elif case == 'dtype':
    np.savez(path, images=good.astype(np.int64))
  elif case == 'nan':
    good[0, 0, 0] = np.nan
    np.savez(path, images=good)
  elif case == 'range':
    np.savez(path, images=good + 1.5)
  elif case == 'empty':
    path.write_bytes(b'')
  elif case == 'no_key':
    np.savez(path, pixels=good)
  with pytest.raises(inference.InputError):
    inference.load_images(str(path))
  out = tmp_path / 'out.json'
  proc = _run_infer(export_dir, path, out)
  assert proc.returncode != 0
  message = proc.stderr.strip().splitlines()[-1]
  assert message.startswith('error:') and 'expected' in message, proc.stderr
  assert not out.exists()


def test_bad_checkpoints_are_refused(export_dir, tmp_path, images):
  npz = tmp_path / 'in.npz'
  np.savez(npz, images=images)
  # Missing checkpoint.
  proc = _run_infer(tmp_path / 'nowhere', npz, tmp_path / 'o1.json')
  assert proc.returncode != 0 and 'error:' in proc.stderr
  assert not (tmp_path / 'o1.json').exists()
  # A checkpoint whose parameters belong to another config.
  other = tmp_path / 'other'
  other.mkdir()
  (other / train.PARAMS_FILE).write_bytes(
    (export_dir / train.PARAMS_FILE).read_bytes()
  )
  config = test_config.get_config()
  config.model.lstm_size = 48
  train.save_config(config, str(other))
  with pytest.raises(inference.InputError, match='does not fit'):
    inference.load(str(other))
  proc = _run_infer(other, npz, tmp_path / 'o2.json')
  assert proc.returncode != 0 and 'does not fit' in proc.stderr
  assert not (tmp_path / 'o2.json').exists()
