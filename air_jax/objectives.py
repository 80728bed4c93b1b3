"""AIR's objective: ELBO terms, the REINFORCE surrogate, the baseline loss.

Glossary of shapes: B batch, N steps, H, W image, D z_what size.

The ELBO per image is
  log p(x | z) - KL_pres - sum_t z_pres_t (KL_where_t + KL_what_t)
    - sum_t repulsion_t
with the optional repulsion of the z_where prior (see `distributions`;
`repulsion_costs`: each pair of present objects counted once, at the later
step) and the KLs analytic given the past: KL_pres_t = mask_t KL(q_t || p)
of the per-step Bernoulli, and Normal KLs for z_where and z_what. Continuous
latents are reparameterised. The gradient of the discrete z_pres choices is
the score function (REINFORCE) estimator, written as a surrogate with value
0:

  surrogate = sum_t mask_t (log q(z_pres_t) - sg[log q(z_pres_t)])
                         * sg[signal_t - baseline_t]

Rao-Blackwellised ("downstream") signal for step t: only the terms that the
choice z_pres_t can change, i.e. the likelihood and the costs of steps >= t:
  signal_t = log p(x | z) - sum_{t' >= t} cost_t',
  cost_t = z_pres_t (KL_where_t + KL_what_t) + repulsion_t + KL_pres_{t+1}
(KL_pres_{t+1} is masked by z_pres_t). The analytic KL_pres_t is already an
expectation over z_pres_t and so is not part of its own signal.

Models whose proposals are independent given the image (`grid.GridAIR`) use
the 'local' estimator instead (`LossConfig.estimator`): the exact
expectation over each z_pres_n given the other samples (`local_signal`),
with the surrogate sum_n (q_n - sg[q_n]) sg[signal_n] and no baseline; with
a Normal likelihood the continuous latents and the decoder get the same
expectation over each z_pres_n (`local_object_objective`).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from air_jax import air
from air_jax import distributions
from air_jax import grid as grid_lib
from air_jax import spatial_transformer

__all__ = [
  'BASELINES',
  'ELBOTerms',
  'ESTIMATORS',
  'LIKELIHOODS',
  'LossAux',
  'LossConfig',
  'SignalMoments',
  'SignalSums',
  'air_loss',
  'baseline_loss',
  'downstream_signal',
  'elbo_terms',
  'log_importance_weight',
  'local_expectation_surrogate',
  'local_object_objective',
  'local_signal',
  'log_likelihood',
  'refinement_objective',
  'reinforce_surrogate',
  'repulsion_costs',
  'set_objective',
  'step_costs',
  'update_signal_moments',
  'z_pres_log_prob',
  'z_pres_prior_logit',
]

LIKELIHOODS = ('normal', 'bernoulli')
BASELINES = ('normalised', 'plain', 'none')
ESTIMATORS = ('downstream', 'local')


class ELBOTerms(NamedTuple):
  """Per-image ELBO and its parts.

  Attributes:
    log_likelihood: [B] log p(x | z) summed over pixels.
    kl_pres: [B, N] mask_t KL(q(z_pres_t) || p(z_pres_t)).
    kl_where: [B, N] z_pres_t KL(q(z_where_t) || p(z_where)).
    kl_what: [B, N] z_pres_t KL(q(z_what_t) || N(0, I)).
    elbo: [B] log_likelihood - all KLs - the repulsion.
    repulsion: [B, N] the z_where prior's repulsion cost of step t
      (`repulsion_costs`; zeros without repulsion).
  """

  log_likelihood: jax.Array
  kl_pres: jax.Array
  kl_where: jax.Array
  kl_what: jax.Array
  elbo: jax.Array
  repulsion: jax.Array


class SignalMoments(NamedTuple):
  """Running mean and variance of the REINFORCE learning signal.

  A normalised baseline (see `air_loss`) predicts the signal in units of
  these moments; `update_signal_moments` keeps them current.
  """

  mean: jax.Array  # []
  var: jax.Array  # []

  @classmethod
  def create(cls) -> 'SignalMoments':
    return cls(mean=jnp.zeros(()), var=jnp.ones(()))


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Every setting of `air_loss`, in one hashable place.

  Built once from a run's config (`configuration.loss_config`); a static
  argument of the jitted steps.

  Attributes:
    z_pres_prior: Schedule of the per-step prior probability p.
    z_where_prior_loc: prior mean of z_where = (s, x, y).
    z_where_prior_scale: prior std of z_where.
    likelihood: 'normal' or 'bernoulli'.
    likelihood_std: Schedule of the Normal likelihood's pixel std.
    baseline: 'normalised' (the baseline network predicts the signal in
      units of its running moments), 'plain' (in nats) or 'none' (the
      advantage is the raw signal; the model must have no baseline).
    moments_decay: decay of the running signal moments.
    estimator: the gradient of the z_pres choices: 'downstream' (the score
      function with the downstream signal, for sequential models) or
      'local' (the exact expectation over each z_pres_n given the other
      samples, `local_signal`; for models whose proposals are independent
      given the image, such as `grid.GridAIR`; needs baseline 'none').
    grid: (R, C) of a grid model: proposal n's z_where prior is centred on
      its cell (`grid.cell_prior`); None: one prior for every step.
    repulsion_strength: Schedule of the nats a pair of present objects with
      coincident centres costs under the z_where prior (`repulsion_costs`);
      0 throughout is off.
    repulsion_radius: centre distance (normalised coordinates) from which a
      pair costs nothing.
    z_pres_warmup_steps: before this step q(z_pres) gets no gradient (it
      stays at its initial value while the decoder and the continuous
      latents learn to draw); 0: from the start.
  """

  z_pres_prior: distributions.Schedule = distributions.Schedule.constant(1e-5)
  z_where_prior_loc: tuple[float, float, float] = (2.5, 0.0, 0.0)
  z_where_prior_scale: tuple[float, float, float] = (0.2, 1.0, 1.0)
  likelihood: str = 'normal'
  likelihood_std: distributions.Schedule = distributions.Schedule(
    init=1.0, final=0.3, anneal_steps=5_000, kind='exponential'
  )
  baseline: str = 'normalised'
  moments_decay: float = 0.9
  estimator: str = 'downstream'
  grid: tuple[int, int] | None = None
  repulsion_strength: distributions.Schedule = distributions.Schedule.constant(
    0.0
  )
  repulsion_radius: float = 0.25
  z_pres_warmup_steps: int = 0

  def __post_init__(self):
    if self.z_pres_warmup_steps < 0:
      raise ValueError(
        f'z_pres_warmup_steps must be >= 0, got {self.z_pres_warmup_steps}.'
      )
    strength = (self.repulsion_strength.init, self.repulsion_strength.final)
    if min(strength) < 0 or self.repulsion_radius <= 0:
      raise ValueError(
        'repulsion needs strength >= 0 and radius > 0, got '
        f'{strength} and {self.repulsion_radius}.'
      )
    if self.estimator not in ESTIMATORS:
      raise ValueError(
        f'estimator {self.estimator!r} is not one of {ESTIMATORS}.'
      )
    if self.estimator == 'local' and self.baseline != 'none':
      raise ValueError(
        "the 'local' estimator uses no baseline; set baseline 'none'."
      )
    if self.likelihood not in LIKELIHOODS:
      raise ValueError(
        f'likelihood {self.likelihood!r} is not one of {LIKELIHOODS}.'
      )
    if self.baseline not in BASELINES:
      raise ValueError(f'baseline {self.baseline!r} is not one of {BASELINES}.')
    if not 0.0 <= self.moments_decay < 1.0:
      raise ValueError(
        f'moments_decay must be in [0, 1), got {self.moments_decay}.'
      )
    p = (self.z_pres_prior.init, self.z_pres_prior.final)
    if not all(0.0 < v < 1.0 for v in p):
      raise ValueError(f'z_pres prior probabilities must be in (0, 1): {p}.')
    std = (self.likelihood_std.init, self.likelihood_std.final)
    if self.likelihood == 'normal' and min(std) <= 0:
      raise ValueError(f'likelihood std must be > 0, got {std}.')
    if min(self.z_where_prior_scale) <= 0:
      raise ValueError(
        f'z_where prior scales must be > 0: {self.z_where_prior_scale}.'
      )

  def repulsion(self, step: jax.Array | int) -> tuple[jax.Array, float] | None:
    """(strength at `step`, radius) of the z_where prior's repulsion, or
    None if it is off."""
    if self.repulsion_strength.init == self.repulsion_strength.final == 0:
      return None
    return (self.repulsion_strength(step), self.repulsion_radius)

  def z_where_prior(self) -> distributions.NormalParams:
    """The z_where prior, fields [3] (or [R * C, 3] for a grid model)."""
    if self.grid is not None:
      return grid_lib.cell_prior(
        self.grid, self.z_where_prior_loc, self.z_where_prior_scale
      )
    return distributions.NormalParams(
      jnp.asarray(self.z_where_prior_loc, jnp.float32),
      jnp.asarray(self.z_where_prior_scale, jnp.float32),
    )


