"""Run configs: validation (one-line errors), translation, differences."""

import math

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import pytest

from air_jax import air
from air_jax import configuration
from air_jax import distributions
from air_jax import objectives
from air_jax.configs import dair
from air_jax.configs import default
from air_jax.configs import many
from air_jax.configs import many_dair
from air_jax.configs import test as tiny
from tests import helpers


def _config(**overrides) -> ml_collections.ConfigDict:
  """The default config with dotted-name overrides of any type.

  Built from a plain dict, so the overrides skip ConfigDict's own type
  checks (as a config file or a JSON config can); None deletes a field.
  """
  tree = default.get_config().to_dict()
  for name, value in overrides.items():
    *parents, leaf = name.split('.')
    node = tree
    for parent in parents:
      node = node[parent]
    if value is None:
      del node[leaf]
    else:
      node[leaf] = value
  return ml_collections.ConfigDict(tree)


def _rejection(config) -> str:
  """validate's message for `config`, checked to be one line."""
  with pytest.raises(configuration.ConfigError) as err:
    configuration.validate(config)
  message = str(err.value)
  assert message and '\n' not in message, message
  return message


@pytest.mark.parametrize('module', [default, dair, many, many_dair, tiny])
def test_shipped_configs_validate(module):
  configuration.validate(module.get_config())


def test_the_plain_dict_form_of_the_default_validates():
  configuration.validate(_config())


def test_unknown_field_names_the_closest_known_one():
  config = default.get_config()
  config.model.lstm_szie = 32
  message = _rejection(config)
  assert "'model.lstm_szie'" in message
  assert "'model.lstm_size'" in message
  message = _rejection(_config(learning_rat=1e-3))
  assert "'learning_rate'" in message


def test_missing_field():
  config = default.get_config()
  del config.model.lstm_size
  assert 'model.lstm_size' in _rejection(config)
  assert 'moments_decay' in _rejection(_config(moments_decay=None))


@pytest.mark.parametrize(
  'name, value',
  [
    ('learning_rate', '1e-4'),
    ('model.lstm_size', '256'),
    ('model.lstm_size', 2.5),
    ('batch_size', 64.5),
    ('model.use_baseline', 1),
    ('normalised_baseline', 'yes'),
    ('likelihood', 0),
    ('model.z_where_prior_loc', (2.5, 0.0)),
    ('model.z_where_prior_scale', 0.2),
  ],
)
def test_wrong_types(name, value):
  assert name in _rejection(_config(**{name: value}))


@pytest.mark.parametrize(
  'name',
  [
    'batch_size',
    'model.lstm_size',
    'model.max_steps',
    'model.image_size',
    'model.z_what_size',
    'model.baseline_hidden_size',
    'eval_batch_size',
    'log_every_steps',
    'checkpoint_every_steps',
    'steps_per_dispatch',
  ],
)
@pytest.mark.parametrize('value', [0, -10])
def test_non_positive_sizes_and_periods(name, value):
  assert name in _rejection(_config(**{name: value}))


@pytest.mark.parametrize('name', ['learning_rate', 'baseline_learning_rate'])
@pytest.mark.parametrize('value', [math.nan, math.inf, 0.0, -1e-4])
def test_learning_rates_must_be_finite_and_positive(name, value):
  assert name in _rejection(_config(**{name: value}))


@pytest.mark.parametrize(
  'name', ['grad_clip_norm', 'eval_max_examples', 'z_pres_warmup_steps']
)
def test_negative_or_non_finite_limits(name):
  assert name in _rejection(_config(**{name: -1}))
  assert name in _rejection(_config(**{name: math.nan}))


@pytest.mark.parametrize(
  'name',
  [
    'log_every_steps',
    'eval_every_steps',
    'image_every_steps',
    'checkpoint_every_steps',
    'num_train_steps',
  ],
)
def test_periods_must_be_multiples_of_steps_per_dispatch(name):
  # The default dispatches 10 steps at a time.
  message = _rejection(_config(**{name: 105}))
  assert name in message and 'steps_per_dispatch' in message
  configuration.validate(_config(**{name: 110}))


def test_normalised_baseline_needs_the_baseline_network():
  message = _rejection(_config(**{'model.use_baseline': False}))
  assert 'normalised_baseline' in message and 'use_baseline' in message
  configuration.validate(
    _config(**{'model.use_baseline': False, 'normalised_baseline': False})
  )


