"""The ELBO and the REINFORCE estimator against exact enumeration."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from air_jax import air
from air_jax import distributions
from air_jax import objectives

N_STEPS = 3
# Toy chain: terminal reward R[n] for n objects, and a reward c_t for each
# present step t (a "cost" in AIR terms, with the opposite sign).
TERMINAL = np.array([1.0, -2.0, 3.0, 0.5], np.float32)
STEP_REWARD = np.array([0.7, -1.3, 2.1], np.float32)
THETA = np.array([0.3, -0.2, 0.5], np.float32)  # Logits of q_t.


def exact_expected_reward(theta):
  """sum_n P(n) f(n), enumerating the N + 1 paths."""
  q = jax.nn.sigmoid(theta)
  total = 0.0
  for n in range(N_STEPS + 1):
    prob = jnp.prod(q[:n]) * (1.0 - q[n] if n < N_STEPS else 1.0)
    total = total + prob * (TERMINAL[n] + STEP_REWARD[:n].sum())
  return total


def sample_chain(key, theta, m):
  """[m, N] z_pres, mask and probabilities of the toy chain."""
  q = jax.nn.sigmoid(theta)
  draws = jax.random.bernoulli(key, q, (m, N_STEPS)).astype(jnp.float32)
  z = jnp.cumprod(draws, axis=1)
  mask = jnp.concatenate([jnp.ones((m, 1)), z[:, :-1]], axis=1)
  return z, mask


def per_sample_gradients(theta, z, mask, signal, baseline):
  """[m, N] gradient of each sample's surrogate w.r.t. theta."""

  def surrogate(theta, z, mask, signal, baseline):
    q = jnp.broadcast_to(jax.nn.sigmoid(theta), z.shape)
    log_q = objectives.z_pres_log_prob(z, q, mask)
    return objectives.reinforce_surrogate(log_q, signal - baseline, mask)[0]

  return jax.vmap(jax.grad(surrogate), (None, 0, 0, 0, 0))(
    theta, z[:, None], mask[:, None], signal[:, None], baseline[:, None]
  )


def signals(z):
  n = jnp.sum(z, axis=1).astype(jnp.int32)
  terminal = jnp.asarray(TERMINAL)[n]
  whole = terminal + jnp.sum(z * STEP_REWARD, axis=1)
  # downstream_signal(l, c) = l - sum_{t' >= t} c_t': rewards are -costs.
  downstream = objectives.downstream_signal(terminal, -z * STEP_REWARD)
  return jnp.broadcast_to(whole[:, None], z.shape), downstream


def exact_downstream_baseline(theta):
  """E[downstream signal_t | mask_t = 1] by enumeration: the ideal baseline."""
  q = np.asarray(jax.nn.sigmoid(theta), np.float64)
  out = np.zeros(N_STEPS)
  for t in range(N_STEPS):
    # Given steps < t present, the path continues from t.
    for n in range(t, N_STEPS + 1):
      prob = np.prod(q[t:n]) * ((1 - q[n]) if n < N_STEPS else 1.0)
      out[t] += prob * (TERMINAL[n] + STEP_REWARD[t:n].sum())
  return out.astype(np.float32)


M = 400_000


@pytest.fixture(scope='module')
def samples():
  theta = jnp.asarray(THETA)
  z, mask = sample_chain(jax.random.key(0), theta, M)
  whole, downstream = signals(z)
  exact = np.asarray(jax.grad(exact_expected_reward)(theta))
  return theta, z, mask, whole, downstream, exact


def _check_unbiased(grads, exact):
  mean = np.asarray(grads.mean(0))
  stderr = np.asarray(grads.std(0)) / np.sqrt(len(grads))
  # 5 standard errors per component: a false alarm has probability < 1e-5.
  assert np.all(np.abs(mean - exact) < 5 * stderr + 1e-4), (mean, exact, stderr)
  return float(np.sum(np.asarray(grads.var(0))))


