"""The grid model and its estimator: the cell priors by hand, the local
expectation gradient against exact enumeration, the signal against drawing
each object, and a non-square image through step, evaluation and infer."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from air_jax import air
from air_jax import checkpointing
from air_jax import configuration
from air_jax import distributions
from air_jax import evaluation
from air_jax import grid
from air_jax import inference
from air_jax import networks
from air_jax import objectives
from air_jax import refinement
from air_jax import spatial_transformer as st
from air_jax import train
from air_jax.cli import infer as infer_cli
from air_jax.configs import many as many_config
from tests import helpers


def test_cell_centres_and_priors_by_hand():
  # A 2 x 3 grid: rows at y = -1/2, 1/2; columns at x = -2/3, 0, 2/3.
  centres = np.asarray(grid.cell_centres((2, 3)))
  want = [[x, y] for y in (-0.5, 0.5) for x in (-2 / 3, 0.0, 2 / 3)]
  np.testing.assert_allclose(centres, want, atol=1e-6)
  prior = grid.cell_prior((2, 3), (4.0, 9.0, 9.0), (0.3, 0.2, 0.1))
  np.testing.assert_allclose(prior.loc[:, 0], 4.0)
  np.testing.assert_allclose(prior.loc[:, 1:], want, atol=1e-6)
  np.testing.assert_allclose(prior.scale, np.tile([0.3, 0.2, 0.1], (6, 1)))


def _toy_output(rng, z_pres, theta):
  """An AIROutput of 3 fixed objects on 12 x 10 images (batch 1)."""
  n = len(z_pres)
  windows = jnp.asarray(rng.random((1, n, 5, 4)), jnp.float32)
  z_where = jnp.asarray(
    [[[2.0, -0.3, 0.1], [2.5, 0.2, -0.2], [1.8, 0.0, 0.3]]], jnp.float32
  )
  z_pres = jnp.asarray(z_pres, jnp.float32)[None]
  what = jnp.asarray(rng.standard_normal((1, n, 2)), jnp.float32)
  return air.AIROutput(
    z_pres=z_pres,
    z_pres_prob=jax.nn.sigmoid(theta)[None],
    mask=jnp.ones_like(z_pres),
    z_where=z_where,
    z_where_loc=z_where + 0.1,
    z_where_scale=jnp.full_like(z_where, 0.5),
    z_what=what,
    z_what_loc=what * 0.5,
    z_what_scale=jnp.full_like(what, 0.8),
    windows=windows,
    canvas=st.windows_to_canvas(windows, z_where, z_pres, (12, 10)),
    baseline=jnp.zeros_like(z_pres),
  )


# Off, and strong enough (radius 0.7) that every pair of the toy objects
# (centres 0.36-0.58 apart) pays for it.
REPULSIONS = [None, (5.0, 0.7)]


@pytest.mark.parametrize('repulsion', REPULSIONS)
@pytest.mark.parametrize('likelihood', ['normal', 'bernoulli'])
def test_local_estimator_is_the_exact_gradient_by_enumeration(
  likelihood, repulsion
):
  """With the continuous latents fixed, E_z[grad of the surrogate] over all
  2^3 choices, weighted by q, equals the gradient of E_z[f(z)] - KL_pres."""
  rng = np.random.default_rng(0)
  theta = jnp.asarray([0.4, -1.1, 0.7], jnp.float32)
  images = jnp.asarray(rng.random((1, 12, 10)), jnp.float32)
  prior = distributions.NormalParams(
    jnp.asarray([2.0, 0.0, 0.0]), jnp.asarray([0.3, 1.0, 1.0])
  )
  choices = [
    np.array(z, np.float32) for z in itertools.product((0, 1), repeat=3)
  ]
  outputs = [_toy_output(np.random.default_rng(1), z, theta) for z in choices]
  std = 0.4

  def f(out):
    terms = objectives.elbo_terms(
      out, images, 0.1, prior, likelihood, std, repulsion
    )
    return terms.elbo + jnp.sum(terms.kl_pres, axis=1)  # f excludes KL_pres.

  def exact(theta):
    q = jax.nn.sigmoid(theta)
    total = 0.0
    for z, out in zip(choices, outputs):
      total += jnp.prod(q**z * (1 - q) ** (1 - z)) * f(out)[0]
    return total

  def expected_estimate(theta):
    q = jax.nn.sigmoid(theta)
    grads = 0.0
    for z, out in zip(choices, outputs):
      signal = objectives.local_signal(
        out, images, prior, likelihood, std, repulsion
      )

      def surrogate(theta, out=out, signal=signal):
        probs = jax.nn.sigmoid(theta)[None]
        return objectives.local_expectation_surrogate(probs, signal, out.mask)[
          0
        ]

      weight = jnp.prod(q**z * (1 - q) ** (1 - z))
      grads += weight * jax.grad(surrogate)(theta)
    return grads

  np.testing.assert_allclose(
    expected_estimate(theta), jax.grad(exact)(theta), rtol=1e-4, atol=1e-4
  )


@pytest.mark.parametrize('repulsion', REPULSIONS)
def test_local_object_objective_is_the_expected_gradient_by_enumeration(
  repulsion,
):
  """Gradients through the objects (windows, z_where, z_what): the sum over
  all 2^3 choices, weighted by q, of the surrogate's gradient equals that of
  the ELBO without KL_pres (whose gradient reaches only present objects)."""
  rng = np.random.default_rng(5)
  theta = jnp.asarray([0.4, -1.1, 0.7], jnp.float32)
  q = jax.nn.sigmoid(theta)
  images = jnp.asarray(rng.random((1, 12, 10)), jnp.float32)
  prior = distributions.NormalParams(
    jnp.asarray([2.0, 0.0, 0.0]), jnp.asarray([0.3, 1.0, 1.0])
  )
  base = _toy_output(np.random.default_rng(1), [0.0, 0.0, 0.0], theta)
  phi = (
    jnp.asarray([1.2, 0.8, 1.0]),  # Window brightness.
    jnp.asarray([[0.1, 0.0, -0.05], [0.0, 0.1, 0.0], [-0.1, 0.05, 0.1]]),
    base.z_what,
  )
  choices = [
    np.array(z, np.float32) for z in itertools.product((0, 1), repeat=3)
  ]

  def output(phi, z):
    gain, shift, what = phi
    windows = base.windows * gain[None, :, None, None]
    z_where = base.z_where + shift[None]
    z = jnp.asarray(z)[None]
    return base._replace(
      z_pres=z,
      windows=windows,
      z_where=z_where,
      z_where_loc=z_where + 0.1,
      z_what=what,
      z_what_loc=what * 0.5,
      canvas=st.windows_to_canvas(windows, z_where, z, (12, 10)),
    )

  def weight(z):
    return jnp.prod(q**z * (1 - q) ** (1 - z))

  def exact(phi):
    total = 0.0
    for z in choices:
      terms = objectives.elbo_terms(
        output(phi, z), images, 0.1, prior, 'normal', 0.4, repulsion
      )
      total += weight(z) * (terms.elbo + jnp.sum(terms.kl_pres, 1))[0]
    return total

  def expected_estimate(phi):
    return sum(
      weight(z)
      * objectives.local_object_objective(
        output(phi, z), images, prior, 0.4, repulsion
      )[0]
      for z in choices
    )

  for got, want in zip(
    jax.grad(lambda p: expected_estimate(p))(phi), jax.grad(exact)(phi)
  ):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('repulsion', REPULSIONS)
@pytest.mark.parametrize('likelihood', ['normal', 'bernoulli'])
def test_local_signal_is_the_difference_of_drawing_each_object(
  likelihood, repulsion
):
  rng = np.random.default_rng(2)
  out = _toy_output(rng, [1.0, 0.0, 1.0], jnp.zeros(3))
  images = jnp.asarray(rng.random((1, 12, 10)), jnp.float32)
  prior = distributions.NormalParams(
    jnp.asarray([2.0, 0.0, 0.0]), jnp.asarray([0.3, 1.0, 1.0])
  )
  signal = objectives.local_signal(
    out, images, prior, likelihood, 0.3, repulsion
  )
  for n in range(3):
    values = []
    for z_n in (1.0, 0.0):
      z = out.z_pres.at[0, n].set(z_n)
      canvas = sum(
        float(z[0, k])
        * np.asarray(
          st.window_to_image(out.windows[0, k], out.z_where[0, k], (12, 10))
        )
        for k in range(3)
      )
      ll = objectives.log_likelihood(
        jnp.asarray(canvas)[None], images, likelihood, 0.3
      )[0]
      terms = objectives.elbo_terms(
        out._replace(z_pres=z), images, 0.5, prior, likelihood, 0.3, repulsion
      )
      values.append(
        ll
        - terms.kl_where[0].sum()
        - terms.kl_what[0].sum()
        - terms.repulsion[0].sum()
      )
    np.testing.assert_allclose(
      signal[0, n], values[0] - values[1], rtol=1e-4, atol=1e-3
    )


def test_grid_model_outputs_and_modes():
  model = grid.GridAIR(
    image_size=(20, 28), window_size=(6, 5), grid_size=(2, 3), grid_features=8
  )
  assert model.max_steps == 6
  params = air.init_params(model, 0)
  images = jnp.asarray(np.random.default_rng(3).random((4, 20, 28)))
  keys = jax.random.split(jax.random.key(0), 4)
  out = helpers.apply_jitted(model, params, images, keys=keys)
  assert out.z_pres.shape == (4, 6) and out.windows.shape == (4, 6, 6, 5)
  assert out.canvas.shape == (4, 20, 28)
  np.testing.assert_array_equal(out.mask, 1.0)
  assert set(np.unique(out.z_pres)) <= {0.0, 1.0}
  # Samples of an example depend on its key alone, not on its batch.
  alone = helpers.apply_jitted(model, params, images[1:2], keys=keys[1:2])
  np.testing.assert_allclose(alone.z_where[0], out.z_where[1], atol=1e-5)
  np.testing.assert_array_equal(alone.z_pres[0], out.z_pres[1])
  # Inference starts at the prior: each cell's window is centred on it.
  modes = helpers.apply_jitted(model, params, images, deterministic=True)
  prior = grid.cell_prior((2, 3), model.z_where_prior_loc, (1, 1, 1))
  np.testing.assert_allclose(
    modes.z_where[..., 1:],
    np.broadcast_to(prior.loc[:, 1:], (4, 6, 2)),
    atol=0.05,
  )
  np.testing.assert_array_equal(modes.z_pres, modes.z_pres_prob > 0.5)


def _grid_test_config():
  config = many_config.get_config()
  config.model.image_size = (40, 56)
  config.model.window_size = (12, 10)
  config.model.grid_size = (3, 4)
  config.model.grid_features = 16
  config.model.z_what_size = 8
  config.model.encoder_hidden_size = 32
  config.model.decoder_hidden_size = 32
  return config


def test_many_config_builds_the_grid_model_and_its_estimator():
  config = many_config.get_config()
  configuration.validate(config)
  model = configuration.create_model(config)
  assert isinstance(model, grid.GridAIR) and model.grid == (8, 8)
  loss = configuration.loss_config(config)
  assert loss.estimator == 'local' and loss.baseline == 'none'
  assert loss.grid == (8, 8) and loss.z_where_prior().loc.shape == (64, 3)
  config.model.use_baseline = True
  config.normalised_baseline = True
  with pytest.raises(configuration.ConfigError, match='grid'):
    configuration.validate(config)
  config = many_config.get_config()
  config.model.kind = 'spair'
  with pytest.raises(configuration.ConfigError, match='model.kind'):
    configuration.validate(config)
  with pytest.raises(ValueError, match='baseline'):
    objectives.LossConfig(estimator='local', baseline='normalised')


def test_a_non_square_grid_runs_step_evaluation_and_infer(tmp_path, capsys):
  config = _grid_test_config()
  configuration.validate(config)
  model = configuration.create_model(config)
  loss_config = configuration.loss_config(config)
  state, tx = train.create_train_state(config, model)
  assert 'baseline' not in state.params
  rng = np.random.default_rng(0)
  images = (rng.random((8, 40, 56)) ** 8 * 255).astype(np.uint8)
  step = jax.jit(helpers.train_step_fn(config, model, tx))
  before = state.params
  state, metrics = step(state, jnp.asarray(images, jnp.float32) / 255.0)
  assert np.isfinite(float(metrics['loss']))
  moved = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), before, state.params
  )
  # Every part learns, the z_pres head included (through the estimator).
  assert (
    moved['head']['kernel'] > 0
    and moved['encoder']['PatchConv_0']['dense']['kernel'] > 0
  )
  result = evaluation.evaluate(
    model,
    state.params,
    helpers.one_object_split(images),
    loss_config,
    batch_size=4,
    iwae_samples=2,
  )
  # 12 cells but 9 object slots: counts 0..9 and one column for 10 or more.
  assert result.confusion.shape == (11, 11) and np.isfinite(result.iwae)
  # Refined: flips and a round of z_where ascent (the same refinement as
  # infer's below; one compile each for evaluation and infer).
  refined = evaluation.evaluate(
    model,
    state.params,
    helpers.one_object_split(images),
    loss_config,
    batch_size=4,
    refine=refinement.Refinement(3, 1),
  )
  assert refined.confusion.sum() == 8 and np.isfinite(refined.elbo)
  records = inference.infer_records(
    model, state.params, images.astype(np.float32) / 255.0
  )
  assert len(records) == 8
  for record in records:
    assert record['count'] == len(record['objects']) <= 12
  # An export loads as the grid model; --max_steps is refused for it.
  export = tmp_path / 'export'
  checkpointing.save_params(state.params, str(export), config)
  npz = tmp_path / 'images.npz'
  np.savez(npz, images=images)
  records_cli = infer_cli.infer(str(export), str(npz), str(tmp_path / 'a.json'))
  assert records_cli == records
  # Refined modes (flips and a round of z_where ascent): the library and
  # the CLI agree (the CLI reads the schedules at the config's last step).
  step = config.num_train_steps
  refine = refinement.Refiner(refinement.Refinement(3, 1), loss_config, step)
  refined = inference.infer_records(
    model, state.params, images.astype(np.float32) / 255.0, refine=refine
  )
  assert [r['count'] for r in refined] == [len(r['objects']) for r in refined]
  refined_cli = infer_cli.infer(
    str(export),
    str(npz),
    str(tmp_path / 'c.json'),
    refine_flips=3,
    refine_rounds=1,
  )
  assert refined_cli == refined
  with pytest.raises(SystemExit):
    infer_cli.infer(str(export), str(npz), str(tmp_path / 'b.json'), None, 20)
  assert '--max_steps applies to the sequential' in capsys.readouterr().err
  assert not (tmp_path / 'b.json').exists()


@pytest.mark.parametrize('shape', [(2, 9, 9, 3), (1, 10, 7, 2)])
@pytest.mark.parametrize('strides', [1, 2, 3])
def test_patch_conv_is_flax_conv(shape, strides):
  x = jnp.asarray(np.random.default_rng(4).standard_normal(shape), jnp.float32)
  conv = networks.PatchConv(5, (3, 3), strides)
  params = conv.init(jax.random.key(0), x)
  reference = nn.Conv(5, (3, 3), strides=strides)
  dense = params['params']['dense']
  ref_params = {
    'params': {
      'kernel': dense['kernel'].reshape(3, 3, shape[-1], 5),
      'bias': dense['bias'],
    }
  }
  np.testing.assert_allclose(
    conv.apply(params, x), reference.apply(ref_params, x), atol=1e-5
  )


def test_grid_max_shift_keeps_each_centre_in_its_cell():
  model = grid.GridAIR(
    image_size=(20, 28),
    window_size=(6, 5),
    grid_size=(2, 4),
    grid_features=8,
    grid_max_shift=0.5,
  )
  params = air.init_params(model, 0)
  # Raw outputs far beyond the cell: z_where's x and y are outputs 2 and 3.
  bias = params['head']['bias'].at[2].set(50.0).at[3].set(-50.0)
  params = {**params, 'head': {**params['head'], 'bias': bias}}
  images = jnp.zeros((1, 20, 28))
  modes = air.posterior_modes(model, params, images)
  centres = grid.cell_centres((2, 4))
  shift = np.asarray(modes.z_where_loc[0, :, 1:] - centres)
  # Half a cell: 1/4 of the normalised width 2 across 4 columns, 1/2 down.
  np.testing.assert_allclose(shift[:, 0], 0.25, atol=1e-4)
  np.testing.assert_allclose(shift[:, 1], -0.5, atol=1e-4)


@pytest.mark.parametrize('repulsion', [0.0, 5.0])
def test_greedy_z_pres_climbs_to_a_local_maximum_by_enumeration(repulsion):
  """From each of the 2^3 starts, the refined z_pres scores at least the
  start's g = f + sum_n z_n logit(p) (f from `elbo_terms`, enumerated) and
  no single flip of it scores higher; its canvas is redrawn."""
  images = jnp.asarray(
    np.random.default_rng(4).random((1, 12, 10)), jnp.float32
  )
  theta = jnp.zeros(3)
  config = _toy_loss_config(repulsion)

  def toy(z):
    return _toy_output(np.random.default_rng(1), z, theta)

  def g(z):
    return float(_toy_g(toy(z), images, config))

  moved = 0
  for start in itertools.product((0.0, 1.0), repeat=3):
    start = np.asarray(start, np.float32)
    out = refinement.greedy_z_pres(toy(start), images, config, 0, max_flips=8)
    z = np.asarray(out.z_pres[0])
    moved += int(np.any(z != start))
    assert g(z) >= g(start) - 1e-3
    for n in range(3):
      assert g(np.where(np.arange(3) == n, 1 - z, z)) <= g(z) + 1e-3
    np.testing.assert_allclose(out.canvas, toy(z).canvas, atol=1e-5)
    one = refinement.greedy_z_pres(toy(start), images, config, 0, max_flips=1)
    assert np.sum(np.asarray(one.z_pres[0]) != start) <= 1
  assert moved > 0  # The starts are not all maxima already.
  with pytest.raises(ValueError, match='independent proposals'):
    refinement.greedy_z_pres(
      toy(start), images, objectives.LossConfig(), 0, max_flips=1
    )


def _toy_g(out, images, config):
  """g = f + sum_n z_n logit(p) of one image at step 0, f from `elbo_terms`
  (the ELBO without the z_pres KL)."""
  p = config.z_pres_prior(0)
  terms = objectives.elbo_terms(
    out,
    images,
    p,
    config.z_where_prior(),
    config.likelihood,
    config.likelihood_std(0),
    config.repulsion(0),
  )
  f = terms.elbo + jnp.sum(terms.kl_pres, axis=1)
  return f[0] + jnp.sum(out.z_pres[0]) * np.log(p / (1 - p))


def _toy_loss_config(repulsion):
  """A grid model's objective for the toy outputs: p = 0.3, std 0.4."""
  return objectives.LossConfig(
    z_pres_prior=distributions.Schedule.constant(0.3),
    z_where_prior_loc=(2.0, 0.0, 0.0),
    z_where_prior_scale=(0.3, 1.0, 1.0),
    likelihood_std=distributions.Schedule.constant(0.4),
    baseline='none',
    estimator='local',
    repulsion_strength=distributions.Schedule.constant(repulsion),
    repulsion_radius=0.7,
  )