class LossAux(NamedTuple):
  """Everything the loss computed that is worth logging."""

  terms: ELBOTerms
  signal: jax.Array  # [B, N] learning signal per step (before baseline).
  advantage: jax.Array  # [B, N] what multiplies the score, masked.
  baseline_loss: jax.Array  # [] (in standard units if normalised).
  signal_sums: 'SignalSums'  # Of the raw signal where a choice was made.


def log_likelihood(
  canvas: jax.Array,
  images: jax.Array,
  kind: str = 'normal',
  std: float = 0.3,
) -> jax.Array:
  """log p(images | canvas) summed over pixels.

  Args:
    canvas: [B, H, W] the likelihood's mean.
    images: [B, H, W] observed images in [0, 1].
    kind: 'normal' (fixed std) or 'bernoulli' (canvas clipped to (0, 1)).
    std: the Normal's standard deviation.

  Returns:
    [B] log-likelihoods in nats.
  """
  axes = tuple(range(1, images.ndim))
  if kind == 'normal':
    z = (images - canvas) / std
    log_p = -0.5 * z * z - jnp.log(std) - 0.5 * jnp.log(2.0 * jnp.pi)
  elif kind == 'bernoulli':
    p = jnp.clip(canvas, 1e-6, 1.0 - 1e-6)
    log_p = images * jnp.log(p) + (1.0 - images) * jnp.log1p(-p)
  else:
    raise ValueError(f'likelihood must be one of {LIKELIHOODS}, got {kind!r}.')
  return jnp.sum(log_p, axis=axes)


