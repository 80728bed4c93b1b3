"""Attend, Infer, Repeat (Eslami et al., 2016) and its difference variant DAIR.

Glossary of shapes:
  B: batch, N: steps (`max_steps`), H, W: image, h, w: window,
  D: z_what size, F: LSTM width.

Per step t = 1..N the inference network emits
  z_pres_t in {0, 1}  (once 0, every later step is 0),
  z_where_t = (s, x, y) (see `spatial_transformer`),
  z_what_t in R^D.
`mask[:, t]` is z_pres_{t-1} (1 at t = 1): whether step t made a choice at
all. Everything of a step with z_pres_t = 0 is masked out of the objective.

The generative model decodes each z_what into a window, writes it onto the
canvas with `spatial_transformer` and adds the objects (one batched matmul
over all objects, `windows_to_canvas`; DAIR draws step by step); the
canvas is the mean of the pixel likelihood (see `objectives`).
"""

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from air_jax import distributions
from air_jax import networks
from air_jax import spatial_transformer

__all__ = [
  'AIR',
  'AIROutput',
  'BOX_THRESHOLD',
  'BaselineNetwork',
  'CellCarry',
  'INK_THRESHOLD',
  'InferenceCell',
  'RENDER_THRESHOLD',
  'StepOutput',
  'hashable',
  'init_params',
  'ink_boxes',
  'pair',
  'posterior_modes',
  'present_first',
  'sample_z_pres',
  'tight_boxes',
  'z_pres_probability',
  'z_where_posterior',
]


def pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
  """(H, W) of a size given as one int (square) or two."""
  if isinstance(size, int):
    return (size, size)
  height, width = size
  return (int(height), int(width))


class CellCarry(NamedTuple):
  """What one inference step hands to the next.

  Before step 1 every field but `canvas` has a leading axis of 1 instead of
  B (the initial state is shared by all examples; see AIR._initial_carry).

  Attributes:
    lstm: networks.LSTMState, [B, F] each.
    z_pres: [B] previous z_pres (1 before the first step).
    z_where: [B, 3] previous z_where.
    z_what: [B, D] previous z_what.
    canvas: [B, H, W] reconstruction so far (DAIR; zeros otherwise).
    baseline_lstm: networks.LSTMState of the baseline network.
  """

  lstm: networks.LSTMState
  z_pres: jax.Array
  z_where: jax.Array
  z_what: jax.Array
  canvas: jax.Array
  baseline_lstm: networks.LSTMState


class StepOutput(NamedTuple):
  """One inference step's latents and posteriors (leading [B])."""

  z_pres: jax.Array  # [B] sample times mask.
  z_pres_prob: jax.Array  # [B] q(z_pres_t = 1 | z_pres_{t-1} = 1, ...).
  mask: jax.Array  # [B] z_pres_{t-1}.
  z_where: jax.Array  # [B, 3]
  z_where_loc: jax.Array  # [B, 3]
  z_where_scale: jax.Array  # [B, 3]
  z_what: jax.Array  # [B, D]
  z_what_loc: jax.Array  # [B, D]
  z_what_scale: jax.Array  # [B, D]


class AIROutput(NamedTuple):
  """The model's output: per-step fields are stacked on axis 1 ([B, N, ...]).

  Attributes:
    z_pres, z_pres_prob, mask: [B, N].
    z_where, z_where_loc, z_where_scale: [B, N, 3].
    z_what, z_what_loc, z_what_scale: [B, N, D].
    windows: [B, N, h, w] decoded windows.
    canvas: [B, H, W] the reconstruction (sum of z_pres-weighted objects).
    baseline: [B, N] the REINFORCE baseline (zeros without a baseline, and
      in deterministic mode).
  Steps skipped because every example had stopped (`AIR.skip_finished`)
  hold placeholders: z_pres_prob 0, z_where at the prior mean, z_what 0.
  """

  z_pres: jax.Array
  z_pres_prob: jax.Array
  mask: jax.Array
  z_where: jax.Array
  z_where_loc: jax.Array
  z_where_scale: jax.Array
  z_what: jax.Array
  z_what_loc: jax.Array
  z_what_scale: jax.Array
  windows: jax.Array
  canvas: jax.Array
  baseline: jax.Array

  @property
  def count(self) -> jax.Array:
    """[B] number of objects inferred (sum of z_pres, rounded)."""
    return jnp.round(jnp.sum(self.z_pres, axis=1)).astype(jnp.int32)