def test_surrogate_value_is_zero(samples):
  theta, z, mask, whole, _, _ = samples
  q = jnp.broadcast_to(jax.nn.sigmoid(theta), z.shape)
  log_q = objectives.z_pres_log_prob(z, q, mask)
  np.testing.assert_allclose(
    objectives.reinforce_surrogate(log_q, whole, mask), 0.0
  )


def test_whole_signal_is_unbiased(samples):
  theta, z, mask, whole, _, exact = samples
  _check_unbiased(
    per_sample_gradients(theta, z, mask, whole, jnp.zeros_like(whole)), exact
  )


def test_downstream_signal_is_unbiased(samples):
  # Dropping the rewards upstream of a choice keeps the estimator unbiased.
  # (Whether it lowers the variance depends on how the dropped rewards
  # covary with the rest; in this toy it does not, so nothing is claimed.)
  theta, z, mask, _, downstream, exact = samples
  zeros = jnp.zeros_like(downstream)
  _check_unbiased(
    per_sample_gradients(theta, z, mask, downstream, zeros), exact
  )


def test_baselines_are_unbiased_and_a_good_one_reduces_variance(samples):
  theta, z, mask, _, downstream, exact = samples
  zeros = jnp.zeros_like(downstream)
  var_none = _check_unbiased(
    per_sample_gradients(theta, z, mask, downstream, zeros), exact
  )
  # Any baseline that does not depend on the current choice is unbiased ...
  arbitrary = jnp.broadcast_to(jnp.asarray([5.0, -3.0, 10.0]), z.shape)
  _check_unbiased(
    per_sample_gradients(theta, z, mask, downstream, arbitrary), exact
  )
  # ... and the expected signal as baseline cuts the variance.
  ideal = jnp.broadcast_to(
    jnp.asarray(exact_downstream_baseline(theta)), z.shape
  )
  var_ideal = _check_unbiased(
    per_sample_gradients(theta, z, mask, downstream, ideal), exact
  )
  assert var_ideal < 0.8 * var_none


def test_downstream_signal_sums_costs_from_t():
  log_lik = jnp.asarray([10.0])
  costs = jnp.asarray([[1.0, 2.0, 4.0]])
  np.testing.assert_allclose(
    objectives.downstream_signal(log_lik, costs), [[3.0, 4.0, 6.0]]
  )


def test_baseline_loss_trains_towards_the_signal():
  baseline = jnp.asarray([[1.0, 2.0], [0.0, 0.0]])
  target = jnp.asarray([[3.0, 2.0], [5.0, 7.0]])
  mask = jnp.asarray([[1.0, 1.0], [1.0, 0.0]])
  assert float(
    objectives.baseline_loss(baseline, target, mask)
  ) == pytest.approx((4 + 0 + 25) / 2)
  grad = jax.grad(objectives.baseline_loss)(baseline, target, mask)
  np.testing.assert_allclose(grad, [[-2.0, 0.0], [-5.0, 0.0]])


# --- ELBO on a tiny model that can be enumerated -----------------------------

H = 4
OBJECTS = np.random.default_rng(7).random((N_STEPS, H, H)).astype(np.float32)
IMAGE = np.clip(OBJECTS[0] + 0.3 * OBJECTS[1], 0, 1).astype(np.float32)
Q_PRES = np.array([0.8, 0.4, 0.3], np.float32)
PRIOR_P = 0.2
WHERE_Q = (
  np.array([[2.0, 0.1, -0.1]] * N_STEPS, np.float32),
  np.full((N_STEPS, 3), 0.3, np.float32),
)
WHERE_P = distributions.NormalParams(
  jnp.asarray([2.5, 0.0, 0.0]), jnp.asarray([0.2, 1.0, 1.0])
)
WHAT_Q = (
  np.full((N_STEPS, 2), 0.5, np.float32),
  np.full((N_STEPS, 2), 0.7, np.float32),
)
STD = 0.3


def _np_normal_kl(mq, sq, mp, sp):
  return np.sum(
    np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5, -1
  )