@pytest.mark.parametrize(
  'name, value',
  [
    ('z_pres_prior.kind', 'cosine'),
    ('z_pres_prior.final', 0.0),  # Exponential or not: p must be in (0, 1).
    ('z_pres_prior.init', 1.5),
    ('z_pres_prior.anneal_steps', -1),
    ('likelihood_std.kind', 'step'),
    ('likelihood_std.final', 0.0),  # Exponential needs values > 0.
    ('likelihood_std.init', math.nan),
    ('likelihood', 'laplace'),
  ],
)
def test_invalid_schedules_and_likelihoods(name, value):
  _rejection(_config(**{name: value}))


def test_non_positive_linear_likelihood_std():
  _rejection(
    _config(
      **{
        'likelihood_std.kind': 'linear',
        'likelihood_std.final': -0.3,
      }
    )
  )


@pytest.mark.parametrize(
  'scale_range',
  [(3.0, 4.0), (1.0, 2.0), (0.0, 3.0), (-1.0, 3.0), (3.0, 1.0), (2.5, 3.0)],
)
def test_bad_z_where_scale_range(scale_range):
  message = _rejection(_config(**{'model.z_where_scale_range': scale_range}))
  assert 'z_where_scale_range' in message


@pytest.mark.parametrize(
  'scale_range', [(1.0,), (1.0, 2.0, 3.0), ('one', 'four')]
)
def test_z_where_scale_range_of_the_wrong_length_or_type(scale_range):
  message = _rejection(_config(**{'model.z_where_scale_range': scale_range}))
  assert 'z_where_scale_range' in message


def test_a_good_z_where_scale_range_validates_and_reaches_the_model():
  config = _config(**{'model.z_where_scale_range': [1.0, 4.0]})
  configuration.validate(config)
  assert configuration.create_model(config).z_where_scale_range == (1.0, 4.0)


@pytest.mark.parametrize('spelling', ['None', '()'])
def test_no_scale_bound_as_the_command_line_spells_it(spelling):
  # config_flags hands `--config.model.z_where_scale_range=None` over as
  # (None,) and "()" as (); both mean no bound.
  argv = ['train', f'--config.model.z_where_scale_range={spelling}']
  flag_values = flags.FlagValues()
  holder = config_flags.DEFINE_config_dict(
    'config', default.get_config(), flag_values=flag_values, sys_argv=argv
  )
  flag_values(argv)
  configuration.validate(holder.value)
  assert configuration.create_model(holder.value).z_where_scale_range is None


def test_a_stored_config_without_the_scale_bound_loads_without_it():
  stored = default.get_config().to_dict()
  del stored['model']['z_where_scale_range']
  upgraded = configuration.upgrade(stored)
  assert upgraded.model.z_where_scale_range is None
  assert default.get_config().model.z_where_scale_range == (1.8, 5.0)
  kept = configuration.upgrade(default.get_config().to_dict())
  assert tuple(kept.model.z_where_scale_range) == (1.8, 5.0)


@pytest.mark.parametrize('value', [0.0, 1.0, -0.1, math.nan, 1e-4, 0.999])
def test_grid_z_pres_init_prob_in_range_and_inside_the_logit_bound(value):
  # The grid config bounds the logit to +-6: q in (0.0025, 0.9975).
  config = many.get_config()
  config.model.z_pres_init_prob = value
  assert 'z_pres_init_prob' in _rejection(config)


def test_grid_z_pres_init_prob_sets_the_first_q_of_every_cell():
  config = many.get_config()
  config.model.z_pres_init_prob = 0.2
  configuration.validate(config)
  model = configuration.create_model(config)
  params = air.init_params(model, 0)
  images = jax.random.uniform(jax.random.key(0), (2, 48, 48))
  out = helpers.apply_jitted(model, params, images, key=jax.random.key(1))
  np.testing.assert_allclose(out.z_pres_prob, 0.2, atol=0.01)


