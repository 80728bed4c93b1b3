"""Run configs -> the library's objects, and the checks that come first.

A run's config is an `ml_collections.ConfigDict` whose fields are those of
`air_jax/configs/default.py` (documented there). This module turns it into
the model (`create_model`) and the loss settings (`loss_config`), and
`validate` rejects, in one line, anything that would fail later: unknown or
missing fields (naming the closest known one), wrong types, non-positive
sizes, non-finite rates and contradictory settings.
"""

import difflib
import math
from typing import Any

import ml_collections

from air_jax import air
from air_jax import distributions
from air_jax import grid
from air_jax import objectives
from air_jax.configs import default

__all__ = [
  'ConfigError',
  'MODEL_KINDS',
  'closest_key',
  'create_model',
  'differences',
  'flatten',
  'loss_config',
  'schedule',
  'upgrade',
  'validate',
]

# Sizes given as one int (square) or as (height, width).
_SIZES = ('model.image_size', 'model.window_size', 'model.grid_size')
MODEL_KINDS = ('air', 'grid')
# The fields of `config.model` that each kind of model is built from.
_GRID_FIELDS = (
  'image_size',
  'window_size',
  'grid_size',
  'grid_features',
  'grid_max_shift',
  'z_what_size',
  'encoder_hidden_size',
  'decoder_hidden_size',
  'decoder_output_bias',
  'z_where_prior_loc',
  'z_where_prior_scale',
  'z_pres_logit_bound',
  'z_where_scale_range',
  'z_pres_init_prob',
)
_POSITIVE_INTS = (
  'batch_size',
  'num_train_steps',
  'steps_per_dispatch',
  'log_every_steps',
  'eval_every_steps',
  'eval_batch_size',
  'image_every_steps',
  'num_picture_images',
  'checkpoint_every_steps',
  'max_checkpoints_to_keep',
  'max_consecutive_nonfinite',
  'model.max_steps',
  'model.lstm_size',
  'model.z_what_size',
  'model.encoder_hidden_size',
  'model.decoder_hidden_size',
  'model.baseline_lstm_size',
  'model.baseline_hidden_size',
  'model.grid_features',
)
_POSITIVE_FLOATS = ('learning_rate', 'baseline_learning_rate')
# model.z_where_scale_range as the command line spells "no bound":
# `--config.model.z_where_scale_range=None` arrives as (None,), "()" as ().
_NO_BOUND = ((), (None,))
# Fields whose period must be a multiple of steps_per_dispatch.
_PERIODS = (
  'log_every_steps',
  'eval_every_steps',
  'image_every_steps',
  'checkpoint_every_steps',
)


