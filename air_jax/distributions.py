"""Priors, posteriors and closed-form KLs of AIR's latents.

Glossary of shapes: B batch, N steps (`max_steps`), D z_what size.

The count prior is the paper's geometric-like prior written per step: at
step t (given z_pres_{t-1} = 1) z_pres_t ~ Bernoulli(p), so the number of
objects n in {0..N} has P(n) = p^n (1 - p) for n < N and P(N) = p^N.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

_EPS = 1e-7
# Smallest prior probability used in a log: keeps p = 1e-30 (69 nats per
# object) representable in float32 while avoiding log(0).
_MIN_PRIOR = 1e-35


class NormalParams(NamedTuple):
  """A diagonal Normal: loc and scale of the same shape."""

  loc: jax.Array
  scale: jax.Array


def anneal(
  step: jax.Array | int,
  *,
  init: float,
  final: float,
  anneal_steps: int,
  schedule: str = 'exponential',
) -> jax.Array:
  """A value moving from `init` (step 0) to `final` (step `anneal_steps` on).

  Args:
    step: the training step (scalar).
    init: value at step 0.
    final: value from `anneal_steps` on.
    anneal_steps: length of the annealing; 0 means `final` from the start.
    schedule: 'exponential' (linear in log value), 'linear', or 'constant'
      (always `final`).

  Returns:
    Scalar float32.
  """
  step = jnp.asarray(step, jnp.float32)
  if schedule == 'constant' or anneal_steps <= 0:
    return jnp.asarray(final, jnp.float32)
  frac = jnp.clip(step / anneal_steps, 0.0, 1.0)
  if schedule == 'linear':
    return (1.0 - frac) * init + frac * final
  if schedule == 'exponential':
    log_p = (1.0 - frac) * math.log(init) + frac * math.log(final)
    return jnp.exp(log_p)
  raise ValueError(f'Unknown schedule {schedule!r}.')


def z_pres_prior_prob(step: jax.Array | int, **schedule) -> jax.Array:
  """Per-step success probability p of the count prior at a training step.

  `anneal(step, **schedule)`: the paper annealed p log-linearly from near 1
  to 1e-5; 'constant' keeps `final`.
  """
  return anneal(step, **schedule)


def count_prior_probs(z_pres_prob: jax.Array | float, max_steps: int):
  """P(n objects) for n = 0..N under the per-step Bernoulli count prior.

  Args:
    z_pres_prob: scalar per-step success probability p.
    max_steps: N.

  Returns:
    [N + 1] probabilities summing to 1.
  """
  p = jnp.asarray(z_pres_prob, jnp.float32)
  n = jnp.arange(max_steps + 1, dtype=jnp.float32)
  stop = jnp.where(n < max_steps, 1.0 - p, 1.0)
  return p**n * stop


def bernoulli_kl(q: jax.Array, p: jax.Array) -> jax.Array:
  """KL(Bernoulli(q) || Bernoulli(p)), elementwise, finite for q in [0, 1]."""
  q = jnp.clip(q, 0.0, 1.0)
  p = jnp.clip(p, _MIN_PRIOR, 1.0 - _EPS)
  # xlogy gives 0 log 0 = 0 at q in {0, 1}.
  return (
    jax.scipy.special.xlogy(q, q)
    - q * jnp.log(p)
    + jax.scipy.special.xlogy(1.0 - q, 1.0 - q)
    - (1.0 - q) * jnp.log1p(-p)
  )


def z_where_prior(
  scale_loc: float, scale_std: float, shift_std: float
) -> NormalParams:
  """Prior over z_where = (s, x, y): independent Normals. Each field [3]."""
  return NormalParams(
    loc=jnp.array([scale_loc, 0.0, 0.0], jnp.float32),
    scale=jnp.array([scale_std, shift_std, shift_std], jnp.float32),
  )


def normal_kl(q: NormalParams, p: NormalParams) -> jax.Array:
  """KL(q || p) of diagonal Normals, summed over the last axis.

  Args:
    q: posterior, fields [..., K].
    p: prior, fields broadcastable to [..., K].

  Returns:
    [...] KL in nats, in closed form:
    log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2.
    (Written in jnp rather than through distrax, whose import costs about
    45 MiB of RSS in every training process; the tests check it against
    distrax.)
  """
  ratio = q.scale / p.scale
  z = (q.loc - p.loc) / p.scale
  return jnp.sum(0.5 * (ratio * ratio + z * z) - 0.5 - jnp.log(ratio), -1)


def standard_normal_like(x: jax.Array) -> NormalParams:
  """N(0, I) with the shape of x (the z_what prior)."""
  return NormalParams(jnp.zeros_like(x), jnp.ones_like(x))


def sample_normal(rng: jax.Array, params: NormalParams) -> jax.Array:
  """Reparameterised sample loc + scale * eps."""
  eps = jax.random.normal(rng, params.loc.shape, params.loc.dtype)
  return params.loc + params.scale * eps


def sample_relaxed_bernoulli(
  rng: jax.Array, prob: jax.Array, temperature: float
) -> jax.Array:
  """Binary Concrete (Maddison et al. 2017) sample in (0, 1), reparameterised.

  Args:
    rng: PRNG key.
    prob: [...] success probabilities.
    temperature: relaxation temperature (> 0); smaller is closer to binary.

  Returns:
    [...] relaxed sample sigmoid((logit(prob) + logistic noise) / T).
  """
  u = jax.random.uniform(rng, prob.shape, prob.dtype, _EPS, 1.0 - _EPS)
  logistic = jnp.log(u) - jnp.log1p(-u)
  logit = jnp.log(prob + _EPS) - jnp.log1p(-prob + _EPS)
  return jax.nn.sigmoid((logit + logistic) / temperature)
