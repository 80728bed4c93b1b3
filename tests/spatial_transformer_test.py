"""Spatial transformer against scipy's bilinear interpolation and exact cases."""

import itertools

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


def _canvas_inputs(rng, lead, num=3, h=12, w=9):
  windows = rng.random((*lead, num, h, w)).astype(np.float32)
  z_where = _random_z_where(rng, int(np.prod(lead)) * num)
  weights = rng.random((*lead, num)).astype(np.float32)
  return windows, z_where.reshape(*lead, num, 3), weights


def _jitted(fn, size):
  """`fn` with its size argument bound, jitted.

  One compile per shape is much faster here than eager op-by-op compiles.
  XLA may order float32 arithmetic differently for different shapes, hence
  atol=1e-5 in the comparisons.
  """
  return jax.jit(lambda *arrays: fn(*arrays, size))


READ = _jitted(st.image_to_window, (12, 9))
WRITE = _jitted(st.window_to_image, 30)
CANVAS = _jitted(st.windows_to_canvas, 30)
BOXES = _jitted(st.object_boxes, 30)


def test_per_example_calls_match_the_batched_call():
  rng = np.random.default_rng(8)
  images = rng.random((4, 30, 30)).astype(np.float32)
  z_where = _random_z_where(rng, 4)
  read = np.asarray(READ(images, z_where))
  write = np.asarray(WRITE(read, z_where))
  windows, canvas_z_where, weights = _canvas_inputs(rng, (4,))
  canvas = np.asarray(CANVAS(windows, canvas_z_where, weights))
  boxes = BOXES(windows, canvas_z_where)
  for b in range(4):
    one_read = READ(images[b], z_where[b])
    assert one_read.shape == (12, 9)
    np.testing.assert_allclose(one_read, read[b], atol=1e-5)
    one_write = WRITE(read[b], z_where[b])
    assert one_write.shape == (30, 30)
    np.testing.assert_allclose(one_write, write[b], atol=1e-5)
    one_canvas = CANVAS(windows[b], canvas_z_where[b], weights[b])
    assert one_canvas.shape == (30, 30)
    np.testing.assert_allclose(one_canvas, canvas[b], atol=1e-5)
    one_boxes = BOXES(windows[b], canvas_z_where[b])
    for got, want in zip(one_boxes, boxes):
      np.testing.assert_allclose(got, want[b], atol=1e-5)
  # Eagerly too, as most callers use them.
  np.testing.assert_allclose(
    st.image_to_window(images[0], z_where[0], (12, 9)), read[0], atol=1e-5
  )


def test_two_leading_axes_match_the_flattened_call():
  rng = np.random.default_rng(9)
  images = rng.random((2, 3, 30, 30, 2)).astype(np.float32)
  z_where = _random_z_where(rng, 6).reshape(2, 3, 3)
  read = READ(images, z_where)
  assert read.shape == (2, 3, 12, 9, 2)
  flat_read = READ(images.reshape(6, 30, 30, 2), z_where.reshape(6, 3))
  np.testing.assert_allclose(
    read, np.reshape(flat_read, (2, 3, 12, 9, 2)), atol=1e-5
  )
  write = WRITE(read, z_where)
  assert write.shape == (2, 3, 30, 30, 2)
  flat_write = WRITE(np.reshape(read, (6, 12, 9, 2)), z_where.reshape(6, 3))
  np.testing.assert_allclose(
    write, np.reshape(flat_write, (2, 3, 30, 30, 2)), atol=1e-5
  )
  windows, canvas_z_where, weights = _canvas_inputs(rng, (2, 3))
  canvas = CANVAS(windows, canvas_z_where, weights)
  assert canvas.shape == (2, 3, 30, 30)
  flat = CANVAS(
    windows.reshape(6, 3, 12, 9),
    canvas_z_where.reshape(6, 3, 3),
    weights.reshape(6, 3),
  )
  np.testing.assert_allclose(
    canvas, np.reshape(flat, (2, 3, 30, 30)), atol=1e-5
  )
  boxes = BOXES(windows, canvas_z_where)
  flat_boxes = BOXES(windows.reshape(18, 12, 9), canvas_z_where.reshape(18, 3))
  for got, want in zip(boxes, flat_boxes):
    assert got.shape == (2, 3, 3)
    np.testing.assert_allclose(got, np.reshape(want, (2, 3, 3)), atol=1e-5)


def test_vmap_matches_the_batched_call():
  rng = np.random.default_rng(10)
  images = rng.random((4, 30, 30)).astype(np.float32)
  z_where = _random_z_where(rng, 4)
  read = READ(images, z_where)
  np.testing.assert_allclose(jax.vmap(READ)(images, z_where), read, atol=1e-5)
  np.testing.assert_allclose(
    jax.vmap(WRITE)(read, z_where), WRITE(read, z_where), atol=1e-5
  )
  windows, canvas_z_where, weights = _canvas_inputs(rng, (4,))
  np.testing.assert_allclose(
    jax.vmap(CANVAS)(windows, canvas_z_where, weights),
    CANVAS(windows, canvas_z_where, weights),
    atol=1e-5,
  )
  eager = st.object_boxes(windows, canvas_z_where, 30)
  for got in (
    jax.vmap(BOXES)(windows, canvas_z_where),
    BOXES(windows, canvas_z_where),
  ):
    for a, b in zip(got, eager):
      np.testing.assert_allclose(a, b, atol=1e-5)