class ConfigError(ValueError):
  """A config that cannot be run; the message is one line saying why."""


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  items = tree.items() if hasattr(tree, 'items') else ()
  out = {}
  for key, value in items:
    name = f'{prefix}{key}'
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(_flatten(value, f'{name}.'))
    else:
      out[name] = value
  return out


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{'model.max_steps': 3, ...}: every leaf field by its dotted name."""
  return _flatten(config)


def closest_key(name: str, known) -> str | None:
  """The known field name closest to a mistyped one (or None)."""
  matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
  if not matches:  # Try the last part alone ('model.lstm_szie').
    tail = {k.rsplit('.', 1)[-1]: k for k in known}
    short = difflib.get_close_matches(name.rsplit('.', 1)[-1], list(tail), n=1)
    return tail[short[0]] if short else None
  return matches[0]


def _check_fields(fields: dict[str, Any]) -> None:
  reference = flatten(default.get_config())
  for name in fields:
    if name not in reference:
      hint = closest_key(name, reference)
      raise ConfigError(
        f'unknown config field {name!r}'
        + (f'; did you mean {hint!r}?' if hint else '.')
        + ' Fields are documented in air_jax/configs/default.py.'
      )
  missing = sorted(set(reference) - set(fields))
  if missing:
    raise ConfigError(
      f'config lacks the fields {missing}; start from '
      'air_jax/configs/default.py.'
    )
  for name, want in reference.items():
    value = fields[name]
    if name == 'model.z_where_scale_range':
      value = _scale_range(value)  # Judged by validate.
    if want is None or value is None:
      continue
    if name in _SIZES:
      sizes = value if isinstance(value, (tuple, list)) else (value,)
      if len(sizes) not in (1, 2) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes
      ):
        raise ConfigError(
          f'config field {name!r} must be a positive int or two (height, '
          f'width), got {value!r}.'
        )
      continue
    if isinstance(want, bool) != isinstance(value, bool):
      raise ConfigError(f'config field {name!r} must be a bool, got {value!r}.')
    if isinstance(want, (int, float)) and not isinstance(value, (int, float)):
      raise ConfigError(
        f'config field {name!r} must be a number, got {value!r}.'
      )
    if isinstance(want, int) and not isinstance(want, bool):
      if isinstance(value, float) and not value.is_integer():
        raise ConfigError(
          f'config field {name!r} must be an integer, got {value!r}.'
        )
    if isinstance(want, str) and not isinstance(value, str):
      raise ConfigError(
        f'config field {name!r} must be a string, got {value!r}.'
      )
    if isinstance(want, (tuple, list)):
      if not isinstance(value, (tuple, list)):
        raise ConfigError(
          f'config field {name!r} must be a sequence, got {value!r}.'
        )
      if want and len(value) != len(want):
        raise ConfigError(
          f'config field {name!r} must be a sequence of {len(want)} '
          f'values, got {value!r}.'
        )


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError (one line) if `config` cannot be trained/evaluated.

  Builds the model and loss settings too, so their own checks run here.
  """
  fields = flatten(config)
  _check_fields(fields)
  for name in _POSITIVE_INTS:
    if int(fields[name]) <= 0:
      raise ConfigError(f'{name} must be > 0, got {fields[name]!r}.')
  for name in _POSITIVE_FLOATS:
    value = float(fields[name])
    if not (math.isfinite(value) and value > 0):
      raise ConfigError(f'{name} must be finite and > 0, got {value!r}.')
  for name in (
    'grad_clip_norm',
    'z_pres_warmup_steps',
    'init_step',
    'model.unroll',
    'eval_max_examples',
    'model.grid_max_shift',
  ):
    value = float(fields[name])
    if not (math.isfinite(value) and value >= 0):
      raise ConfigError(f'{name} must be finite and >= 0, got {value!r}.')
  init_prob = float(fields['model.z_pres_init_prob'])
  bound = float(fields['model.z_pres_logit_bound'])
  if not 0 < init_prob < 1 or (
    config.model.kind == 'grid'
    and bound > 0
    and abs(math.log(init_prob / (1 - init_prob))) >= bound
  ):
    raise ConfigError(
      'model.z_pres_init_prob must be in (0, 1) with its logit inside '
      f'model.z_pres_logit_bound ({bound:g}), got {init_prob!r}.'
    )
  k = int(config.steps_per_dispatch)
  for name in _PERIODS + ('num_train_steps', 'init_step'):
    if int(fields[name]) % k:
      raise ConfigError(
        f'{name} ({fields[name]}) must be a multiple of steps_per_dispatch '
        f'({k}): logging, evaluation and checkpoints fall between dispatches.'
      )
  if int(config.init_step) > int(config.num_train_steps):
    raise ConfigError(
      f'init_step ({config.init_step}) must be <= num_train_steps '
      f'({config.num_train_steps}).'
    )
  if config.model.kind not in MODEL_KINDS:
    raise ConfigError(
      f'model.kind must be one of {MODEL_KINDS}, got {config.model.kind!r}.'
    )
  if config.model.kind == 'grid' and (
    config.model.use_baseline or config.model.difference
  ):
    raise ConfigError(
      "model.kind='grid' needs model.use_baseline=False and "
      'normalised_baseline=False (its estimator needs no baseline) and '
      'model.difference=False.'
    )
  if config.normalised_baseline and not config.model.use_baseline:
    raise ConfigError(
      'normalised_baseline=True needs model.use_baseline=True (set both to '
      'False for no baseline).'
    )
  scale_range = _scale_range(config.model.z_where_scale_range)
  if scale_range is not None:
    if not (
      isinstance(scale_range, (tuple, list))
      and len(scale_range) == 2
      and all(
        isinstance(v, (int, float)) and not isinstance(v, bool)
        for v in scale_range
      )
    ):
      raise ConfigError(
        'model.z_where_scale_range must be None or two numbers (lo, hi), '
        f'got {scale_range!r}.'
      )
    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo < float(config.model.z_where_prior_loc[0]) < hi:
      raise ConfigError(
        f'model.z_where_scale_range {tuple(scale_range)} must satisfy '
        '0 < lo < z_where_prior_loc[0] < hi.'
      )
  try:
    loss_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e


# Options of the first config format that are gone, with the only value the
# current code reproduces.
_REMOVED = {
  'nvil': False,
  'nvil_scale': False,
  'signal': 'downstream',
  'z_pres_kl': 'analytic',
  'model.z_pres_estimator': 'reinforce',
  'model.baseline_shares_projection': True,
  'model.concrete_temperature': None,
}


