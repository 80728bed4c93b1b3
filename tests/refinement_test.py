"""Posterior modes searched by the model's objective (air_jax.refinement):
the candidates of drops and splits by hand, and the searches on a
sequential AIR's and DAIR's modes (the grid model's: tests/grid_test.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from air_jax import air
from air_jax import configuration
from air_jax import distributions
from air_jax import objectives
from air_jax import refinement
from air_jax import spatial_transformer
from air_jax.configs import test as test_config
from tests import helpers


def test_split_candidates_by_hand():
  # Image 0: steps 0 and 2 present, step 2's window the larger (s = 2 <
  # 4); step 1 absent. Image 1: every step present (nowhere to put a
  # second window). Image 2: nothing present.
  z_pres = jnp.asarray([[1, 0, 1], [1, 1, 1], [0, 0, 0]], jnp.float32)
  z_where = jnp.asarray(
    [
      [[4.0, 0.3, 0.3], [3.0, 0.0, 0.0], [2.0, 0.1, -0.2]],
      [[2.0, 0.0, 0.0], [2.0, 0.5, 0.5], [2.0, -0.5, -0.5]],
      [[2.0, 0.0, 0.0], [2.0, 0.5, 0.5], [2.0, -0.5, -0.5]],
    ]
  )
  pres, where, valid = refinement.split_candidates(
    z_pres, z_where, num_objects=2, shrink=1.5
  )
  assert pres.shape == (3, 8, 3) and where.shape == (3, 8, 3, 3)
  np.testing.assert_array_equal(valid, [[True] * 8, [False] * 8, [False] * 8])
  # Window 2 first (the largest), a quarter of its width (2 / s) = 0.25
  # either side of its centre, at scale 3; the second window takes step 1.
  d = 0.25 / np.sqrt(2.0)
  offsets = [(0.25, 0.0), (0.0, 0.25), (d, d), (d, -d)]
  for c, (dx, dy) in enumerate(offsets):
    np.testing.assert_array_equal(pres[0, c], [1, 1, 1])
    np.testing.assert_allclose(
      where[0, c],
      [[4.0, 0.3, 0.3], [3.0, 0.1 - dx, -0.2 - dy], [3.0, 0.1 + dx, -0.2 + dy]],
      rtol=1e-6,
    )
  # Then window 0 (s = 4): 0.125 either side, at scale 6.
  np.testing.assert_allclose(
    where[0, 4], [[6.0, 0.425, 0.3], [6.0, 0.175, 0.3], [2.0, 0.1, -0.2]]
  )


def test_drop_candidates_by_hand():
  # Image 0: steps 0 and 2 present, step 2 the less probable; image 1:
  # one present; image 2: none.
  z_pres = jnp.asarray([[1, 0, 1], [0, 1, 0], [0, 0, 0]], jnp.float32)
  prob = jnp.asarray([[0.9, 0.1, 0.6], [0.2, 0.7, 0.3], [0.1, 0.2, 0.3]])
  pres, valid = refinement.drop_candidates(z_pres, prob, num_objects=2)
  np.testing.assert_array_equal(
    pres,
    [
      [[1, 0, 0], [0, 0, 1]],
      [[0, 0, 0], z_pres[1]],
      [z_pres[2], z_pres[2]],
    ],
  )
  np.testing.assert_array_equal(
    valid, [[True, True], [True, False], [False, False]]
  )


def test_split_candidates_put_the_second_window_where_bounds_allow():
  # A grid model's proposals reach only near their cells: the second
  # window goes to the absent proposal whose bounds hold its centre, not
  # the first absent one.
  z_pres = jnp.asarray([[1, 0, 0]], jnp.float32)
  z_where = jnp.asarray([[[2.0, 0.0, 0.0], [2.0, 0.7, 0.0], [2.0, -0.7, 0.0]]])
  inf = np.inf
  lower = jnp.asarray([[-inf, -1, -1], [-inf, 0.5, -1], [-inf, -1, -1]])
  upper = jnp.asarray([[inf, 1, 1], [inf, 1, 1], [inf, -0.1, 1]])
  pres, where, valid = refinement.split_candidates(
    z_pres, z_where, 1, bounds=(lower, upper)
  )
  assert np.all(valid)
  # Horizontal: the second centre (-0.25, 0) lies in proposal 2's bounds.
  np.testing.assert_array_equal(pres[0, 0], [1, 0, 1])
  np.testing.assert_allclose(where[0, 0, 2], [3.0, -0.25, 0.0])
  np.testing.assert_allclose(where[0, 0, 1], z_where[0, 1])
  # Vertical: (0, -0.25) is 0.1 from proposal 2's bounds, 0.5 from 1's.
  np.testing.assert_array_equal(pres[0, 1], [1, 0, 1])


def _objective(out, images, loss_config, step):
  """[B] the model's objective of modes taken as a set of objects: the
  likelihood of their canvas, minus each present object's KL_where, KL_what
  and log(p / (1 - p))."""
  prior = loss_config.z_where_prior()
  kl_where = distributions.normal_kl(
    distributions.NormalParams(out.z_where_loc, out.z_where_scale), prior
  )
  kl_what = distributions.normal_kl(
    distributions.NormalParams(out.z_what_loc, out.z_what_scale),
    distributions.NormalParams(
      jnp.zeros_like(out.z_what_loc), jnp.ones_like(out.z_what_loc)
    ),
  )
  p = loss_config.z_pres_prior(step)
  log_lik = objectives.log_likelihood(
    out.canvas, images, 'normal', loss_config.likelihood_std(step)
  )
  cost = kl_where + kl_what - (jnp.log(p) - jnp.log1p(-p))
  return log_lik - jnp.sum(out.z_pres * cost, axis=1)


def _assert_sequential(out, model):
  """`out` has a sequential AIR's form: present steps first, mask the step
  before's z_pres, the canvas drawn from its objects, z_where in bounds."""
  z = np.asarray(out.z_pres)
  assert np.all(np.diff(z, axis=1) <= 0)
  np.testing.assert_array_equal(out.mask[:, 1:], z[:, :-1])
  np.testing.assert_allclose(
    out.canvas,
    spatial_transformer.windows_to_canvas(
      out.windows, out.z_where, out.z_pres, model.image_shape
    ),
    atol=1e-5,
  )
  lower, upper = model.z_where_bounds()
  assert np.all(out.z_where >= lower) and np.all(out.z_where <= upper)