def test_windows_to_canvas_channels_are_independent():
  rng = np.random.default_rng(11)
  windows, z_where, weights = _canvas_inputs(rng, (2,))
  windows = np.stack([windows, 1.0 - windows, windows**2], axis=-1)
  canvas = np.asarray(CANVAS(windows, z_where, weights))
  assert canvas.shape == (2, 30, 30, 3)
  for c in range(3):
    np.testing.assert_allclose(
      canvas[..., c], CANVAS(windows[..., c], z_where, weights), atol=1e-5
    )


@pytest.mark.parametrize(
  'call, message',
  [
    # Leading axes (2,) from z_where, but one image.
    (
      lambda: st.image_to_window(jnp.ones((10, 10)), jnp.ones((2, 3)), 5),
      r'images must have shape \[\*L, H, W, \*C\] with leading axes \(2,\)',
    ),
    (
      lambda: st.image_to_window(jnp.ones((10,)), jnp.ones(3), 5),
      r'images must have shape \[\*L, H, W, \*C\]',
    ),
    (
      lambda: st.window_to_image(jnp.ones((3, 8, 8)), jnp.ones((2, 3)), 20),
      r'windows must have shape \[\*L, h, w, \*C\] with leading axes \(2,\)',
    ),
    (
      lambda: st.window_to_image(jnp.ones((8, 8)), jnp.ones(()), 20),
      r'z_where must have shape \[\*L, 3\]',
    ),
    (
      lambda: st.windows_to_canvas(
        jnp.ones((3, 8, 8)), jnp.ones(3), jnp.ones(3), 20
      ),
      r'z_where must have shape \[\*L, N, 3\]',
    ),
    (
      lambda: st.windows_to_canvas(
        jnp.ones((2, 4, 8, 8)), jnp.ones((2, 3, 3)), jnp.ones((2, 3)), 20
      ),
      r'windows must have shape \[\*L, N, h, w, \*C\] with leading axes '
      r'\(2, 3\)',
    ),
    (
      lambda: st.windows_to_canvas(
        jnp.ones((2, 3, 8, 8)), jnp.ones((2, 3, 3)), jnp.ones((2,)), 20
      ),
      r'weights must have shape \[\*L, N\] = \(2, 3\)',
    ),
    (
      lambda: st.object_boxes(jnp.ones((2, 8, 8, 1)), jnp.ones((2, 3)), 20),
      r'windows must have shape \[\*L, h, w\] with L = \(2,\)',
    ),
  ],
)
def test_wrong_shapes_name_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_object_boxes_of_a_rectangle_by_hand():
  # s = 2 on a 50-pixel image: the window's square is 25 pixels wide, so each
  # of its 10 pixels is 2.5 image pixels. Its top-left corner is at
  # ((y + 1 - 1/s) * 25, (x + 1 - 1/s) * 25) = (2.5, 17.5). Window rows 2..5
  # and columns 3..8 are on: top = 2.5 + 2 * 2.5, left = 17.5 + 3 * 2.5,
  # height = 4 * 2.5, width = 6 * 2.5.
  window = np.zeros((10, 10), np.float32)
  window[2:6, 3:9] = 0.8
  window[7, 0] = 0.5  # Not above the threshold.
  box = st.object_boxes(window, np.asarray([2.0, 0.2, -0.4], np.float32), 50)
  np.testing.assert_allclose(
    [float(v) for v in box], [7.5, 25.0, 10.0, 15.0], atol=1e-5
  )
  # A lower threshold takes the 0.5 pixel in: rows 2..7, columns 0..8.
  box = st.object_boxes(
    window, np.asarray([2.0, 0.2, -0.4], np.float32), 50, threshold=0.4
  )
  np.testing.assert_allclose(
    [float(v) for v in box], [7.5, 17.5, 15.0, 22.5], atol=1e-5
  )


def test_object_boxes_of_an_empty_window_have_zero_size():
  windows = np.zeros((2, 6, 6), np.float32)
  windows[1] = 0.5  # Equal to the threshold is not above it.
  z_where = np.asarray([[2.0, 0.2, -0.4], [3.0, 0.0, 0.5]], np.float32)
  box = st.object_boxes(windows, z_where, 50)
  np.testing.assert_array_equal(box.height, [0.0, 0.0])
  np.testing.assert_array_equal(box.width, [0.0, 0.0])
  # Placed at the centre of the window's square.
  np.testing.assert_allclose(box.top, [15.0, 37.5], atol=1e-5)
  np.testing.assert_allclose(box.left, [30.0, 25.0], atol=1e-5)