def exact_elbo():
  """E_q[log p(x | z)] - KL(q || p), enumerating z_pres paths in numpy.

  The canvas depends only on z_pres (each present step adds a fixed object),
  so the continuous latents integrate out into closed-form KLs.
  """
  kl_b = [
    q * np.log(q / PRIOR_P) + (1 - q) * np.log((1 - q) / (1 - PRIOR_P))
    for q in Q_PRES
  ]
  kl_where = _np_normal_kl(
    *WHERE_Q, np.asarray(WHERE_P.loc), np.asarray(WHERE_P.scale)
  )
  kl_what = _np_normal_kl(*WHAT_Q, 0.0, 1.0)
  total = 0.0
  for n in range(N_STEPS + 1):
    prob = np.prod(Q_PRES[:n]) * ((1 - Q_PRES[n]) if n < N_STEPS else 1.0)
    canvas = OBJECTS[:n].sum(0)
    ll = np.sum(stats_norm_logpdf(IMAGE, canvas, STD))
    kl = sum(kl_b[: min(n + 1, N_STEPS)]) + sum(kl_where[:n]) + sum(kl_what[:n])
    total += prob * (ll - kl)
  return total


def stats_norm_logpdf(x, mean, std):
  from scipy import stats  # pylint: disable=g-import-not-at-top

  return stats.norm.logpdf(x, mean, std)


def sample_outputs(key, m):
  k1, k2, k3 = jax.random.split(key, 3)
  draws = jax.random.bernoulli(k1, jnp.asarray(Q_PRES), (m, N_STEPS)).astype(
    jnp.float32
  )
  z_pres = jnp.cumprod(draws, axis=1)
  mask = jnp.concatenate([jnp.ones((m, 1)), z_pres[:, :-1]], axis=1)
  where_loc = jnp.broadcast_to(jnp.asarray(WHERE_Q[0]), (m, N_STEPS, 3))
  where_scale = jnp.broadcast_to(jnp.asarray(WHERE_Q[1]), (m, N_STEPS, 3))
  what_loc = jnp.broadcast_to(jnp.asarray(WHAT_Q[0]), (m, N_STEPS, 2))
  what_scale = jnp.broadcast_to(jnp.asarray(WHAT_Q[1]), (m, N_STEPS, 2))
  canvas = jnp.einsum('bn,nij->bij', z_pres, jnp.asarray(OBJECTS))
  return air.AIROutput(
    z_pres=z_pres,
    z_pres_prob=jnp.broadcast_to(jnp.asarray(Q_PRES), (m, N_STEPS)),
    mask=mask,
    z_where=where_loc + where_scale * jax.random.normal(k2, where_loc.shape),
    z_where_loc=where_loc,
    z_where_scale=where_scale,
    z_what=what_loc + what_scale * jax.random.normal(k3, what_loc.shape),
    z_what_loc=what_loc,
    z_what_scale=what_scale,
    windows=jnp.zeros((m, N_STEPS, 1, 1)),
    canvas=canvas,
    baseline=jnp.zeros((m, N_STEPS)),
  )


def test_monte_carlo_elbo_matches_enumeration():
  m = 200_000
  out = sample_outputs(jax.random.key(3), m)
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (m, H, H))
  exact = exact_elbo()
  terms = objectives.elbo_terms(out, images, PRIOR_P, WHERE_P, 'normal', STD)
  elbo = np.asarray(terms.elbo, np.float64)
  assert abs(elbo.mean() - exact) < 5 * elbo.std() / np.sqrt(m) + 1e-3
  # Fully sampled log weights (used for IWAE) have the same mean.
  log_w = np.asarray(
    objectives.log_importance_weight(
      out, images, PRIOR_P, WHERE_P, 'normal', STD
    ),
    np.float64,
  )
  assert abs(log_w.mean() - exact) < 5 * log_w.std() / np.sqrt(m) + 1e-3


