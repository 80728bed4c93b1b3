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
    return float(
      distributions.z_pres_prior_prob(step, schedule='exponential', **kw)
    )

  def lin(step):
    return float(distributions.z_pres_prior_prob(step, schedule='linear', **kw))

  assert exp(0) == pytest.approx(0.99, rel=1e-6)
  assert exp(500) == pytest.approx(
    np.sqrt(0.99 * 1e-5), rel=1e-4
  )  # Geometric mean.
  assert exp(1000) == pytest.approx(1e-5, rel=1e-4)
  assert exp(5000) == pytest.approx(1e-5, rel=1e-4)
  assert lin(250) == pytest.approx(0.75 * 0.99 + 0.25 * 1e-5, rel=1e-6)
  assert lin(2000) == pytest.approx(1e-5, rel=1e-4)
  const = distributions.z_pres_prior_prob(123, schedule='constant', **kw)
  assert float(const) == pytest.approx(1e-5, rel=1e-6)
  with pytest.raises(ValueError):
    distributions.z_pres_prior_prob(0, schedule='cosine', **kw)


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


def test_relaxed_bernoulli_mean_tends_to_probability():
  prob = jnp.full((100_000,), 0.3)
  x = distributions.sample_relaxed_bernoulli(jax.random.key(0), prob, 0.05)
  assert float(jnp.mean(x > 0.5)) == pytest.approx(0.3, abs=0.01)
  assert np.all((np.asarray(x) >= 0) & (np.asarray(x) <= 1))
  # At any temperature P(x > 1/2) = prob (the logistic noise is symmetric).
  x_warm = distributions.sample_relaxed_bernoulli(jax.random.key(1), prob, 2.0)
  assert float(jnp.mean(x_warm > 0.5)) == pytest.approx(0.3, abs=0.01)


def test_sample_normal_moments():
  params = distributions.NormalParams(
    jnp.full((200_000,), 1.5), jnp.full((200_000,), 0.4)
  )
  x = np.asarray(distributions.sample_normal(jax.random.key(2), params))
  assert stats.kstest(x[:5000], 'norm', args=(1.5, 0.4)).pvalue > 1e-3
  assert x.mean() == pytest.approx(1.5, abs=0.01)