def elbo_terms(
  output: air.AIROutput,
  images: jax.Array,
  z_pres_prior_prob: jax.Array | float,
  z_where_prior: distributions.NormalParams,
  likelihood: str = 'normal',
  likelihood_std: float | jax.Array = 0.3,
  repulsion: tuple[float | jax.Array, float] | None = None,
) -> ELBOTerms:
  """The ELBO of each image from one posterior sample.

  Args:
    output: AIROutput of the model on `images`.
    images: [B, H, W].
    z_pres_prior_prob: scalar per-step prior probability p.
    z_where_prior: NormalParams with [3] fields.
    likelihood: see `log_likelihood`.
    likelihood_std: see `log_likelihood`.
    repulsion: (strength, radius), see `repulsion_costs`; None: off.

  Returns:
    ELBOTerms. KL_pres_t = mask_t KL(q_t || p) is the expectation over
    z_pres_t (analytic), so it carries no score-function term of its own.
  """
  ll = log_likelihood(output.canvas, images, likelihood, likelihood_std)
  prior = jnp.asarray(z_pres_prior_prob, jnp.float32)
  kl_pres = output.mask * distributions.bernoulli_kl(output.z_pres_prob, prior)
  kl_where, kl_what = _object_kls(output, z_where_prior)
  kl_where, kl_what = output.z_pres * kl_where, output.z_pres * kl_what
  pairs = _repulsion_costs_or_zeros(output, repulsion)
  elbo = ll - jnp.sum(kl_pres + kl_where + kl_what + pairs, axis=1)
  return ELBOTerms(ll, kl_pres, kl_where, kl_what, elbo, pairs)


def repulsion_costs(
  z_pres: jax.Array, z_where: jax.Array, strength: float, radius: float
) -> jax.Array:
  """[B, N] cost_t = strength z_pres_t sum_{j<t} z_pres_j phi(z_where_t,
  z_where_j): minus the log of the z_where prior's repulsion factor, each
  pair of present objects counted once, at its later step (so that it is
  among the costs that step's choice brings about). phi is
  `distributions.repulsion_potential`.

  Args:
    z_pres: [B, N] in {0, 1}.
    z_where: [B, N, 3].
    strength: nats for coincident centres.
    radius: distance (normalised coordinates) from which a pair costs 0.
  """
  phi = distributions.repulsion_potential(z_where, z_where, radius)
  earlier = jnp.tril(phi, k=-1)
  return strength * z_pres * jnp.einsum('bnj,bj->bn', earlier, z_pres)