@pytest.mark.parametrize('repulsion', [0.0, 5.0])
def test_refinement_objective_is_g_plus_each_absent_proposals_gain(repulsion):
  """Its value is g(z) + sum over absent n of g(z with n on) - g(z), g from
  `elbo_terms` with canvases drawn anew; its gradient in z_where is that of
  g(z) for a present proposal and that of g(z with n on) for an absent n."""
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.random((1, 12, 10)), jnp.float32)
  config = _toy_loss_config(repulsion)
  toy = _toy_output(np.random.default_rng(1), [1.0, 0.0, 0.0], jnp.zeros(3))

  def at(z_where, z_pres):
    z_pres = jnp.asarray(z_pres, jnp.float32)[None]
    return toy._replace(
      z_pres=z_pres,
      z_where=z_where,
      z_where_loc=z_where,
      canvas=st.windows_to_canvas(toy.windows, z_where, z_pres, (12, 10)),
    )

  def g(z_where, z_pres):
    return _toy_g(at(z_where, z_pres), images, config)

  z_pres = np.asarray([1.0, 0.0, 0.0])
  with_ = [np.where(np.arange(3) == n, 1.0, z_pres) for n in (1, 2)]

  def objective(z_where):
    return objectives.refinement_objective(
      at(z_where, z_pres), images, config, 0
    )[0]

  want = g(toy.z_where, z_pres) + sum(
    g(toy.z_where, z) - g(toy.z_where, z_pres) for z in with_
  )
  np.testing.assert_allclose(objective(toy.z_where), want, rtol=1e-5)
  grad = jax.grad(objective)(toy.z_where)[0]
  np.testing.assert_allclose(
    grad[0], jax.grad(g)(toy.z_where, z_pres)[0, 0], rtol=1e-4, atol=1e-4
  )
  for n, z in zip((1, 2), with_, strict=True):
    np.testing.assert_allclose(
      grad[n], jax.grad(g)(toy.z_where, z)[0, n], rtol=1e-4, atol=1e-4
    )
  with pytest.raises(ValueError, match='Normal'):
    objectives.refinement_objective(
      toy, images, dataclasses.replace(config, likelihood='bernoulli'), 0
    )


