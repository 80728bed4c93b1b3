"""AIR's objective: ELBO terms, the REINFORCE surrogate, the baseline loss.

Glossary of shapes: B batch, N steps, H, W image, D z_what size.

The ELBO per image is
  log p(x | z) - KL_pres - sum_t z_pres_t (KL_where_t + KL_what_t)
with the KLs analytic given the past: KL_pres_t = mask_t KL(q_t || p) of the
per-step Bernoulli, and Normal KLs for z_where and z_what. Continuous latents
are reparameterised. The gradient of the discrete z_pres choices is the score
function (REINFORCE) estimator, written as a surrogate with value 0:

  surrogate = sum_t mask_t (log q(z_pres_t) - sg[log q(z_pres_t)])
                         * sg[signal_t - baseline_t]

Rao-Blackwellised ("downstream") signal for step t: only the terms that the
choice z_pres_t can change, i.e. the likelihood and the costs of steps >= t:
  signal_t = log p(x | z) - sum_{t' >= t} cost_t',
  cost_t = z_pres_t (KL_where_t + KL_what_t) + KL_pres_{t+1}
(KL_pres_{t+1} is masked by z_pres_t). The analytic KL_pres_t is already an
expectation over z_pres_t and so is not part of its own signal.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from air_jax import air
from air_jax import distributions

LIKELIHOODS = ('normal', 'bernoulli')
Z_PRES_KLS = ('analytic', 'sampled')
SIGNALS = ('downstream', 'elbo')


class ELBOTerms(NamedTuple):
  """Per-image ELBO and its parts.

  Attributes:
    log_likelihood: [B] log p(x | z) summed over pixels.
    kl_pres: [B, N] mask_t KL(q(z_pres_t) || p(z_pres_t)).
    kl_where: [B, N] z_pres_t KL(q(z_where_t) || p(z_where)).
    kl_what: [B, N] z_pres_t KL(q(z_what_t) || N(0, I)).
    elbo: [B] log_likelihood - all KLs.
  """

  log_likelihood: jax.Array
  kl_pres: jax.Array
  kl_where: jax.Array
  kl_what: jax.Array
  elbo: jax.Array


class NVILState(NamedTuple):
  """Running mean and variance of the learning signal (NVIL, Mnih & Gregor)."""

  mean: jax.Array  # []
  var: jax.Array  # []

  @classmethod
  def create(cls) -> 'NVILState':
    return cls(mean=jnp.zeros(()), var=jnp.ones(()))


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
  likelihood_std: float = 0.3,
  z_pres_kl: str = 'analytic',
) -> ELBOTerms:
  """The ELBO of each image from one posterior sample.

  Args:
    output: AIROutput of the model on `images`.
    images: [B, H, W].
    z_pres_prior_prob: scalar per-step prior probability p.
    z_where_prior: NormalParams with [3] fields.
    likelihood: see `log_likelihood`.
    likelihood_std: see `log_likelihood`.
    z_pres_kl: 'analytic': KL_pres_t = mask_t KL(q_t || p), the expectation
      over z_pres_t; 'sampled': log q(z_pres_t) - log p(z_pres_t) at the
      sampled z_pres_t (as Pyro's TraceGraph_ELBO; the same expectation,
      and then part of step t's own REINFORCE signal).

  Returns:
    ELBOTerms.
  """
  ll = log_likelihood(output.canvas, images, likelihood, likelihood_std)
  prior = jnp.asarray(z_pres_prior_prob, jnp.float32)
  if z_pres_kl == 'analytic':
    kl_pres = output.mask * distributions.bernoulli_kl(
      output.z_pres_prob, prior
    )
  elif z_pres_kl == 'sampled':
    kl_pres = z_pres_log_prob(
      output.z_pres, output.z_pres_prob, output.mask
    ) - z_pres_log_prob(
      output.z_pres, jnp.broadcast_to(prior, output.z_pres.shape), output.mask
    )
  else:
    raise ValueError(
      f'z_pres_kl must be one of {Z_PRES_KLS}, got {z_pres_kl!r}.'
    )
  where_q = distributions.NormalParams(output.z_where_loc, output.z_where_scale)
  what_q = distributions.NormalParams(output.z_what_loc, output.z_what_scale)
  kl_where = output.z_pres * distributions.normal_kl(where_q, z_where_prior)
  kl_what = output.z_pres * distributions.normal_kl(
    what_q, distributions.standard_normal_like(output.z_what_loc)
  )
  elbo = ll - jnp.sum(kl_pres + kl_where + kl_what, axis=1)
  return ELBOTerms(ll, kl_pres, kl_where, kl_what, elbo)


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


def step_costs(terms: ELBOTerms, z_pres_kl: str = 'analytic') -> jax.Array:
  """[B, N] the costs that step t's choice z_pres_t brings about.

  Analytic: cost_t = KL_where_t + KL_what_t + KL_pres_{t+1} (see module
  doc). Sampled: cost_t = KL_pres_t + KL_where_t + KL_what_t (the sampled
  log-ratio of z_pres_t depends on the choice itself).
  """
  if z_pres_kl == 'sampled':
    return terms.kl_pres + terms.kl_where + terms.kl_what
  next_kl_pres = jnp.pad(terms.kl_pres[:, 1:], ((0, 0), (0, 1)))
  return terms.kl_where + terms.kl_what + next_kl_pres


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
  """Masked count, sum and sum of squares of the learning signal.

  Sums (not moments) so that data-parallel devices can add theirs up before
  `moments` turns them into the global batch's mean and variance.
  """

  count: jax.Array  # []
  total: jax.Array  # []
  total_sq: jax.Array  # []

  @classmethod
  def of(cls, x: jax.Array, mask: jax.Array) -> 'SignalSums':
    return cls(jnp.sum(mask), jnp.sum(mask * x), jnp.sum(mask * x * x))

  def moments(self) -> tuple[jax.Array, jax.Array]:
    """(mean, variance); (0, 0) when nothing was counted."""
    count = jnp.maximum(self.count, 1.0)
    mean = self.total / count
    return mean, jnp.maximum(self.total_sq / count - mean * mean, 0.0)


def air_loss(
  output: air.AIROutput,
  images: jax.Array,
  z_pres_prior_prob: jax.Array | float,
  z_where_prior: distributions.NormalParams,
  *,
  likelihood: str = 'normal',
  likelihood_std: float = 0.3,
  z_pres_estimator: str = 'reinforce',
  signal: str = 'downstream',
  nvil: NVILState | None = None,
  nvil_scale: bool = False,
  z_pres_kl: str = 'analytic',
  baseline_moments: NVILState | None = None,
) -> tuple[jax.Array, LossAux]:
  """The scalar to minimise: -mean(ELBO + surrogate) + baseline loss.

  Args:
    output: AIROutput (with `baseline` when a baseline is used).
    images: [B, H, W].
    z_pres_prior_prob: scalar p.
    z_where_prior: NormalParams with [3] fields.
    likelihood: see `log_likelihood`.
    likelihood_std: see `log_likelihood`.
    z_pres_estimator: 'reinforce' adds the score-function surrogate;
      'concrete' relies on the relaxed, reparameterised z_pres.
    signal: 'downstream' (Rao-Blackwellised per step) or 'elbo' (the whole
      ELBO for every step, for ablations).
    nvil: if given, the signal is centred by its running mean before the
      baseline is subtracted (the baseline then learns the residual), as in
      NVIL.
    nvil_scale: also divide the advantage by max(1, running std), as NVIL
      does. Beware: this reweights the score-function term against the
      pathwise gradients of the analytic KLs and the likelihood, so the
      total gradient is no longer that of the ELBO.
    z_pres_kl: see `elbo_terms`.
    baseline_moments: if given (running mean m and variance v of the
      signal, from earlier batches), the baseline network's output is in
      standard units: the baseline is m + sqrt(v) * output and it is fitted
      to (target - m) / sqrt(v). A network whose output starts near 0 then
      tracks a signal of hundreds of nats from the first steps; without it,
      Adam moves the output by about the learning rate per step and the
      baseline lags far behind. The advantage is not rescaled, so the
      estimator stays unbiased.

  Returns:
    (loss, LossAux).
  """
  terms = elbo_terms(
    output,
    images,
    z_pres_prior_prob,
    z_where_prior,
    likelihood,
    likelihood_std,
    z_pres_kl,
  )
  if signal == 'downstream':
    raw = downstream_signal(terms.log_likelihood, step_costs(terms, z_pres_kl))
  elif signal == 'elbo':
    raw = jnp.broadcast_to(terms.elbo[:, None], output.mask.shape)
  else:
    raise ValueError(f'signal must be one of {SIGNALS}, got {signal!r}.')
  if nvil is not None and baseline_moments is not None:
    raise ValueError('Use NVIL centring or a normalised baseline, not both.')
  raw = jax.lax.stop_gradient(raw)
  mask = output.mask

  target = raw
  scale = 1.0
  if nvil is not None:
    target = raw - nvil.mean
    if nvil_scale:
      scale = jnp.maximum(1.0, jnp.sqrt(nvil.var))
  if baseline_moments is None:
    baseline = output.baseline
    b_loss = baseline_loss(baseline, target, mask)
  else:
    shift = baseline_moments.mean
    unit = jnp.sqrt(jnp.maximum(baseline_moments.var, 1e-6))
    baseline = shift + unit * output.baseline
    b_loss = baseline_loss(output.baseline, (target - shift) / unit, mask)
  advantage = mask * (target - baseline) / scale

  objective = terms.elbo
  if z_pres_estimator == 'reinforce':
    log_q = z_pres_log_prob(output.z_pres, output.z_pres_prob, mask)
    objective = objective + reinforce_surrogate(log_q, advantage, mask)
  loss = -jnp.mean(objective) + b_loss
  return loss, LossAux(
    terms=terms,
    signal=raw,
    advantage=advantage,
    baseline_loss=b_loss,
    signal_sums=SignalSums.of(raw, mask),
  )


def update_nvil(
  state: NVILState,
  batch_mean: jax.Array,
  batch_var: jax.Array,
  decay: float = 0.9,
) -> NVILState:
  """Exponential moving averages of the signal's mean and variance."""
  return NVILState(
    mean=decay * state.mean + (1.0 - decay) * batch_mean,
    var=decay * state.var + (1.0 - decay) * batch_var,
  )


def log_importance_weight(
  output: air.AIROutput,
  images: jax.Array,
  z_pres_prior_prob: jax.Array | float,
  z_where_prior: distributions.NormalParams,
  likelihood: str = 'normal',
  likelihood_std: float = 0.3,
) -> jax.Array:
  """log p(x, z) - log q(z | x) at the sampled z (hard z_pres), per image.

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
  return ll + jnp.sum(per_step, axis=1)
