"""Evaluating a model: count accuracy, confusion, ELBO, IWAE, timings.

Glossary of shapes: M images in a split, B batch, N steps.
"""

import functools
import json
import time
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from air_jax import air
from air_jax import checkpointing
from air_jax import configuration
from air_jax import files
from air_jax import inference
from air_jax import input_pipeline
from air_jax import metrics as metrics_lib
from air_jax import objectives
from air_jax import refinement

__all__ = [
  'EvalResult',
  'batch_count_accuracy',
  'eval_batch',
  'evaluate',
  'evaluate_checkpoint',
  'format_table',
  'inference_pass',
  'time_inference',
  'write_report',
]


class EvalResult(NamedTuple):
  """Evaluation of a model on a split.

  Attributes:
    count_accuracy: with posterior modes (z_pres = q > 0.5).
    count_accuracy_sampled: with one posterior sample per image.
    confusion: [C, C] true (rows) vs inferred (columns) counts, modes, with
      C = min(N, K + 1) + 1 for K object slots in the data (the last column
      holds every count from C - 1 up).
    elbo: mean single-sample ELBO (analytic KLs).
    iwae: mean importance-weighted bound with `iwae_samples` samples (None
      when not computed).
    num_images: how many images were evaluated.
    boxes: `metrics.detection_metrics` of the tight object boxes against the
      ground-truth ink boxes ('ap50', 'ap50_95', 'mean_iou',
      'overcount_rate', 'undercount_rate'); None without ground truth.
  """

  count_accuracy: float
  count_accuracy_sampled: float
  confusion: np.ndarray
  elbo: float
  iwae: float | None
  num_images: int
  boxes: dict[str, float] | None = None

  def scalars(self, prefix: str) -> dict[str, float]:
    out = {
      f'{prefix}/count_accuracy': self.count_accuracy,
      f'{prefix}/count_accuracy_sampled': self.count_accuracy_sampled,
      f'{prefix}/elbo': self.elbo,
    }
    if self.iwae is not None:
      out[f'{prefix}/iwae'] = self.iwae
    for name, value in (self.boxes or {}).items():
      out[f'{prefix}/{name}'] = value
    return out


@functools.partial(
  jax.jit,
  static_argnames=(
    'model',
    'loss_config',
    'iwae_samples',
    'refine',
  ),
)
def eval_batch(
  params,
  images: jax.Array,
  rng: jax.Array,
  step: jax.Array,
  *,
  model: air.AIR,
  loss_config: objectives.LossConfig,
  iwae_samples: int = 0,
  refine: refinement.Refinement | None = None,
) -> dict[str, jax.Array]:
  """Counts (modes and a sample), ELBO and optionally IWAE of a batch.

  Args:
    params: model parameters.
    images: [B, H, W] in [0, 1].
    rng: PRNG key of the batch.
    step: training step (the schedules' argument).
    model: the AIR module.
    loss_config: the objective's settings.
    iwae_samples: K of the IWAE bound (0: skip).
    refine: if given, the posterior modes are refined by the model's
      objective at `step` (`refinement.refine`); None: the encoder's.

  Returns:
    dict of [B] arrays: 'count', 'count_sampled', 'elbo', and 'iwae' when
    iwae_samples > 0; 'boxes' [B, N, 4] and 'z_pres_prob', 'z_pres' [B, N]
    of the posterior modes.
  """
  # The generative model at `step`: the z_pres prior, the z_where prior,
  # the likelihood and its std, the repulsion.
  model_terms = (
    loss_config.z_pres_prior(step),
    loss_config.z_where_prior(),
    loss_config.likelihood,
    loss_config.likelihood_std(step),
    loss_config.repulsion(step),
  )
  variables = {'params': params}
  refiner = None
  if refine is not None:
    refiner = refinement.Refiner(refine, loss_config, step)
  mode = inference.modes(model, params, images, refiner)
  sample = model.apply(variables, images, rngs={'sample': rng})
  terms = objectives.elbo_terms(sample, images, *model_terms)
  result = {
    'count': mode.count,
    'count_sampled': sample.count,
    'elbo': terms.elbo,
    'boxes': air.ink_boxes(mode, images),
    'z_pres_prob': mode.z_pres_prob,
    'z_pres': mode.z_pres,
  }
  if iwae_samples > 0:

    def log_weight(key):
      out = model.apply(variables, images, rngs={'sample': key})
      return objectives.log_importance_weight(out, images, *model_terms)

    keys = jax.random.split(jax.random.fold_in(rng, 2), iwae_samples)
    result['iwae'] = metrics_lib.iwae_bound(jax.lax.map(log_weight, keys))
  return result


