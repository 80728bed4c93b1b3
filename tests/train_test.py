"""The train step, the loop with checkpoints and resume, and data parallelism."""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from air_jax import train
from configs import test as test_config
from tests import conftest

REPO = conftest.REPO


def _tiny_config(data_dir=None):
  config = test_config.get_config()
  config.data.data_dir = data_dir
  config.data.mnist_dir = (
    str(conftest.mnist_dir()) if conftest.mnist_dir() else None
  )
  return config


def test_one_train_step_is_finite_in_range_and_compiles_once():
  config = _tiny_config()
  model = train.create_model(config)
  state, tx = train.create_train_state(config, model)
  settings = train.loss_settings(config)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, images):
    return train.train_step(
      state,
      images,
      model=model,
      tx=tx,
      settings=settings,
      seed=0,
      axis_name=None,
    )

  images = jax.random.uniform(jax.random.key(0), (8, 50, 50))
  for i in range(3):
    state, metrics = step(state, images * (0.5 + 0.1 * i))
  assert int(state.step) == 3 and int(state.num_skipped) == 0
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params))
  metrics = jax.device_get(metrics)
  assert 0.0 <= metrics['mean_count'] <= config.model.max_steps
  for name in ('kl_pres', 'kl_where', 'kl_what', 'baseline_loss', 'grad_norm'):
    assert metrics[name] >= 0.0, name
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


def test_non_finite_updates_are_skipped_and_counted():
  config = _tiny_config()
  model = train.create_model(config)
  state, tx = train.create_train_state(config, model)
  step = jax.jit(
    functools.partial(
      train.train_step,
      model=model,
      tx=tx,
      settings=train.loss_settings(config),
      seed=0,
      axis_name=None,
    )
  )
  images = jnp.full((8, 50, 50), jnp.nan)
  new_state, metrics = step(state, images)
  assert (
    int(new_state.num_skipped) == 1 and int(new_state.consecutive_skipped) == 1
  )
  assert float(metrics['nonfinite']) == 1.0
  chex.assert_trees_all_equal(new_state.params, state.params)
  good, _ = step(new_state, jnp.full((8, 50, 50), 0.5))
  assert int(good.consecutive_skipped) == 0 and int(good.num_skipped) == 1


def _params_of(workdir):
  _, _, params = train.load_model(str(workdir))
  return params


def _launch(workdir, data_dir, overrides):
  env = dict(os.environ, TFDS_DATA_DIR=str(data_dir))
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


@conftest.requires_mnist
def test_killed_run_resumes_exactly(tmp_path, small_data_dir):
  mnist = f'--config.data.mnist_dir={conftest.mnist_dir()}'
  # A long run, SIGKILLed once a checkpoint exists (maybe in the middle of
  # writing the next one).
  killed = tmp_path / 'killed'
  proc = _launch(
    killed,
    small_data_dir,
    [
      mnist,
      '--config.num_train_steps=100000',
      '--config.checkpoint_every_steps=2',
      '--config.eval_every_steps=100000',
      '--config.image_every_steps=100000',
    ],
  )
  deadline = time.time() + 240
  ckpt = killed / train.CHECKPOINT_DIR
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

  latest = train._checkpoint_manager(str(killed)).latest_step()  # pylint: disable=protected-access
  assert latest is not None and latest >= 4
  final = latest + 3
  common = dict(
    checkpoint_every_steps=2, eval_every_steps=100000, image_every_steps=100000
  )

  config = _tiny_config(small_data_dir)
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
  assert (straight / 'export' / train.PARAMS_FILE).is_file()
  assert (straight / 'tb').is_dir() and list(
    (straight / 'pictures').glob('*.png')
  )


_PMAP_SCRIPT = textwrap.dedent("""
    import os
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    import jax, jax.numpy as jnp, numpy as np
    from air_jax import train
    from configs import test as test_config
    assert jax.local_device_count() == 2, jax.devices()
    config = test_config.get_config()
    model = train.create_model(config)
    settings = train.loss_settings(config)
    images = np.asarray(jax.random.uniform(jax.random.key(0), (2, 4, 50, 50)))
    results = []
    for devices in (2, 1):
      state, tx = train.create_train_state(config, model)
      state = train.replicate(state, devices)
      batch = images.reshape(devices, -1, 50, 50)
      # Compiled ahead of time, as train_and_evaluate does.
      step = train.compile_train_step(
          model, tx, settings, 0, devices, state=state, images=batch)
      for _ in range(2):
        state, metrics = step(state, batch)
      results.append((train.unreplicate(state.params, devices),
                      train.unreplicate(metrics, devices)))
    (p2, m2), (p1, m1) = results
    flat2, flat1 = jax.tree.leaves(p2), jax.tree.leaves(p1)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(flat2, flat1))
    print('MAXDIFF', diff, 'LOSS', float(np.ravel(m2['loss'])[0]), float(np.ravel(m1['loss'])[0]))
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
  line = [x for x in proc.stdout.splitlines() if x.startswith('MAXDIFF')]
  line = line[0].split()
  maxdiff, loss2, loss1 = float(line[1]), float(line[3]), float(line[4])
  # Same per-example randomness; only the order of float sums differs.
  assert maxdiff < 1e-5, maxdiff
  assert loss2 == pytest.approx(loss1, rel=1e-5)


def test_likelihood_std_is_annealed_from_its_initial_value():
  config = _tiny_config()
  config.likelihood_std_init = 1.0
  config.likelihood_std_anneal_steps = 100
  settings = train.loss_settings(config)
  assert float(settings.likelihood_std_at(0)) == pytest.approx(1.0)
  assert float(settings.likelihood_std_at(50)) == pytest.approx(
    np.sqrt(0.3), rel=1e-5
  )
  assert float(settings.likelihood_std_at(1000)) == pytest.approx(0.3, rel=1e-5)
  config.likelihood_std_init = 0.0
  assert float(
    train.loss_settings(config).likelihood_std_at(0)
  ) == pytest.approx(0.3)