def _repulsion_costs_or_zeros(output: air.AIROutput, repulsion) -> jax.Array:
  """[B, N] `repulsion_costs` of the output's sample, zeros if None."""
  if repulsion is None:
    return jnp.zeros_like(output.z_pres)
  return repulsion_costs(output.z_pres, output.z_where, *repulsion)


def _repulsion_of_each(
  z_pres: jax.Array, z_where: jax.Array, repulsion
) -> jax.Array:
  """[B, N] strength sum_{j != n} z_pres_j phi(z_where_n, sg[z_where_j]):
  the repulsion cost proposal n adds if present, given the others (its
  gradient reaches z_where_n only); zeros if `repulsion` is None."""
  if repulsion is None:
    return jnp.zeros_like(z_pres)
  strength, radius = repulsion
  n = z_pres.shape[1]
  phi = distributions.repulsion_potential(
    z_where, jax.lax.stop_gradient(z_where), radius
  ) * (1.0 - jnp.eye(n))
  return strength * jnp.einsum('bnj,bj->bn', phi, z_pres)


def _object_kls(
  output: air.AIROutput, z_where_prior: distributions.NormalParams
) -> tuple[jax.Array, jax.Array]:
  """[B, N] KL_where and KL_what of every step, as if its object were
  present (not multiplied by z_pres)."""
  where_q = distributions.NormalParams(output.z_where_loc, output.z_where_scale)
  what_q = distributions.NormalParams(output.z_what_loc, output.z_what_scale)
  return distributions.normal_kl(where_q, z_where_prior), (
    distributions.normal_kl(
      what_q, distributions.standard_normal_like(output.z_what_loc)
    )
  )


def _normal_flip_gains(
  output: air.AIROutput,
  images: jax.Array,
  z_where_prior: distributions.NormalParams,
  likelihood_std: float | jax.Array,
  repulsion: tuple[float | jax.Array, float] | None,
) -> jax.Array:
  """[B, N] f(z_pres_n = 1) - f(z_pres_n = 0) for a Normal likelihood, f as
  in `local_signal`. ll(c) = -|x - c|^2 / (2 std^2) + const: the difference
  of adding O_n to the canvas without it is (<x - C, O_n> + (z_n - 1/2)
  |O_n|^2) / std^2 for the canvas C, computed without drawing O_n.
  Gradients reach each proposal's own window, z_where and q parameters, not
  the canvas, z_pres or the other proposals."""
  kl_where, kl_what = _object_kls(output, z_where_prior)
  z_pres = jax.lax.stop_gradient(output.z_pres)
  # The repulsion proposal n would add is one more cost of its presence.
  costs = (
    kl_where + kl_what + _repulsion_of_each(z_pres, output.z_where, repulsion)
  )
  dot, sq_norm = spatial_transformer.object_image_products(
    output.windows,
    output.z_where,
    images - jax.lax.stop_gradient(output.canvas),
  )
  return (dot + (z_pres - 0.5) * sq_norm) / likelihood_std**2 - costs


def local_signal(
  output: air.AIROutput,
  images: jax.Array,
  z_where_prior: distributions.NormalParams,
  likelihood: str = 'normal',
  likelihood_std: float | jax.Array = 0.3,
  repulsion: tuple[float | jax.Array, float] | None = None,
) -> jax.Array:
  """[B, N] f(z_pres_n = 1) - f(z_pres_n = 0) with every other latent at its
  sample, where f = log p(x | z) - sum_n z_pres_n (KL_where_n + KL_what_n)
  - sum_n repulsion_n (`repulsion_costs`).

  When the proposals are independent given the image (a grid model), the
  gradient of E_q[f] through q_n = q(z_pres_n = 1) is exactly
  E[f(z_pres_n = 1) - f(z_pres_n = 0)] dq_n: this difference, at one sample
  of the others, is an unbiased estimate with no noise from z_pres_n
  itself, so no baseline is needed (the local expectation gradient of
  Titsias and Lazaro-Gredilla, 2015). With a Normal likelihood the
  difference is computed in window space; otherwise each object is drawn
  alone onto the image to add it to, or take it from, the sampled canvas.
  Carries no gradient.

  Args:
    output: AIROutput with independent proposals.
    images: [B, H, W].
    z_where_prior: NormalParams, fields [3] or [N, 3].
    likelihood: see `log_likelihood`.
    likelihood_std: see `log_likelihood`.
    repulsion: (strength, radius), see `repulsion_costs`; None: off.

  Returns:
    [B, N] signals.
  """
  output = jax.lax.stop_gradient(output)
  if likelihood == 'normal':
    return _normal_flip_gains(
      output, images, z_where_prior, likelihood_std, repulsion
    )
  kl_where, kl_what = _object_kls(output, z_where_prior)
  # The repulsion proposal n would add is one more cost of its presence.
  kl_where = kl_where + _repulsion_of_each(
    output.z_pres, output.z_where, repulsion
  )
  b, n = output.z_pres.shape
  objects = spatial_transformer.window_to_image(
    output.windows, output.z_where, images.shape[1:]
  )  # [B, N, H, W]
  without = output.canvas[:, None] - output.z_pres[..., None, None] * objects
  pairs = jnp.concatenate([without + objects, without], axis=0)
  targets = jnp.broadcast_to(images[:, None], without.shape)
  ll = log_likelihood(
    pairs.reshape(2 * b * n, *images.shape[1:]),
    jnp.concatenate([targets, targets], axis=0).reshape(
      2 * b * n, *images.shape[1:]
    ),
    likelihood,
    likelihood_std,
  ).reshape(2, b, n)
  return ll[0] - ll[1] - kl_where - kl_what