def upgrade(raw: dict[str, Any]) -> ml_collections.ConfigDict:
  """A stored config (config.json of a run or export) in today's format.

  Fields added since it was written get the value that reproduces the
  behaviour from before they existed (the default, except
  `model.z_where_scale_range`: None); the first format's names are mapped
  (`z_pres_prior.schedule` -> `kind`, the likelihood std and its annealing ->
  one schedule, `nvil_decay` -> `moments_decay`); removed options are
  dropped if they held the value the code still implements, else
  ConfigError names them.
  """
  raw = ml_collections.ConfigDict(raw).to_dict()
  prior = raw.get('z_pres_prior', {})
  if 'schedule' in prior:
    prior['kind'] = prior.pop('schedule')
  if isinstance(raw.get('likelihood_std'), (int, float)):
    final = raw.pop('likelihood_std')
    init = raw.pop('likelihood_std_init', 0.0)
    steps = raw.pop('likelihood_std_anneal_steps', 0)
    annealed = init > 0 and steps > 0
    raw['likelihood_std'] = {
      'init': init if annealed else final,
      'final': final,
      'anneal_steps': steps if annealed else 0,
      'kind': 'exponential' if annealed else 'constant',
    }
  if 'nvil_decay' in raw:
    raw['moments_decay'] = raw.pop('nvil_decay')
  for name, kept in _REMOVED.items():
    head, _, leaf = name.rpartition('.')
    block = raw.get(head, {}) if head else raw
    if leaf in block:
      value = block.pop(leaf)
      if kept is not None and value != kept:
        raise ConfigError(
          f'the stored config sets {name}={value!r}, an option this '
          f'version no longer has (only {kept!r}).'
        )
  if 'model' in raw:
    # Stored before the field existed: no bound (today's default has one).
    raw['model'].setdefault('z_where_scale_range', None)
  if not raw.get('model', {}).get('use_baseline', True):
    # Exports drop the baseline network; older ones kept this flag on.
    raw['normalised_baseline'] = False
  merged = default.get_config().to_dict()

  def fill(into, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(into.get(key), dict):
        fill(into[key], value)
      else:
        into[key] = value

  fill(merged, raw)
  return ml_collections.ConfigDict(merged)


def create_model(config: ml_collections.ConfigDict) -> air.AIR | grid.GridAIR:
  """The module described by `config.model`: air.AIR, or grid.GridAIR when
  `kind` is 'grid' (field names match the module's attributes)."""
  fields = dict(config.model)
  kind = fields.pop('kind')
  grid_only = (
    'grid_size',
    'grid_features',
    'grid_max_shift',
    'z_pres_init_prob',
  )
  if kind == 'grid':
    fields = {k: fields[k] for k in _GRID_FIELDS}
  else:
    fields = {k: v for k, v in fields.items() if k not in grid_only}
  for key in ('image_size', 'window_size', 'grid_size'):
    if key not in fields:
      continue
    if isinstance(fields[key], (tuple, list)):
      fields[key] = tuple(int(v) for v in fields[key])
  if 'z_where_scale_range' in fields:
    fields['z_where_scale_range'] = _scale_range(fields['z_where_scale_range'])
  for key in (
    'z_where_prior_loc',
    'z_where_prior_scale',
    'z_where_scale_range',
  ):
    if fields.get(key) is not None:
      fields[key] = tuple(float(v) for v in fields[key])
  return grid.GridAIR(**fields) if kind == 'grid' else air.AIR(**fields)


def _scale_range(value):
  """z_where_scale_range with the command line's spellings of None read as
  None (anything else unchanged, for `validate` to judge)."""
  if isinstance(value, (tuple, list)) and tuple(value) in _NO_BOUND:
    return None
  return value


def schedule(config: ml_collections.ConfigDict) -> distributions.Schedule:
  """A Schedule from its config block {init, final, anneal_steps, kind}."""
  return distributions.Schedule(
    init=float(config.init),
    final=float(config.final),
    anneal_steps=int(config.anneal_steps),
    kind=str(config.kind),
  )


def loss_config(config: ml_collections.ConfigDict) -> objectives.LossConfig:
  """The objective's settings (hashable) from a run's config."""
  if not config.model.use_baseline:
    baseline = 'none'
  else:
    baseline = 'normalised' if config.normalised_baseline else 'plain'
  return objectives.LossConfig(
    z_pres_prior=schedule(config.z_pres_prior),
    z_where_prior_loc=tuple(float(v) for v in config.model.z_where_prior_loc),
    z_where_prior_scale=tuple(
      float(v) for v in config.model.z_where_prior_scale
    ),
    likelihood=str(config.likelihood),
    likelihood_std=schedule(config.likelihood_std),
    baseline=baseline,
    moments_decay=float(config.moments_decay),
    estimator='local' if config.model.kind == 'grid' else 'downstream',
    grid=(
      air.pair(tuple(config.model.grid_size))
      if config.model.kind == 'grid'
      else None
    ),
    repulsion_strength=schedule(config.z_where_repulsion),
    repulsion_radius=float(config.z_where_repulsion_radius),
    z_pres_warmup_steps=int(config.z_pres_warmup_steps),
  )


def differences(
  old: ml_collections.ConfigDict,
  new: ml_collections.ConfigDict,
  ignore: tuple[str, ...] = ('num_train_steps',),
) -> list[str]:
  """Dotted names of the fields that differ between two configs."""
  a, b = flatten(old), flatten(new)
  names = sorted(set(a) | set(b))
  return [
    n
    for n in names
    if n not in ignore and _normalise(a.get(n), n) != _normalise(b.get(n), n)
  ]


def _normalise(value, name: str = ''):
  # Names are dotted from the config's root or from `config.model`.
  field = 'model.' + name.removeprefix('model.')
  if field in _SIZES and isinstance(value, int):
    return (value, value)  # A square size, as stored by older versions.
  if field == 'model.z_where_scale_range':
    value = _scale_range(value)  # None, (None,) and () all mean no bound.
  if isinstance(value, (list, tuple)):
    return tuple(_normalise(v) for v in value)
  return value
