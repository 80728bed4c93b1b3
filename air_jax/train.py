"""Training AIR: the train state, one step, steps scanned on the device, the
loop with evaluation, pictures and checkpoints.

Glossary of shapes: D local devices, B global batch, b = B / D per device,
K steps per dispatch, M training examples, H, W image.

The training split lives on the device(s) as uint8; each dispatch runs K
steps in one `lax.scan`, gathering every step's batch on the device from
indices that are a function of (seed, step) alone (see `batch_indices`).
Randomness is fold_in(seed, step, example index), so a resumed run replays
an uninterrupted one exactly.
"""

import contextlib
import functools
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from air_jax import air
from air_jax import checkpointing
from air_jax import configuration
from air_jax import device_data
from air_jax import evaluation
from air_jax import input_pipeline
from air_jax import objectives
from air_jax import workdir as workdir_lib
from air_jax import writers

__all__ = [
  'TrainState',
  'compile_train_steps',
  'create_train_state',
  'example_keys',
  'loop',
  'make_optimizer',
  'open_run',
  'start_from',
  'train_and_evaluate',
  'train_step',
  'train_steps',
]

TrainingError = checkpointing.TrainingError


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly.

  Attributes:
    step: number of steps taken (skipped non-finite ones included).
    params: model parameters (the baseline network under 'baseline').
    opt_state: optimiser state.
    signal_moments: running moments of the REINFORCE learning signal.
    num_skipped: updates skipped because the loss or a gradient was not
      finite.
    consecutive_skipped: such skips in a row (reset by a good step).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  signal_moments: objectives.SignalMoments
  num_skipped: jax.Array
  consecutive_skipped: jax.Array


def _group(params) -> dict[str, str]:
  """'baseline' for the baseline network's subtree, 'model' for the rest."""
  return {k: 'baseline' if k == 'baseline' else 'model' for k in params}


def make_optimizer(
  config: ml_collections.ConfigDict, params
) -> optax.GradientTransformation:
  """Adam for the model and, with its own learning rate, for the baseline."""

  def adam(lr):
    clip = [optax.clip_by_global_norm(config.grad_clip_norm)]
    return optax.chain(*clip[: config.grad_clip_norm > 0], optax.adam(lr))

  labels = {
    k: jax.tree.map(lambda _, g=g: g, params[k])
    for k, g in _group(params).items()
  }
  return optax.multi_transform(
    {
      'model': adam(config.learning_rate),
      'baseline': adam(config.baseline_learning_rate),
    },
    labels,
  )


def create_train_state(config: ml_collections.ConfigDict, model: air.AIR):
  """A fresh TrainState (from config.seed) and the optimiser."""
  params = air.init_params(model, config.seed)
  tx = make_optimizer(config, params)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    signal_moments=objectives.SignalMoments.create(),
    num_skipped=jnp.zeros((), jnp.int32),
    consecutive_skipped=jnp.zeros((), jnp.int32),
  )
  return state, tx


# Model fields that may differ between a run and the run it starts from:
# they change speed or drop the baseline network, not the parameters' meaning.
_INIT_FREE_FIELDS = ('use_baseline', 'unroll', 'skip_finished')


def start_from(state: TrainState, tx, config: ml_collections.ConfigDict):
  """A fresh `state` with the parameters of `config.init_from` (an export
  or workdir), its optimiser state new.

  A baseline network the source lacks (exports drop it) keeps its fresh
  initialisation.

  Raises:
    checkpointing.CheckpointError: no usable parameters there.
    configuration.ConfigError: the source's model fields differ.
  """
  source, _, params = checkpointing.load_model(config.init_from)
  changed = configuration.differences(
    source.model, config.model, ignore=_INIT_FREE_FIELDS
  )
  if changed:
    raise configuration.ConfigError(
      f'init_from {config.init_from} holds another model (model fields '
      f'{changed} differ).'
    )
  params = {k: params.get(k, fresh) for k, fresh in state.params.items()}
  return state.replace(params=params, opt_state=tx.init(params))


