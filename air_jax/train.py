"""Training and evaluation of AIR: train state, one pmapped step, the loop.

Glossary of shapes: D local devices, B global batch, b = B / D per device,
H, W image, N steps.
"""

import ctypes
import functools
import json
import os
import time
from typing import Any
from typing import NamedTuple

from absl import logging
import flax
import flax.jax_utils
import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from air_jax import air
from air_jax import distributions
from air_jax import input_pipeline
from air_jax import metrics as metrics_lib
from air_jax import objectives
from air_jax import visualization
from air_jax import writers

CONFIG_FILE = 'config.json'
PARAMS_FILE = 'params.msgpack'
CHECKPOINT_DIR = 'checkpoints'


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly.

  Attributes:
    step: number of steps taken (skipped non-finite ones included).
    params: model parameters (baseline network included).
    opt_state: optimiser state.
    nvil: running moments of the learning signal.
    num_skipped: updates skipped because the loss or a gradient was not
      finite.
    consecutive_skipped: such skips in a row (reset by a good step).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  nvil: objectives.NVILState
  num_skipped: jax.Array
  consecutive_skipped: jax.Array


class LossSettings(NamedTuple):
  """The static (hashable) knobs of the objective, read from a config."""

  prior_init: float
  prior_final: float
  prior_anneal_steps: int
  prior_schedule: str
  z_where_prior_loc: tuple[float, float, float]
  z_where_prior_scale: tuple[float, float, float]
  likelihood: str
  likelihood_std: float
  z_pres_estimator: str
  signal: str
  use_nvil: bool
  nvil_scale: bool
  nvil_decay: float
  z_pres_kl: str = 'analytic'
  likelihood_std_init: float = 0.0
  likelihood_std_anneal_steps: int = 0
  normalised_baseline: bool = False

  def prior_prob(self, step) -> jax.Array:
    return distributions.z_pres_prior_prob(
      step,
      init=self.prior_init,
      final=self.prior_final,
      anneal_steps=self.prior_anneal_steps,
      schedule=self.prior_schedule,
    )

  def likelihood_std_at(self, step) -> jax.Array:
    """The pixel std at a step: annealed from likelihood_std_init if set."""
    if self.likelihood_std_init <= 0 or self.likelihood_std_anneal_steps <= 0:
      return jnp.asarray(self.likelihood_std, jnp.float32)
    return distributions.anneal(
      step,
      init=self.likelihood_std_init,
      final=self.likelihood_std,
      anneal_steps=self.likelihood_std_anneal_steps,
    )

  def z_where_prior(self) -> distributions.NormalParams:
    return distributions.NormalParams(
      jnp.asarray(self.z_where_prior_loc, jnp.float32),
      jnp.asarray(self.z_where_prior_scale, jnp.float32),
    )


def create_model(config: ml_collections.ConfigDict) -> air.AIR:
  """The AIR module described by `config.model` (field names match AIR's)."""
  fields = dict(config.model)
  for key in ('z_where_prior_loc', 'z_where_prior_scale'):
    fields[key] = tuple(float(v) for v in fields[key])
  return air.AIR(**fields)


def loss_settings(config: ml_collections.ConfigDict) -> LossSettings:
  """LossSettings from a config."""
  return LossSettings(
    prior_init=float(config.z_pres_prior.init),
    prior_final=float(config.z_pres_prior.final),
    prior_anneal_steps=int(config.z_pres_prior.anneal_steps),
    prior_schedule=str(config.z_pres_prior.schedule),
    z_where_prior_loc=tuple(float(v) for v in config.model.z_where_prior_loc),
    z_where_prior_scale=tuple(
      float(v) for v in config.model.z_where_prior_scale
    ),
    likelihood=str(config.likelihood),
    likelihood_std=float(config.likelihood_std),
    z_pres_estimator=str(config.model.z_pres_estimator),
    signal=str(config.signal),
    use_nvil=bool(config.nvil),
    nvil_scale=bool(config.get('nvil_scale', False)),
    nvil_decay=float(config.nvil_decay),
    z_pres_kl=str(config.get('z_pres_kl', 'analytic')),
    likelihood_std_init=float(config.get('likelihood_std_init', 0.0)),
    likelihood_std_anneal_steps=int(
      config.get('likelihood_std_anneal_steps', 0)
    ),
    normalised_baseline=bool(config.get('normalised_baseline', False)),
  )


