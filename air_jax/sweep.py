"""Seed sweeps: K runs of one config trained as a single vmapped program."""

import contextlib
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from air_jax import checkpointing
from air_jax import configuration
from air_jax import device_data
from air_jax import input_pipeline
from air_jax import train
from air_jax import workdir as workdir_lib

__all__ = [
  'sweep_workdir',
  'train_sweep',
]


def sweep_workdir(workdir: str, seed: int) -> str:
  """The workdir of one seed of a sweep."""
  return os.path.join(workdir, f'seed_{seed}')


def train_sweep(
  config: ml_collections.ConfigDict,
  workdir: str,
  seeds: list[int],
  allow_config_change: bool = False,
  vmapped: bool | None = None,
) -> list[train.TrainState]:
  """Trains one run of `config` per seed as a single vmapped program.

  Each member has its own parameters, optimiser state, randomness and data
  order (from its seed), and its own workdir `workdir/seed_<s>` with
  config.json, checkpoints, metrics, pictures and export: exactly what
  `train_and_evaluate(config with that seed, workdir/seed_<s>)` writes, and
  the same parameters up to float rounding. One device (no pmap). Resumes
  when every member has checkpoints of the same step.

  `vmapped` (default: on accelerators, not on a CPU) runs the members as
  one vmapped program; otherwise one compiled step serves each member in
  turn. The results are the same.

  Returns:
    The final TrainState of each member.
  """
  if len(set(seeds)) != len(seeds) or not seeds:
    raise configuration.ConfigError(f'seeds must be distinct, got {seeds}.')
  configs = []
  for seed in seeds:
    member_config = ml_collections.ConfigDict(config.to_dict())
    member_config.seed = int(seed)
    configuration.validate(member_config)
    configs.append(member_config)
  with contextlib.ExitStack() as stack:
    opened = []
    for member_config in configs:
      path = sweep_workdir(workdir, member_config.seed)
      stack.enter_context(workdir_lib.lock(path))
      opened.append(train.open_run(member_config, path, allow_config_change))
    members = [m for m, _, _ in opened]
    steps = {int(s.step) for _, s, _ in opened}
    if len(steps) != 1:
      raise checkpointing.TrainingError(
        f'the members of the sweep in {workdir} stopped at different steps '
        f'{sorted(steps)}; resume them one by one.'
      )
    tx = opened[0][2]
    states = [s for _, s, _ in opened]
    fn = functools.partial(
      train.train_steps,
      model=members[0].model,
      tx=tx,
      loss_config=members[0].loss_config,
      axis_name=None,
    )

    def member_steps(st, images, idx, seed):
      return fn(st, images, idx, seed=seed)

    data = device_data.load_data(config, 1)
    k = config.steps_per_dispatch
    seed_array = jnp.asarray(seeds, jnp.int32)
    if vmapped is None:
      vmapped = jax.default_backend() != 'cpu'
    if vmapped:
      state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
      step_fn = jax.jit(
        jax.vmap(member_steps, in_axes=(0, None, 0, 0)), donate_argnums=(0,)
      )

      def run(st, images, idx):
        return step_fn(st, images, idx, seed_array)

      def view(tree, i):
        return jax.device_get(jax.tree.map(lambda x: x[i], tree))

    else:
      # One compiled step (the seed is an argument) applied to each member
      # in turn: on a CPU this costs what K runs one after another cost,
      # where vmap's batched matmuls and selects measured slower.
      state = states
      step_fn = jax.jit(member_steps, donate_argnums=(0,))

      def run(st, images, idx):
        out = [
          step_fn(s, images, i, seed) for s, i, seed in zip(st, idx, seed_array)
        ]
        return [s for s, _ in out], [m for _, m in out]

      def view(tree, i):
        return jax.device_get(tree[i])

    def indices_fn(first):
      idx = np.stack(
        [
          input_pipeline.batch_indices(
            s, first, k, config.batch_size, data.size
          )
          for s in seeds
        ]
      )
      return idx, idx[:, -1]

    state = train.loop(config, members, state, run, data, indices_fn, view)
    return [view(state, i) for i in range(len(seeds))]