def test_refine_modes_moves_z_where_up_the_objective_within_bounds():
  model = grid.GridAIR(
    image_size=(20, 28),
    window_size=(6, 5),
    grid_size=(2, 3),
    grid_features=8,
    grid_max_shift=0.5,
    z_where_prior_loc=(2.0, 0.0, 0.0),
    z_where_scale_range=(1.5, 3.0),
  )
  params = air.init_params(model, 0)
  images = jnp.asarray(np.random.default_rng(6).random((3, 20, 28)) ** 4)
  config = dataclasses.replace(_toy_loss_config(5.0), grid=(2, 3))
  modes = model.apply({'params': params}, images, deterministic=True)
  modes = modes._replace(z_pres=modes.z_pres.at[:, ::2].set(1.0))
  modes = modes._replace(
    canvas=st.windows_to_canvas(
      modes.windows, modes.z_where, modes.z_pres, (20, 28)
    )
  )

  def objects_at(z_where, z_pres=None):
    return model.apply(
      {'params': params}, images, z_where, z_pres, method='objects_at'
    )

  def refine(out, flips, rounds, **kw):
    search = refinement.Search(
      config, 0, objects_at, model.z_where_bounds(), flips, rounds, **kw
    )
    return refinement.refine_modes(out, images, search)

  # No rounds: greedy_z_pres alone.
  np.testing.assert_array_equal(
    refine(modes, 4, 0).z_pres,
    refinement.greedy_z_pres(modes, images, config, 0, 4).z_pres,
  )
  # One small Adam step and no flips: every coordinate moves by at most the
  # step size, and the objective rises (Adam's first step is lr * sign).
  lr = 1e-3
  one = refine(modes, 0, 1, where_steps=1, where_lr=lr)
  np.testing.assert_array_equal(one.z_pres, modes.z_pres)
  assert np.max(np.abs(one.z_where - modes.z_where)) <= lr * (1 + 1e-4)
  before = objectives.refinement_objective(modes, images, config, 0)
  after = objectives.refinement_objective(one, images, config, 0)
  assert np.all(np.asarray(after) > np.asarray(before))
  # Longer: within the bounds, the objects redrawn where z_where now is.
  out = refine(modes, 6, 2, where_steps=10, where_lr=0.2)
  lower, upper = model.z_where_bounds()
  assert np.all(out.z_where >= lower - 1e-6) and np.all(
    out.z_where <= upper + 1e-6
  )
  assert np.max(np.abs(out.z_where - modes.z_where)) > 0.1
  what_q, windows = objects_at(out.z_where)
  np.testing.assert_allclose(out.windows, windows, atol=1e-5)
  np.testing.assert_allclose(out.z_what, what_q.loc, atol=1e-5)
  np.testing.assert_allclose(
    out.canvas,
    st.windows_to_canvas(out.windows, out.z_where, out.z_pres, (20, 28)),
    atol=1e-5,
  )