def test_masked_steps_contribute_nothing():
  out = sample_outputs(jax.random.key(4), 64)
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (64, H, H))
  terms = objectives.elbo_terms(out, images, PRIOR_P, WHERE_P)
  assert np.all(np.asarray(terms.kl_pres)[np.asarray(out.mask) == 0] == 0)
  absent = np.asarray(out.z_pres) == 0
  assert np.all(np.asarray(terms.kl_where)[absent] == 0)
  assert np.all(np.asarray(terms.kl_what)[absent] == 0)


def test_log_likelihoods_match_scipy():
  rng = np.random.default_rng(9)
  canvas = rng.random((2, 5, 5)).astype(np.float32)
  images = rng.random((2, 5, 5)).astype(np.float32)
  from scipy import stats  # pylint: disable=g-import-not-at-top

  np.testing.assert_allclose(
    objectives.log_likelihood(canvas, images, 'normal', 0.3),
    stats.norm.logpdf(images, canvas, 0.3).sum((1, 2)),
    rtol=1e-5,
  )
  binary = (images > 0.5).astype(np.float32)
  np.testing.assert_allclose(
    objectives.log_likelihood(canvas, binary, 'bernoulli'),
    stats.bernoulli.logpmf(binary, canvas).sum((1, 2)),
    rtol=1e-4,
  )


def test_enumeration_helper_sanity():
  # The toy chain's path probabilities sum to one.
  q = jax.nn.sigmoid(jnp.asarray(THETA))
  total = sum(
    float(jnp.prod(q[:n]) * (1 - q[n] if n < N_STEPS else 1.0))
    for n in range(N_STEPS + 1)
  )
  assert total == pytest.approx(1.0, abs=1e-6)
  assert len(list(itertools.product([0, 1], repeat=N_STEPS))) == 2**N_STEPS


def _loss_config(**kwargs):
  """The objective of the enumerable toy model (constant schedules)."""
  return objectives.LossConfig(
    z_pres_prior=distributions.Schedule.constant(PRIOR_P),
    z_where_prior_loc=tuple(float(v) for v in WHERE_P.loc),
    z_where_prior_scale=tuple(float(v) for v in WHERE_P.scale),
    likelihood='normal',
    likelihood_std=distributions.Schedule.constant(STD),
    **kwargs,
  )


def test_normalised_baseline_is_in_units_of_the_running_moments():
  m = 256
  out = sample_outputs(jax.random.key(5), m)
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (m, H, H))
  unit_output = jax.random.normal(jax.random.key(6), (m, N_STEPS))
  out = out._replace(baseline=unit_output)
  moments = objectives.SignalMoments(
    mean=jnp.asarray(-40.0), var=jnp.asarray(9.0)
  )
  _, plain = objectives.air_loss(out, images, _loss_config(baseline='plain'), 0)
  _, scaled = objectives.air_loss(
    out, images, _loss_config(baseline='normalised'), 0, moments
  )
  mask = np.asarray(out.mask)
  signal = np.asarray(plain.signal)
  # The baseline is mean + std * output; the advantage is not rescaled.
  np.testing.assert_allclose(
    scaled.advantage,
    mask * (signal - (-40.0 + 3.0 * np.asarray(unit_output))),
    rtol=1e-5,
    atol=1e-3,
  )
  # The network is fitted to the standardised signal.
  expected = np.mean(
    np.sum(mask * ((signal + 40.0) / 3.0 - np.asarray(unit_output)) ** 2, 1)
  )
  assert float(scaled.baseline_loss) == pytest.approx(expected, rel=1e-5)
  with pytest.raises(ValueError, match='moments'):
    objectives.air_loss(out, images, _loss_config(baseline='normalised'), 0)


