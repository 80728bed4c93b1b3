"""The AIR module: shapes, the z_pres chain, masking, compile-once, learning."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from air_jax import air
from air_jax import distributions
from air_jax import objectives
from air_jax import spatial_transformer
from tests import helpers

SMALL = dict(
  image_size=20,
  window_size=8,
  max_steps=3,
  lstm_size=32,
  z_what_size=6,
  encoder_hidden_size=32,
  decoder_hidden_size=32,
  baseline_lstm_size=16,
  baseline_hidden_size=16,
  z_where_prior_loc=(2.0, 0.0, 0.0),
)


# The z_where prior of SMALL, as the objective sees it.
WHERE_PRIOR = distributions.NormalParams(
  loc=jnp.array([2.0, 0.0, 0.0]), scale=jnp.array([0.2, 1.0, 1.0])
)


def _init(model, images, seed=0):
  # Jitted: an eager init runs the scan op by op (about 15 s here).
  return jax.jit(model.init)(
    {'params': jax.random.key(seed), 'sample': jax.random.key(seed + 1)}, images
  )['params']


@pytest.mark.parametrize('difference', [False, True])
def test_output_shapes_and_finiteness(difference):
  model = air.AIR(**SMALL, difference=difference)
  images = jax.random.uniform(jax.random.key(0), (5, 20, 20))
  params = _init(model, images)
  out = helpers.apply_jitted(model, params, images, jax.random.key(3))
  b, n, d = 5, 3, 6
  expected = {
    'z_pres': (b, n),
    'z_pres_prob': (b, n),
    'mask': (b, n),
    'z_where': (b, n, 3),
    'z_where_loc': (b, n, 3),
    'z_where_scale': (b, n, 3),
    'z_what': (b, n, d),
    'z_what_loc': (b, n, d),
    'z_what_scale': (b, n, d),
    'windows': (b, n, 8, 8),
    'canvas': (b, 20, 20),
    'baseline': (b, n),
  }
  for name, shape in expected.items():
    value = getattr(out, name)
    assert value.shape == shape, name
    assert np.all(np.isfinite(value)), name
  assert np.all(np.asarray(out.z_where_scale) > 0)


def test_z_pres_is_monotone_and_mask_is_previous_z_pres():
  model = air.AIR(**SMALL)
  images = jax.random.uniform(jax.random.key(1), (256, 20, 20))
  params = _init(model, images)
  out = helpers.apply_jitted(model, params, images, jax.random.key(4))
  z = np.asarray(out.z_pres)
  assert set(np.unique(z)) <= {0.0, 1.0}
  assert np.all(np.diff(z, axis=1) <= 0)  # Never 1 after a 0.
  np.testing.assert_array_equal(np.asarray(out.mask)[:, 0], 1.0)
  np.testing.assert_array_equal(np.asarray(out.mask)[:, 1:], z[:, :-1])
  counts = np.asarray(out.count)
  assert len(np.unique(counts)) > 1  # q starts near 1/2: several counts occur.
  np.testing.assert_array_equal(counts, z.sum(1))


def test_canvas_is_the_sum_of_present_objects():
  model = air.AIR(**SMALL)
  images = jax.random.uniform(jax.random.key(2), (16, 20, 20))
  params = _init(model, images)
  out = helpers.apply_jitted(model, params, images, jax.random.key(5))
  objects = [
    spatial_transformer.window_to_image(
      out.windows[:, t], out.z_where[:, t], 20
    )
    for t in range(3)
  ]
  expected = sum(out.z_pres[:, t, None, None] * objects[t] for t in range(3))
  np.testing.assert_allclose(out.canvas, expected, atol=1e-5)


def test_dair_canvas_matches_rendering():
  model = air.AIR(**SMALL, difference=True)
  images = jax.random.uniform(jax.random.key(6), (8, 20, 20))
  params = _init(model, images)
  out = helpers.apply_jitted(model, params, images, jax.random.key(7))
  rendered, _ = model.apply(
    {'params': params},
    out.z_pres,
    out.z_where,
    out.z_what,
    method=air.AIR.render,
  )
  np.testing.assert_allclose(out.canvas, rendered, atol=1e-5)


def test_per_example_keys_make_samples_independent_of_the_batch():
  model = air.AIR(**SMALL)
  images = jax.random.uniform(jax.random.key(8), (6, 20, 20))
  params = _init(model, images)
  keys = jax.random.split(jax.random.key(9), 6)
  full = helpers.apply_jitted(model, params, images, keys=keys)
  part = helpers.apply_jitted(model, params, images[3:], keys=keys[3:])
  np.testing.assert_allclose(full.z_where[3:], part.z_where, atol=1e-5)
  np.testing.assert_array_equal(full.z_pres[3:], part.z_pres)


@pytest.mark.parametrize('difference', [False, True])
def test_unrolling_and_fewer_steps_do_not_change_the_math(difference):
  """The speed knob `unroll` leaves the outputs as they are, and a model
  with max_steps = 1 (no scan at all) gives step 1 of a longer one."""
  images = jax.random.uniform(jax.random.key(10), (4, 20, 20))
  keys = jax.random.split(jax.random.key(11), 4)
  rolled = air.AIR(**SMALL, difference=difference, unroll=1)
  params = _init(rolled, images)
  reference = helpers.apply_jitted(rolled, params, images, keys=keys)
  for other in (
    air.AIR(**SMALL, difference=difference, unroll=0),
    air.AIR(**SMALL, difference=difference, unroll=2),
  ):
    out = helpers.apply_jitted(other, params, images, keys=keys)
    for name in ('z_pres', 'z_where', 'z_what', 'canvas', 'baseline'):
      np.testing.assert_allclose(
        getattr(out, name), getattr(reference, name), atol=1e-5, err_msg=name
      )
  one = air.AIR(**{**SMALL, 'max_steps': 1}, difference=difference)
  first = helpers.apply_jitted(one, params, images, keys=keys)
  for name in ('z_pres', 'mask', 'z_where', 'z_what', 'baseline'):
    np.testing.assert_allclose(
      getattr(first, name),
      getattr(reference, name)[:, :1],
      atol=1e-5,
      err_msg=name,
    )


@pytest.mark.parametrize('difference', [False, True])
def test_skipping_finished_steps_changes_neither_loss_nor_gradients(difference):
  """Once every example has stopped, `skip_finished` skips the step's work:
  the present objects, the canvas, the loss and every gradient equal those
  of the model that computes all N steps, in sampled and mode passes."""
  config = objectives.LossConfig()
  kwargs = dict(SMALL, max_steps=5, difference=difference, unroll=1)
  skipping = air.AIR(**kwargs)
  computing = air.AIR(**kwargs, skip_finished=False)
  images = jax.random.uniform(jax.random.key(20), (6, 20, 20))
  keys = jax.random.split(jax.random.key(21), 6)
  params = air.init_params(skipping, 0)
  # q(z_pres) near its lower bound: every example stops within 2-3 steps.
  head = params['cell']['z_pres_head']
  head['bias'] = head['bias'] - 5.0

  def loss(p, model):
    out = model.apply({'params': p}, images, keys=keys)
    value, _ = objectives.air_loss(
      out, images, config, 100, objectives.SignalMoments.create()
    )
    return value, out

  value_and_grad = jax.jit(
    jax.value_and_grad(loss, has_aux=True), static_argnums=1
  )
  (value, out), grads = value_and_grad(params, skipping)
  (ref_value, ref), ref_grads = value_and_grad(params, computing)
  # The batch stopped early (else nothing was skipped), and the skipped
  # steps hold the placeholder (q = 0) where the full model computed q.
  last = int(jnp.max(jnp.sum(ref.mask, axis=1)))
  assert last < 5
  assert np.all(np.asarray(out.z_pres_prob)[:, last:] == 0)
  assert np.all(np.asarray(ref.z_pres_prob)[:, last:] > 0)
  np.testing.assert_array_equal(out.z_pres, ref.z_pres)
  np.testing.assert_array_equal(out.mask, ref.mask)
  present = np.asarray(ref.z_pres)[..., None]
  for name in ('z_where', 'z_what'):
    np.testing.assert_allclose(
      getattr(out, name) * present, getattr(ref, name) * present, atol=1e-6
    )
  np.testing.assert_allclose(out.canvas, ref.canvas, atol=1e-6)
  np.testing.assert_allclose(value, ref_value, rtol=1e-6)
  chex.assert_trees_all_close(grads, ref_grads, rtol=1e-5, atol=1e-7)
  modes = air.posterior_modes(skipping, params, images)
  ref_modes = air.posterior_modes(computing, params, images)
  np.testing.assert_array_equal(modes.z_pres, ref_modes.z_pres)
  np.testing.assert_allclose(modes.canvas, ref_modes.canvas, atol=1e-6)


def test_deterministic_mode_uses_posterior_modes():
  model = air.AIR(**SMALL)
  images = jax.random.uniform(jax.random.key(10), (8, 20, 20))
  params = _init(model, images)
  a = helpers.apply_jitted(
    model, params, images, jax.random.key(0), deterministic=True
  )
  b = helpers.apply_jitted(
    model, params, images, jax.random.key(1), deterministic=True
  )
  np.testing.assert_array_equal(a.z_pres, b.z_pres)
  np.testing.assert_allclose(a.z_where, a.z_where_loc)
  np.testing.assert_allclose(a.z_what, a.z_what_loc)


def test_baseline_gets_no_gradient_from_the_elbo():
  model = air.AIR(**SMALL)
  images = jax.random.uniform(jax.random.key(11), (4, 20, 20))
  params = _init(model, images)

  def elbo(params):
    out = helpers.apply_jitted(model, params, images, jax.random.key(0))
    return jnp.mean(objectives.elbo_terms(out, images, 0.01, WHERE_PRIOR).elbo)

  grads = jax.jit(jax.grad(elbo))(params)
  # Every baseline parameter lives under 'baseline'; none gets a gradient.
  assert not [k for k in grads if k != 'baseline' and 'baseline' in k]
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads['baseline']):
    assert float(jnp.max(jnp.abs(leaf))) == 0.0, jax.tree_util.keystr(path)
  assert float(optax.tree.norm(grads['cell'])) > 0


def test_jit_compiles_once():
  model = air.AIR(**SMALL)
  images = jax.random.uniform(jax.random.key(12), (4, 20, 20))
  params = _init(model, images)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(params, images, key):
    return model.apply({'params': params}, images, rngs={'sample': key}).canvas

  for i in range(3):
    forward(params, images + 0.01 * i, jax.random.key(i))


def test_training_on_synthetic_images_improves_the_elbo():
  # A handful of synthetic scenes: 0-2 bright squares on a 20x20 canvas.
  rng = np.random.default_rng(0)
  images = np.zeros((16, 20, 20), np.float32)
  for i in range(16):
    for _ in range(i % 3):
      top, left = rng.integers(0, 14, size=2)
      images[i, top : top + 6, left : left + 6] = 1.0
  images = jnp.asarray(images)
  model = air.AIR(**SMALL)
  params = _init(model, images)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  config = objectives.LossConfig(
    z_pres_prior=distributions.Schedule.constant(0.01),
    z_where_prior_loc=(2.0, 0.0, 0.0),
    z_where_prior_scale=(0.2, 1.0, 1.0),
    likelihood='normal',
    likelihood_std=distributions.Schedule.constant(0.3),
    baseline='plain',
  )

  def loss_fn(params, key):
    out = model.apply({'params': params}, images, rngs={'sample': key})
    loss, aux = objectives.air_loss(out, images, config, 0)
    return loss, jnp.mean(aux.terms.elbo)

  @jax.jit
  def step(params, opt_state, key):
    (_, elbo), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, elbo

  elbos = []
  for i in range(300):
    params, opt_state, elbo = step(params, opt_state, jax.random.key(i))
    elbos.append(float(elbo))
  first, last = np.mean(elbos[:20]), np.mean(elbos[-20:])
  assert np.all(np.isfinite(elbos))
  # Per image, 400 pixels: the ELBO must rise by well over 100 nats.
  assert last > first + 100, (first, last)


def test_logit_bound_keeps_q_away_from_zero_and_one():
  model = air.AIR(**SMALL, z_pres_logit_bound=2.0)
  images = jax.random.uniform(jax.random.key(13), (8, 20, 20))
  params = _init(model, images)
  # Push the z_pres head far out: q would be 1 without the bound.
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x + 100.0
    if 'z_pres_head' in jax.tree_util.keystr(path)
    else x,
    params,
  )
  out = helpers.apply_jitted(model, params, images, jax.random.key(0))
  q = np.asarray(out.z_pres_prob)
  bound = 1.0 / (1.0 + np.exp(-2.0))
  assert np.all(q <= bound + 1e-6) and np.all(q >= 1 - bound - 1e-6)
  assert q.max() > 0.85


def test_defaults_are_the_recipe():
  model = air.AIR()
  assert model.z_where_prior_loc == (2.5, 0.0, 0.0)
  assert model.z_pres_logit_bound == 3.0
  assert model.z_where_scale_range is None
  assert model.use_baseline


@pytest.mark.parametrize('difference', [False, True])
def test_baseline_network_lives_under_one_key(difference):
  images = jnp.zeros((2, 20, 20))
  params = _init(air.AIR(**SMALL, difference=difference), images)
  assert set(params['baseline']) == {'projection', 'lstm', 'init_state', 'mlp'}
  assert params['baseline']['init_state'].shape == (2, 16)
  # It reads the inference network's image projection ([B, 4F], F = 32).
  assert params['baseline']['projection']['kernel'].shape == (4 * 32, 4 * 16)
  assert not [k for k in params if k != 'baseline' and 'baseline' in k]

  model = air.AIR(**SMALL, difference=difference, use_baseline=False)
  params = _init(model, images)
  assert not [k for k in params if 'baseline' in k]
  out = helpers.apply_jitted(model, params, images, jax.random.key(0))
  np.testing.assert_array_equal(out.baseline, np.zeros((2, 3)))


def test_init_params_matches_init_structure():
  model = air.AIR(**SMALL)
  params = air.init_params(model, 0)
  reference = _init(model, jnp.zeros((3, 20, 20)))
  assert jax.tree.structure(params) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    assert a.shape == b.shape
  # Deterministic in the seed, and the seed matters.
  again, other = air.init_params(model, 0), air.init_params(model, 1)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  kernel = params['image_projection']['kernel']
  assert not np.array_equal(kernel, other['image_projection']['kernel'])


def _with_z_where_head(params, bias):
  """params whose z_where head outputs `bias` ([6]) whatever its input."""
  head = params['cell']['z_where_head']
  head = {
    'kernel': jnp.zeros_like(head['kernel']),
    'bias': jnp.asarray(bias, jnp.float32),
  }
  return {**params, 'cell': {**params['cell'], 'z_where_head': head}}


@pytest.mark.parametrize('difference', [False, True])
def test_z_where_scale_range_bounds_the_scale_mean(difference):
  lo, hi = 1.2, 4.0
  # Every step computed: the test reads the scale of all N steps.
  model = air.AIR(
    **SMALL,
    difference=difference,
    z_where_scale_range=(lo, hi),
    skip_finished=False,
  )
  free = air.AIR(**SMALL, difference=difference, skip_finished=False)
  images = jax.random.uniform(jax.random.key(14), (4, 20, 20))
  params = _init(model, images)

  def scale_loc(model, head_output):
    out = helpers.apply_jitted(
      model,
      _with_z_where_head(params, [head_output] + [0.0] * 5),
      images,
      deterministic=True,
    )
    return np.asarray(out.z_where_loc[..., 0])

  # A zero head output gives the prior mean.
  np.testing.assert_allclose(scale_loc(model, 0.0), 2.0, rtol=1e-6)
  # Huge and tiny outputs stay within the range (float32 saturates the
  # sigmoid at +-100, so the bounds themselves are reached) ...
  assert np.all(
    (scale_loc(model, 100.0) <= hi) & (scale_loc(model, 100.0) > 3.9)
  )
  assert np.all(
    (scale_loc(model, -100.0) >= lo) & (scale_loc(model, -100.0) < 1.3)
  )
  # ... moderate ones strictly inside, monotone in the output ...
  inside = [scale_loc(model, v) for v in (-3.0, -1.0, 1.0, 3.0)]
  for a, b in zip(inside, inside[1:]):
    assert np.all((lo < a) & (a < b) & (b < hi))
  # ... where without the range the mean is the prior plus the output.
  np.testing.assert_allclose(scale_loc(free, 100.0), 102.0, rtol=1e-6)
  np.testing.assert_allclose(scale_loc(free, 0.0), 2.0, rtol=1e-6)


def _drawn_output(drawings, z_pres) -> air.AIROutput:
  """An AIROutput whose [1, N, H, W] windows are drawn over the whole image
  (identity z_where), so each window is its drawing in image pixels."""
  drawings = jnp.asarray(drawings, jnp.float32)
  b, n = drawings.shape[:2]
  zeros = jnp.zeros((b, n))
  return air.AIROutput(
    z_pres=jnp.asarray(z_pres, jnp.float32),
    z_pres_prob=zeros,
    mask=zeros,
    z_where=jnp.tile(jnp.array([1.0, 0.0, 0.0]), (b, n, 1)),
    z_where_loc=jnp.zeros((b, n, 3)),
    z_where_scale=jnp.ones((b, n, 3)),
    z_what=zeros[..., None],
    z_what_loc=zeros[..., None],
    z_what_scale=zeros[..., None],
    windows=drawings,
    canvas=jnp.zeros((b,) + drawings.shape[2:]),
    baseline=zeros,
  )


def test_ink_boxes_by_hand():
  # A 20 x 30 image and four objects drawn in image pixels.
  drawings = np.zeros((1, 4, 20, 30), np.float32)
  drawings[0, 0, 2:10, 3:13] = 0.9
  drawings[0, 1, 5:15, 10:26] = 0.5
  drawings[0, 2] = 1.0  # Absent: explains nothing, however bright.
  drawings[0, 3, 16:19, 0:3] = 0.8  # Present, over no ink.
  image = np.zeros((1, 20, 30), np.float32)
  image[0, 4:9, 4:12] = 1.0  # Inside object 0's drawing only.
  image[0, 6:13, 11:21] = 0.3  # Where 0 and 1 both draw, 0 is brighter.
  image[0, 18, 28] = 1.0  # Drawn by no present object.
  out = _drawn_output(drawings, [[1, 1, 0, 1]])
  tight = np.asarray(air.tight_boxes(out, (20, 30)))[0]

  boxes = np.asarray(air.ink_boxes(out, jnp.asarray(image)))[0]
  # 0: rows 4..9 (its own blob, and rows 6..9 of the faint one at columns
  # 11..12), columns 4..12. 1: the faint blob outside 0's drawing: rows
  # 6..12 (rows 10..12 at columns 11..12), columns 11..20.
  np.testing.assert_array_equal(boxes[0], [4, 4, 6, 9])
  np.testing.assert_array_equal(boxes[1], [6, 11, 7, 10])
  # No ink explained: the tight box of the drawing.
  np.testing.assert_array_equal(boxes[2], tight[2])
  np.testing.assert_allclose(boxes[3], [16, 0, 3, 3], atol=1e-5)
  np.testing.assert_allclose(tight[3], [16, 0, 3, 3], atol=1e-5)

  # The faint blob is not ink above 0.5; object 1 keeps its drawing's box.
  boxes = np.asarray(air.ink_boxes(out, jnp.asarray(image), ink_threshold=0.5))
  np.testing.assert_array_equal(boxes[0, 0], [4, 4, 5, 8])
  np.testing.assert_allclose(boxes[0, 1], [5, 10, 10, 16], atol=1e-5)
  # Object 1's drawing (0.5) is not above a render threshold of 0.6.
  boxes = np.asarray(
    air.ink_boxes(out, jnp.asarray(image), render_threshold=0.6)
  )
  np.testing.assert_array_equal(boxes[0, 0], [4, 4, 6, 9])
  np.testing.assert_allclose(boxes[0, 1], [5, 10, 10, 16], atol=1e-5)