def test_create_model_of_the_default_is_the_default_model():
  model = configuration.create_model(default.get_config())
  # The recipe bounds the window scale; the module's own default does not.
  assert model == air.AIR(z_where_scale_range=(1.8, 5.0))
  assert air.AIR().z_where_scale_range is None
  assert configuration.create_model(dair.get_config()) == air.AIR(
    difference=True, z_where_scale_range=(1.8, 5.0)
  )
  small = configuration.create_model(tiny.get_config())
  assert (small.lstm_size, small.z_what_size, small.baseline_lstm_size) == (
    32,
    8,
    16,
  )
  crowded = configuration.create_model(many_dair.get_config())
  assert crowded == air.AIR(
    image_size=(48, 48),
    window_size=(14, 14),
    max_steps=10,
    difference=True,
    z_where_prior_loc=(4.0, 0.0, 0.0),
    z_where_prior_scale=(0.3, 1.0, 1.0),
    z_where_scale_range=(3.0, 6.0),
  )
  # Sequences become tuples of floats (hashable: the model is static).
  assert small.z_where_prior_loc == (2.5, 0.0, 0.0)
  hash(small)


def test_loss_config_of_the_default_is_the_default_loss():
  assert configuration.loss_config(default.get_config()) == (
    objectives.LossConfig()
  )
  config = default.get_config()
  config.z_pres_prior.update(
    {'init': 0.5, 'final': 1e-3, 'anneal_steps': 100, 'kind': 'linear'}
  )
  config.likelihood = 'bernoulli'
  config.moments_decay = 0.5
  config.z_pres_warmup_steps = 300
  loss = configuration.loss_config(config)
  assert loss.z_pres_warmup_steps == 300
  assert loss.z_pres_prior == distributions.Schedule(0.5, 1e-3, 100, 'linear')
  assert loss.likelihood == 'bernoulli'
  assert loss.moments_decay == 0.5


@pytest.mark.parametrize(
  'use_baseline, normalised, expected',
  [(True, True, 'normalised'), (True, False, 'plain'), (False, False, 'none')],
)
def test_loss_config_baseline(use_baseline, normalised, expected):
  config = default.get_config()
  config.model.use_baseline = use_baseline
  config.normalised_baseline = normalised
  configuration.validate(config)
  assert configuration.loss_config(config).baseline == expected


def test_differences():
  base = default.get_config()
  assert configuration.differences(base, default.get_config()) == []
  assert configuration.differences(base, dair.get_config()) == [
    'model.difference'
  ]
  other = default.get_config()
  other.num_train_steps = 10  # Ignored: a resumed run may train longer.
  other.learning_rate = 3e-4
  other.likelihood_std.final = 0.5
  assert configuration.differences(base, other) == [
    'learning_rate',
    'likelihood_std.final',
  ]
  assert configuration.differences(base, other, ignore=()) == [
    'learning_rate',
    'likelihood_std.final',
    'num_train_steps',
  ]
  # A list and a tuple of the same values (JSON round trip) are equal.
  listed = _config(**{'model.z_where_prior_loc': [2.5, 0.0, 0.0]})
  assert configuration.differences(base, listed) == []
  # A field only one side has differs.
  assert configuration.differences(base, _config(moments_decay=None)) == [
    'moments_decay'
  ]
  # Every spelling of "no bound" is the same config, as the whole config
  # and as its model block (init_from compares those).
  unbounded = _config(**{'model.z_where_scale_range': ()})
  for spelling in ((None,), (), [None], []):
    spelled = ml_collections.ConfigDict(unbounded.to_dict())
    spelled.model.z_where_scale_range = spelling
    assert configuration.differences(unbounded, spelled) == []
    assert configuration.differences(unbounded.model, spelled.model) == []
  assert configuration.differences(base.model, unbounded.model) == [
    'z_where_scale_range'
  ]
  # A square size stored as one int equals its pair, from either root.
  tree = unbounded.to_dict()
  tree['model']['window_size'] = 28
  square = ml_collections.ConfigDict(tree)
  assert configuration.differences(unbounded, square) == []
  assert configuration.differences(unbounded.model, square.model) == []


def test_flatten_and_closest_key():
  flat = configuration.flatten(default.get_config())
  assert flat['model.max_steps'] == 3
  assert flat['likelihood_std.anneal_steps'] == 5_000
  assert flat['batch_size'] == 64
  assert not any(
    isinstance(v, ml_collections.ConfigDict) for v in flat.values()
  )
  assert configuration.closest_key('model.lstm_szie', flat) == 'model.lstm_size'
  assert configuration.closest_key('lstm_szie', flat) == 'model.lstm_size'
  assert configuration.closest_key('qqqqqqqqqqqq', flat) is None
