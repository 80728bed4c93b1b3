"""Priors, posteriors and closed-form KLs of AIR's latents.

Glossary of shapes: B batch, N steps (`max_steps`), D z_what size.

The count prior is the paper's geometric-like prior written per step: at
step t (given z_pres_{t-1} = 1) z_pres_t ~ Bernoulli(p), so the number of
objects n in {0..N} has P(n) = p^n (1 - p) for n < N and P(N) = p^N.

An optional repulsion between present objects multiplies the prior of
(z_pres, z_where) by exp(-strength * sum_{i<j} z_pres_i z_pres_j phi_ij),
phi_ij = `repulsion_potential` of the two windows' centres: a pairwise
(Strauss-like) factor that says two objects seldom sit closer than a radius,
as digits placed with limited overlap do. Unnormalised; its normaliser
depends on no learnt quantity.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
  'NormalParams',
  'SCHEDULE_KINDS',
  'Schedule',
  'anneal',
  'bernoulli_kl',
  'count_prior_probs',
  'normal_kl',
  'repulsion_potential',
  'sample_normal',
  'standard_normal_like',
]

_EPS = 1e-7
# Smallest prior probability used in a log: keeps p = 1e-30 (69 nats per
# object) representable in float32 while avoiding log(0).
_MIN_PRIOR = 1e-35


class NormalParams(NamedTuple):
  """A diagonal Normal: loc and scale of the same shape."""

  loc: jax.Array
  scale: jax.Array


SCHEDULE_KINDS = ('constant', 'exponential', 'linear')


def anneal(
  step: jax.Array | int,
  *,
  init: float,
  final: float,
  anneal_steps: int,
  kind: str = 'exponential',
) -> jax.Array:
  """A value moving from `init` (step 0) to `final` (step `anneal_steps` on).

  Args:
    step: the training step (scalar).
    init: value at step 0.
    final: value from `anneal_steps` on.
    anneal_steps: length of the annealing; 0 means `final` from the start.
    kind: 'exponential' (linear in log value), 'linear', or 'constant'
      (always `final`).

  Returns:
    Scalar float32.
  """
  step = jnp.asarray(step, jnp.float32)
  if kind == 'constant' or anneal_steps <= 0:
    return jnp.asarray(final, jnp.float32)
  frac = jnp.clip(step / anneal_steps, 0.0, 1.0)
  if kind == 'linear':
    return (1.0 - frac) * init + frac * final
  if kind == 'exponential':
    log_p = (1.0 - frac) * math.log(init) + frac * math.log(final)
    return jnp.exp(log_p)
  raise ValueError(f'Unknown schedule kind {kind!r}; one of {SCHEDULE_KINDS}.')


@dataclasses.dataclass(frozen=True)
class Schedule:
  """An annealed quantity: `anneal` with its settings bound (hashable).

  The per-step z_pres prior p and the likelihood's pixel std are both
  Schedules. `Schedule.constant(v)` never changes.

  Attributes:
    init: value at step 0.
    final: value from `anneal_steps` on.
    anneal_steps: length of the annealing (0: `final` throughout).
    kind: 'constant', 'exponential' (log-linear) or 'linear'.
  """

  init: float
  final: float
  anneal_steps: int = 0
  kind: str = 'constant'

  def __post_init__(self):
    if self.kind not in SCHEDULE_KINDS:
      raise ValueError(
        f'schedule kind {self.kind!r} is not one of {SCHEDULE_KINDS}.'
      )
    values = (self.init, self.final)
    if not all(math.isfinite(v) for v in values):
      raise ValueError(f'schedule values must be finite, got {values}.')
    if self.anneal_steps < 0:
      raise ValueError(f'anneal_steps must be >= 0, got {self.anneal_steps}.')
    if self.kind == 'exponential' and min(values) <= 0:
      raise ValueError(
        f'an exponential schedule needs init, final > 0, got {values}.'
      )

  @classmethod
  def constant(cls, value: float) -> 'Schedule':
    return cls(init=value, final=value)

  def __call__(self, step: jax.Array | int) -> jax.Array:
    """The value at `step` (scalar float32)."""
    return anneal(
      step,
      init=self.init,
      final=self.final,
      anneal_steps=self.anneal_steps,
      kind=self.kind,
    )


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
  """KL(Bernoulli(q) || Bernoulli(p)), elementwise.

  Exact at q = 0 and 1 (0 log 0 = 0) and with finite gradients there that
  point towards p: the logs see q and 1 - q floored at 1e-7, a floor that
  only ever multiplies 0 or changes nothing.
  """
  q = jnp.clip(q, 0.0, 1.0)
  p = jnp.clip(p, _MIN_PRIOR, 1.0 - _EPS)
  r = 1.0 - q
  log_q = jnp.log(jnp.maximum(q, _EPS))
  log_r = jnp.log(jnp.maximum(r, _EPS))
  return q * (log_q - jnp.log(p)) + r * (log_r - jnp.log1p(-p))


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


def repulsion_potential(
  z_where_a: jax.Array, z_where_b: jax.Array, radius: float
) -> jax.Array:
  """[..., N, M] max(0, 1 - d_nm / radius), d_nm the Euclidean distance
  between the centres (x, y) of z_where_a[..., n, :] and z_where_b[..., m, :]
  in the normalised coordinates of `spatial_transformer` (the image spans
  [-1, 1]: on a 48-pixel-wide image a radius of 0.25 is 6 pixels).

  1 for coincident centres, 0 from `radius` apart on; the diagonal of a set
  against itself is 1 (callers leave it out).

  Args:
    z_where_a: [..., N, 3] (s, x, y).
    z_where_b: [..., M, 3].
    radius: > 0.
  """
  diff = z_where_a[..., :, None, 1:] - z_where_b[..., None, :, 1:]
  # The small constant keeps the gradient of the distance finite at 0.
  dist = jnp.sqrt(jnp.sum(diff * diff, -1) + 1e-12)
  return jax.nn.relu(1.0 - dist / radius)


def standard_normal_like(x: jax.Array) -> NormalParams:
  """N(0, I) with the shape of x (the z_what prior)."""
  return NormalParams(jnp.zeros_like(x), jnp.ones_like(x))


def sample_normal(rng: jax.Array, params: NormalParams) -> jax.Array:
  """Reparameterised sample loc + scale * eps."""
  eps = jax.random.normal(rng, params.loc.shape, params.loc.dtype)
  return params.loc + params.scale * eps