# Jitted: eagerly, each loop of the refinement compiles on every call.
_refine = jax.jit(refinement.refine, static_argnames=('model', 'refiner'))


def _refiner(loss_config, step, flips, rounds=0, **kwargs):
  return refinement.Refiner(
    refinement.Refinement(flips, rounds, **kwargs), loss_config, step
  )


def _first_present(out, k, image_shape):
  """`out` with its first k steps present and its canvas drawn anew."""
  z_pres = jnp.zeros_like(out.z_pres).at[:, :k].set(1.0)
  return out._replace(
    z_pres=z_pres,
    canvas=spatial_transformer.windows_to_canvas(
      out.windows, out.z_where, z_pres, image_shape
    ),
  )


def _all_present(difference: bool, seed: int):
  """(model, params, loss_config, step, images, modes with every step
  present) of the test config's untrained AIR (DAIR with `difference`),
  every step computed."""
  config = test_config.get_config()
  config.model.difference = difference
  model = configuration.create_model(config).clone(skip_finished=False)
  params = air.init_params(model, 0)
  images = helpers.inked_images(6, seed=seed)
  out = helpers.apply_jitted(model, params, images, deterministic=True)
  out = _first_present(out, out.z_pres.shape[1], model.image_shape)
  loss_config = configuration.loss_config(config)
  return model, params, loss_config, config.num_train_steps, images, out