def test_plain_baseline_is_subtracted_in_nats():
  m = 64
  out = sample_outputs(jax.random.key(12), m)
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (m, H, H))
  out = out._replace(
    baseline=jax.random.normal(jax.random.key(13), (m, N_STEPS)) * 30.0
  )
  _, aux = objectives.air_loss(out, images, _loss_config(baseline='plain'), 0)
  mask, signal = np.asarray(out.mask), np.asarray(aux.signal)
  baseline = np.asarray(out.baseline)
  np.testing.assert_allclose(
    aux.advantage, mask * (signal - baseline), rtol=1e-6, atol=1e-4
  )
  expected = np.mean(np.sum(mask * (signal - baseline) ** 2, 1))
  assert float(aux.baseline_loss) == pytest.approx(expected, rel=1e-5)


def test_no_baseline_uses_the_raw_signal():
  m = 64
  out = sample_outputs(jax.random.key(7), m)
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (m, H, H))
  config = _loss_config(baseline='none')
  results = []
  # Whatever the model's baseline output holds, it is ignored.
  for baseline in (
    jnp.zeros((m, N_STEPS)),
    1e3 * jax.random.normal(jax.random.key(8), (m, N_STEPS)),
    jnp.full((m, N_STEPS), jnp.nan),
  ):
    loss, aux = objectives.air_loss(
      out._replace(baseline=baseline), images, config, 0
    )
    mask = np.asarray(out.mask)
    np.testing.assert_array_equal(aux.advantage, mask * np.asarray(aux.signal))
    assert float(aux.baseline_loss) == 0.0
    results.append((float(loss), np.asarray(aux.signal)))
  for loss, signal in results[1:]:
    assert loss == results[0][0]
    np.testing.assert_array_equal(signal, results[0][1])
  # The signal is the downstream one of the ELBO terms.
  terms = objectives.elbo_terms(out, images, PRIOR_P, WHERE_P, 'normal', STD)
  np.testing.assert_allclose(
    results[0][1],
    objectives.downstream_signal(
      terms.log_likelihood, objectives.step_costs(terms)
    ),
    rtol=1e-6,
  )


def test_air_loss_reads_the_schedules_at_the_step():
  m = 32
  out = sample_outputs(jax.random.key(9), m)
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (m, H, H))
  config = objectives.LossConfig(
    z_pres_prior=distributions.Schedule(0.5, 0.01, 100, 'exponential'),
    z_where_prior_loc=(2.5, 0.0, 0.0),
    z_where_prior_scale=(0.2, 1.0, 1.0),
    likelihood_std=distributions.Schedule(1.0, 0.3, 100, 'linear'),
    baseline='none',
  )
  for step, prior_p, std in ((0, 0.5, 1.0), (50, np.sqrt(0.005), 0.65)):
    _, aux = objectives.air_loss(out, images, config, step)
    terms = objectives.elbo_terms(out, images, prior_p, WHERE_P, 'normal', std)
    for name in ('log_likelihood', 'kl_pres', 'elbo'):
      np.testing.assert_allclose(
        getattr(aux.terms, name), getattr(terms, name), rtol=1e-5, atol=1e-5
      )


def test_update_signal_moments_is_an_exponential_average():
  moments = objectives.SignalMoments.create()
  assert float(moments.mean) == 0.0 and float(moments.var) == 1.0
  moments = objectives.update_signal_moments(
    moments, jnp.asarray(10.0), jnp.asarray(5.0), decay=0.9
  )
  assert float(moments.mean) == pytest.approx(1.0, rel=1e-6)
  assert float(moments.var) == pytest.approx(0.9 + 0.5, rel=1e-6)
  moments = objectives.update_signal_moments(
    moments, jnp.asarray(-10.0), jnp.asarray(1.0), decay=0.5
  )
  assert float(moments.mean) == pytest.approx(-4.5, rel=1e-6)
  assert float(moments.var) == pytest.approx(1.2, rel=1e-6)


def test_loss_config_defaults_are_the_recipe_and_hashable():
  config = objectives.LossConfig()
  assert config.z_pres_prior == distributions.Schedule.constant(1e-5)
  assert config.z_where_prior_loc == (2.5, 0.0, 0.0)
  assert config.likelihood_std == distributions.Schedule(
    1.0, 0.3, 5_000, 'exponential'
  )
  assert config.baseline == 'normalised'
  assert hash(config) == hash(objectives.LossConfig())