def z_pres_prior_logit(config: LossConfig, step: jax.Array | int) -> jax.Array:
  """log(p / (1 - p)) of the z_pres prior p at `step`."""
  p = jnp.clip(config.z_pres_prior(step), 1e-35, 1.0 - 1e-7)
  return jnp.log(p) - jnp.log1p(-p)


def refinement_objective(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
) -> jax.Array:
  """[B] what `refinement.refine_modes` climbs in z_where: g
  (`set_objective`: the likelihood of the canvas, each present object's
  KL_where, KL_what and prior, the repulsion) plus, for every absent
  proposal, the gain in g of turning it on alone, with the canvas of the
  present objects held fixed in that term (its gradient moves the absent
  proposal only: to where it would explain most if it were turned on).
  Normal likelihood only.

  Args:
    output: AIROutput of a model with independent proposals; its canvas
      must be drawn from its z_pres, z_where and windows.
    images: [B, H, W].
    config: the objective's settings.
    step: the training step the schedules are read at.
  """
  if config.likelihood != 'normal':
    raise ValueError(
      'refinement_objective needs the Normal likelihood, not '
      f'{config.likelihood!r}.'
    )
  std = config.likelihood_std(step)
  repulsion = config.repulsion(step)
  z_pres = jax.lax.stop_gradient(output.z_pres)
  gain = _normal_flip_gains(
    output, images, config.z_where_prior(), std, repulsion
  ) + z_pres_prior_logit(config, step)
  return set_objective(output, images, config, step) + jnp.sum(
    (1.0 - z_pres) * gain, axis=1
  )


def set_objective(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
) -> jax.Array:
  """[B] g, the model's objective for a set of objects: the
  log-likelihood of the canvas minus, for each present object, its
  KL_where, KL_what and z_pres prior logit, minus the repulsion. What the
  search over posterior modes climbs (`refinement`: its flips, and its
  drops and splits compare candidates by it); z_pres is not
  differentiated.

  Args:
    output: AIROutput whose canvas is drawn from its z_pres, z_where and
      windows.
    images: [B, H, W].
    config: the objective's settings.
    step: the training step the schedules are read at.
  """
  kl_where, kl_what = _object_kls(output, config.z_where_prior())
  cost = kl_where + kl_what - z_pres_prior_logit(config, step)  # [B, N]
  z_pres = jax.lax.stop_gradient(output.z_pres)
  std = config.likelihood_std(step)
  return (
    log_likelihood(output.canvas, images, config.likelihood, std)
    - jnp.sum(z_pres * cost, axis=1)
    - jnp.sum(_repulsion_costs_or_zeros(output, config.repulsion(step)), axis=1)
  )


def local_expectation_surrogate(
  z_pres_prob: jax.Array, signal: jax.Array, mask: jax.Array
) -> jax.Array:
  """Surrogate of the local expectation gradient: value 0, gradient
  sum_n mask_n signal_n grad q_n.

  Args:
    z_pres_prob: [B, N] q(z_pres_n = 1).
    signal: [B, N] `local_signal` (treated as constant).
    mask: [B, N] 1 where a choice was made.

  Returns:
    [B] surrogate terms to add to the objective being maximised.
  """
  # REINFORCE's surrogate with q in place of log q.
  return reinforce_surrogate(z_pres_prob, signal, mask)