def example_keys(seed: int, step, first_index, count: int) -> jax.Array:
  """[count] keys fold_in(fold_in(key(seed), step), global example index)."""
  step_key = jax.random.fold_in(jax.random.key(seed), step)
  indices = first_index + jnp.arange(count)
  return jax.vmap(jax.random.fold_in, (None, 0))(step_key, indices)


def train_step(
  state: TrainState,
  images: jax.Array,
  *,
  model: air.AIR,
  tx: optax.GradientTransformation,
  loss_config: objectives.LossConfig,
  seed: int,
  axis_name: str | None = 'batch',
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's share of the batch.

  Args:
    state: TrainState (replicated).
    images: [b, H, W] this device's images in [0, 1].
    model: the AIR module.
    tx: the optimiser.
    loss_config: the objective's settings.
    seed: run seed; randomness is fold_in(seed, step, example index).
    axis_name: pmap axis to average over (None when not mapped).

  Returns:
    (new state, metrics averaged over devices).
  """
  b = images.shape[0]
  device = jax.lax.axis_index(axis_name) if axis_name else 0
  keys = example_keys(seed, state.step, device * b, b)

  def loss_fn(params):
    # One key per example: samples do not depend on the device split.
    out = model.apply({'params': params}, images, keys=keys)
    loss, aux = objectives.air_loss(
      out, images, loss_config, state.step, state.signal_moments
    )
    return loss, (out, aux)

  (loss, (out, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  signal_sums = aux.signal_sums
  if axis_name:
    grads, loss = jax.lax.pmean((grads, loss), axis_name)
    signal_sums = signal_sums.psum(axis_name)
  groups = _group(grads)

  def group_norm(group):
    return optax.tree.norm(
      {k: v for k, v in grads.items() if groups[k] == group}
    )

  norms = {
    'grad_norm': group_norm('model'),
    'baseline_grad_norm': group_norm('baseline'),
  }
  # A NaN or inf anywhere in the gradients makes its group's norm non-finite.
  finite = jnp.isfinite(loss) & jnp.isfinite(
    norms['grad_norm'] + norms['baseline_grad_norm']
  )

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state

  # cond, not where: a skipped step costs nothing and a taken one no copies.
  new_params, new_opt_state = jax.lax.cond(
    finite, update, lambda _: (state.params, state.opt_state), None
  )
  moments = objectives.update_signal_moments(
    state.signal_moments, *signal_sums.moments(), loss_config.moments_decay
  )
  new_state = TrainState(
    step=state.step + 1,
    params=new_params,
    opt_state=new_opt_state,
    signal_moments=jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), moments, state.signal_moments
    ),
    num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
    consecutive_skipped=jnp.where(finite, 0, state.consecutive_skipped + 1),
  )
  terms = aux.terms
  step_metrics = {
    'loss': loss,
    'elbo': jnp.mean(terms.elbo),
    'log_likelihood': jnp.mean(terms.log_likelihood),
    'kl_pres': jnp.mean(jnp.sum(terms.kl_pres, 1)),
    'kl_where': jnp.mean(jnp.sum(terms.kl_where, 1)),
    'kl_what': jnp.mean(jnp.sum(terms.kl_what, 1)),
    'repulsion': jnp.mean(jnp.sum(terms.repulsion, 1)),
    'baseline_loss': aux.baseline_loss,
    'mean_count': jnp.mean(jnp.sum(out.z_pres, 1)),
    'z_pres_prior_prob': loss_config.z_pres_prior(state.step),
    'likelihood_std': loss_config.likelihood_std(state.step),
    'nonfinite': (~finite).astype(jnp.float32),
    **norms,
  }
  if axis_name:
    step_metrics = jax.lax.pmean(step_metrics, axis_name)
  step_metrics['num_skipped'] = new_state.num_skipped
  return new_state, step_metrics


def train_steps(
  state: TrainState,
  data: jax.Array,
  indices: jax.Array,
  *,
  axis_name: str | None = 'batch',
  **step_kwargs,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """K training steps in one scan, each gathering its batch on the device.

  Args:
    state: TrainState.
    data: [M, H, W] uint8, the training images on this device.
    indices: [K, b] int32, rows of `data` for each step's batch.
    axis_name: see `train_step`.
    **step_kwargs: model, tx, loss_config, seed of `train_step`.

  Returns:
    (state after K steps, metrics of the last step).
  """

  def body(state, idx):
    images = jnp.take(data, idx, axis=0).astype(jnp.float32) / 255.0
    return train_step(state, images, axis_name=axis_name, **step_kwargs)

  state, metrics = jax.lax.scan(body, state, indices)
  return state, jax.tree.map(lambda x: x[-1], metrics)


def compile_train_steps(
  model, tx, loss_config, seed: int, num_devices: int, state, data, indices
):
  """`train_steps` pmapped over local devices, or jitted on a single one,
  compiled ahead of time for example arguments (arrays or
  jax.ShapeDtypeStruct) in the layout of `replicate`: state, data and the
  returned metrics with a leading [D] axis on several devices, as they are
  on one; indices [D, K, b] either way.

  On one device the step is jitted, not pmapped (on CPU, pmap over a single
  device measured slower with the same math). The state is donated.
  """
  fn = functools.partial(
    train_steps, model=model, tx=tx, loss_config=loss_config, seed=seed
  )
  if device_data.pmapped(num_devices):
    mapped = jax.pmap(fn, axis_name='batch', donate_argnums=(0,))
    if jax.process_count() > 1:
      return mapped  # pmap's ahead-of-time lowering is single-process.
    return mapped.lower(state, data, indices).compile()
  single = jax.jit(functools.partial(fn, axis_name=None), donate_argnums=(0,))
  one = jax.ShapeDtypeStruct(indices.shape[1:], indices.dtype)
  compiled = single.lower(state, data, one).compile()
  return lambda state, data, indices: compiled(state, data, indices[0])


def _due(step: int, every: int, last: int) -> bool:
  return step % every == 0 or step == last


def loop(config, members, state, step_fn, data, indices_fn, member_view):
  """Dispatches K steps at a time; at logging, evaluation, picture and
  checkpoint steps each member does its part.

  Args:
    config: the (shared) config.
    members: list of workdir.RunDir.
    state: the device state of all members.
    step_fn: (state, images, indices) -> (state, metrics).
    data: device_data.TrainingData.
    indices_fn: first step -> (indices for step_fn, [members, B] the last
      step's batch of each member).
    member_view: (tree, i) -> member i's host copy of a device tree.

  Returns:
    The device state after the last step.
  """
  start, last = int(member_view(state, 0).step), config.num_train_steps
  k = config.steps_per_dispatch
  bar = writers.ProgressBar(last, start, enabled=members[0].chief)
  t_log, step_log = time.time(), start
  for first in range(start, last, k):
    indices, last_batch = indices_fn(first)
    state, metrics = step_fn(state, data.images, indices)
    step = first + k
    events = {
      name: _due(step, getattr(config, f'{name}_every_steps'), last)
      for name in ('log', 'eval', 'image', 'checkpoint')
    }
    if not any(events.values()):
      continue
    jax.block_until_ready(metrics)  # Dispatch is asynchronous.
    rate = (step - step_log) * config.batch_size * len(members)
    rate /= time.time() - t_log
    for i, member in enumerate(members):
      host = member_view(state, i)
      if events['log']:
        accuracy = float(
          evaluation.batch_count_accuracy(
            member.model,
            host.params,
            data.first_device_images,
            data.counts,
            jnp.asarray(last_batch[i]),
          )
        )
        scalars = member.log_train(
          step, host, member_view(metrics, i), rate, accuracy
        )
        if i == 0:
          bar.update(
            step,
            {'elbo': scalars['train/elbo'], 'acc': accuracy, 'img/s': rate},
          )
      if events['eval']:
        member.evaluate(step, host, data.eval_split)
      if events['image']:
        member.pictures(step, host, data.picture_images)
      if events['checkpoint']:
        member.save(step, host)
    if events['log']:
      t_log, step_log = time.time(), step
  bar.close()
  for i, member in enumerate(members):
    member.finish(member_view(state, i))
  return state


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  allow_config_change: bool = False,
) -> TrainState:
  """Trains AIR as `config` says, resuming from `workdir` if it holds a run.

  Writes checkpoints, metrics.jsonl, TensorBoard events, pictures and, at
  the end, an export under `workdir` (only process 0 writes files other
  than checkpoints). Returns the final (unreplicated) TrainState.

  Raises:
    configuration.ConfigError: an invalid config (before anything is
      written).
    TrainingError: the workdir is in use, holds another config, or training
      cannot go on (non-finite parameters, a failed save).
  """
  configuration.validate(config)
  num_devices = jax.local_device_count()
  total_devices = num_devices * jax.process_count()
  if config.batch_size % total_devices:
    raise configuration.ConfigError(
      f'batch_size {config.batch_size} is not divisible by the '
      f'{total_devices} devices.'
    )
  chief = jax.process_index() == 0
  lock = workdir_lib.lock(workdir) if chief else contextlib.nullcontext()
  with lock:
    # The data is prepared and its size known before the workdir is touched.
    shape = device_data.data_shape(config, num_devices)
    member, state, tx = open_run(config, workdir, allow_config_change)
    local_batch = config.batch_size // jax.process_count()
    k = config.steps_per_dispatch
    # Compile before the data is in memory and hand the compiler's scratch
    # memory back: the peak RSS is then that of compiling or of training,
    # not their sum.
    state = device_data.replicate(state, num_devices)
    step_fn = compile_train_steps(
      member.model,
      tx,
      member.loss_config,
      config.seed,
      num_devices,
      state,
      shape,
      jax.ShapeDtypeStruct(
        (num_devices, k, local_batch // num_devices), jnp.int32
      ),
    )
    workdir_lib.release_free_memory()
    data = device_data.load_data(config, num_devices)

    share = slice(
      jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch
    )

    def indices_fn(first):
      idx = input_pipeline.batch_indices(
        config.seed, first, k, config.batch_size, data.size
      )
      idx = idx[:, share]
      return idx.reshape(k, num_devices, -1).swapaxes(0, 1), idx[-1:]

    def view(tree, i):
      del i
      return device_data.unreplicate(tree, num_devices)

    state = loop(config, [member], state, step_fn, data, indices_fn, view)
    return device_data.unreplicate(state, num_devices)


def open_run(config, workdir, allow_config_change):
  """(workdir.RunDir, restored or fresh TrainState, optimiser) of a
  workdir; its config.json is written only after a successful restore."""
  checkpointing.check_resume_config(config, workdir, allow_config_change)
  model = configuration.create_model(config)
  state, tx = create_train_state(config, model)
  if not checkpointing.steps(
    os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
  ):  # A new run (before anything is written to its workdir).
    if config.init_from:
      state = start_from(state, tx, config)
    state = state.replace(step=jnp.asarray(config.init_step, jnp.int32))
  manager = checkpointing.checkpoint_manager(
    workdir, config.max_checkpoints_to_keep
  )
  state = checkpointing.restore_train_state(manager, state)
  if jax.process_index() == 0:
    checkpointing.save_config(config, workdir)
  member = workdir_lib.RunDir(
    config, workdir, model, configuration.loss_config(config), manager
  )
  return member, state, tx