@pytest.mark.parametrize(
  'kwargs',
  [
    dict(likelihood='laplace'),
    dict(baseline='nvil'),
    dict(z_pres_prior=distributions.Schedule.constant(0.0)),
    dict(z_pres_prior=distributions.Schedule.constant(1.0)),
    dict(z_pres_prior=distributions.Schedule(0.5, 1.5, 10, 'linear')),
    dict(likelihood_std=distributions.Schedule.constant(0.0)),
    dict(likelihood_std=distributions.Schedule(1.0, -0.3, 10, 'linear')),
    dict(z_where_prior_scale=(0.2, 0.0, 1.0)),
    dict(moments_decay=1.0),
    dict(repulsion_strength=distributions.Schedule(1.0, -1.0, 10, 'linear')),
    dict(repulsion_radius=0.0),
  ],
)
def test_loss_config_rejects_invalid_settings(kwargs):
  with pytest.raises(ValueError):
    objectives.LossConfig(**kwargs)


@pytest.mark.parametrize('shards', [1, 2, 4])
def test_signal_sums_add_up_across_shards_to_the_global_moments(shards):
  # Many nats with a small spread: the naive sum of squares minus the
  # squared sum loses the variance in float32.
  rng = np.random.default_rng(11)
  x = rng.normal(60_000.0, 30.0, (8, 3)).astype(np.float32)
  mask = (rng.random((8, 3)) < 0.7).astype(np.float32)
  mask[:2] = 0.0  # One shard (of four) counts nothing.
  sums = jax.vmap(
    lambda x, m: objectives.SignalSums.of(x, m).psum('shards'),
    axis_name='shards',
  )(
    jnp.asarray(x).reshape(shards, -1, 3),
    jnp.asarray(mask).reshape(shards, -1, 3),
  )
  picked = x[mask == 1].astype(np.float64)
  for i in range(shards):  # Every shard holds the global sums.
    mean, var = jax.tree.map(lambda a, i=i: a[i], sums).moments()
    assert float(mean) == pytest.approx(picked.mean(), rel=1e-6)
    assert float(var) == pytest.approx(picked.var(), rel=1e-3)


def test_signal_sums_of_nothing_are_zero_moments():
  sums = objectives.SignalSums.of(jnp.ones(4) * 7.0, jnp.zeros(4))
  assert [float(v) for v in sums.moments()] == [0.0, 0.0]


def test_repulsion_by_hand():
  # Centres (x, y) = (0, 0), (0.1, 0), (0.05, 0), (0.06, 0.08) and one far
  # away, radius 0.2: phi = 1 - d / 0.2 below 0.2 apart, else 0.
  z_where = jnp.asarray(
    [[[3.0, 0.0, 0.0], [2.0, 0.1, 0.0], [4.0, 0.05, 0.0], [3.0, 0.06, 0.08]]]
  )
  phi = np.asarray(distributions.repulsion_potential(z_where, z_where, 0.2))
  assert phi[0, 0, 1] == pytest.approx(0.5)  # 0.1 apart.
  assert phi[0, 0, 2] == pytest.approx(0.75)  # 0.05 apart.
  assert phi[0, 0, 3] == pytest.approx(0.5)  # 0.1 apart (a 6-8-10 triangle).
  assert phi[0, 1, 3] == pytest.approx(1 - np.hypot(0.04, 0.08) / 0.2)
  np.testing.assert_allclose(phi[0], phi[0].T, atol=1e-7)
  np.testing.assert_allclose(np.diag(phi[0]), 1.0, atol=1e-5)
  far = jnp.asarray([[[3.0, 0.0, 0.0], [3.0, 0.0, 0.3]]])
  assert float(distributions.repulsion_potential(far, far, 0.2)[0, 0, 1]) == 0
  # Each present pair once, at its later step: strength 4, z_pres 1, 0, 1, 1.
  z_pres = jnp.asarray([[1.0, 0.0, 1.0, 1.0]])
  costs = np.asarray(objectives.repulsion_costs(z_pres, z_where, 4.0, 0.2))
  pair_03 = 4 * 0.5
  pair_23 = 4 * (1 - np.hypot(0.01, 0.08) / 0.2)
  np.testing.assert_allclose(
    costs[0], [0.0, 0.0, 4 * 0.75, pair_03 + pair_23], rtol=1e-5
  )
  assert not np.any(objectives.repulsion_costs(z_pres, z_where, 0.0, 0.2))
  # Finite gradient where two centres coincide.
  grad = jax.grad(
    lambda w: objectives.repulsion_costs(jnp.ones((1, 2)), w, 4.0, 0.2).sum()
  )(jnp.zeros((1, 2, 3)))
  assert np.all(np.isfinite(np.asarray(grad)))