def local_object_objective(
  output: air.AIROutput,
  images: jax.Array,
  z_where_prior: distributions.NormalParams,
  likelihood_std: float | jax.Array = 0.3,
  repulsion: tuple[float | jax.Array, float] | None = None,
) -> jax.Array:
  """[B] a surrogate for the continuous latents and the decoder of a model
  with independent proposals and a Normal likelihood: its gradient is
  sum_n q_n grad[f](z_pres_n = 1), the exact expectation over each z_pres_n
  (given the other samples) of the reparameterised gradient of
  f = log p(x | z) - sum_n z_pres_n (KL_where_n + KL_what_n).

  The sampled ELBO's gradient reaches an object only when its z_pres_n was
  drawn 1; this one reaches every proposal, weighted by q_n, so the decoder
  keeps learning what a proposal would draw while few are present (and a
  grid of proposals does not settle on drawing nothing). Per proposal it is
  q_n [<x - C_n, O_n> / std^2 - KL_where_n - KL_what_n] with C_n the sampled
  canvas with O_n present (gradient through O_n only): written as
  (<x - C, O_n> - (1 - z_n) |O_n|^2 / 2) / std^2. Its value is not the ELBO.

  Args:
    output: AIROutput with independent proposals.
    images: [B, H, W].
    z_where_prior: NormalParams, fields [3] or [N, 3].
    likelihood_std: the Normal likelihood's std.
    repulsion: (strength, radius), see `repulsion_costs` (None: off);
      proposal n's term is q_n strength sum_{j != n} z_pres_j phi_nj with
      the gradient of z_where_n (that of z_where_j comes from proposal j's
      term): the expectation over z_pres_n of the pair terms' gradient.

  Returns:
    [B] surrogate values.
  """
  residual = jax.lax.stop_gradient(images - output.canvas)
  dot, sq_norm = spatial_transformer.object_image_products(
    output.windows, output.z_where, residual
  )
  z_pres = jax.lax.stop_gradient(output.z_pres)
  log_lik = (dot - (1.0 - z_pres) * 0.5 * sq_norm) / likelihood_std**2
  kl_where, kl_what = _object_kls(output, z_where_prior)
  pairs = _repulsion_of_each(z_pres, output.z_where, repulsion)
  q = jax.lax.stop_gradient(output.z_pres_prob)
  return jnp.sum(q * (log_lik - kl_where - kl_what - pairs), axis=1)


def downstream_signal(log_lik: jax.Array, step_costs: jax.Array) -> jax.Array:
  """signal_t = log_lik - sum_{t' >= t} step_costs_t'.

  Args:
    log_lik: [B] the reward every choice shares.
    step_costs: [B, N] costs incurred at each step.

  Returns:
    [B, N] learning signals.
  """
  costs_from_t = jnp.flip(jnp.cumsum(jnp.flip(step_costs, 1), axis=1), 1)
  return log_lik[:, None] - costs_from_t


def step_costs(terms: ELBOTerms) -> jax.Array:
  """[B, N] the costs that step t's choice z_pres_t brings about:
  cost_t = KL_where_t + KL_what_t + repulsion_t + KL_pres_{t+1} (see the
  module doc)."""
  next_kl_pres = jnp.pad(terms.kl_pres[:, 1:], ((0, 0), (0, 1)))
  return terms.kl_where + terms.kl_what + terms.repulsion + next_kl_pres


def z_pres_log_prob(
  z_pres: jax.Array, z_pres_prob: jax.Array, mask: jax.Array
) -> jax.Array:
  """log q(z_pres_t) of the sampled choices, 0 where no choice was made.

  Args:
    z_pres: [B, N] sampled z_pres (binary).
    z_pres_prob: [B, N] q(z_pres_t = 1).
    mask: [B, N] z_pres_{t-1}.

  Returns:
    [B, N] log-probabilities.
  """
  p = jnp.clip(z_pres_prob, 1e-35, 1.0 - 1e-7)
  log_q = z_pres * jnp.log(p) + (1.0 - z_pres) * jnp.log1p(-p)
  return mask * log_q


def reinforce_surrogate(
  log_q: jax.Array, advantage: jax.Array, mask: jax.Array
) -> jax.Array:
  """Score-function surrogate: value 0, gradient sum_t mask_t A_t grad log q_t.

  Args:
    log_q: [B, N] log q of the sampled discrete choices.
    advantage: [B, N] learning signal minus baseline (treated as constant).
    mask: [B, N] 1 where a choice was made.

  Returns:
    [B] surrogate terms to add to the objective being maximised.
  """
  centred = log_q - jax.lax.stop_gradient(log_q)
  return jnp.sum(mask * centred * jax.lax.stop_gradient(advantage), axis=1)


