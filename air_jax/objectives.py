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
from typing import Protocol

import jax
import jax.numpy as jnp

from air_jax import air
from air_jax import distributions
from air_jax import grid as grid_lib
from air_jax import spatial_transformer

__all__ = [
  'BASELINES',
  'DROP_GAIN',
  'ELBOTerms',
  'ESTIMATORS',
  'LIKELIHOODS',
  'LossAux',
  'LossConfig',
  'ObjectsAt',
  'SPLIT_GAIN',
  'SignalMoments',
  'SignalSums',
  'air_loss',
  'baseline_loss',
  'downstream_signal',
  'drop_candidates',
  'drop_objects',
  'elbo_terms',
  'greedy_z_pres',
  'log_importance_weight',
  'local_expectation_surrogate',
  'local_object_objective',
  'local_signal',
  'log_likelihood',
  'objects_as_set',
  'refine_modes',
  'refinement_objective',
  'reinforce_surrogate',
  'repulsion_costs',
  'set_objective',
  'split_candidates',
  'split_objects',
  'step_costs',
  'update_signal_moments',
  'z_pres_log_prob',
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


def objects_as_set(config: LossConfig) -> LossConfig:
  """A sequential AIR's objective as `greedy_z_pres` and `refine_modes` use
  it on its posterior modes: its N steps taken as N proposals, each present
  or not, with the canvas the sum of the present ones.

  The sequential prior gives k present objects (steps 1..k) the probability
  p^k (1 - p) (p^N for k = N) and each object's z_where and z_what the same
  prior whatever its step; the likelihood depends on the set of objects, not
  their order. So any k present proposals, moved to the first k steps
  (`air.present_first`), have the sequential model's objective up to
  log(1 - p) for each absent step after the first (1e-5 nats at the
  default p): the independent per-proposal prior of the grid model's
  estimator 'local'. The estimator only tells `greedy_z_pres` that this
  objective applies; nothing here is trained."""
  return dataclasses.replace(config, estimator='local', baseline='none')


def greedy_z_pres(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
  max_flips: int,
) -> air.AIROutput:
  """z_pres moved to a local maximum of the model's own objective, one flip
  at a time (iterated conditional modes), for models whose proposals are
  independent given the image (config.estimator 'local'), or a sequential
  AIR's steps taken as a set of proposals (`objects_as_set`).

  With every other latent as in `output` (its means, for posterior modes),
  z_pres maximises
    g(z) = f(z) + sum_n z_n log(p / (1 - p)),
  f as in `local_signal` (the likelihood, each present object's KL_where and
  KL_what, the repulsion) and p the z_pres prior at `step`. Each round flips,
  in every image, the one z_pres_n that raises g most, if any does; after
  `max_flips` rounds, or once no flip raises g, z_pres is returned with the
  canvas redrawn. The encoder's q(z_pres) decides each proposal alone; this
  lets proposals explain each other away (two proposals on one digit: the
  second adds little ink and pays its prior, so it is dropped).

  Args:
    output: AIROutput of a model with independent proposals.
    images: [B, H, W].
    config: the objective's settings (prior, likelihood, repulsion).
    step: the training step the schedules are read at.
    max_flips: most rounds (each flips at most one z_pres per image).

  Returns:
    The output with z_pres and canvas replaced (z_pres_prob is still q).
  """
  if config.estimator != 'local':
    raise ValueError(
      'greedy_z_pres needs a model with independent proposals (estimator '
      f"'local'), not {config.estimator!r}; for a sequential AIR's modes "
      'use objects_as_set(config).'
    )
  prior_logit = _prior_logit(config, step)

  def flip_best(_, out):
    gain = (
      local_signal(
        out,
        images,
        config.z_where_prior(),
        config.likelihood,
        config.likelihood_std(step),
        config.repulsion(step),
      )
      + prior_logit
    )
    gain = jnp.where(out.z_pres > 0.5, -gain, gain)  # Of flipping each.
    best = jnp.argmax(gain, axis=1)
    flip = (jnp.max(gain, axis=1) > 0)[:, None] & (
      jnp.arange(gain.shape[1])[None] == best[:, None]
    )
    z_pres = jnp.where(flip, 1.0 - out.z_pres, out.z_pres)
    canvas = spatial_transformer.windows_to_canvas(
      out.windows, out.z_where, z_pres, images.shape[1:]
    )
    return out._replace(z_pres=z_pres, canvas=canvas)

  return jax.lax.fori_loop(0, max_flips, flip_best, output)


def _prior_logit(config: LossConfig, step: jax.Array | int) -> jax.Array:
  """log(p / (1 - p)) of the z_pres prior p at `step`."""
  p = jnp.clip(config.z_pres_prior(step), 1e-35, 1.0 - 1e-7)
  return jnp.log(p) - jnp.log1p(-p)


def refinement_objective(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
) -> jax.Array:
  """[B] what `refine_modes` climbs in z_where: g of `greedy_z_pres` (the
  likelihood of the canvas, each present object's KL_where, KL_what and
  prior, the repulsion) plus, for every absent proposal, the gain in g of
  turning it on alone, with the canvas of the present objects held fixed in
  that term (its gradient moves the absent proposal only: to where it would
  explain most if it were turned on). Normal likelihood only.

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
  ) + _prior_logit(config, step)
  return set_objective(output, images, config, step) + jnp.sum(
    (1.0 - z_pres) * gain, axis=1
  )


def set_objective(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
) -> jax.Array:
  """[B] g of `greedy_z_pres`: the log-likelihood of the canvas minus, for
  each present object, its KL_where, KL_what and z_pres prior logit, minus
  the repulsion. What the refinement of the modes climbs and what
  `split_objects` compares candidates by; z_pres is not differentiated.

  Args:
    output: AIROutput whose canvas is drawn from its z_pres, z_where and
      windows.
    images: [B, H, W].
    config: the objective's settings.
    step: the training step the schedules are read at.
  """
  kl_where, kl_what = _object_kls(output, config.z_where_prior())
  cost = kl_where + kl_what - _prior_logit(config, step)  # [B, N]
  z_pres = jax.lax.stop_gradient(output.z_pres)
  std = config.likelihood_std(step)
  return (
    log_likelihood(output.canvas, images, config.likelihood, std)
    - jnp.sum(z_pres * cost, axis=1)
    - jnp.sum(_repulsion_costs_or_zeros(output, config.repulsion(step)), axis=1)
  )


class ObjectsAt(Protocol):
  """(z_where [B, N, 3], z_pres [B, N]) -> (q(z_what) [B, N, D], windows
  [B, N, h, w]) of the images being refined (e.g. `grid.GridAIR.objects_at`
  with its params; z_pres matters only to models whose objects depend on
  each other, DAIR: `air.AIR.objects_at`)."""

  def __call__(
    self, z_where: jax.Array, z_pres: jax.Array
  ) -> tuple[distributions.NormalParams, jax.Array]: ...


def refine_modes(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
  max_flips: int,
  rounds: int,
  objects_at: ObjectsAt,
  bounds: tuple[jax.Array, jax.Array],
  where_steps: int = 10,
  where_lr: float = 0.05,
) -> air.AIROutput:
  """Posterior modes of a model with independent proposals (or a
  sequential model's steps taken as a set, `objects_as_set`) moved up the
  model's own objective: `greedy_z_pres`, then `rounds` times (i)
  `where_steps` steps of Adam ascent (step `where_lr`, normalised
  coordinates) on every proposal's z_where, up `refinement_objective`, each
  glimpse re-read and redrawn by the model at its new z_where and the means
  kept within `bounds` (`objects_at`, given z_pres: a DAIR re-reads its
  objects one after the other, and its gradient runs through that chain),
  (ii) `greedy_z_pres` again (its flips keep every object's drawing; the
  next round re-reads them).

  The encoder proposes each object alone; the flips of `greedy_z_pres` can
  only choose among its proposals. Moving them lets a window that sits
  between two digits move onto one (the other's proposal then pays for
  itself), and two windows on one digit meet (the repulsion and the prior
  then drop one). z_where's posterior stds and q(z_pres) are kept.

  Args:
    output: AIROutput of the posterior modes (deterministic).
    images: [B, H, W].
    config: the objective's settings (Normal likelihood).
    step: the training step the schedules are read at.
    max_flips: most flips of each `greedy_z_pres`.
    rounds: rounds of ascent and flips after the first flips (0: just
      `greedy_z_pres`).
    objects_at: the model's q(z_what) and windows at given z_where.
    bounds: ([N, 3], [N, 3]) lower and upper bounds of z_where's means
      (`grid.GridAIR.z_where_bounds`).
    where_steps: Adam steps per round.
    where_lr: Adam's step size.

  Returns:
    The refined AIROutput (z_pres, z_where, z_what, windows, canvas).
  """
  output = greedy_z_pres(output, images, config, step, max_flips)
  return _ascent_rounds(
    output,
    images,
    config,
    step,
    max_flips,
    rounds,
    objects_at,
    bounds,
    where_steps,
    where_lr,
  )


def _redraw(
  output: air.AIROutput, z_where: jax.Array, objects_at: ObjectsAt
) -> air.AIROutput:
  """`output` with its objects re-read and redrawn at z_where [B, N, 3]."""
  what_q, windows = objects_at(z_where, output.z_pres)
  canvas = spatial_transformer.windows_to_canvas(
    windows, z_where, output.z_pres, output.canvas.shape[1:]
  )
  return output._replace(
    z_where=z_where,
    z_where_loc=z_where,
    z_what=what_q.loc,
    z_what_loc=what_q.loc,
    z_what_scale=what_q.scale,
    windows=windows,
    canvas=canvas,
  )


def _ascent_rounds(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
  max_flips: int,
  rounds: int,
  objects_at: ObjectsAt,
  bounds: tuple[jax.Array, jax.Array],
  where_steps: int,
  where_lr: float,
) -> air.AIROutput:
  """`rounds` rounds of z_where ascent then `greedy_z_pres` (`refine_modes`
  after its first flips)."""
  lower, upper = bounds
  b1, b2, eps = 0.9, 0.999, 1e-8

  def ascend(out):
    grad_fn = jax.grad(
      lambda z: jnp.sum(
        refinement_objective(_redraw(out, z, objects_at), images, config, step)
      )
    )

    def adam(t, state):
      z, m, v = state
      grad = grad_fn(z)
      m = b1 * m + (1.0 - b1) * grad
      v = b2 * v + (1.0 - b2) * grad**2
      t = t + 1.0
      update = (m / (1.0 - b1**t)) / (jnp.sqrt(v / (1.0 - b2**t)) + eps)
      return jnp.clip(z + where_lr * update, lower, upper), m, v

    zeros = jnp.zeros_like(out.z_where)
    z, _, _ = jax.lax.fori_loop(
      0, where_steps, adam, (out.z_where, zeros, zeros)
    )
    return _redraw(out, z, objects_at)

  def one_round(out, _):
    out = greedy_z_pres(ascend(out), images, config, step, max_flips)
    return out, None

  output, _ = jax.lax.scan(one_round, output, None, length=rounds)
  return output


# How much a split must raise the objective to be taken (nats; chosen on
# training canvases, RESULTS.md): the objective of `pretrained/air` takes
# some wide single digits as two windows by a few nats.
SPLIT_GAIN = 10.0

# How much dropping an object must raise the objective to be taken (nats):
# none, the objective decides (`drop_objects`).
DROP_GAIN = 0.0

# Unit vectors (x, y) along which `split_objects` splits a window.
_SPLIT_DIRECTIONS = (
  (1.0, 0.0),
  (0.0, 1.0),
  (0.5**0.5, 0.5**0.5),
  (0.5**0.5, -(0.5**0.5)),
)


def split_candidates(
  z_pres: jax.Array,
  z_where: jax.Array,
  num_objects: int,
  shrink: float = 1.5,
  bounds: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each of the `num_objects` largest present windows of every image split
  in two, along each of four directions (horizontal, vertical, the two
  diagonals): two windows `shrink` times smaller than the one they replace,
  whose centres sit a quarter of its width either side of its centre; the
  second takes an absent proposal: the first one whose `bounds` on the
  centre hold it (or come nearest; without bounds, the first absent one).

  Args:
    z_pres: [B, N] in {0, 1}.
    z_where: [B, N, 3] (s, x, y).
    num_objects: K, how many present windows (the largest first) to split.
    shrink: the new windows' scale over the old one's (> 1: smaller).
    bounds: optional ([N, 3], [N, 3]) bounds of each proposal's z_where
      (a grid model's cells reach only so far).

  Returns:
    (z_pres [B, C, N], z_where [B, C, N, 3], valid [B, C]) of the C = 4K
    candidates, ordered by window then direction; a candidate is invalid
    when its image has fewer than k present windows or no absent proposal.
  """
  n = z_pres.shape[1]
  present = z_pres > 0.5
  largest = jnp.where(present, -jnp.abs(z_where[..., 0]), -jnp.inf)
  _, which = jax.lax.top_k(largest, num_objects)  # [B, K]
  enough = jnp.take_along_axis(present, which, axis=1)  # [B, K]
  directions = jnp.asarray(_SPLIT_DIRECTIONS, z_where.dtype)  # [D, 2]
  old = jnp.take_along_axis(z_where, which[..., None], axis=1)  # [B, K, 3]
  offset = (0.5 / jnp.abs(old[..., :1]))[:, :, None] * directions  # [B,K,D,2]
  new_scale = jnp.broadcast_to(
    old[:, :, None, :1] * shrink, offset.shape[:-1] + (1,)
  )
  centre = old[:, :, None, 1:]
  first = jnp.concatenate([new_scale, centre + offset], -1)  # [B, K, D, 3]
  second = jnp.concatenate([new_scale, centre - offset], -1)
  b, k, d = first.shape[:3]
  # How far each proposal's bounds keep it from the second centre.
  lower, upper = (
    (jnp.full((n, 3), -jnp.inf), jnp.full((n, 3), jnp.inf))
    if bounds is None
    else bounds
  )
  at = second[:, :, :, None, 1:]  # [B, K, D, 1, 2]
  miss = jnp.sum(
    (at - jnp.clip(at, lower[:, 1:], upper[:, 1:])) ** 2, axis=-1
  )  # [B, K, D, N]
  miss = jnp.where(present[:, None, None], jnp.inf, miss)
  free = jnp.argmin(miss, axis=-1)  # [B, K, D]
  slots = jnp.arange(n)
  is_which = (slots == which[:, :, None, None])[..., None]  # [B,K,1,N,1]
  is_free = (slots == free[..., None])[..., None]  # [B,K,D,N,1]
  candidate = jnp.where(
    is_which,
    first[:, :, :, None],
    jnp.where(is_free, second[:, :, :, None], z_where[:, None, None]),
  )  # [B, K, D, N, 3]
  pres = jnp.where(is_free[..., 0], 1.0, z_pres[:, None, None])
  has_free = jnp.any(~present, axis=1)
  valid = jnp.broadcast_to((enough & has_free[:, None])[:, :, None], (b, k, d))
  return (
    pres.reshape(b, k * d, n),
    candidate.reshape(b, k * d, n, 3),
    valid.reshape(b, k * d),
  )


def split_objects(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
  max_flips: int,
  rounds: int,
  objects_at: ObjectsAt,
  bounds: tuple[jax.Array, jax.Array],
  num_objects: int = 1,
  shrink: float = 1.5,
  min_gain: float = SPLIT_GAIN,
  where_steps: int = 10,
  where_lr: float = 0.05,
) -> air.AIROutput:
  """Refined modes (`refine_modes`' output) given the chance to read one
  object as two: the `split_candidates` of the present windows, each
  re-read and redrawn by the model and refined by `rounds` rounds of
  z_where ascent and flips; per image, the candidate of highest
  `set_objective` g replaces `output` if it beats it by more than
  `min_gain` nats.

  The ascent moves one window at a time up g; a window that covers two
  close digits sits at a local maximum that the two digits' own windows
  can beat only together (each alone leaves the other's ink to the big
  window). A split proposes the pair, and the model's objective decides.

  Args:
    output: refined posterior modes (`refine_modes`).
    images: [B, H, W].
    config: the objective's settings (Normal likelihood).
    step: the training step the schedules are read at.
    max_flips: most flips of each `greedy_z_pres`.
    rounds: rounds of ascent and flips per candidate (>= 1).
    objects_at: the model's q(z_what) and windows at given z_where.
    bounds: lower and upper bounds of z_where's means.
    num_objects: how many present windows (the largest first) to split.
    shrink: see `split_candidates`.
    min_gain: how much a split must raise g to be taken (nats).
    where_steps: Adam steps per round.
    where_lr: Adam's step size.

  Returns:
    AIROutput: per image, `output` or its best split.
  """
  z_pres, z_where, valid = split_candidates(
    output.z_pres, output.z_where, num_objects, shrink, bounds
  )
  return _best_candidate(
    output,
    images,
    config,
    step,
    max_flips,
    rounds,
    objects_at,
    bounds,
    (z_pres, jnp.clip(z_where, *bounds), valid),
    min_gain,
    where_steps,
    where_lr,
  )


def drop_candidates(
  z_pres: jax.Array, z_pres_prob: jax.Array, num_objects: int
) -> tuple[jax.Array, jax.Array]:
  """Each of the `num_objects` present objects of every image whose
  q(z_pres) is lowest turned off, one per candidate.

  Args:
    z_pres: [B, N] in {0, 1}.
    z_pres_prob: [B, N] the encoder's q(z_pres).
    num_objects: K, how many present objects (the least probable first).

  Returns:
    (z_pres [B, K, N], valid [B, K]) of the K candidates; a candidate is
    invalid when its image has fewer than k present objects.
  """
  n = z_pres.shape[1]
  present = z_pres > 0.5
  least = jnp.where(present, -z_pres_prob, -jnp.inf)
  _, which = jax.lax.top_k(least, num_objects)  # [B, K]
  valid = jnp.take_along_axis(present, which, axis=1)
  off = jnp.arange(n) == which[..., None]  # [B, K, N]
  return jnp.where(off, 0.0, z_pres[:, None]), valid


def drop_objects(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
  rounds: int,
  objects_at: ObjectsAt,
  bounds: tuple[jax.Array, jax.Array],
  num_objects: int = 1,
  min_gain: float = DROP_GAIN,
  where_steps: int = 10,
  where_lr: float = 0.05,
) -> air.AIROutput:
  """Refined modes (`refine_modes`' output) given the chance to read one
  object fewer: each of the `drop_candidates` (one present object turned
  off) re-read and redrawn by the model and its windows moved by `rounds`
  rounds of z_where ascent, without flips (a flip could turn the dropped
  object back on: the candidate is the reading with one object fewer);
  per image, the candidate of highest `set_objective` g replaces `output`
  if it beats it by more than `min_gain` nats.

  The mirror of `split_objects`. A flip turns an object off with every
  other window where it is; an object can pay for itself there and not
  once the others have moved (DAIR's pairs read as three, RESULTS.md).
  Dropping it and moving the rest lets the model's objective compare the
  two readings.

  Args:
    output: refined posterior modes (`refine_modes`).
    images: [B, H, W].
    config: the objective's settings (Normal likelihood).
    step: the training step the schedules are read at.
    rounds: rounds of ascent per candidate (>= 1).
    objects_at: the model's q(z_what) and windows at given z_where.
    bounds: lower and upper bounds of z_where's means.
    num_objects: how many present objects (the least probable first) to
      try without.
    min_gain: how much a drop must raise g to be taken (nats).
    where_steps: Adam steps per round.
    where_lr: Adam's step size.

  Returns:
    AIROutput: per image, `output` or its best drop.
  """
  z_pres, valid = drop_candidates(
    output.z_pres, output.z_pres_prob, num_objects
  )
  z_where = jnp.broadcast_to(
    output.z_where[:, None], z_pres.shape + output.z_where.shape[-1:]
  )
  return _best_candidate(
    output,
    images,
    config,
    step,
    0,
    rounds,
    objects_at,
    bounds,
    (z_pres, z_where, valid),
    min_gain,
    where_steps,
    where_lr,
  )


def _best_candidate(
  output: air.AIROutput,
  images: jax.Array,
  config: LossConfig,
  step: jax.Array | int,
  max_flips: int,
  rounds: int,
  objects_at: ObjectsAt,
  bounds: tuple[jax.Array, jax.Array],
  candidates: tuple[jax.Array, jax.Array, jax.Array],
  min_gain: float,
  where_steps: int,
  where_lr: float,
) -> air.AIROutput:
  """Per image, `output` or the best of `candidates` (z_pres [B, C, N],
  z_where [B, C, N, 3], valid [B, C]), each redrawn and refined by `rounds`
  rounds of ascent and flips, by `set_objective` g: a candidate must beat
  `output` by more than `min_gain` nats (`split_objects`,
  `drop_objects`)."""
  z_pres, z_where, valid = candidates

  def refine(pres, where):
    out = _redraw(output._replace(z_pres=pres), where, objects_at)
    out = _ascent_rounds(
      out,
      images,
      config,
      step,
      max_flips,
      rounds,
      objects_at,
      bounds,
      where_steps,
      where_lr,
    )
    return out, set_objective(out, images, config, step)

  refined, g = jax.vmap(refine, in_axes=1, out_axes=1)(z_pres, z_where)
  g = jnp.where(valid, g, -jnp.inf)  # [B, C]
  kept = set_objective(output, images, config, step)
  g = jnp.concatenate([kept[:, None] + min_gain, g], axis=1)
  best = jnp.argmax(g, axis=1)  # [B] 0: `output` kept.

  def pick(keep, other):
    stacked = jnp.concatenate([keep[:, None], other], axis=1)
    index = best.reshape(-1, *([1] * (stacked.ndim - 1)))
    return jnp.take_along_axis(stacked, index, axis=1)[:, 0]

  return jax.tree.map(pick, output, refined)


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
