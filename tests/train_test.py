"""The train step, the loop with checkpoints and resume, and data parallelism."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from air_jax import checkpointing
from air_jax import configuration
from air_jax import evaluation
from air_jax import inference
from air_jax import input_pipeline
from air_jax import sweep as sweep_lib
from air_jax import train
from air_jax.configs import test as test_config
from tests import helpers

REPO = helpers.REPO


def _tiny_config(data_dir=None):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.data.mnist_dir = (
    str(helpers.mnist_dir()) if helpers.mnist_dir() else None
  )
  return config


def test_one_train_step_is_finite_in_range_and_compiles_once():
  config = _tiny_config()
  model = configuration.create_model(config)
  state, tx = train.create_train_state(config, model)
  step_fn = helpers.train_step_fn(config, model, tx)

  # Named as the scanned-loop test's host step: the same program, which the
  # run's compilation cache (tests/conftest.py) then compiles once.
  @jax.jit
  @chex.assert_max_traces(n=1)
  def train_step(state, images):
    return step_fn(state, images)

  images = jax.random.uniform(jax.random.key(0), (8, 50, 50))
  for i in range(3):
    state, metrics = train_step(state, images * (0.5 + 0.1 * i))
  assert int(state.step) == 3 and int(state.num_skipped) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  metrics = jax.device_get(metrics)
  assert 0.0 <= metrics['mean_count'] <= config.model.max_steps
  for name in ('kl_pres', 'kl_where', 'kl_what', 'baseline_loss', 'grad_norm'):
    assert metrics[name] >= 0.0, name
  assert metrics['repulsion'] == 0.0  # Off in the default config.
  assert metrics['elbo'] == pytest.approx(
    metrics['log_likelihood']
    - metrics['kl_pres']
    - metrics['kl_where']
    - metrics['kl_what'],
    rel=1e-4,
    abs=1e-2,
  )
  assert metrics['z_pres_prior_prob'] == pytest.approx(
    config.z_pres_prior.final
  )


def test_the_optimiser_groups_the_baseline_by_its_key():
  config = _tiny_config()
  config.learning_rate = 0.0
  config.baseline_learning_rate = 1e-2
  model = configuration.create_model(config)
  state, tx = train.create_train_state(config, model)
  images = jax.random.uniform(jax.random.key(1), (8, 50, 50))
  new, _ = jax.jit(helpers.train_step_fn(config, model, tx))(state, images)
  for key in state.params:
    moved = any(
      not np.array_equal(a, b)
      for a, b in zip(
        jax.tree.leaves(state.params[key]), jax.tree.leaves(new.params[key])
      )
    )
    assert moved == (key == 'baseline'), key


def test_a_new_run_starts_from_another_runs_export(tmp_path):
  source = _tiny_config()
  source.seed = 7
  model = configuration.create_model(source)
  trained, _ = train.create_train_state(source, model)
  checkpointing.save_params(trained.params, str(tmp_path / 'export'), source)
  config = _tiny_config()
  config.init_from = str(tmp_path / 'export')
  config.init_step = 4
  _, state, tx = train.open_run(config, str(tmp_path / 'run'), False)
  fresh, _ = train.create_train_state(config, model)
  assert int(state.step) == 4
  for key in state.params:  # The export has no baseline network.
    want = fresh.params if key == 'baseline' else trained.params
    chex.assert_trees_all_close(state.params[key], want[key])
  chex.assert_trees_all_equal(state.opt_state, tx.init(state.params))
  # Once the run has a checkpoint it resumes from it; init_from is not read.
  manager = checkpointing.checkpoint_manager(str(tmp_path / 'run'))
  manager.save(5, args=ocp.args.StandardSave(state.replace(step=5)))
  manager.wait_until_finished()
  config.init_from = str(tmp_path / 'nowhere')
  _, resumed, _ = train.open_run(config, str(tmp_path / 'run'), True)
  assert int(resumed.step) == 5
  # Another model is refused by name.
  config.init_from = str(tmp_path / 'export')
  config.model.z_what_size = 5
  with pytest.raises(configuration.ConfigError, match='z_what_size'):
    train.open_run(config, str(tmp_path / 'other'), False)
  assert not (tmp_path / 'other').exists()  # Refused before writing.
  config.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(checkpointing.CheckpointError, match='nowhere'):
    train.open_run(config, str(tmp_path / 'other'), False)
  assert not (tmp_path / 'other').exists()


def test_non_finite_updates_are_skipped_and_counted():
  config = _tiny_config()
  model = configuration.create_model(config)
  state, tx = train.create_train_state(config, model)
  step = jax.jit(helpers.train_step_fn(config, model, tx))
  images = jnp.full((8, 50, 50), jnp.nan)
  new_state, metrics = step(state, images)
  assert (
    int(new_state.num_skipped) == 1 and int(new_state.consecutive_skipped) == 1
  )
  assert float(metrics['nonfinite']) == 1.0
  chex.assert_trees_all_equal(new_state.params, state.params)
  good, _ = step(new_state, jnp.full((8, 50, 50), 0.5))
  assert int(good.consecutive_skipped) == 0 and int(good.num_skipped) == 1


def test_batch_indices_are_the_host_pipelines_batches():
  rng = np.random.default_rng(0)
  split = input_pipeline.Split(
    images=rng.integers(0, 256, (50, 4, 4), dtype=np.uint8),
    num_objects=np.arange(50, dtype=np.int32),
    boxes=np.zeros((50, 3, 4), np.int32),
    labels=np.zeros((50, 3), np.int32),
  )
  # 6 steps per epoch of 8 (2 examples dropped); cross two epochs.
  indices = input_pipeline.batch_indices(
    seed=3, first_step=4, num_steps=5, batch_size=8, size=50
  )
  for k, step in enumerate(range(4, 9)):
    batch = input_pipeline.train_batch(split, 3, step, 8)
    np.testing.assert_array_equal(
      split.num_objects[indices[k]], batch.num_objects
    )


def test_scanned_device_loop_equals_the_host_loop():
  """K steps per dispatch, batches gathered on the device from uint8 data,
  give the parameters and losses of one step at a time on host batches."""
  config = _tiny_config()
  model = configuration.create_model(config)
  rng = np.random.default_rng(0)
  split = input_pipeline.Split(
    images=(rng.random((40, 50, 50)) ** 8 * 255).astype(np.uint8),
    num_objects=np.zeros(40, np.int32),
    boxes=np.zeros((40, 3, 4), np.int32),
    labels=np.zeros((40, 3), np.int32),
  )
  num_steps, k = 12, 4
  state, tx = train.create_train_state(config, model)
  step = jax.jit(helpers.train_step_fn(config, model, tx))
  host_losses = []
  for s in range(num_steps):
    batch = input_pipeline.train_batch(split, config.seed, s, 8)
    state, metrics = step(state, jnp.asarray(batch.images))
    host_losses.append(float(metrics['loss']))
  host_params = state.params

  state, tx = train.create_train_state(config, model)
  data = jnp.asarray(split.images)
  shape = jax.ShapeDtypeStruct((1, k, 8), jnp.int32)
  run = train.compile_train_steps(
    model,
    tx,
    configuration.loss_config(config),
    config.seed,
    1,
    state,
    data,
    shape,
  )
  device_losses = []
  for first in range(0, num_steps, k):
    idx = input_pipeline.batch_indices(config.seed, first, k, 8, split.size)
    state, metrics = run(state, data, idx[None])
    device_losses.append(float(metrics['loss']))
  assert int(state.step) == num_steps
  # Same math; XLA fuses the scanned program differently (float32 rounding).
  chex.assert_trees_all_close(state.params, host_params, atol=2e-4, rtol=1e-3)
  np.testing.assert_allclose(device_losses, host_losses[k - 1 :: k], rtol=1e-4)


def _params_of(workdir):
  _, _, params = checkpointing.load_model(str(workdir))
  return params


def _launch(workdir, data_dir, overrides, extra_env=None):
  """`python -m experiments.train` on the test config in a subprocess."""
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir), **(extra_env or {}))
  return subprocess.Popen(
    [
      sys.executable,
      '-m',
      'experiments.train',
      '--config=configs/test.py',
      f'--workdir={workdir}',
      f'--config.data.data_dir={data_dir}',
      *overrides,
    ],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_killed_run_resumes_exactly(tmp_path, small_data_dir):
  # A long run, SIGKILLed once a checkpoint exists (maybe in the middle of
  # writing the next one).
  killed = tmp_path / 'killed'
  proc = _launch(
    killed,
    small_data_dir,
    [
      '--config.num_train_steps=100000',
      '--config.checkpoint_every_steps=2',
      '--config.eval_every_steps=100000',
      '--config.image_every_steps=100000',
    ],
  )
  deadline = time.time() + 240
  ckpt = killed / checkpointing.CHECKPOINT_DIR
  while time.time() < deadline:
    done = (
      [p for p in ckpt.glob('*') if p.name.isdigit()] if ckpt.exists() else []
    )
    if any(int(p.name) >= 4 for p in done) or proc.poll() is not None:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, proc.stderr.read()[-2000:]

  latest = checkpointing.checkpoint_manager(str(killed)).latest_step()
  assert latest is not None and latest >= 4
  final = latest + 3
  common = dict(
    checkpoint_every_steps=2, eval_every_steps=100000, image_every_steps=100000
  )

  config = _tiny_config(small_data_dir)
  config.data.mnist_dir = None  # As the killed run's command had it.
  config.update(common)
  config.num_train_steps = final
  train.train_and_evaluate(config, str(killed))  # Resumes from `latest`.

  straight = tmp_path / 'straight'
  train.train_and_evaluate(config, str(straight))

  resumed_params, straight_params = _params_of(killed), _params_of(straight)
  chex.assert_trees_all_close(
    resumed_params, straight_params, atol=1e-6, rtol=1e-6
  )

  # The losses logged after the resume equal the uninterrupted ones.
  def losses(workdir):
    out = {}
    for line in (workdir / 'metrics.jsonl').read_text().splitlines():
      record = json.loads(line)
      if 'train/loss' in record:
        out[record['step']] = record['train/loss']
    return out

  # The killed run may have logged steps past its last checkpoint; the
  # resumed run logs them again (later lines win here) up to `final`.
  after = {s: v for s, v in losses(killed).items() if latest < s <= final}
  assert after, 'no step logged after the resume'
  for s, v in after.items():
    assert v == pytest.approx(losses(straight)[s], rel=1e-6)
  # Outputs of a finished run.
  assert (straight / 'export' / checkpointing.PARAMS_FILE).is_file()
  assert (straight / 'tb').is_dir() and list(
    (straight / 'pictures').glob('*.png')
  )


_PMAP_SCRIPT = textwrap.dedent("""
    import os
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '')
        + ' --xla_force_host_platform_device_count=2')
    import jax, jax.numpy as jnp, numpy as np
    from air_jax import configuration, device_data, input_pipeline, train
    from air_jax.configs import test as test_config
    assert jax.local_device_count() == 2, jax.devices()
    config = test_config.get_config()
    model = configuration.create_model(config)
    loss_config = configuration.loss_config(config)
    data = (np.random.default_rng(0).random((16, 50, 50)) * 255).astype(np.uint8)
    idx = input_pipeline.batch_indices(0, 0, 2, 8, 16)  # [K, B]
    results = []
    for devices in (2, 1):
      state, tx = train.create_train_state(config, model)
      state = device_data.replicate(state, devices)
      images = device_data.replicate(data, devices)
      indices = idx.reshape(2, devices, -1).swapaxes(0, 1)
      step = train.compile_train_steps(
          model, tx, loss_config, 0, devices, state, images,
          jax.ShapeDtypeStruct(indices.shape, jnp.int32))
      state, metrics = step(state, images, indices)
      results.append((device_data.unreplicate(state.params, devices),
                      device_data.unreplicate(metrics, devices)))
    (p2, m2), (p1, m1) = results
    flat2, flat1 = jax.tree.leaves(p2), jax.tree.leaves(p1)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(flat2, flat1))
    print('MAXDIFF', diff)
    for name in sorted(m1):
      print('METRIC', name, float(np.ravel(m2[name])[0]), float(np.ravel(m1[name])[0]))
