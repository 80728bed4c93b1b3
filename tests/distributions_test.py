"""Priors and KLs against closed forms and scipy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from air_jax import distributions


@pytest.mark.parametrize('p', [1e-5, 0.01, 0.5, 0.9])
@pytest.mark.parametrize('n_steps', [1, 3, 5])
def test_count_prior_closed_form(p, n_steps):
  probs = np.asarray(distributions.count_prior_probs(p, n_steps), np.float64)
  expected = [p**n * (1 - p) for n in range(n_steps)] + [p**n_steps]
  np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-12)
  assert abs(probs.sum() - 1.0) < 1e-6


def test_count_prior_matches_sampled_chain():
  # Independent check: simulate the per-step Bernoulli chain.
  rng = np.random.default_rng(0)
  p, n_steps, m = 0.6, 3, 200_000
  draws = rng.random((m, n_steps)) < p
  counts = np.cumprod(draws, axis=1).sum(axis=1)
  empirical = np.bincount(counts, minlength=n_steps + 1) / m
  np.testing.assert_allclose(
    distributions.count_prior_probs(p, n_steps), empirical, atol=5e-3
  )


def test_annealing_schedules():
  kw = dict(init=0.99, final=1e-5, anneal_steps=1000)

  def exp(step):
    return float(distributions.anneal(step, kind='exponential', **kw))

  def lin(step):
    return float(distributions.anneal(step, kind='linear', **kw))

  assert exp(0) == pytest.approx(0.99, rel=1e-6)
  assert exp(500) == pytest.approx(
    np.sqrt(0.99 * 1e-5), rel=1e-4
  )  # Geometric mean.
  assert exp(1000) == pytest.approx(1e-5, rel=1e-4)
  assert exp(5000) == pytest.approx(1e-5, rel=1e-4)
  assert lin(250) == pytest.approx(0.75 * 0.99 + 0.25 * 1e-5, rel=1e-6)
  assert lin(2000) == pytest.approx(1e-5, rel=1e-4)
  const = distributions.anneal(123, kind='constant', **kw)
  assert float(const) == pytest.approx(1e-5, rel=1e-6)
  with pytest.raises(ValueError):
    distributions.anneal(0, kind='cosine', **kw)


@pytest.mark.parametrize('kind', ['exponential', 'linear', 'constant'])
def test_schedule_object_equals_anneal(kind):
  kw = dict(init=0.99, final=1e-5, anneal_steps=1000)
  schedule = distributions.Schedule(kind=kind, **kw)
  for step in (0, 1, 250, 500, 999, 1000, 5000):
    np.testing.assert_array_equal(
      schedule(step), distributions.anneal(step, kind=kind, **kw)
    )
  # Frozen and hashable: it is part of a static jit argument.
  assert hash(schedule) == hash(distributions.Schedule(kind=kind, **kw))


def test_constant_schedule_never_changes():
  schedule = distributions.Schedule.constant(0.3)
  assert schedule == distributions.Schedule(init=0.3, final=0.3)
  for step in (0, 10, 10**6):
    assert float(schedule(step)) == pytest.approx(0.3, rel=1e-7)


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(init=0.5, final=0.1, anneal_steps=10, kind='cosine'),
    dict(init=float('nan'), final=0.1, anneal_steps=10, kind='linear'),
    dict(init=0.5, final=float('inf'), anneal_steps=10, kind='linear'),
    dict(init=0.5, final=0.1, anneal_steps=-1, kind='linear'),
    dict(init=0.0, final=0.1, anneal_steps=10, kind='exponential'),
    dict(init=0.5, final=-0.1, anneal_steps=10, kind='exponential'),
  ],
)
def test_schedule_rejects_invalid_settings(kwargs):
  with pytest.raises(ValueError):
    distributions.Schedule(**kwargs)


def test_bernoulli_kl_closed_form_and_edges():
  q = np.array([0.0, 0.1, 0.5, 0.9, 1.0])
  p = np.array([0.3, 0.3, 1e-5, 0.5, 0.7])
  expected = []
  for qi, pi in zip(q, p):
    terms = 0.0
    if qi > 0:
      terms += qi * np.log(qi / pi)
    if qi < 1:
      terms += (1 - qi) * np.log((1 - qi) / (1 - pi))
    expected.append(terms)
  got = distributions.bernoulli_kl(
    jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32)
  )
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  grad = jax.grad(lambda q: jnp.sum(distributions.bernoulli_kl(q, 0.3)))(
    jnp.asarray([0.2, 0.7])
  )
  assert np.all(np.isfinite(grad))


def _np_bernoulli_kl(q, p):
  q, p = np.float64(q), np.float64(p)
  return q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p))


@pytest.mark.parametrize('p', [0.3, 0.5, 0.7])
def test_bernoulli_kl_at_q_zero_and_one(p):
  p32 = jnp.float32(p)
  at_zero = float(distributions.bernoulli_kl(jnp.float32(0.0), p32))
  at_one = float(distributions.bernoulli_kl(jnp.float32(1.0), p32))
  assert at_zero == pytest.approx(-np.log1p(-p), rel=1e-6)
  assert at_one == pytest.approx(-np.log(p), rel=1e-6)
  # Inside (0, 1) the clipping is inactive: the closed form.
  for q in (1e-3, 0.2, 0.5, 0.8, 1 - 1e-3):
    got = float(distributions.bernoulli_kl(jnp.float32(q), p32))
    assert got == pytest.approx(_np_bernoulli_kl(q, p), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize('p', [1e-5, 0.01, 0.3, 0.9])
def test_bernoulli_kl_has_finite_gradients_at_q_zero_and_one(p):
  grad = jax.grad(distributions.bernoulli_kl)
  for q in (0.0, 1.0):
    g = grad(jnp.float32(q), jnp.float32(p))
    assert np.isfinite(float(g)), (q, p, g)
  # The gradient points towards q = p from either edge.
  assert float(grad(jnp.float32(0.0), jnp.float32(p))) < 0
  assert float(grad(jnp.float32(1.0), jnp.float32(p))) > 0
  # Even where the closed form is tiny (p -> 0 at q = 0), the edges' values
  # equal it up to float32 rounding.
  at_zero = distributions.bernoulli_kl(jnp.float32(0.0), jnp.float32(p))
  at_one = distributions.bernoulli_kl(jnp.float32(1.0), jnp.float32(p))
  assert float(at_zero) == pytest.approx(-np.log1p(-p), rel=2e-7, abs=2e-7)
  assert float(at_one) == pytest.approx(-np.log(p), rel=2e-7, abs=2e-7)


def test_normal_kl_closed_form():
  rng = np.random.default_rng(1)
  mq, sq = rng.normal(size=(4, 3)), rng.uniform(0.1, 2, (4, 3))
  mp, sp = rng.normal(size=3), rng.uniform(0.1, 2, 3)
  expected = np.sum(
    np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5, axis=1
  )
  got = distributions.normal_kl(
    distributions.NormalParams(
      jnp.asarray(mq, jnp.float32), jnp.asarray(sq, jnp.float32)
    ),
    distributions.NormalParams(
      jnp.asarray(mp, jnp.float32), jnp.asarray(sp, jnp.float32)
    ),
  )
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  # And against distrax's Normal, an independent implementation.
  import distrax  # pylint: disable=g-import-not-at-top

  reference = np.sum(
    distrax.Normal(mq, sq).kl_divergence(
      distrax.Normal(
        np.broadcast_to(mp, mq.shape), np.broadcast_to(sp, sq.shape)
      )
    ),
    axis=1,
  )
  np.testing.assert_allclose(got, reference, rtol=1e-4)


def test_sample_normal_moments():
  params = distributions.NormalParams(
    jnp.full((200_000,), 1.5), jnp.full((200_000,), 0.4)
  )
  x = np.asarray(distributions.sample_normal(jax.random.key(2), params))
  assert stats.kstest(x[:5000], 'norm', args=(1.5, 0.4)).pvalue > 1e-3
  assert x.mean() == pytest.approx(1.5, abs=0.01)
