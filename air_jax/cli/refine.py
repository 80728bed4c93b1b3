"""The refinement flags that `air-evaluate` and `air-infer` share
(--refine_flips, --refine_rounds, --refine_splits, --refine_split_gain,
--refine_drops) and the `refinement.Refinement` they ask for."""

from typing import NamedTuple

from absl import flags

from air_jax import cli
from air_jax import configuration
from air_jax import refinement

__all__ = ['Flags', 'define_flags', 'refiner', 'settings']


class Flags(NamedTuple):
  """The holders of the five refinement flags."""

  flips: flags.FlagHolder
  rounds: flags.FlagHolder
  splits: flags.FlagHolder
  split_gain: flags.FlagHolder
  drops: flags.FlagHolder


def define_flags() -> Flags:
  """Defines the refinement flags (once per process: a second program's
  module imported in the same process gets the same holders)."""
  return Flags(
    flips=cli.define_once(
      flags.DEFINE_integer,
      'refine_flips',
      0,
      'Refine the posterior modes by flipping up to this many z_pres, '
      'each raising the model objective (refinement.greedy_z_pres); 0: '
      "the encoder's modes.",
    ),
    rounds=cli.define_once(
      flags.DEFINE_integer,
      'refine_rounds',
      0,
      'With --refine_flips: after the flips, this many rounds of '
      'moving every z_where up the model objective (10 Adam steps, the '
      'glimpses re-read) and flipping again (refinement.refine_modes).',
    ),
    splits=cli.define_once(
      flags.DEFINE_integer,
      'refine_splits',
      0,
      'With --refine_rounds: then try each of this many of the largest '
      'present windows as two (four directions, each candidate refined by '
      '--refine_rounds rounds) and keep the best by the model objective '
      '(refinement.split_objects): two close objects read as one.',
    ),
    split_gain=cli.define_once(
      flags.DEFINE_float,
      'refine_split_gain',
      refinement.SPLIT_GAIN,
      'With --refine_splits: how much (nats) a split must raise the model '
      'objective to be taken.',
    ),
    drops=cli.define_once(
      flags.DEFINE_integer,
      'refine_drops',
      0,
      'With --refine_rounds: then (before any split) try each of this many '
      'of the least probable present objects as absent (the others moved '
      'by --refine_rounds rounds of ascent) and keep the best where it '
      'raises the model objective (refinement.drop_objects): one object '
      'read as two.',
    ),
  )


def settings(
  config,
  refine_flips: int,
  refine_rounds: int = 0,
  refine_splits: int = 0,
  refine_split_gain: float = refinement.SPLIT_GAIN,
  refine_drops: int = 0,
) -> refinement.Refinement | None:
  """The Refinement --refine_flips, --refine_rounds, --refine_splits,
  --refine_split_gain and --refine_drops ask for of a checkpoint with
  config `config` (None for no flips); fails (one line) when one is
  negative, rounds come without flips, splits or drops without rounds, or
  rounds with a likelihood other than the Normal."""
  if refine_flips < 0:
    cli.fail(f'--refine_flips must be >= 0, got {refine_flips}.')
  if refine_rounds < 0:
    cli.fail(f'--refine_rounds must be >= 0, got {refine_rounds}.')
  if refine_splits < 0:
    cli.fail(f'--refine_splits must be >= 0, got {refine_splits}.')
  if not refine_split_gain >= 0:  # NaN too.
    cli.fail(f'--refine_split_gain must be >= 0, got {refine_split_gain}.')
  if refine_rounds and not refine_flips:
    cli.fail('--refine_rounds needs --refine_flips > 0.')
  if refine_drops < 0:
    cli.fail(f'--refine_drops must be >= 0, got {refine_drops}.')
  if refine_splits and not refine_rounds:
    cli.fail('--refine_splits needs --refine_rounds > 0.')
  if refine_drops and not refine_rounds:
    cli.fail('--refine_drops needs --refine_rounds > 0.')
  if not refine_flips:
    return None
  if refine_rounds and config.likelihood != 'normal':
    cli.fail(
      '--refine_rounds needs the Normal likelihood; this checkpoint '
      f'uses {config.likelihood!r}.'
    )
  return refinement.Refinement(
    refine_flips,
    refine_rounds,
    refine_splits,
    float(refine_split_gain),
    refine_drops,
  )


def refiner(config, *flag_values) -> refinement.Refiner | None:
  """`settings(config, *flag_values)` with the checkpoint's objective: its
  loss config read at its last training step."""
  refine = settings(config, *flag_values)
  if refine is None:
    return None
  return refinement.Refiner(
    refine, configuration.loss_config(config), int(config.num_train_steps)
  )