""")


def test_pmap_on_two_devices_matches_one_device():
  proc = subprocess.run(
    [sys.executable, '-c', _PMAP_SCRIPT],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [x.split() for x in proc.stdout.splitlines()]
  maxdiff = [float(x[1]) for x in lines if x[0] == 'MAXDIFF'][0]
  metrics = {
    x[1]: (float(x[2]), float(x[3])) for x in lines if x[0] == 'METRIC'
  }
  # Same per-example randomness; only the order of float sums differs.
  assert maxdiff < 1e-5, maxdiff
  # Adam's first updates hardly depend on the gradients' size, so the
  # second step's metrics (its loss with the baseline's regression on the
  # running signal moments, its gradient norms) carry the stronger check.
  assert {'loss', 'baseline_loss', 'grad_norm'} <= set(metrics)
  for name, (two, one) in metrics.items():
    assert two == pytest.approx(one, rel=1e-5, abs=1e-6), name


def _run_training(workdir, data_dir, extra_env=None, args=()):
  """A 4-step run of the test config (logs and saves at 2, evaluates at 4)."""
  short = [
    '--config.num_train_steps=4',
    '--config.log_every_steps=2',
    '--config.eval_every_steps=4',
    '--config.checkpoint_every_steps=2',
    '--config.image_every_steps=4',
  ]
  env = {'JAX_PLATFORMS': 'cpu', **(extra_env or {})}
  return _launch(workdir, data_dir, [*short, *args], env)


def _finish(procs, timeout=400):
  for proc in procs:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def _max_param_diff(a, b):
  _, _, pa = checkpointing.load_model(str(a))
  _, _, pb = checkpointing.load_model(str(b))
  return max(
    float(np.max(np.abs(x - y)))
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb))
  )


def _assert_same_train_metrics(a, b):
  """The logged loss, ELBO and gradient norms of two runs agree at every
  logged step (Adam's first updates hardly depend on the gradients' size,
  so equal parameters alone would not catch, e.g., a sum for a mean)."""

  def logged(workdir):
    records = [json.loads(x) for x in (workdir / 'metrics.jsonl').open()]
    return {r['step']: r for r in records if 'train/loss' in r}

  a, b = logged(a), logged(b)
  assert a and sorted(a) == sorted(b)
  for step in a:
    for name in ('train/loss', 'train/elbo', 'train/grad_norm'):
      assert a[step][name] == pytest.approx(b[step][name], rel=1e-4), (
        step,
        name,
      )


def test_two_processes_match_one_process_with_two_devices(
  tmp_path, small_data_dir
):
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  multi = tmp_path / 'multi'
  procs = [
    _run_training(
      multi,
      small_data_dir,
      {
        'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
        'JAX_NUM_PROCESSES': '2',
        'JAX_PROCESS_ID': str(i),
      },
    )
    for i in range(2)
  ]
  single = tmp_path / 'single'
  procs.append(
    _run_training(
      single,
      small_data_dir,
      {
        'XLA_FLAGS': helpers.xla_flags(
          '--xla_force_host_platform_device_count=2'
        )
      },
    )
  )
  _finish(procs)
  # Same examples, randomness and mean gradients; float sums may differ.
  assert _max_param_diff(multi / 'export', single / 'export') < 1e-5
  _assert_same_train_metrics(multi, single)
  # Only process 0 wrote metrics: one record per logged step, as alone.
  lines = (multi / 'metrics.jsonl').read_text().splitlines()
  assert len(lines) == len((single / 'metrics.jsonl').read_text().splitlines())


def test_sweep_members_equal_their_runs_alone(tmp_path, small_data_dir):
  procs = [
    _run_training(tmp_path / 'sweep', small_data_dir, args=['--seeds=3,5']),
    _run_training(tmp_path / 'alone', small_data_dir, args=['--config.seed=5']),
  ]
  # The same sweep as one vmapped program (the default on accelerators).
  config = _tiny_config(small_data_dir)
  config.num_train_steps = 4
  config.log_every_steps = config.checkpoint_every_steps = 2
  config.eval_every_steps = config.image_every_steps = 4
  sweep_lib.train_sweep(config, str(tmp_path / 'vmapped'), [3, 5], vmapped=True)
  _finish(procs)
  sweep = tmp_path / 'sweep' / 'seed_5'
  alone = tmp_path / 'alone' / 'export'
  assert _max_param_diff(sweep / 'export', alone) < 1e-5
  vmapped = tmp_path / 'vmapped' / 'seed_5' / 'export'
  assert _max_param_diff(vmapped, alone) < 1e-5
  _assert_same_train_metrics(sweep, tmp_path / 'alone')
  _assert_same_train_metrics(vmapped.parent, tmp_path / 'alone')
  # Each member has its own run directory, as a run alone.
  for seed in (3, 5):
    member = tmp_path / 'sweep' / f'seed_{seed}'
    assert json.loads((member / 'config.json').read_text())['seed'] == seed
    assert sorted(p.name for p in (member / 'checkpoints').iterdir()) == [
      '2',
      '4',
    ]
    assert (member / 'metrics.jsonl').is_file()
  # Different seeds train differently.
  assert (
    _max_param_diff(sweep / 'export', tmp_path / 'sweep' / 'seed_3' / 'export')
    > 1e-3
  )


def test_a_non_square_image_and_another_window_size_run_end_to_end():
  """Nothing assumes 50x50 images, 28x28 windows or 3 steps: a step, an
  evaluation and inference on 40x56 images with 20x12 windows, 5 steps."""
  config = _tiny_config()
  config.model.image_size = (40, 56)
  config.model.window_size = (20, 12)
  config.model.max_steps = 5
  configuration.validate(config)
  model = configuration.create_model(config)
  state, tx = train.create_train_state(config, model)
  rng = np.random.default_rng(0)
  images = (rng.random((8, 40, 56)) ** 8 * 255).astype(np.uint8)
  state, metrics = jax.jit(helpers.train_step_fn(config, model, tx))(
    state, jnp.asarray(images, jnp.float32) / 255.0
  )
  assert np.isfinite(float(metrics['loss']))
  result = evaluation.evaluate(
    model,
    state.params,
    helpers.one_object_split(images),
    configuration.loss_config(config),
    batch_size=4,
  )
  assert result.confusion.shape == (6, 6) and result.num_images == 8
  assert 0.0 <= result.boxes['ap50'] <= 1.0
  records = inference.infer_records(
    model, state.params, images.astype(np.float32) / 255.0
  )
  assert len(records) == 8
  for record in records:
    for obj in record['objects']:
      top, left, height, width = obj['window']
      # The window of z_where = (s, x, y) on a 40 x 56 image: H / s by W / s.
      assert height / width == pytest.approx(40 / 56, rel=1e-4)