def test_object_boxes_with_identity_z_where_are_pixel_boxes():
  rng = np.random.default_rng(12)
  windows = np.zeros((3, 20, 30), np.float32)
  windows[0, 4:9, 11:27] = rng.uniform(0.6, 1.0, (5, 16))
  windows[1, 0, 29] = 0.9  # One corner pixel.
  windows[2] = rng.random((20, 30)) ** 8  # Scattered bright pixels.
  identity = np.tile([1.0, 0.0, 0.0], (3, 1)).astype(np.float32)
  box = st.object_boxes(windows, identity, (20, 30))
  for i in range(3):
    rows, cols = np.nonzero(windows[i] > 0.5)
    np.testing.assert_allclose(
      [float(v[i]) for v in box],
      [
        rows.min(),
        cols.min(),
        rows.max() + 1 - rows.min(),
        cols.max() + 1 - cols.min(),
      ],
      atol=1e-6,
    )


_WRITE_STATIC = jax.jit(st.window_to_image, static_argnums=2)


def _rendered_extent(profile, z_where, image_size, axis):
  """Image extent of a window profile drawn with window_to_image.

  The window is the 0/1 profile repeated across the other axis, so along
  `axis` the drawn intensity is the linear interpolation of the profile; it
  exceeds 0.5 exactly on the image spans of the profile's ones. Returns
  (first, one past the last) image pixel drawn above 0.5.
  """
  other = 8
  window = np.repeat(profile[:, None], other, axis=1)
  if axis == 1:
    window = window.T
  image = np.asarray(_WRITE_STATIC(window, z_where, image_size))
  hits = np.nonzero(np.any(image > 0.5, axis=1 - axis))[0]
  return hits.min(), hits.max() + 1


def test_object_boxes_match_windows_drawn_at_high_resolution():
  # At 400 x 320 pixels one window pixel is 13 or more image pixels, and the
  # drawn extent is within one image pixel of the exact one.
  rng = np.random.default_rng(13)
  image_size = (400, 320)
  windows = rng.random((6, 10, 8)).astype(np.float32) ** 2
  scale = rng.uniform(1.5, 3.0, 6)
  z_where = np.stack(
    [
      scale,
      rng.uniform(-1, 1, 6) * (1 - 1 / scale),  # The square stays inside.
      rng.uniform(-1, 1, 6) * (1 - 1 / scale),
    ],
    axis=1,
  ).astype(np.float32)
  box = st.object_boxes(windows, z_where, image_size)
  for i in range(6):
    mask = windows[i] > 0.5
    top, bottom = _rendered_extent(
      mask.any(axis=1).astype(np.float32), z_where[i], image_size, axis=0
    )
    left, right = _rendered_extent(
      mask.any(axis=0).astype(np.float32), z_where[i], image_size, axis=1
    )
    np.testing.assert_allclose(
      [float(v[i]) for v in box],
      [top, left, bottom - top, right - left],
      atol=1.0,
    )


def test_image_to_windows_reads_each_window_with_scipy():
  rng = np.random.default_rng(11)
  images = rng.random((2, 30, 24)).astype(np.float32)
  z_where = _random_z_where(rng, 6).reshape(2, 3, 3)
  windows = np.asarray(st.image_to_windows(images, z_where, (12, 9)))
  assert windows.shape == (2, 3, 12, 9)
  for b, n in itertools.product(range(2), range(3)):
    want = reference_image_to_window(images[b], z_where[b, n], 12, 9)
    np.testing.assert_allclose(windows[b, n], want, atol=2e-5)
  # Channels ride along.
  rgb = np.stack([images, 2 * images], axis=-1)
  both = np.asarray(st.image_to_windows(rgb, z_where, (12, 9)))
  np.testing.assert_allclose(both[..., 1], 2 * windows, atol=4e-5)


def test_object_image_products_equal_those_of_the_drawn_objects():
  rng = np.random.default_rng(12)
  windows = rng.random((2, 3, 12, 9)).astype(np.float32)
  z_where = _random_z_where(rng, 6).reshape(2, 3, 3)
  images = rng.standard_normal((2, 30, 26)).astype(np.float32)
  dot, sq_norm = st.object_image_products(windows, z_where, images)
  for b, n in itertools.product(range(2), range(3)):
    drawn = reference_window_to_image(windows[b, n], z_where[b, n], 30, 26)
    np.testing.assert_allclose(
      dot[b, n], np.sum(images[b] * drawn), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
      sq_norm[b, n], np.sum(drawn * drawn), rtol=1e-4, atol=1e-4
    )


def test_mask_box_by_hand():
  mask = np.zeros((3, 5, 7), bool)
  mask[0, 1:4, 2:6] = True  # Rows 1..3, columns 2..5.
  mask[1, 4, 6] = True  # The last pixel.
  box = st.mask_box(jnp.asarray(mask))  # mask[2] is empty.
  np.testing.assert_array_equal(
    np.stack(box, -1), [[1, 2, 3, 4], [4, 6, 1, 1], [0, 0, 0, 0]]
  )