@pytest.mark.parametrize('difference', [False, True], ids=['air', 'dair'])
def test_refined_air_modes_raise_its_objective_and_stay_sequential(difference):
  # Start from every step present: flips must then drop what does not pay.
  model, params, loss_config, step, images, out = _all_present(difference, 2)
  before = _objective(out, images, loss_config, step)
  flipped = _refine(model, params, images, out, _refiner(loss_config, step, 3))
  after = _objective(flipped, images, loss_config, step)
  assert np.all(np.asarray(after) >= np.asarray(before) - 1e-3)
  assert np.any(np.asarray(flipped.count) < 3)  # Some flip was taken.
  _assert_sequential(flipped, model)
  # Every move at once (flips, a round of ascent, a drop, a split): still a
  # sequential AIR's output, present steps first.
  every = _refiner(loss_config, step, 3, 1, splits=1, drops=1)
  _assert_sequential(_refine(model, params, images, out, every), model)


def _searches(difference: bool, seed: int):
  """(images, modes with every step present, the model, and a Search over
  its steps taken as a set with 1 round and no flips) of the test
  config's untrained AIR (DAIR with `difference`)."""
  model, params, loss_config, step, images, out = _all_present(difference, seed)
  objects_at = functools.partial(
    model.apply, {'params': params}, images, method='objects_at'
  )
  search = refinement.Search(
    refinement.objects_as_set(loss_config),
    step,
    objects_at,
    model.z_where_bounds(),
    max_flips=0,
    rounds=1,
  )
  objective = functools.partial(
    _objective, images=images, loss_config=loss_config, step=step
  )
  return images, out, model, search, objective


def test_split_objects_never_lower_the_objective():
  images, out, model, search, objective = _searches(False, 4)
  # The gain asked for is an argument: one compile for every threshold.
  split = jax.jit(
    lambda o, gain: refinement.split_objects(o, images, search, min_gain=gain)
  )
  one, two = (_first_present(out, k, model.image_shape) for k in (1, 2))
  for start in (one, two):
    kept = split(start, refinement.SPLIT_GAIN)
    before, after = np.asarray(objective(start)), np.asarray(objective(kept))
    assert np.all(after >= before - 1e-3), (before, after)
    # Where no split wins, the modes are handed back as they were.
    same = np.isclose(after, before, atol=1e-3)
    np.testing.assert_allclose(
      kept.z_where[same], start.z_where[same], atol=1e-6
    )
  # With no gain asked for (-inf), every image of one present object takes
  # its best split: two windows, each re-read where it is, in bounds.
  forced = split(one, -np.inf)
  np.testing.assert_array_equal(np.sum(forced.z_pres, axis=1), 2)
  what_q, windows = search.objects_at(forced.z_where, forced.z_pres)
  np.testing.assert_allclose(forced.z_what, what_q.loc, atol=1e-5)
  np.testing.assert_allclose(forced.windows, windows, atol=1e-5)
  lower, upper = search.bounds
  assert np.all(forced.z_where >= lower) and np.all(forced.z_where <= upper)


def test_drop_objects_never_lower_the_objective():
  # DAIR, whose objects depend on each other (AIR's path is the same),
  # every step present.
  images, out, _, search, objective = _searches(True, 5)
  drop = jax.jit(
    lambda o, gain: refinement.drop_objects(o, images, search, 1, gain)
  )
  dropped = drop(out, refinement.DROP_GAIN)
  before, after = np.asarray(objective(out)), np.asarray(objective(dropped))
  assert np.all(after >= before - 1e-3), (before, after)
  # Taken whatever it costs: the least probable object goes, the others
  # are moved and re-read.
  forced = drop(out, -np.inf)
  least = np.argmin(np.asarray(out.z_pres_prob), axis=1)
  want = np.ones((len(images), 3))
  want[np.arange(len(images)), least] = 0
  np.testing.assert_array_equal(forced.z_pres, want)
  # The objects left, where they now are, are what the model reads there.
  what_q, windows = search.objects_at(forced.z_where, forced.z_pres)
  np.testing.assert_allclose(forced.z_what, what_q.loc, atol=1e-5)
  np.testing.assert_allclose(forced.windows, windows, atol=1e-5)
