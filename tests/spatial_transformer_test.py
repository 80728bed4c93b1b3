"""Spatial transformer against scipy's bilinear interpolation and exact cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from air_jax import spatial_transformer as st


def _centres(n):
  return (2 * np.arange(n) + 1) / n - 1


def reference_image_to_window(image, z_where, h, w):
  """Bilinear read with scipy (zero padding: mode='grid-constant')."""
  s, x, y = z_where
  height, width = image.shape
  rows_u = y + _centres(h) / s
  cols_u = x + _centres(w) / s
  r = ((rows_u + 1) * height - 1) / 2
  c = ((cols_u + 1) * width - 1) / 2
  rr, cc = np.meshgrid(r, c, indexing='ij')
  return ndimage.map_coordinates(
    image.astype(np.float64), [rr, cc], order=1, mode='grid-constant', cval=0.0
  )


def reference_window_to_image(window, z_where, height, width):
  s, x, y = z_where
  h, w = window.shape
  rows_v = (_centres(height) - y) * s
  cols_v = (_centres(width) - x) * s
  r = ((rows_v + 1) * h - 1) / 2
  c = ((cols_v + 1) * w - 1) / 2
  rr, cc = np.meshgrid(r, c, indexing='ij')
  return ndimage.map_coordinates(
    window.astype(np.float64), [rr, cc], order=1, mode='grid-constant', cval=0.0
  )


def _random_z_where(rng, batch):
  return np.stack(
    [
      rng.uniform(0.8, 4.0, batch),
      rng.uniform(-1, 1, batch),
      rng.uniform(-1, 1, batch),
    ],
    axis=1,
  ).astype(np.float32)


def test_identity_reproduces_input():
  rng = np.random.default_rng(0)
  images = rng.random((3, 50, 50)).astype(np.float32)
  identity = np.tile([[1.0, 0.0, 0.0]], (3, 1)).astype(np.float32)
  # float32 pixel indices are exact to a few 1e-6.
  np.testing.assert_allclose(
    st.image_to_window(images, identity, 50), images, atol=2e-5
  )
  np.testing.assert_allclose(
    st.window_to_image(images, identity, 50), images, atol=2e-5
  )


@pytest.mark.parametrize('shift', [1, 3, -2])
def test_integer_pixel_shift_equals_array_shift(shift):
  rng = np.random.default_rng(1)
  images = rng.random((2, 20, 20)).astype(np.float32)
  # x = 2k / W moves the window k pixels right: window[:, b] = image[:, b + k].
  z_where = np.array(
    [[1.0, 2 * shift / 20, 0.0], [1.0, 0.0, 2 * shift / 20]], np.float32
  )
  out = np.asarray(st.image_to_window(images, z_where, 20))
  expected_cols = np.zeros_like(images[0])
  expected_rows = np.zeros_like(images[1])
  if shift > 0:
    expected_cols[:, :-shift] = images[0][:, shift:]
    expected_rows[:-shift, :] = images[1][shift:, :]
  else:
    expected_cols[:, -shift:] = images[0][:, :shift]
    expected_rows[-shift:, :] = images[1][:shift, :]
  np.testing.assert_allclose(out[0], expected_cols, atol=2e-5)
  np.testing.assert_allclose(out[1], expected_rows, atol=2e-5)


def test_round_trips_on_an_aligned_grid():
  # s = 2 with a half-pixel shift puts each window pixel on one image pixel.
  rng = np.random.default_rng(2)
  windows = rng.random((2, 25, 25)).astype(np.float32)
  z_where = np.array([[2.0, 0.02, 0.02], [2.0, -0.3, 0.5]], np.float32)
  images = st.window_to_image(windows, z_where, 50)
  np.testing.assert_allclose(
    st.image_to_window(images, z_where, 25), windows, atol=1e-5
  )
  # Reading then writing recovers the image inside the window's square.
  source = rng.random((1, 50, 50)).astype(np.float32)
  window = st.image_to_window(source, z_where[:1], 25)
  back = np.asarray(st.window_to_image(window, z_where[:1], 50))[0]
  box = st.z_where_to_box(jnp.asarray(z_where[0]), 50)
  top, left = int(round(float(box.top))), int(round(float(box.left)))
  np.testing.assert_allclose(
    back[top : top + 25, left : left + 25],
    source[0, top : top + 25, left : left + 25],
    atol=1e-5,
  )
  # Outside the square: zero (up to float32 rounding of pixel indices).
  assert (
    np.abs(back[:top]).max() < 1e-4 and np.abs(back[top + 25 :]).max() < 1e-4
  )


def test_matches_scipy_on_random_inputs():
  rng = np.random.default_rng(3)
  images = rng.random((6, 50, 50)).astype(np.float32)
  z_where = _random_z_where(rng, 6)
  windows = np.asarray(st.image_to_window(images, z_where, (28, 20)))
  drawn = np.asarray(st.window_to_image(windows, z_where, 50))
  for i in range(6):
    np.testing.assert_allclose(
      windows[i],
      reference_image_to_window(images[i], z_where[i], 28, 20),
      atol=2e-5,
    )
    np.testing.assert_allclose(
      drawn[i],
      reference_window_to_image(windows[i], z_where[i], 50, 50),
      atol=2e-5,
    )


def test_channels_are_transformed_independently():
  rng = np.random.default_rng(4)
  images = rng.random((2, 30, 30, 3)).astype(np.float32)
  z_where = _random_z_where(rng, 2)
  out = np.asarray(st.image_to_window(images, z_where, 12))
  for c in range(3):
    np.testing.assert_allclose(
      out[..., c], st.image_to_window(images[..., c], z_where, 12), atol=1e-6
    )


@pytest.fixture
def float64():
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', False)


def test_gradients_match_finite_differences(float64):
  # float64: the bilinear map is piecewise linear in z_where, so central
  # differences with a small step are exact up to rounding away from kinks.
  del float64
  rng = np.random.default_rng(5)
  images = jnp.asarray(rng.random((2, 20, 20)))
  windows = jnp.asarray(rng.random((2, 10, 10)))
  z_where = jnp.asarray([[1.7, 0.13, -0.21], [2.9, -0.37, 0.33]])
  weights_w = jnp.asarray(rng.standard_normal((2, 10, 10)))
  weights_i = jnp.asarray(rng.standard_normal((2, 20, 20)))

  def read(images, z_where):
    return jnp.sum(weights_w * st.image_to_window(images, z_where, 10))

  def write(windows, z_where):
    return jnp.sum(weights_i * st.window_to_image(windows, z_where, 20))

  for f, source in ((read, images), (write, windows)):
    grads = jax.grad(f, argnums=(0, 1))(source, z_where)
    for arg, grad in zip((0, 1), grads):
      assert grad.dtype == jnp.float64
      direction = jnp.asarray(rng.standard_normal(grad.shape))
      eps = 1e-6
      args_plus = [source, z_where]
      args_minus = [source, z_where]
      base = args_plus[arg]
      args_plus[arg] = base + eps * direction
      args_minus[arg] = base - eps * direction
      numeric = (f(*args_plus) - f(*args_minus)) / (2 * eps)
      analytic = jnp.sum(grad * direction)
      np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('scale', [0.0, 1e-8, -1e-8, 1e-30, 1e-3])
def test_no_nan_for_scale_near_zero(scale):
  images = jnp.ones((1, 20, 20))
  windows = jnp.ones((1, 8, 8))
  z_where = jnp.asarray([[scale, 0.1, -0.2]], jnp.float32)

  def loss(z_where):
    return jnp.sum(st.image_to_window(images, z_where, 8)) + jnp.sum(
      st.window_to_image(windows, z_where, 20)
    )

  value, grad = jax.value_and_grad(loss)(z_where)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  box = st.z_where_to_box(z_where, 20)
  assert all(np.all(np.isfinite(v)) for v in box)


def test_box_convention_and_inverse():
  box = st.z_where_to_box(jnp.asarray([1.0, 0.0, 0.0]), 50)
  np.testing.assert_allclose([float(v) for v in box], [0, 0, 50, 50], atol=1e-6)
  box = st.z_where_to_box(jnp.asarray([2.0, 0.0, 0.0]), 50)
  np.testing.assert_allclose(
    [float(v) for v in box], [12.5, 12.5, 25, 25], atol=1e-6
  )
  z = jnp.asarray([[2.5, 0.3, -0.4], [1.2, -0.1, 0.9]])
  np.testing.assert_allclose(
    st.box_to_z_where(st.z_where_to_box(z, 50), 50), z, atol=1e-5
  )


def test_rejects_bad_z_where_shape():
  with pytest.raises(ValueError, match='z_where'):
    st.image_to_window(jnp.ones((2, 10, 10)), jnp.ones((2, 2)), 5)


def test_windows_to_canvas_is_the_weighted_sum_of_drawn_windows():
  rng = np.random.default_rng(7)
  windows = rng.random((2, 3, 12, 9)).astype(np.float32)
  z_where = np.stack([_random_z_where(rng, 3) for _ in range(2)])
  weights = rng.random((2, 3)).astype(np.float32)
  canvas = np.asarray(st.windows_to_canvas(windows, z_where, weights, 30))
  for b in range(2):
    expected = sum(
      weights[b, n]
      * reference_window_to_image(windows[b, n], z_where[b, n], 30, 30)
      for n in range(3)
    )
    np.testing.assert_allclose(canvas[b], expected, atol=2e-5)

  # Its gradients are those of the per-window form.
  target = jnp.asarray(rng.standard_normal((2, 30, 30)).astype(np.float32))

  def fused(windows, z_where, weights):
    return jnp.sum(target * st.windows_to_canvas(windows, z_where, weights, 30))

  def per_window(windows, z_where, weights):
    drawn = st.window_to_image(
      windows.reshape(6, 12, 9), z_where.reshape(6, 3), 30
    ).reshape(2, 3, 30, 30)
    canvas = jnp.sum(weights[..., None, None] * drawn, axis=1)
    return jnp.sum(target * canvas)

  args = (jnp.asarray(windows), jnp.asarray(z_where), jnp.asarray(weights))
  for got, want in zip(
    jax.grad(fused, argnums=(0, 1, 2))(*args),
    jax.grad(per_window, argnums=(0, 1, 2))(*args),
  ):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='weights'):
    st.windows_to_canvas(windows, z_where, weights[:, :2], 30)