def test_repulsion_enters_the_elbo_the_log_weights_and_the_step_costs():
  out = sample_outputs(jax.random.key(8), 16)
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (16, H, H))
  out = out._replace(
    z_where=out.z_where.at[..., 1:].set(0.0), z_pres=jnp.ones_like(out.z_pres)
  )
  plain = objectives.elbo_terms(out, images, PRIOR_P, WHERE_P, 'normal', STD)
  repelled = objectives.elbo_terms(
    out, images, PRIOR_P, WHERE_P, 'normal', STD, (3.0, 0.5)
  )
  # Every centre at (0, 0): each of the N (N - 1) / 2 pairs costs 3 nats.
  pairs = N_STEPS * (N_STEPS - 1) / 2
  np.testing.assert_allclose(plain.elbo - repelled.elbo, 3.0 * pairs, rtol=1e-5)
  np.testing.assert_allclose(
    objectives.step_costs(repelled) - objectives.step_costs(plain),
    np.tile(3.0 * np.arange(N_STEPS), (16, 1)),
    rtol=1e-5,
  )

  def log_w(repulsion):
    return objectives.log_importance_weight(
      out, images, PRIOR_P, WHERE_P, 'normal', STD, repulsion
    )

  np.testing.assert_allclose(
    log_w(None) - log_w((3.0, 0.5)), 3.0 * pairs, rtol=1e-5
  )


@pytest.mark.parametrize('estimator', ['downstream', 'local'])
def test_z_pres_warmup_stops_only_the_gradient_of_q(estimator):
  m = 64
  out = sample_outputs(jax.random.key(11), m)
  images = jnp.broadcast_to(jnp.asarray(IMAGE), (m, H, H))
  kwargs = {'baseline': 'plain' if estimator == 'downstream' else 'none'}
  plain = _loss_config(estimator=estimator, **kwargs)
  warm = _loss_config(estimator=estimator, z_pres_warmup_steps=100, **kwargs)

  def grads(config, step):
    def loss(q, where_loc):
      o = out._replace(z_pres_prob=q, z_where_loc=where_loc)
      return objectives.air_loss(o, images, config, step)[0]

    value = loss(out.z_pres_prob, out.z_where_loc)
    return value, jax.grad(loss, (0, 1))(out.z_pres_prob, out.z_where_loc)

  for step in (0, 99):
    value, (d_q, d_where) = grads(warm, step)
    ref_value, (ref_q, ref_where) = grads(plain, step)
    assert value == pytest.approx(float(ref_value))
    np.testing.assert_array_equal(d_q, 0.0)
    assert np.any(np.asarray(ref_q) != 0)
    np.testing.assert_allclose(d_where, ref_where, rtol=1e-6, atol=1e-9)
  _, (d_q, _) = grads(warm, 100)
  _, (ref_q, _) = grads(plain, 100)
  np.testing.assert_allclose(d_q, ref_q, rtol=1e-6, atol=1e-9)
  with pytest.raises(ValueError, match='z_pres_warmup_steps'):
    _loss_config(z_pres_warmup_steps=-1)