def baseline_loss(
  baseline: jax.Array, target: jax.Array, mask: jax.Array
) -> jax.Array:
  """Squared error of the baseline to the (constant) target.

  Summed over the steps where a choice was made, averaged over the batch (a
  per-example mean, so data-parallel averages equal the global one).

  Args:
    baseline: [B, N] predictions.
    target: [B, N] learning signal.
    mask: [B, N].

  Returns:
    Scalar loss.
  """
  err = jax.lax.stop_gradient(target) - baseline
  return jnp.mean(jnp.sum(mask * err * err, axis=1))


class SignalSums(NamedTuple):
  """Masked count, sum and sum of squared deviations of the learning signal.

  Sums (not moments) so that data-parallel devices can add theirs up
  (`psum`) before `moments` turns them into the global batch's mean and
  variance. The squares are taken about the shard's own mean and combined
  by Chan et al.'s rule: sum(x^2) - n mean^2 in float32 cancels
  catastrophically for a signal of many nats with a small spread, and then
  depends on how the batch is split.
  """

  count: jax.Array  # []
  total: jax.Array  # []
  sq_dev: jax.Array  # [] sum of mask * (x - this shard's mean)^2

  @classmethod
  def of(cls, x: jax.Array, mask: jax.Array) -> 'SignalSums':
    count, total = jnp.sum(mask), jnp.sum(mask * x)
    mean = total / jnp.maximum(count, 1.0)
    return cls(count, total, jnp.sum(mask * jnp.square(x - mean)))

  def psum(self, axis_name: str) -> 'SignalSums':
    """The sums of the shards along `axis_name` (every shard gets them)."""
    count = jax.lax.psum(self.count, axis_name)
    total = jax.lax.psum(self.total, axis_name)
    shift = self.total / jnp.maximum(self.count, 1.0) - total / jnp.maximum(
      count, 1.0
    )
    sq_dev = jax.lax.psum(
      self.sq_dev + self.count * jnp.square(shift), axis_name
    )
    return SignalSums(count, total, sq_dev)

  def moments(self) -> tuple[jax.Array, jax.Array]:
    """(mean, variance); (0, 0) when nothing was counted."""
    count = jnp.maximum(self.count, 1.0)
    return self.total / count, self.sq_dev / count