def _is_baseline(path) -> bool:
  return str(getattr(path[0], 'key', path[0])).startswith('baseline')


def make_optimizer(config: ml_collections.ConfigDict, params):
  """Adam for the model and, with its own learning rate, for the baseline."""

  def adam(lr):
    chain = []
    if config.grad_clip_norm > 0:
      chain.append(optax.clip_by_global_norm(config.grad_clip_norm))
    chain.append(optax.adam(lr))
    return optax.chain(*chain)

  labels = jax.tree_util.tree_map_with_path(
    lambda path, _: 'baseline' if _is_baseline(path) else 'model', params
  )
  return optax.multi_transform(
    {
      'model': adam(config.learning_rate),
      'baseline': adam(config.baseline_learning_rate),
    },
    labels,
  )


def init_params(model: air.AIR, seed: int, image_size: int):
  """Parameters of `model` from a seed (jitted init: much faster)."""
  rng = jax.random.key(seed)
  images = jnp.zeros((1, image_size, image_size), jnp.float32)
  variables = jax.jit(model.init)(
    {
      'params': jax.random.fold_in(rng, 1),
      'sample': jax.random.fold_in(rng, 2),
    },
    images,
  )
  return variables['params']


def create_train_state(config, model: air.AIR):
  """A fresh TrainState and the optimiser."""
  params = init_params(model, config.seed, config.model.image_size)
  tx = make_optimizer(config, params)
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    nvil=objectives.NVILState.create(),
    num_skipped=jnp.zeros((), jnp.int32),
    consecutive_skipped=jnp.zeros((), jnp.int32),
  )
  return state, tx


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
  settings: LossSettings,
  seed: int,
  axis_name: str | None = 'batch',
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's share of the batch.

  Args:
    state: TrainState (replicated).
    images: [b, H, W] this device's images in [0, 1].
    model: the AIR module.
    tx: the optimiser.
    settings: LossSettings.
    seed: run seed; randomness is fold_in(seed, step, example index).
    axis_name: pmap axis to average over (None when not mapped).

  Returns:
    (new state, metrics averaged over devices).
  """
  b = images.shape[0]
  device = jax.lax.axis_index(axis_name) if axis_name else 0
  keys = example_keys(seed, state.step, device * b, b)
  prior_prob = settings.prior_prob(state.step)
  likelihood_std = settings.likelihood_std_at(state.step)

  def loss_fn(params):
    # One key per example: samples do not depend on the device split.
    out = model.apply({'params': params}, images, keys=keys)
    loss, aux = objectives.air_loss(
      out,
      images,
      prior_prob,
      settings.z_where_prior(),
      likelihood=settings.likelihood,
      likelihood_std=likelihood_std,
      z_pres_estimator=settings.z_pres_estimator,
      signal=settings.signal,
      nvil=state.nvil if settings.use_nvil else None,
      nvil_scale=settings.nvil_scale,
      z_pres_kl=settings.z_pres_kl,
      baseline_moments=state.nvil if settings.normalised_baseline else None,
    )
    return loss, (out, aux)

  (loss, (out, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  if axis_name:
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  is_baseline = {k: k.startswith('baseline') for k in grads}
  grad_norms = {
    'grad_norm': optax.tree.norm(
      {k: v for k, v in grads.items() if not is_baseline[k]}
    ),
    'baseline_grad_norm': optax.tree.norm(
      {k: v for k, v in grads.items() if is_baseline[k]}
    ),
  }
  # A NaN or inf anywhere in the gradients makes its group's norm non-finite.
  finite = jnp.isfinite(loss) & jnp.isfinite(
    grad_norms['grad_norm'] + grad_norms['baseline_grad_norm']
  )

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state

  # cond, not where: a skipped step costs nothing and a taken one no copies.
  new_params, new_opt_state = jax.lax.cond(
    finite, update, lambda _: (state.params, state.opt_state), None
  )
  signal_sums = aux.signal_sums
  if axis_name:
    signal_sums = jax.lax.psum(signal_sums, axis_name)
  new_nvil = objectives.update_nvil(
    state.nvil, *signal_sums.moments(), settings.nvil_decay
  )
  new_state = TrainState(
    step=state.step + 1,
    params=new_params,
    opt_state=new_opt_state,
    nvil=jax.tree.map(
      lambda n, o: jnp.where(finite, n, o), new_nvil, state.nvil
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
    'baseline_loss': aux.baseline_loss,
    'mean_count': jnp.mean(jnp.sum(out.z_pres, 1)),
    'z_pres_prior_prob': prior_prob,
    'likelihood_std': likelihood_std,
    'nonfinite': (~finite).astype(jnp.float32),
    **grad_norms,
  }
  if axis_name:
    step_metrics = jax.lax.pmean(step_metrics, axis_name)
  step_metrics['num_skipped'] = new_state.num_skipped
  return new_state, step_metrics


class EvalResult(NamedTuple):
  """Evaluation of a model on a split.

  Attributes:
    count_accuracy: with posterior modes (z_pres = q > 0.5).
    count_accuracy_sampled: with one posterior sample per image.
    confusion: [N + 1, N + 1] true (rows) vs inferred (columns) counts, modes.
    elbo: mean single-sample ELBO (analytic KLs).
    iwae: mean importance-weighted bound with `iwae_samples` samples (None
      when not computed).
    num_images: how many images were evaluated.
  """

  count_accuracy: float
  count_accuracy_sampled: float
  confusion: np.ndarray
  elbo: float
  iwae: float | None
  num_images: int

  def scalars(self, prefix: str) -> dict[str, float]:
    out = {
      f'{prefix}/count_accuracy': self.count_accuracy,
      f'{prefix}/count_accuracy_sampled': self.count_accuracy_sampled,
      f'{prefix}/elbo': self.elbo,
    }
    if self.iwae is not None:
      out[f'{prefix}/iwae'] = self.iwae
    return out


@functools.partial(
  jax.jit, static_argnames=('model', 'settings', 'iwae_samples')
)
def eval_batch(
  params,
  images: jax.Array,
  rng: jax.Array,
  step: jax.Array,
  *,
  model: air.AIR,
  settings: LossSettings,
  iwae_samples: int = 0,
):
  """Counts (modes and a sample), ELBO and optionally IWAE log weights.

  Returns:
    dict of [B] arrays: 'count', 'count_sampled', 'elbo', and 'iwae' when
    iwae_samples > 0.
  """
  prior = settings.prior_prob(step)
  variables = {'params': params}
  mode = model.apply(
    variables, images, deterministic=True, rngs={'sample': rng}
  )
  sample = model.apply(
    variables, images, rngs={'sample': jax.random.fold_in(rng, 1)}
  )
  terms = objectives.elbo_terms(
    sample,
    images,
    prior,
    settings.z_where_prior(),
    settings.likelihood,
    settings.likelihood_std,
  )
  result = {
    'count': mode.count,
    'count_sampled': sample.count,
    'elbo': terms.elbo,
  }
  if iwae_samples > 0:

    def log_weight(key):
      out = model.apply(variables, images, rngs={'sample': key})
      return objectives.log_importance_weight(
        out,
        images,
        prior,
        settings.z_where_prior(),
        settings.likelihood,
        settings.likelihood_std,
      )

    keys = jax.random.split(jax.random.fold_in(rng, 2), iwae_samples)
    result['iwae'] = metrics_lib.iwae_bound(jax.lax.map(log_weight, keys))
  return result


def evaluate(
  model: air.AIR,
  params,
  split: input_pipeline.Split,
  settings: LossSettings,
  *,
  step: int = 0,
  batch_size: int = 500,
  seed: int = 0,
  iwae_samples: int = 0,
  max_examples: int | None = None,
) -> EvalResult:
  """Count accuracy, confusion matrix, ELBO (and IWAE) on a split."""
  num_classes = model.max_steps + 1
  if max_examples is not None and max_examples < split.size:
    split = input_pipeline.Split(*(x[:max_examples] for x in split))
  counts, sampled, elbos, iwaes, trues = [], [], [], [], []
  for k, (batch, valid) in enumerate(
    input_pipeline.eval_batches(split, batch_size)
  ):
    rng = jax.random.fold_in(jax.random.key(seed), k)
    out = eval_batch(
      params,
      jnp.asarray(batch.images),
      rng,
      jnp.asarray(step),
      model=model,
      settings=settings,
      iwae_samples=iwae_samples,
    )
    out = jax.device_get(out)
    counts.append(out['count'][:valid])
    sampled.append(out['count_sampled'][:valid])
    elbos.append(out['elbo'][:valid])
    trues.append(batch.num_objects[:valid])
    if iwae_samples > 0:
      iwaes.append(out['iwae'][:valid])
  count, true = np.concatenate(counts), np.concatenate(trues)
  return EvalResult(
    count_accuracy=float(np.mean(count == true)),
    count_accuracy_sampled=float(np.mean(np.concatenate(sampled) == true)),
    confusion=np.asarray(
      metrics_lib.confusion_matrix(
        jnp.asarray(true), jnp.asarray(count), num_classes
      )
    ),
    elbo=float(np.mean(np.concatenate(elbos))),
    iwae=float(np.mean(np.concatenate(iwaes))) if iwaes else None,
    num_images=int(len(true)),
  )


def save_config(config: ml_collections.ConfigDict, directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, CONFIG_FILE), 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load_config(directory: str) -> ml_collections.ConfigDict:
  path = os.path.join(directory, CONFIG_FILE)
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def save_params(
  params,
  directory: str,
  config: ml_collections.ConfigDict,
  inference_only: bool = True,
):
  """Writes float32 parameters and the config: a standalone model export.

  Args:
    params: model parameters.
    directory: created if needed; gets params.msgpack and config.json.
    config: the run's config.
    inference_only: drop the REINFORCE baseline network (not needed to
      infer or generate) and record `model.use_baseline = False`.
  """
  os.makedirs(directory, exist_ok=True)
  params = jax.tree.map(
    lambda x: np.asarray(x, np.float32), jax.device_get(params)
  )
  if inference_only:
    params = {k: v for k, v in params.items() if not k.startswith('baseline')}
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.use_baseline = False
  with open(os.path.join(directory, PARAMS_FILE), 'wb') as f:
    f.write(flax.serialization.msgpack_serialize(params))
  save_config(config, directory)


def _checkpoint_manager(
  workdir: str, max_to_keep: int = 3
) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
    options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
  )


def load_model(path: str, step: int | None = None):
  """Loads (config, model, params) from a run's workdir or a params export.

  Args:
    path: a workdir (config.json + checkpoints/) or an export directory
      (config.json + params.msgpack).
    step: checkpoint step of a workdir (latest when None).

  Raises:
    FileNotFoundError: no config or no checkpoint there.
    ValueError: the stored parameters do not fit the stored config.
  """
  if not os.path.isfile(os.path.join(path, CONFIG_FILE)):
    raise FileNotFoundError(
      f'No {CONFIG_FILE} in {path}: not an air_jax checkpoint.'
    )
  config = load_config(path)
  model = create_model(config)
  template = jax.eval_shape(
    lambda: init_params(model, 0, config.model.image_size)
  )
  params_path = os.path.join(path, PARAMS_FILE)
  if os.path.isfile(params_path):
    with open(params_path, 'rb') as f:
      raw = flax.serialization.msgpack_restore(f.read())
  else:
    manager = _checkpoint_manager(path)
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
        f'No checkpoint under {os.path.join(path, CHECKPOINT_DIR)}.'
      )
    raw = manager.restore(step, args=ocp.args.StandardRestore())['params']
  _check_same_structure(template, raw)
  params = jax.tree.map(
    jnp.asarray, flax.serialization.from_state_dict(template, raw)
  )
  return config, model, params


def _check_same_structure(template, raw) -> None:
  want = {
    jax.tree_util.keystr(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_leaves_with_path(template)
  }
  have = {
    jax.tree_util.keystr(p): tuple(np.shape(x))
    for p, x in jax.tree_util.tree_leaves_with_path(raw)
  }
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:3]
    raise ValueError(
      f'The checkpoint does not fit its config (parameter names or shapes differ, e.g. {diff}).'
    )


def compile_train_step(
  model, tx, settings, seed: int, num_devices: int, state=None, images=None
):
  """`train_step` pmapped over local devices, or jitted on a single one.

  With several devices the state is replicated (leading device axis); with
  one, the step is jitted and the state kept as is (on CPU, pmap over a
  single device measured slower than jit, with the same math). Either way
  the returned function takes images [D, b, H, W], returns metrics with a
  leading [D] axis, and donates the state.

  Given an example `state` (in that layout) and `images` (arrays or
  jax.ShapeDtypeStruct), the step is compiled now, ahead of time, rather
  than at its first call.
  """
  step = functools.partial(
    train_step, model=model, tx=tx, settings=settings, seed=seed
  )
  if num_devices > 1:
    fn = jax.pmap(step, axis_name='batch', donate_argnums=(0,))
    if state is None:
      return fn
    return fn.lower(state, images).compile()
  single = jax.jit(functools.partial(step, axis_name=None), donate_argnums=(0,))
  if state is not None:
    one = jax.ShapeDtypeStruct(images.shape[1:], images.dtype)
    single = single.lower(state, one).compile()

  def run(state, images):
    state, metrics = single(state, images[0])
    return state, jax.tree.map(lambda x: x[None], metrics)

  return run


def release_free_memory() -> None:
  """Returns the C heap's free pages to the OS (glibc only; else a no-op).

  XLA's compiler allocates several hundred MiB of short-lived memory; glibc
  keeps it mapped after it is freed, so everything allocated later (the
  dataset) would stack on top of it in the peak RSS.
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