def evaluate(
  model: air.AIR,
  params,
  split: input_pipeline.Split,
  loss_config: objectives.LossConfig,
  *,
  step: int = 0,
  batch_size: int = 500,
  seed: int = 0,
  iwae_samples: int = 0,
  max_examples: int | None = None,
  refine: refinement.Refinement | None = None,
) -> EvalResult:
  """Count accuracy, confusion matrix, ELBO (and IWAE) on a split
  (`refine`: see `eval_batch`)."""
  # Counts 0..N, but no more columns than the data's object slots need
  # (a grid model's N is its number of cells): the last column then also
  # holds every larger count.
  num_classes = min(model.max_steps, split.boxes.shape[1] + 1) + 1
  if max_examples is not None and max_examples < split.size:
    split = input_pipeline.Split(*(x[:max_examples] for x in split))
  counts, sampled, elbos, iwaes, trues = [], [], [], [], []
  boxes, scores, present = [], [], []
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
      loss_config=loss_config,
      iwae_samples=iwae_samples,
      refine=refine,
    )
    out = jax.device_get(out)
    counts.append(out['count'][:valid])
    sampled.append(out['count_sampled'][:valid])
    elbos.append(out['elbo'][:valid])
    trues.append(batch.num_objects[:valid])
    boxes.append(out['boxes'][:valid])
    scores.append(out['z_pres_prob'][:valid])
    present.append(out['z_pres'][:valid] > 0.5)
    if iwae_samples > 0:
      iwaes.append(out['iwae'][:valid])
  count, true = np.concatenate(counts), np.concatenate(trues)
  true_boxes = split.boxes[: len(true)]
  box_metrics = metrics_lib.detection_metrics(
    np.concatenate(boxes),
    np.concatenate(scores),
    np.concatenate(present),
    true_boxes,
    true_boxes[..., 2] > 0,
    count,
    true,
  )
  # Counts from C - 1 up (inferred or true) land in the last column or row.
  return EvalResult(
    count_accuracy=float(np.mean(count == true)),
    count_accuracy_sampled=float(np.mean(np.concatenate(sampled) == true)),
    confusion=np.asarray(
      metrics_lib.confusion_matrix(
        jnp.asarray(np.minimum(true, num_classes - 1)),
        jnp.asarray(count),
        num_classes,
      )
    ),
    elbo=float(np.mean(np.concatenate(elbos))),
    iwae=float(np.mean(np.concatenate(iwaes))) if iwaes else None,
    num_images=int(len(true)),
    boxes=box_metrics,
  )


@functools.partial(jax.jit, static_argnames=('model',))
def batch_count_accuracy(model, params, data, counts, indices) -> jax.Array:
  """Count accuracy (posterior modes) of the examples `indices` [B] of
  on-device uint8 images `data` [M, H, W] with true counts `counts` [M]."""
  images = jnp.take(data, indices, axis=0).astype(jnp.float32) / 255.0
  out = model.apply({'params': params}, images, deterministic=True)
  return jnp.mean(out.count == jnp.take(counts, indices, axis=0))


def inference_pass(model):
  """The jitted deterministic inference pass, (params, images) -> z_where.

  Only z_where is returned, so the renderer is compiled away: this is the
  cost of reading a scene, as timed by `time_inference` and the benchmarks.
  """
  return jax.jit(
    lambda p, x: model.apply({'params': p}, x, deterministic=True).z_where
  )


def time_inference(
  model, params, images: np.ndarray, batch_size: int, repeats: int = 5
) -> float:
  """Median ms per image of the deterministic inference pass (compiled)."""
  apply = inference_pass(model)
  x = jnp.asarray(images[:batch_size])
  jax.block_until_ready(apply(params, x))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(apply(params, x))
    times.append(time.perf_counter() - t)
  return 1000.0 * float(np.median(times)) / len(x)