def air_loss(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
  moments: SignalMoments | None = None,
) -> tuple[jax.Array, LossAux]:
  """The scalar to minimise: -mean(ELBO + surrogate) + baseline loss.

  The REINFORCE signal of step t is the downstream (Rao-Blackwellised)
  signal; the advantage is signal - baseline.

  Args:
    output: AIROutput (its `baseline` is used unless config.baseline is
      'none').
    images: [B, H, W].
    config: LossConfig.
    step: the training step (the schedules' argument).
    moments: running moments of the signal (from earlier batches); needed
      when config.baseline is 'normalised'. The baseline network's output is
      then in standard units: the baseline is m + sqrt(v) * output and it is
      fitted to (signal - m) / sqrt(v). A network whose output starts near 0
      then tracks a signal of hundreds of nats from the first steps; without
      it, Adam moves the output by about the learning rate per step and the
      baseline lags far behind. The advantage is not rescaled, so the
      estimator stays unbiased.

  Returns:
    (loss, LossAux).
  """
  if config.z_pres_warmup_steps:
    # The same values; no gradient reaches q(z_pres) during the warm-up.
    learn = jnp.asarray(step) >= config.z_pres_warmup_steps
    q = output.z_pres_prob
    output = output._replace(
      z_pres_prob=jnp.where(learn, q, jax.lax.stop_gradient(q))
    )
  terms = elbo_terms(
    output,
    images,
    config.z_pres_prior(step),
    config.z_where_prior(),
    config.likelihood,
    config.likelihood_std(step),
    config.repulsion(step),
  )
  mask = output.mask
  if config.estimator == 'local':
    signal = local_signal(
      output,
      images,
      config.z_where_prior(),
      config.likelihood,
      config.likelihood_std(step),
      config.repulsion(step),
    )
    surrogate = local_expectation_surrogate(output.z_pres_prob, signal, mask)
    objective = terms.elbo + surrogate
    if config.likelihood == 'normal':
      # The same value; the gradient of the continuous latents and the
      # decoder from every proposal (local_object_objective), that of q_n
      # from the surrogate and the analytic KL_pres.
      def gradient_only(x):
        return x - jax.lax.stop_gradient(x)

      objective = jax.lax.stop_gradient(terms.elbo) + gradient_only(
        local_object_objective(
          output,
          images,
          config.z_where_prior(),
          config.likelihood_std(step),
          config.repulsion(step),
        )
        - jnp.sum(terms.kl_pres, axis=1)
        + surrogate
      )
    return -jnp.mean(objective), LossAux(
      terms=terms,
      signal=signal,
      advantage=mask * signal,
      baseline_loss=jnp.zeros(()),
      signal_sums=SignalSums.of(signal, mask),
    )
  signal = jax.lax.stop_gradient(
    downstream_signal(terms.log_likelihood, step_costs(terms))
  )
  if config.baseline == 'none':
    baseline = jnp.zeros_like(signal)
    b_loss = jnp.zeros(())
  elif config.baseline == 'plain':
    baseline = output.baseline
    b_loss = baseline_loss(baseline, signal, mask)
  else:
    if moments is None:
      raise ValueError('A normalised baseline needs the signal moments.')
    shift = moments.mean
    unit = jnp.sqrt(jnp.maximum(moments.var, 1e-6))
    baseline = shift + unit * output.baseline
    b_loss = baseline_loss(output.baseline, (signal - shift) / unit, mask)
  advantage = mask * (signal - baseline)
  log_q = z_pres_log_prob(output.z_pres, output.z_pres_prob, mask)
  objective = terms.elbo + reinforce_surrogate(log_q, advantage, mask)
  loss = -jnp.mean(objective) + b_loss
  return loss, LossAux(
    terms=terms,
    signal=signal,
    advantage=advantage,
    baseline_loss=b_loss,
    signal_sums=SignalSums.of(signal, mask),
  )


def update_signal_moments(
  moments: SignalMoments,
  batch_mean: jax.Array,
  batch_var: jax.Array,
  decay: float = 0.9,
) -> SignalMoments:
  """Exponential moving averages of the signal's mean and variance."""
  return SignalMoments(
    mean=decay * moments.mean + (1.0 - decay) * batch_mean,
    var=decay * moments.var + (1.0 - decay) * batch_var,
  )


def log_importance_weight(
  output: air.AIROutput,
  images: jax.Array,
  z_pres_prior_prob: jax.Array | float,
  z_where_prior: distributions.NormalParams,
  likelihood: str = 'normal',
  likelihood_std: float = 0.3,
  repulsion: tuple[float | jax.Array, float] | None = None,
) -> jax.Array:
  """log p(x, z) - log q(z | x) at the sampled z (hard z_pres), per image
  (p with the z_where prior's repulsion, `repulsion_costs`, if any).

  The average over samples is an ELBO estimate; log-mean-exp over K samples
  is the importance-weighted (IWAE) bound.

  Returns:
    [B] log weights.
  """
  ll = log_likelihood(output.canvas, images, likelihood, likelihood_std)
  p = jnp.asarray(z_pres_prior_prob, jnp.float32)
  log_p_pres = z_pres_log_prob(
    output.z_pres, jnp.broadcast_to(p, output.z_pres.shape), output.mask
  )
  log_q_pres = z_pres_log_prob(output.z_pres, output.z_pres_prob, output.mask)

  def normal_log_prob(x, params):
    z = (x - params.loc) / params.scale
    return jnp.sum(
      -0.5 * z * z - jnp.log(params.scale) - 0.5 * jnp.log(2 * jnp.pi), -1
    )

  where_q = distributions.NormalParams(output.z_where_loc, output.z_where_scale)
  what_q = distributions.NormalParams(output.z_what_loc, output.z_what_scale)
  log_ratio_where = normal_log_prob(
    output.z_where, z_where_prior
  ) - normal_log_prob(output.z_where, where_q)
  log_ratio_what = normal_log_prob(
    output.z_what, distributions.standard_normal_like(output.z_what)
  ) - normal_log_prob(output.z_what, what_q)
  per_step = (
    log_p_pres - log_q_pres + output.z_pres * (log_ratio_where + log_ratio_what)
  )
  pairs = _repulsion_costs_or_zeros(output, repulsion)
  return ll + jnp.sum(per_step - pairs, axis=1)
