"""A parallel AIR: a grid of cells, each proposing at most one object.

Sequential AIR attends to one object per step, so its cost and its
difficulty grow with the number of objects. This model, after SPAIR
(Crawford & Pineau, AAAI 2019), proposes every object at once: a
convolutional network maps the image to an R x C grid of cells, and cell n
(row-major) infers

  z_pres_n in {0, 1}, q(z_pres_n = 1) from the cell's features,
  z_where_n = (s, x, y) with a prior centred on the cell,
  z_what_n from the window that z_where_n picks out of the image,

all conditionally independent given the image. The generative model is
AIR's: each present object's z_what is decoded into a window and written
where its z_where says; the canvas is their sum. The output is an
`air.AIROutput` with N = R * C proposals and every mask 1, so the
objective, the metrics, `evaluate` and `infer` treat it as an AIR whose
steps all make a choice.

Because the cells are independent given the image, the gradient of each
z_pres_n needs no baseline: `objectives` uses the exact expectation over
z_pres_n given the other samples (`objectives.local_signal`).

Glossary of shapes: B batch, R, C grid rows and columns, N = R * C
proposals, F features, H, W image, h, w window, D z_what size.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from air_jax import air
from air_jax import distributions
from air_jax import networks
from air_jax import spatial_transformer

__all__ = ['GridAIR', 'GridEncoder', 'cell_centres', 'cell_prior']


def cell_centres(grid: tuple[int, int]) -> jax.Array:
  """[R * C, 2] (x, y) centres of the cells, row-major, in the normalised
  image coordinates of `spatial_transformer` ([-1, 1], x along columns)."""
  rows, cols = grid
  y = (2.0 * jnp.arange(rows) + 1.0) / rows - 1.0
  x = (2.0 * jnp.arange(cols) + 1.0) / cols - 1.0
  yy, xx = jnp.meshgrid(y, x, indexing='ij')
  return jnp.stack([xx.reshape(-1), yy.reshape(-1)], axis=-1)


def cell_prior(
  grid: tuple[int, int],
  prior_loc: tuple[float, float, float],
  prior_scale: tuple[float, float, float],
) -> distributions.NormalParams:
  """The z_where prior of every cell, fields [R * C, 3]: the scale's mean is
  prior_loc[0] and the position's mean the cell's centre (prior_loc's x and
  y are not used); the stds are prior_scale for every cell."""
  centres = cell_centres(grid)
  scale_loc = jnp.full((centres.shape[0], 1), prior_loc[0], jnp.float32)
  loc = jnp.concatenate([scale_loc, centres], axis=-1)
  scale = jnp.broadcast_to(
    jnp.asarray(prior_scale, jnp.float32), (centres.shape[0], 3)
  )
  return distributions.NormalParams(loc, scale)


def _first_bias(prob: float, bound: float):
  """Initialiser of the head's bias: 0, except the z_pres logit, set so that
  `air.z_pres_probability` gives `prob`."""
  logit = math.log(prob) - math.log1p(-prob)
  if bound > 0:
    logit = bound * math.atanh(logit / bound)

  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.zeros(shape, dtype).at[0].set(logit)

  return init


class GridEncoder(nn.Module):
  """Image -> features of an R x C grid of cells.

  Two stride-2 convolutions, a (bilinear) resize to the grid and two 3 x 3
  convolutions at the grid's resolution: on a 48 x 48 image with an 8 x 8
  grid a cell's features see about 37 x 37 pixels around it.

  Attributes:
    grid: (R, C).
    features: F, channels of the last layers.
  """

  grid: tuple[int, int]
  features: int = 64

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, H, W] -> [B, R, C, F]."""
    x = images[..., None]
    x = nn.relu(networks.PatchConv(self.features // 2, strides=2)(x))
    x = nn.relu(networks.PatchConv(self.features, strides=2)(x))
    x = jax.image.resize(
      x, (x.shape[0], *self.grid, x.shape[-1]), method='linear'
    )
    x = nn.relu(networks.PatchConv(self.features)(x))
    return nn.relu(networks.PatchConv(self.features)(x))


class GridAIR(nn.Module):
  """AIR with parallel proposals (see the module docstring).

  Called like `air.AIR`: on images [B, H, W] in [0, 1] with an rng stream
  'sample' or per-example `keys`, or `deterministic=True` for posterior
  modes; returns an `air.AIROutput` with N = R * C.

  Attributes:
    image_size: H = W, or (H, W).
    window_size: h = w, or (h, w).
    grid_size: R = C, or (R, C): cells of the proposal grid.
    grid_features: F of the grid encoder.
    grid_max_shift: if > 0, the posterior mean of a proposal's centre stays
      within this many cells of its cell's centre (a tanh), so that a digit
      belongs to the cell it is centred in (0.5: inside the cell) and two
      neighbours cannot both centre on it; 0: unbounded (the prior alone
      keeps it near).
    z_what_size: D.
    encoder_hidden_size: hidden width of the glimpse encoder.
    decoder_hidden_size: hidden width of the glimpse decoder.
    decoder_output_bias: added before the decoder's sigmoid.
    z_where_prior_loc: prior mean of the scale s (first entry; the
      position's prior is centred on each cell, see `cell_prior`).
    z_where_prior_scale: prior std of (s, x, y).
    z_pres_logit_bound: see `air.z_pres_probability`.
    z_where_scale_range: see `air.z_where_posterior`.
    z_pres_init_prob: q(z_pres = 1) of every cell at initialisation. Low,
      about the share of cells that hold an object: with q = 1/2 the first
      canvases are covered by some 32 faint windows, every proposal makes
      them worse, and q is driven to its floor, where its gradient vanishes.
  """

  image_size: int | tuple[int, int] = (48, 48)
  window_size: int | tuple[int, int] = (14, 14)
  grid_size: int | tuple[int, int] = (8, 8)
  grid_features: int = 64
  grid_max_shift: float = 0.0
  z_what_size: int = 50
  encoder_hidden_size: int = 200
  decoder_hidden_size: int = 200
  decoder_output_bias: float = -2.0
  z_where_prior_loc: tuple[float, float, float] = (4.0, 0.0, 0.0)
  z_where_prior_scale: tuple[float, float, float] = (0.3, 0.25, 0.25)
  z_pres_logit_bound: float = 6.0
  z_where_scale_range: tuple[float, float] | None = (3.0, 6.0)
  z_pres_init_prob: float = 0.05

  # No REINFORCE baseline network: the estimator needs none.
  use_baseline = False

  @property
  def image_shape(self) -> tuple[int, int]:
    """(H, W)."""
    return air.pair(self.image_size)

  @property
  def grid(self) -> tuple[int, int]:
    """(R, C)."""
    return air.pair(self.grid_size)

  @property
  def max_steps(self) -> int:
    """N = R * C, the most objects the model can report."""
    rows, cols = self.grid
    return rows * cols

  def setup(self):
    self.encoder = GridEncoder(self.grid, self.grid_features)
    # z_pres logit, then 6 outputs for z_where; q starts at z_pres_init_prob.
    self.head = nn.Dense(
      7,
      kernel_init=nn.initializers.normal(1e-3),
      bias_init=_first_bias(self.z_pres_init_prob, self.z_pres_logit_bound),
    )
    self.glimpse_encoder = networks.GlimpseEncoder(
      self.encoder_hidden_size, self.z_what_size
    )
    self.decoder = networks.GlimpseDecoder(
      self.decoder_hidden_size,
      air.pair(self.window_size),
      self.decoder_output_bias,
    )

  def glimpse_posterior(
    self, images: jax.Array, z_where: jax.Array
  ) -> distributions.NormalParams:
    """q(z_what) of the glimpses at z_where.

    Args:
      images: [B, H, W].
      z_where: [B, N, 3].

    Returns:
      NormalParams with [B, N, D] fields.
    """
    b, n = z_where.shape[:2]
    glimpses = spatial_transformer.image_to_windows(
      images, z_where, air.pair(self.window_size)
    )
    what_q = self.glimpse_encoder(glimpses.reshape(b * n, *glimpses.shape[2:]))
    return jax.tree.map(lambda x: x.reshape(b, n, -1), what_q)

  def objects_at(
    self,
    images: jax.Array,
    z_where: jax.Array,
    z_pres: jax.Array | None = None,
  ) -> tuple[distributions.NormalParams, jax.Array]:
    """(q(z_what) [B, N, D] of the glimpses at z_where [B, N, 3], the windows
    [B, N, h, w] its means draw): the proposals' objects, were their
    z_where moved there (`refinement.refine_modes`). z_pres is unused: each
    proposal reads the image alone."""
    del z_pres
    what_q = self.glimpse_posterior(images, z_where)
    return what_q, self.decoder(what_q.loc)

  def _reach(self) -> jax.Array:
    """[2] grid_max_shift cells in normalised (x, y) units."""
    rows, cols = self.grid
    return self.grid_max_shift * jnp.asarray([2.0 / cols, 2.0 / rows])

  def z_where_bounds(self) -> tuple[jax.Array, jax.Array]:
    """([N, 3], [N, 3]) bounds of the posterior means of z_where: the scale
    in z_where_scale_range, each centre within grid_max_shift cells of its
    cell's (+-inf where unbounded)."""
    n = self.max_steps
    lower = jnp.full((n, 3), -jnp.inf, jnp.float32)
    upper = jnp.full((n, 3), jnp.inf, jnp.float32)
    if self.z_where_scale_range is not None:
      lo, hi = self.z_where_scale_range
      lower, upper = lower.at[:, 0].set(lo), upper.at[:, 0].set(hi)
    if self.grid_max_shift > 0:
      centres = cell_centres(self.grid)
      lower = lower.at[:, 1:].set(centres - self._reach())
      upper = upper.at[:, 1:].set(centres + self._reach())
    return lower, upper

  def __call__(
    self,
    images: jax.Array,
    deterministic: bool = False,
    keys: jax.Array | None = None,
  ) -> air.AIROutput:
    """Infers every cell's latents and reconstructs the images.

    Args:
      images: [B, H, W] float in [0, 1].
      deterministic: posterior modes (z_pres = q > 0.5, means).
      keys: optional [B] PRNG keys, one per example (see `air.AIR`).

    Returns:
      AIROutput with N = R * C; mask and baseline are ones and zeros.
    """
    b, n = images.shape[0], self.max_steps
    if keys is None:
      rng = jax.random.key(0) if deterministic else self.make_rng('sample')
      keys = jax.random.split(rng, b)
    key_pres, key_where, key_what = jnp.moveaxis(
      jax.vmap(lambda k: jax.random.split(k, 3))(keys), 1, 0
    )
    out = self.head(self.encoder(images)).reshape(b, n, 7)
    z_pres_prob = air.z_pres_probability(out[..., 0], self.z_pres_logit_bound)
    prior = cell_prior(
      self.grid, self.z_where_prior_loc, self.z_where_prior_scale
    )
    where_q = air.z_where_posterior(
      out[..., 1:], prior.loc, prior.scale, self.z_where_scale_range
    )
    if self.grid_max_shift > 0:
      # Keep each centre's mean within grid_max_shift cells of its cell's.
      reach = self._reach()
      shift = where_q.loc[..., 1:] - prior.loc[:, 1:]
      where_q = where_q._replace(
        loc=where_q.loc.at[..., 1:].set(
          prior.loc[:, 1:] + reach * jnp.tanh(shift / reach)
        )
      )
    # Every cell makes a choice: its mask is 1.
    z_pres = air.sample_z_pres(
      key_pres, z_pres_prob, jnp.ones_like(z_pres_prob), deterministic
    )
    if deterministic:
      z_where = where_q.loc
    else:
      z_where = jax.vmap(distributions.sample_normal)(key_where, where_q)

    what_q = self.glimpse_posterior(images, z_where)
    if deterministic:
      z_what = what_q.loc
    else:
      z_what = jax.vmap(distributions.sample_normal)(key_what, what_q)

    windows = self.decoder(z_what)
    canvas = spatial_transformer.windows_to_canvas(
      windows, z_where, z_pres, self.image_shape
    )
    return air.AIROutput(
      z_pres=z_pres,
      z_pres_prob=z_pres_prob,
      mask=jnp.ones_like(z_pres_prob),
      z_where=z_where,
      z_where_loc=where_q.loc,
      z_where_scale=where_q.scale,
      z_what=z_what,
      z_what_loc=what_q.loc,
      z_what_scale=what_q.scale,
      windows=windows,
      canvas=canvas,
      baseline=jnp.zeros_like(z_pres),
    )