def evaluate_checkpoint(
  checkpoint: str,
  splits,
  data_dir: str | None = None,
  mnist_dir: str | None = None,
  builder_config: str | None = None,
  iwae_samples: int = 100,
  max_examples: int | None = None,
  batch_size: int = 500,
  refine: refinement.Refinement | None = None,
) -> dict[str, Any]:
  """Evaluates a workdir or export on multi-MNIST splits.

  Args:
    checkpoint: a training workdir or an export.
    splits: split names of the builder config.
    data_dir: TFDS data dir (None: the checkpoint config's, else TFDS's).
    mnist_dir: MNIST files (None: the config's, else AIR_MNIST_DIR).
    builder_config: multi_mnist config (None: the checkpoint config's).
    iwae_samples: K of the IWAE bound (0: skip).
    max_examples: per split (None: all).
    batch_size: images per evaluation batch.
    refine: see `eval_batch` (None: the encoder's modes).

  Returns:
    {'checkpoint', 'builder_config', 'refine_flips', 'refine_rounds',
    'refine_splits', 'refine_split_gain', 'refine_drops',
    'splits': {name: {...}},
    'infer_ms_per_image_b1', 'infer_ms_per_image_b64'}.
  """
  config, model, params = checkpointing.load_model(checkpoint)
  loss_config = configuration.loss_config(config)
  builder_config = builder_config or config.data.builder_config
  data_dir = data_dir or config.data.data_dir
  input_pipeline.prepare(
    data_dir, mnist_dir or config.data.mnist_dir, builder_config
  )
  report = {
    'checkpoint': checkpoint,
    'builder_config': builder_config,
    **(refine or refinement.Refinement(0)).report(),
    'splits': {},
  }
  images = None
  for split in splits:
    data = input_pipeline.load_split(
      split, data_dir, builder_config, shard=False
    )
    images = data.images
    t = time.time()
    result = evaluate(
      model,
      params,
      data,
      loss_config,
      step=config.num_train_steps,
      batch_size=batch_size,
      seed=config.seed,
      iwae_samples=iwae_samples,
      max_examples=max_examples,
      refine=refine,
    )
    report['splits'][split] = {
      'count_accuracy': result.count_accuracy,
      'count_accuracy_sampled': result.count_accuracy_sampled,
      'confusion': result.confusion.tolist(),
      'elbo': result.elbo,
      'iwae': result.iwae,
      'iwae_samples': iwae_samples,
      'num_images': result.num_images,
      'boxes': result.boxes,
      'eval_seconds': time.time() - t,
    }
  if images is not None:
    float_images = images[:64].astype(np.float32) / 255.0
    report['infer_ms_per_image_b1'] = time_inference(
      model, params, float_images, 1, 50
    )
    report['infer_ms_per_image_b64'] = time_inference(
      model, params, float_images, 64, 20
    )
  return report


def write_report(report: dict[str, Any], path: str) -> None:
  """Writes the report as JSON, atomically."""
  files.write_text(path, json.dumps(report, indent=1))


def format_table(report: dict[str, Any]) -> str:
  """A plain-text table of the report."""
  lines = [
    f'{"split":<10} {"images":>7} {"count acc":>9} {"sampled":>8} '
    f'{"ELBO":>9} {"IWAE":>9} {"AP50":>6} {"AP50:95":>7} {"over":>6} '
    f'{"under":>6}'
  ]
  for name, r in report['splits'].items():
    iwae = f'{r["iwae"]:9.2f}' if r['iwae'] is not None else f'{"-":>9}'
    b = r['boxes']
    lines.append(
      f'{name:<10} {r["num_images"]:>7} {r["count_accuracy"]:>9.4f} '
      f'{r["count_accuracy_sampled"]:>8.4f} {r["elbo"]:>9.2f} {iwae} '
      f'{b["ap50"]:>6.3f} {b["ap50_95"]:>7.3f} {b["overcount_rate"]:>6.3f} '
      f'{b["undercount_rate"]:>6.3f}'
    )
    lines.append(
      f'  confusion (rows true 0..N, cols inferred): {r["confusion"]}'
    )
  if 'infer_ms_per_image_b1' in report:
    lines.append(
      f'inference: {report["infer_ms_per_image_b1"]:.3f} ms/image at batch 1, '
      f'{report["infer_ms_per_image_b64"]:.4f} ms/image at batch 64'
    )
  return '\n'.join(lines)