def sample_z_pres(
  rng: jax.Array, prob: jax.Array, mask: jax.Array, deterministic: bool
) -> jax.Array:
  """Samples z_pres_t given q and the mask z_pres_{t-1}.

  `rng` holds one key per example ([B]); prob, mask and the result are [B].
  The sample is a hard Bernoulli draw with no pathwise gradient (the
  score-function surrogate in `objectives` carries it); `deterministic`
  takes the mode.
  """
  if deterministic:
    sample = (prob > 0.5).astype(prob.dtype)
  else:
    sample = jax.vmap(jax.random.bernoulli)(rng, prob).astype(prob.dtype)
  return sample * mask


def z_pres_probability(logit: jax.Array, bound: float = 0.0) -> jax.Array:
  """q(z_pres = 1) = sigmoid(logit); with bound > 0 the logit is first
  squashed to (-bound, bound) (bound * tanh(logit / bound)), keeping q away
  from 0 and 1 so that the score-function estimator keeps exploring."""
  if bound > 0:
    logit = bound * jnp.tanh(logit / bound)
  return nn.sigmoid(logit)


def z_where_posterior(
  raw: jax.Array,
  prior_loc: jax.Array | tuple[float, float, float],
  prior_scale: jax.Array | tuple[float, float, float],
  scale_range: tuple[float, float] | None = None,
) -> distributions.NormalParams:
  """q(z_where) from a network's raw output, centred on the prior.

  The mean is `prior_loc` plus the first three outputs, so inference starts
  at the prior; the std is a softplus of the last three times the prior's.
  With `scale_range` = (lo, hi) the mean of the scale s is squashed into
  (lo, hi) by a sigmoid that gives the prior's mean at a raw output of 0.

  Args:
    raw: [..., 6] network outputs.
    prior_loc: [..., 3] (broadcastable) prior mean of (s, x, y).
    prior_scale: [..., 3] (broadcastable) prior std.
    scale_range: None, or (lo, hi) with lo < prior_loc[..., 0] < hi.

  Returns:
    NormalParams with [..., 3] fields.
  """
  prior_loc = jnp.asarray(prior_loc, jnp.float32)
  loc = raw[..., :3] + prior_loc
  if scale_range is not None:
    lo, hi = scale_range
    centre = (prior_loc[..., 0] - lo) / (hi - lo)
    offset = jnp.log(centre) - jnp.log1p(-centre)
    scale_loc = lo + (hi - lo) * nn.sigmoid(raw[..., 0] + offset)
    loc = loc.at[..., 0].set(scale_loc)
  scale = nn.softplus(raw[..., 3:]) * jnp.asarray(prior_scale, jnp.float32)
  return distributions.NormalParams(loc=loc, scale=scale + 1e-4)


class BaselineNetwork(nn.Module):
  """The learned REINFORCE baseline: an LSTM and an MLP on stop-gradient
  inputs (the inference network's image projection and the previous
  step's latents), one value per step.

  All its parameters live under one key (`baseline` in AIR), so an
  optimiser can give it its own learning rate.

  Attributes:
    lstm_size: width of its LSTM.
    hidden_size: hidden width of its MLP.
  """

  lstm_size: int = 256
  hidden_size: int = 200

  def setup(self):
    self.projection = nn.Dense(4 * self.lstm_size)
    self.lstm = networks.LSTM(self.lstm_size)
    self.init_state = self.param(
      'init_state', nn.initializers.zeros, (2, self.lstm_size)
    )
    self.mlp = networks.MLP(
      (self.hidden_size, 1), last_kernel_init=nn.initializers.zeros
    )

  def gates(self, image_gates: jax.Array) -> jax.Array:
    """[B, 4F'] LSTM input gates from the inference network's [B, 4F]."""
    return self.projection(jax.lax.stop_gradient(image_gates))

  def initial_state(self) -> networks.LSTMState:
    """The state before step 1, [1, F'] each (shared by all examples)."""
    return networks.LSTMState(
      self.init_state[0][None], self.init_state[1][None]
    )

  def __call__(
    self, state: networks.LSTMState, gates: jax.Array, prev: jax.Array
  ) -> tuple[networks.LSTMState, jax.Array]:
    """One step: (new state, [B] baseline) from gates and [B, K] latents."""
    state = self.lstm(state, gates, jax.lax.stop_gradient(prev))
    return state, self.mlp(state.h)[:, 0]


