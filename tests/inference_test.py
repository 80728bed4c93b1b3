"""experiments.infer and air_jax.inference: records, boxes, bad input."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from air_jax import air
from air_jax import checkpointing
from air_jax import configuration
from air_jax import inference
from air_jax import spatial_transformer
from air_jax.cli import infer as infer_cli
from air_jax.cli import refine as refine_cli
from air_jax.configs import test as test_config
from tests import helpers


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
  """A params export of a (randomly initialised) tiny model."""
  config = test_config.get_config()
  model = configuration.create_model(config)
  params = air.init_params(model, 0)
  directory = tmp_path_factory.mktemp('export')
  checkpointing.save_params(params, str(directory), config)
  return directory


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(0)
  return (rng.random((5, 50, 50)) * 255).astype(np.uint8)


def test_records_schema_and_boxes(export_dir, images):
  records = inference.infer(str(export_dir), images)
  assert [r['index'] for r in records] == list(range(5))
  config, model, params = checkpointing.load_model(str(export_dir))
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
      assert set(obj) == {'step', 'z_pres_prob', 'box', 'window'}
      s, x, y = z_where[obj['step']]
      # The documented convention: half-width 1/s around (x, y) in [-1, 1].
      expected = [(y - 1 / s + 1) * 25, (x - 1 / s + 1) * 25, 50 / s, 50 / s]
      np.testing.assert_allclose(obj['window'], expected, rtol=1e-4, atol=1e-3)
      # The box of the ink it explains (or of its drawing): inside the image
      # and inside the window, up to the bilinear smear of one pixel.
      top, left, height, width = obj['box']
      assert height >= 0 and width >= 0
      if height > 0:
        assert -1e-3 <= top and top + height <= 50 + 1e-3
        assert -1e-3 <= left and left + width <= 50 + 1e-3
        w_top, w_left, w_height, w_width = obj['window']
        assert w_top - 1 <= top and top + height <= w_top + w_height + 1
        assert w_left - 1 <= left and left + width <= w_left + w_width + 1
      assert height <= obj['window'][2] + 1 and width <= obj['window'][3] + 1
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
    cwd=helpers.REPO,
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
  path = helpers.bad_images(case, tmp_path, (50, 50))
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
  (other / checkpointing.PARAMS_FILE).write_bytes(
    (export_dir / checkpointing.PARAMS_FILE).read_bytes()
  )
  config = test_config.get_config()
  config.model.lstm_size = 48
  checkpointing.save_config(config, str(other))
  with pytest.raises(inference.InputError, match='does not fit'):
    inference.load(str(other))
  proc = _run_infer(other, npz, tmp_path / 'o2.json')
  assert proc.returncode != 0 and 'does not fit' in proc.stderr
  assert not (tmp_path / 'o2.json').exists()


def test_max_steps_can_be_raised_or_lowered_at_inference(tmp_path):
  """The recurrence's parameters are shared over steps: the shipped DAIR,
  trained with 3 steps, runs with 1 or 5 without retraining."""
  data = np.load(helpers.TESTDATA / 'pretrained_images.npz')
  path = tmp_path / 'images.npy'
  np.save(path, data['test_3_images'])
  counts = {}
  for steps in (1, 3, 5):
    records = infer_cli.infer(
      str(helpers.REPO / 'pretrained' / 'dair'),
      str(path),
      str(tmp_path / f'out{steps}.json'),
      max_steps=steps,
    )
    counts[steps] = np.array([r['count'] for r in records])
    assert all(o['step'] < steps for r in records for o in r['objects'])
  assert counts[1].max() == 1
  # More steps never read fewer objects: z_pres stops at the first 0.
  assert np.all(counts[5] >= counts[3]) and np.all(counts[3] >= counts[1])
  # Trained on 0-2 digits, DAIR counts most 3-digit images right.
  assert np.mean(counts[3] == data['test_3_counts']) >= 0.8
  with pytest.raises(SystemExit):
    infer_cli.infer(
      str(helpers.REPO / 'pretrained' / 'dair'),
      str(path),
      str(tmp_path / 'bad.json'),
      max_steps=0,
    )
  assert not (tmp_path / 'bad.json').exists()


# --- Refined modes of a sequential AIR -------------------------------------


def test_air_objects_at_are_what_its_steps_infer_and_draw():
  config = test_config.get_config()
  # Every step computed, so that each holds its own object.
  model = configuration.create_model(config).clone(skip_finished=False)
  params = air.init_params(model, 0)
  images = helpers.inked_images(4)
  out = helpers.apply_jitted(model, params, images, deterministic=True)
  what_q, windows = jax.jit(
    lambda p, x, z: model.apply({'params': p}, x, z, method='objects_at')
  )(params, images, out.z_where)
  np.testing.assert_allclose(what_q.loc, out.z_what_loc, atol=1e-5)
  np.testing.assert_allclose(what_q.scale, out.z_what_scale, atol=1e-5)
  np.testing.assert_allclose(windows, out.windows, atol=1e-5)
  with pytest.raises(ValueError, match='needs z_pres'):
    model.clone(difference=True).apply(
      {'params': params}, images, out.z_where, method='objects_at'
    )


def test_dair_objects_at_read_the_image_minus_the_present_steps_before():
  config = test_config.get_config()
  config.model.difference = True
  model = configuration.create_model(config).clone(skip_finished=False)
  params = air.init_params(model, 1)
  images = helpers.inked_images(3, seed=3)
  out = helpers.apply_jitted(model, params, images, deterministic=True)
  z_where = out.z_where

  def objects_at(z_pres):
    return jax.jit(
      lambda p, x, z, pres: model.apply(
        {'params': p}, x, z, pres, method='objects_at'
      )
    )(params, images, z_where, z_pres)

  # At the modes (steps once absent stay absent): what the steps inferred.
  what_q, windows = objects_at(out.z_pres)
  np.testing.assert_allclose(what_q.loc, out.z_what_loc, atol=1e-5)
  np.testing.assert_allclose(windows, out.windows, atol=1e-5)

  # Any z_pres, against the rule written out step by step: present steps
  # 0 and 2 read the image minus the present drawings before them, the
  # absent step 1 the image minus both.
  def encode(glimpse):
    return model.apply(
      {'params': params}, glimpse, method=lambda m, g: m.cell.encoder(g)
    )

  def draw(what, where):
    window = model.apply(
      {'params': params}, what, method=lambda m, w: m.decoder(w)
    )
    return window, spatial_transformer.window_to_image(window, where, (50, 50))

  def read(source, t):
    q = encode(
      spatial_transformer.image_to_window(source, z_where[:, t], (28, 28))
    )
    return q, *draw(q.loc, z_where[:, t])

  q0, w0, drawn0 = read(images, 0)
  q2, w2, drawn2 = read(images - drawn0, 2)
  q1, w1, _ = read(images - drawn0 - drawn2, 1)
  what_q, windows = objects_at(jnp.asarray([[1.0, 0.0, 1.0]] * 3))
  for t, (q, w) in enumerate(((q0, w0), (q1, w1), (q2, w2))):
    np.testing.assert_allclose(what_q.loc[:, t], q.loc, atol=1e-5)
    np.testing.assert_allclose(what_q.scale[:, t], q.scale, atol=1e-5)
    np.testing.assert_allclose(windows[:, t], w, atol=1e-5)


def test_present_first_reorders_steps_and_keeps_the_canvas():
  rng = np.random.default_rng(1)
  b, n, d, size = 3, 4, 2, (20, 24)
  z_pres = jnp.asarray([[0, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]], jnp.float32)
  z_where = jnp.asarray(
    np.concatenate(
      [rng.uniform(2, 4, (b, n, 1)), rng.uniform(-0.5, 0.5, (b, n, 2))], -1
    ),
    jnp.float32,
  )
  windows = jnp.asarray(rng.random((b, n, 6, 6)), jnp.float32)

  def per_step(k):
    return jnp.asarray(rng.normal(size=(b, n, k)), jnp.float32)

  out = air.AIROutput(
    z_pres=z_pres,
    z_pres_prob=jnp.asarray(rng.random((b, n)), jnp.float32),
    mask=jnp.ones((b, n)),
    z_where=z_where,
    z_where_loc=z_where,
    z_where_scale=per_step(3),
    z_what=per_step(d),
    z_what_loc=per_step(d),
    z_what_scale=per_step(d),
    windows=windows,
    canvas=spatial_transformer.windows_to_canvas(
      windows, z_where, z_pres, size
    ),
    baseline=jnp.zeros((b, n)),
  )
  first = air.present_first(out)
  # Present steps first, each group in step order.
  order = np.asarray([[1, 3, 0, 2], [0, 1, 2, 3], [0, 1, 2, 3]])
  for name in out._fields:
    if name not in ('canvas', 'mask'):
      want = np.take_along_axis(
        np.asarray(getattr(out, name)),
        order.reshape(*order.shape, *[1] * (getattr(out, name).ndim - 2)),
        axis=1,
      )
      np.testing.assert_array_equal(getattr(first, name), want, err_msg=name)
  np.testing.assert_array_equal(
    first.mask, [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
  )
  np.testing.assert_allclose(
    spatial_transformer.windows_to_canvas(
      first.windows, first.z_where, first.z_pres, size
    ),
    out.canvas,
    atol=1e-5,
  )


def test_refined_air_records_library_equals_cli(export_dir, images, tmp_path):
  config, model, params = inference.load(str(export_dir))
  npz = tmp_path / 'images.npz'
  np.savez(npz, images=images)
  floats = images.astype(np.float32) / 255.0
  for flips, rounds in ((3, 0), (3, 1)):
    refine = refine_cli.refiner(config, flips, rounds)
    records = inference.infer_records(model, params, floats, refine=refine)
    records_cli = infer_cli.infer(
      str(export_dir),
      str(npz),
      str(tmp_path / f'{rounds}.json'),
      refine_flips=flips,
      refine_rounds=rounds,
    )
    assert records_cli == records
    for record in records:  # Objects are the first steps.
      assert [o['step'] for o in record['objects']] == list(
        range(record['count'])
      )


def test_refined_air_modes_of_an_image_do_not_depend_on_its_batch():
  # Half the images empty: a batch of one empty image stops at step 1, and
  # without every step computed its later steps would be placeholders,
  # where in a batch with inked images they are the network's proposals
  # (absent ones too, which the refinement moves and may turn on).
  config = test_config.get_config()
  model = configuration.create_model(config)
  params = air.init_params(model, 0)
  images = np.array(helpers.inked_images(6, seed=3))
  images[::2] = 0.0
  refine = refine_cli.refiner(config, 3, 1)
  # Jitted: two compiles (batches of 6 and 1), not one per call.
  modes = jax.jit(inference.modes, static_argnames=('model', 'refine'))
  together = modes(model, params, jnp.asarray(images), refine)
  for i in range(len(images)):
    alone = modes(model, params, jnp.asarray(images[i : i + 1]), refine)
    np.testing.assert_array_equal(alone.z_pres[0], together.z_pres[i])
    np.testing.assert_allclose(
      alone.z_where[0], together.z_where[i], atol=1e-4, err_msg=str(i)
    )