def replicate(tree, num_devices: int):
  """Puts a host tree in the layout `compile_train_step` expects."""
  if num_devices > 1:
    return flax.jax_utils.replicate(tree)
  return jax.tree.map(jnp.asarray, tree)


def unreplicate(tree, num_devices: int):
  """The host copy of a tree in `compile_train_step`'s layout."""
  if num_devices > 1:
    tree = jax.tree.map(lambda x: x[0], tree)
  return jax.device_get(tree)


def _log_pictures(writer, workdir, step, model, params, images):
  # Jitted: run eagerly, the scan compiled op by op (10 s, +180 MiB RSS).
  out = jax.device_get(air.posterior_modes(model, params, jnp.asarray(images)))
  grid = visualization.reconstruction_grid(
    images, out.canvas, out.z_pres, out.z_where
  )
  os.makedirs(os.path.join(workdir, 'pictures'), exist_ok=True)
  path = os.path.join(workdir, 'pictures', f'step_{step:07d}.png')
  visualization.save_png(path, grid)
  writer.write_image(step, 'pictures/reconstructions', grid)
  return path


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """Trains AIR as `config` says, resuming from `workdir` if it holds a run.

  Writes checkpoints, metrics.jsonl, TensorBoard events and pictures under
  `workdir`. Returns the final (unreplicated) TrainState.
  """
  os.makedirs(workdir, exist_ok=True)
  save_config(config, workdir)
  devices = jax.local_devices()
  num_devices = len(devices)
  if config.batch_size % (num_devices * jax.process_count()):
    raise ValueError(
      f'batch_size {config.batch_size} is not divisible by the '
      f'{num_devices * jax.process_count()} devices.'
    )
  local_batch = config.batch_size // jax.process_count()

  data = config.data
  input_pipeline.prepare(data.data_dir, data.mnist_dir, data.builder_config)

  model = create_model(config)
  settings = loss_settings(config)
  state, tx = create_train_state(config, model)
  manager = _checkpoint_manager(workdir, config.max_checkpoints_to_keep)
  latest = manager.latest_step()
  if latest is not None:
    state = manager.restore(latest, args=ocp.args.StandardRestore(state))
    logging.info('Restored checkpoint at step %d.', latest)
  start_step = int(state.step)

  # Compile before the dataset is in memory and hand the compiler's scratch
  # memory back: the peak RSS is then that of compiling or of training, not
  # their sum.
  state = replicate(state, num_devices)
  size = config.model.image_size
  p_train_step = compile_train_step(
    model,
    tx,
    settings,
    config.seed,
    num_devices,
    state=state,
    images=jax.ShapeDtypeStruct(
      (num_devices, local_batch // num_devices, size, size), jnp.float32
    ),
  )
  release_free_memory()

  train_split = input_pipeline.load_split(
    data.train_split, data.data_dir, data.builder_config
  )
  eval_split = input_pipeline.load_split(
    data.eval_split, data.data_dir, data.builder_config, shard=False
  )
  logging.info('Train %d, eval %d examples.', train_split.size, eval_split.size)
  writer = writers.MetricWriter(workdir)
  bar = writers.ProgressBar(config.num_train_steps, start_step)
  batches = input_pipeline.TrainIterator(
    train_split, config.seed, local_batch, start_step
  )
  picture_images = (
    eval_split.images[: config.num_picture_images].astype(np.float32) / 255.0
  )

  t_log, step_log = time.time(), start_step
  for step in range(start_step + 1, config.num_train_steps + 1):
    batch = next(batches)
    images = batch.images.reshape(num_devices, -1, *batch.images.shape[1:])
    counts_true = batch.num_objects
    state, step_metrics = p_train_step(state, images)

    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      scalars = jax.device_get(jax.tree.map(lambda x: x[0], step_metrics))
      consecutive = int(unreplicate(state.consecutive_skipped, num_devices))
      if consecutive >= config.max_consecutive_nonfinite:
        raise FloatingPointError(
          f'{consecutive} consecutive non-finite updates at step {step}: '
          'stopping. The last checkpoint holds finite parameters.'
        )
      elapsed = time.time() - t_log
      scalars['unix_time'] = time.time()  # For curves against wall time.
      scalars['images_per_s'] = (
        (step - step_log) * config.batch_size / max(elapsed, 1e-9)
      )
      t_log, step_log = time.time(), step
      scalars = {f'train/{k}': v for k, v in scalars.items()}
      # Count accuracy on the training batch, with posterior modes.
      scalars['train/count_accuracy'] = _batch_count_accuracy(
        model, unreplicate(state.params, num_devices), batch.images, counts_true
      )
      writer.write_scalars(step, scalars, check_finite=False)
      bar.update(
        step,
        {
          'elbo': scalars['train/elbo'],
          'acc': scalars['train/count_accuracy'],
          'img/s': scalars['train/images_per_s'],
        },
      )

    if step % config.eval_every_steps == 0 or step == config.num_train_steps:
      result = evaluate(
        model,
        unreplicate(state.params, num_devices),
        eval_split,
        settings,
        step=step,
        batch_size=config.eval_batch_size,
        seed=config.seed,
        max_examples=config.eval_max_examples or None,
      )
      writer.write_scalars(step, result.scalars(f'eval_{data.eval_split}'))
      writer.write_text(
        step, 'eval/confusion', np.array2string(result.confusion)
      )
      logging.info(
        'step %d eval %s count acc %.4f elbo %.2f confusion\n%s',
        step,
        data.eval_split,
        result.count_accuracy,
        result.elbo,
        result.confusion,
      )
      release_free_memory()  # The eval step's compile scratch.

    if step % config.image_every_steps == 0 or step == config.num_train_steps:
      _log_pictures(
        writer,
        workdir,
        step,
        model,
        unreplicate(state.params, num_devices),
        picture_images,
      )
      release_free_memory()

    if (
      step % config.checkpoint_every_steps == 0
      or step == config.num_train_steps
    ):
      manager.save(
        step, args=ocp.args.StandardSave(unreplicate(state, num_devices))
      )

  manager.wait_until_finished()
  writer.close()
  bar.close()
  final = unreplicate(state, num_devices)
  save_params(final.params, os.path.join(workdir, 'export'), config)
  return final


def _batch_count_accuracy(model, params, images, true) -> float:
  counts = air.posterior_modes(model, params, jnp.asarray(images)).count
  return float(np.mean(np.asarray(counts) == true))