class InferenceCell(nn.Module):
  """One AIR inference step: attend to one object and infer its latents.

  The LSTM sees the image (as precomputed input gates) and the previous
  step's latents; heads give q(z_pres), q(z_where); the window that z_where
  picks out of `glimpse_source` is encoded into q(z_what).

  Attributes:
    image_size: (H, W).
    window_size: (h, w).
    lstm_size: F.
    z_what_size: D.
    encoder_hidden_size: width of the glimpse encoder's hidden layer.
    z_where_prior_loc: prior mean of z_where; the posterior mean is an
      offset from it, so inference starts at the prior.
    z_where_prior_scale: prior std of z_where; the posterior std is a
      softplus times it.
    z_pres_logit_bound: if > 0, the z_pres logit is squashed to
      (-bound, bound) with bound * tanh(logit / bound), keeping q away from
      0 and 1 so the score-function estimator keeps exploring.
    z_where_scale_range: (lo, hi) with 0 < lo < prior scale < hi, or None:
      the posterior mean of the scale s is squashed into (lo, hi) (a
      sigmoid centred on the prior mean), so one window cannot grow to
      cover several objects (windows are at most H / lo pixels wide).
  """

  image_size: tuple[int, int]
  window_size: tuple[int, int]
  lstm_size: int = 256
  z_what_size: int = 50
  encoder_hidden_size: int = 200
  z_where_prior_loc: tuple[float, float, float] = (2.5, 0.0, 0.0)
  z_where_prior_scale: tuple[float, float, float] = (0.2, 1.0, 1.0)
  z_pres_logit_bound: float = 3.0
  z_where_scale_range: tuple[float, float] | None = None

  def setup(self):
    self.lstm = networks.LSTM(self.lstm_size)
    small = nn.initializers.normal(1e-3)
    self.z_pres_head = nn.Dense(1, kernel_init=small)
    self.z_where_head = nn.Dense(6, kernel_init=small)
    self.encoder = networks.GlimpseEncoder(
      self.encoder_hidden_size, self.z_what_size
    )

  def __call__(
    self,
    lstm_state: networks.LSTMState,
    prev: tuple[jax.Array, jax.Array, jax.Array],
    image_gates: jax.Array,
    glimpse_source: jax.Array,
    rng: jax.Array,
    deterministic: bool = False,
  ) -> tuple[networks.LSTMState, StepOutput]:
    """One step.

    Args:
      lstm_state: LSTMState, [B, F] each.
      prev: (z_pres [B], z_where [B, 3], z_what [B, D]) of the last step.
      image_gates: [B, 4F] the image's LSTM input projection.
      glimpse_source: [B, H, W] the image windows are read from.
      rng: [B] PRNG keys, one per example, for this step's samples.
      deterministic: take posterior modes instead of samples.

    Returns:
      (new LSTMState, StepOutput).
    """
    prev_z_pres, prev_z_where, prev_z_what = prev
    latents = jnp.concatenate(
      [prev_z_pres[:, None], prev_z_where, prev_z_what], axis=-1
    )
    lstm_state = self.lstm(lstm_state, image_gates, latents)
    rng_pres, rng_where, rng_what = jnp.moveaxis(
      jax.vmap(lambda k: jax.random.split(k, 3))(rng), 1, 0
    )
    sample_normal = jax.vmap(distributions.sample_normal)

    z_pres_prob = z_pres_probability(
      self.z_pres_head(lstm_state.h)[:, 0], self.z_pres_logit_bound
    )
    z_pres = sample_z_pres(rng_pres, z_pres_prob, prev_z_pres, deterministic)

    z_where_q = z_where_posterior(
      self.z_where_head(lstm_state.h),
      self.z_where_prior_loc,
      self.z_where_prior_scale,
      self.z_where_scale_range,
    )
    z_where = (
      z_where_q.loc if deterministic else sample_normal(rng_where, z_where_q)
    )

    glimpse = spatial_transformer.image_to_window(
      glimpse_source, z_where, self.window_size
    )
    z_what_q = self.encoder(glimpse)
    z_what = (
      z_what_q.loc if deterministic else sample_normal(rng_what, z_what_q)
    )
    return lstm_state, StepOutput(
      z_pres=z_pres,
      z_pres_prob=z_pres_prob,
      mask=jnp.broadcast_to(prev_z_pres, z_pres.shape),
      z_where=z_where,
      z_where_loc=z_where_q.loc,
      z_where_scale=z_where_q.scale,
      z_what=z_what,
      z_what_loc=z_what_q.loc,
      z_what_scale=z_what_q.scale,
    )


class AIR(nn.Module):
  """AIR (or DAIR with `difference=True`): inference network and renderer.

  Call it on images [B, H, W] in [0, 1] with an rng stream named 'sample'
  (or per-example `keys`); with `deterministic=True` no rng is needed.
  The defaults are the recipe's model (configs/default.py) but for the
  bound on the window scale: `AIR(z_where_scale_range=(1.8, 5.0))` is the
  model that counts multi-MNIST (`AIR()` does too, from most seeds).

  Parameters: the inference network, the decoder and, with `use_baseline`,
  a BaselineNetwork under the key `baseline` (so an optimiser can give it
  its own learning rate).

  Attributes:
    image_size: H = W, or (H, W).
    window_size: h = w, or (h, w).
    max_steps: N.
    lstm_size: F of the inference LSTM.
    z_what_size: D.
    encoder_hidden_size: hidden width of the glimpse encoder.
    decoder_hidden_size: hidden width of the glimpse decoder.
    decoder_output_bias: added before the decoder's sigmoid.
    z_where_prior_loc, z_where_prior_scale: see InferenceCell.
    difference: DAIR: the LSTM and the glimpses see image - canvas so far.
    z_pres_logit_bound: see InferenceCell.
    z_where_scale_range: see InferenceCell.
    use_baseline: build the REINFORCE baseline network.
    baseline_lstm_size: width of the baseline LSTM.
    baseline_hidden_size: hidden width of the baseline MLP.
    unroll: `lax.scan` unroll factor of steps 2..N (speed only); 0, as in
      lax.scan, unrolls them all into straight-line code.
    skip_finished: skip the work of a step once every example of the batch
      has stopped (z_pres_{t-1} = 0 everywhere; `lax.cond`), so that a
      forward pass costs the steps its objects need, not `max_steps` (the
      gradient's reverse pass still pays for them). The outputs
      of a skipped step are masked out of everything (zeros, prior
      locations and unit scales). Speed only: the objective, its gradients
      and every present object are the same either way. Under `jax.vmap`
      (a sweep) both branches run.
  """

  image_size: int | tuple[int, int] = (50, 50)
  window_size: int | tuple[int, int] = (28, 28)
  max_steps: int = 3
  lstm_size: int = 256
  z_what_size: int = 50
  encoder_hidden_size: int = 200
  decoder_hidden_size: int = 200
  decoder_output_bias: float = -2.0
  z_where_prior_loc: tuple[float, float, float] = (2.5, 0.0, 0.0)
  z_where_prior_scale: tuple[float, float, float] = (0.2, 1.0, 1.0)
  difference: bool = False
  z_pres_logit_bound: float = 3.0
  z_where_scale_range: tuple[float, float] | None = None
  use_baseline: bool = True
  baseline_lstm_size: int = 256
  baseline_hidden_size: int = 200
  unroll: int = 0
  skip_finished: bool = True

  def setup(self):
    sizes, window = self.image_shape, pair(self.window_size)
    self.image_projection = nn.Dense(4 * self.lstm_size)
    self.cell = InferenceCell(
      image_size=sizes,
      window_size=window,
      lstm_size=self.lstm_size,
      z_what_size=self.z_what_size,
      encoder_hidden_size=self.encoder_hidden_size,
      z_where_prior_loc=self.z_where_prior_loc,
      z_where_prior_scale=self.z_where_prior_scale,
      z_pres_logit_bound=self.z_pres_logit_bound,
      z_where_scale_range=self.z_where_scale_range,
    )
    self.lstm_init = self.param(
      'lstm_init', nn.initializers.zeros, (2, self.lstm_size)
    )
    self.decoder = networks.GlimpseDecoder(
      self.decoder_hidden_size, window, self.decoder_output_bias
    )
    if self.use_baseline:
      self.baseline = BaselineNetwork(
        self.baseline_lstm_size, self.baseline_hidden_size
      )

  @property
  def image_shape(self) -> tuple[int, int]:
    """(H, W)."""
    return pair(self.image_size)

  def render(
    self, z_pres: jax.Array, z_where: jax.Array, z_what: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """The generative model's mean image from latents.

    Args:
      z_pres: [B, N].
      z_where: [B, N, 3].
      z_what: [B, N, D].

    Returns:
      (canvas [B, H, W], windows [B, N, h, w]).
    """
    windows = self.decoder(z_what)  # [B, N, h, w]
    canvas = spatial_transformer.windows_to_canvas(
      windows, z_where, z_pres, self.image_shape
    )
    return canvas, windows

  def objects_at(
    self,
    images: jax.Array,
    z_where: jax.Array,
    z_pres: jax.Array | None = None,
  ) -> tuple[distributions.NormalParams, jax.Array]:
    """(q(z_what) [B, N, D] of the glimpses at z_where [B, N, 3], the windows
    [B, N, h, w] its means draw): what each step would infer and draw were
    its z_where there (`refinement.refine_modes`).

    AIR reads every glimpse from the image. DAIR reads each step's glimpse
    from the image minus what the steps before it drew, so its objects
    depend on each other and on z_pres [B, N] (needed for DAIR, unused by
    AIR): a present step (z_pres > 0.5) reads the image minus the drawings
    of the present steps before it, in step order, as the recurrence does;
    an absent step reads the image minus every present drawing (what it
    would explain if turned on last). At a DAIR's posterior modes (every
    step computed) this is what its steps inferred and drew.
    """
    b, n = z_where.shape[:2]
    window = pair(self.window_size)

    def read_all(source):
      """Every step's object read from `source` [B, H, W] at once."""
      glimpses = spatial_transformer.image_to_windows(source, z_where, window)
      what_q = self.cell.encoder(glimpses.reshape(b * n, *window))
      what_q = jax.tree.map(lambda x: x.reshape(b, n, -1), what_q)
      return what_q, self.decoder(what_q.loc)

    if not self.difference:
      return read_all(images)
    if z_pres is None:
      raise ValueError(
        "DAIR's objects_at needs z_pres: a DAIR step reads its glimpse "
        "from the image minus the present earlier steps' drawings."
      )
    present = jax.lax.stop_gradient(z_pres) > 0.5
    canvas = jnp.zeros_like(images)
    read = []  # Each step's (q(z_what), window) in step order.
    for t in range(n):
      glimpse = spatial_transformer.image_to_window(
        images - canvas, z_where[:, t], window
      )
      what_q = self.cell.encoder(glimpse)
      drawn = self.decoder(what_q.loc)
      obj = spatial_transformer.window_to_image(
        drawn, z_where[:, t], self.image_shape
      )
      canvas = canvas + present[:, t, None, None] * obj
      read.append((what_q, drawn))
    in_order = jax.tree.map(lambda *x: jnp.stack(x, axis=1), *read)
    # Absent steps: what each would explain of the image left over.
    last = read_all(images - canvas)

    def pick(ordered, leftover):
      mask = present.reshape(b, n, *([1] * (ordered.ndim - 2)))
      return jnp.where(mask, ordered, leftover)

    return jax.tree.map(pick, in_order, last)

  def z_where_bounds(self) -> tuple[jax.Array, jax.Array]:
    """([N, 3], [N, 3]) bounds of z_where's means when refined: the scale s
    in z_where_scale_range, else >= 1 (no window larger than the image);
    the centre on the image ([-1, 1])."""
    lo, hi = self.z_where_scale_range or (1.0, jnp.inf)
    lower = jnp.asarray([lo, -1.0, -1.0], jnp.float32)
    upper = jnp.asarray([hi, 1.0, 1.0], jnp.float32)
    shape = (self.max_steps, 3)
    return jnp.broadcast_to(lower, shape), jnp.broadcast_to(upper, shape)

  def _initial_carry(self, batch: int, with_baseline: bool) -> CellCarry:
    """The state before step 1. It is the same for every example, so all
    but the canvas have a leading axis of 1 (not B): step 1's recurrent
    matmuls then cost one row, and broadcasting makes its outputs [B]."""
    no_state = networks.LSTMState(jnp.zeros((1, 0)), jnp.zeros((1, 0)))
    return CellCarry(
      lstm=networks.LSTMState(self.lstm_init[0][None], self.lstm_init[1][None]),
      z_pres=jnp.ones((1,), jnp.float32),
      z_where=jnp.zeros((1, 3), jnp.float32),
      z_what=jnp.zeros((1, self.z_what_size), jnp.float32),
      canvas=jnp.zeros((batch, *self.image_shape), jnp.float32),
      baseline_lstm=(
        self.baseline.initial_state() if with_baseline else no_state
      ),
    )

  def __call__(
    self,
    images: jax.Array,
    deterministic: bool = False,
    keys: jax.Array | None = None,
  ):
    """Infers latents for a batch and reconstructs it.

    Args:
      images: [B, H, W] float in [0, 1].
      deterministic: use posterior modes (z_pres = q > 0.5, means) instead
        of samples; for evaluation and `infer`.
      keys: optional [B] PRNG keys, one per example: each example's samples
        then depend on its key alone (not on the batch it is in). Without
        them the 'sample' rng stream is split over the batch.

    Returns:
      AIROutput.
    """
    b = images.shape[0]
    if keys is None:
      # Modes need no randomness: the keys are then unused (and compiled
      # away), so `deterministic=True` needs no 'sample' rng stream.
      rng = jax.random.key(0) if deterministic else self.make_rng('sample')
      keys = jax.random.split(rng, b)
    # The image is the same at every AIR step: project it once.
    image_gates = (
      None if self.difference else self.image_projection(images.reshape(b, -1))
    )
    # Inference with posterior modes needs no baseline.
    with_baseline = self.use_baseline and not deterministic
    baseline_gates = None
    if with_baseline and not self.difference:
      baseline_gates = self.baseline.gates(image_gates)

    def body(mdl, carry: CellCarry, t):
      if mdl.difference:
        step_image = images - carry.canvas
        step_gates = mdl.image_projection(step_image.reshape(b, -1))
      else:
        step_image, step_gates = images, image_gates
      lstm, step = mdl.cell(
        carry.lstm,
        (carry.z_pres, carry.z_where, carry.z_what),
        step_gates,
        step_image,
        jax.vmap(jax.random.fold_in, (0, None))(keys, t),
        deterministic,
      )
      canvas, window = carry.canvas, None
      if mdl.difference:
        window = mdl.decoder(step.z_what)
        obj = spatial_transformer.window_to_image(
          window, step.z_where, mdl.image_shape
        )
        canvas = canvas + step.z_pres[:, None, None] * obj

      baseline_lstm, baseline = carry.baseline_lstm, jnp.zeros((b,))
      if with_baseline:
        prev = jnp.concatenate(
          [carry.z_pres[:, None], carry.z_where, carry.z_what], axis=-1
        )
        gates = baseline_gates
        if mdl.difference:
          gates = mdl.baseline.gates(step_gates)
        baseline_lstm, baseline = mdl.baseline(baseline_lstm, gates, prev)
        baseline = jnp.broadcast_to(baseline, (b,))

      new_carry = CellCarry(
        lstm=lstm,
        z_pres=step.z_pres,
        z_where=step.z_where,
        z_what=step.z_what,
        canvas=canvas,
        baseline_lstm=baseline_lstm,
      )
      return new_carry, (step, baseline, window)

    def finished(mdl, carry: CellCarry, t):
      """`body` once every example has stopped: nothing changes, nothing
      is drawn, and the step's outputs are masked placeholders."""
      del t
      zeros = jnp.zeros((b,), jnp.float32)
      loc = jnp.broadcast_to(
        jnp.asarray(mdl.z_where_prior_loc, jnp.float32), (b, 3)
      )
      scale = jnp.broadcast_to(
        jnp.asarray(mdl.z_where_prior_scale, jnp.float32), (b, 3)
      )
      what = jnp.zeros((b, mdl.z_what_size), jnp.float32)
      step = StepOutput(
        z_pres=zeros,
        z_pres_prob=zeros,
        mask=zeros,
        z_where=loc,
        z_where_loc=loc,
        z_where_scale=scale,
        z_what=what,
        z_what_loc=what,
        z_what_scale=jnp.ones_like(what),
      )
      window = None
      if mdl.difference:
        window = jnp.zeros((b, *pair(mdl.window_size)), jnp.float32)
      return carry, (step, zeros, window)

    def scanned(mdl, carry: CellCarry, t):
      if not mdl.skip_finished:
        return body(mdl, carry, t)
      return nn.cond(jnp.any(carry.z_pres > 0), body, finished, mdl, carry, t)

    # Step 1 runs outside the scan: its input state has a leading axis of 1
    # (see _initial_carry), every later state is [B].
    carry, first = body(self, self._initial_carry(b, with_baseline), 0)
    first = jax.tree.map(lambda x: x[:, None], first)  # [B, 1, ...]
    per_step = first
    if self.max_steps > 1:
      scan = nn.scan(
        scanned,
        variable_broadcast='params',
        split_rngs={'params': False},
        length=self.max_steps - 1,
        unroll=self.unroll,
      )
      carry, rest = scan(self, carry, jnp.arange(1, self.max_steps))
      # Scan stacks on axis 0; AIROutput is batch-major.
      per_step = jax.tree.map(
        lambda a, r: jnp.concatenate([a, jnp.moveaxis(r, 0, 1)], axis=1),
        first,
        rest,
      )
    steps, baseline, windows = per_step
    if self.difference:
      # DAIR already decoded inside the recurrence.
      canvas = carry.canvas
    else:
      canvas, windows = self.render(steps.z_pres, steps.z_where, steps.z_what)
    return AIROutput(
      **steps._asdict(), windows=windows, canvas=canvas, baseline=baseline
    )


@functools.partial(jax.jit, static_argnums=0)
def _init(model, rng: jax.Array):
  images = jnp.zeros((1, *model.image_shape), jnp.float32)
  rngs = {
    'params': jax.random.fold_in(rng, 1),
    'sample': jax.random.fold_in(rng, 2),
  }
  return model.init(rngs, images)['params']


def hashable(model: nn.Module) -> nn.Module:
  """The model with list fields (JSON's tuples, e.g. image_size) made
  tuples: jit needs a hashable module as a static argument."""
  lists = {
    name: tuple(getattr(model, name))
    for name in model.__dataclass_fields__
    if isinstance(getattr(model, name, None), list)
  }
  return model.clone(**lists) if lists else model


def init_params(model: AIR, seed: int):
  """Parameters of `model` from a seed (jitted, compiled once per model)."""
  return _init(hashable(model), jax.random.key(seed))


def present_first(output: AIROutput) -> AIROutput:
  """The steps of `output` reordered so that its present objects come first,
  each group in step order, with mask = z_pres of the step before (1 for
  the first): a sequential AIR's form of a set of objects whose z_pres
  were chosen in any order (`refinement.refine_modes`). The canvas is the
  same sum."""
  order = jnp.argsort(-output.z_pres, axis=1, stable=True)  # [B, N]

  def take(x):
    index = order.reshape(*order.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)

  per_step = {
    name: take(value)
    for name, value in output._asdict().items()
    if name != 'canvas'
  }
  z_pres = per_step['z_pres']
  mask = jnp.concatenate([jnp.ones_like(z_pres[:, :1]), z_pres[:, :-1]], 1)
  return output._replace(**{**per_step, 'mask': mask})


# Window pixels brighter than this make up an object's tight box (chosen on
# training images, RESULTS.md).
BOX_THRESHOLD = 0.2


def tight_boxes(
  output: AIROutput,
  image_size: int | tuple[int, int],
  threshold: float = BOX_THRESHOLD,
) -> jax.Array:
  """[B, N, 4] tight boxes (top, left, height, width) of the objects: the
  extent of their rendered pixels brighter than `threshold` (the attention
  windows are squares with margin; these are the objects themselves)."""
  box = spatial_transformer.object_boxes(
    output.windows, output.z_where, image_size, threshold
  )
  return jnp.stack(box, axis=-1)


# An object explains the input pixels brighter than INK_THRESHOLD where its
# drawing is the brightest of the present objects' and brighter than
# RENDER_THRESHOLD (chosen on training images, RESULTS.md).
RENDER_THRESHOLD = 0.02
INK_THRESHOLD = 0.0


@jax.jit
def ink_boxes(
  output: AIROutput,
  images: jax.Array,
  render_threshold: float = RENDER_THRESHOLD,
  ink_threshold: float = INK_THRESHOLD,
) -> jax.Array:
  """[B, N, 4] boxes (top, left, height, width) of the input's ink that each
  object explains: the image is segmented by the model's own drawing, each
  pixel brighter than `ink_threshold` going to the present object that
  draws it brightest (if brighter than `render_threshold`), and an object's
  box is the pixel extent of its segment (pixel i spans [i, i + 1]). An
  object with an empty segment (nothing drawn over ink, or absent) gets
  its `tight_boxes` box.

  Unlike the drawn pixels alone, the segment ends where the digit's ink
  ends, not where the drawing fades, and a window placed a little off its
  digit still gets the digit's ink. Images whose background is not 0 need
  an `ink_threshold` above the background.

  Args:
    output: AIROutput of [B, N] objects (z_pres > 0.5 are present).
    images: [B, H, W] the images it was inferred from, in [0, 1].
    render_threshold: the drawing's intensity above which a pixel can be
      explained.
    ink_threshold: the input's intensity above which a pixel is ink.
  """
  image_size = images.shape[-2:]
  drawn = spatial_transformer.window_to_image(
    output.windows, output.z_where, image_size
  )  # [B, N, H, W]
  drawn = jnp.where((output.z_pres > 0.5)[..., None, None], drawn, 0.0)
  owner = jnp.argmax(drawn, axis=1)  # [B, H, W]
  explained = (jnp.max(drawn, axis=1) > render_threshold) & (
    images > ink_threshold
  )
  steps = jnp.arange(drawn.shape[1])[None, :, None, None]
  segments = (owner[:, None] == steps) & explained[:, None]
  box = jnp.stack(spatial_transformer.mask_box(segments), axis=-1)
  found = jnp.any(segments, axis=(-2, -1))
  return jnp.where(found[..., None], box, tight_boxes(output, image_size))


@functools.partial(jax.jit, static_argnames=('model',))
def posterior_modes(model: AIR, params, images: jax.Array) -> AIROutput:
  """`model` applied with posterior modes (z_pres = q > 0.5, means), jitted.

  Args:
    model: an AIR module (static: one compilation per module and shape).
    params: its parameters.
    images: [B, H, W] float in [0, 1].

  Returns:
    AIROutput.
  """
  return model.apply({'params': params}, images, deterministic=True)
