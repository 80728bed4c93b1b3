"""Evaluating a checkpoint on several splits: the report and its table."""

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from air_jax import inference
from air_jax import input_pipeline
from air_jax import train


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
  data_dir=None,
  mnist_dir=None,
  builder_config='full',
  iwae_samples: int = 100,
  max_examples: int | None = None,
  batch_size: int = 500,
) -> dict[str, Any]:
  """Evaluates a workdir or export on multi-MNIST splits.

  Returns:
    {'checkpoint', 'splits': {name: {...}}, 'infer_ms_per_image_b1',
    'infer_ms_per_image_b64'}.
  """
  config, model, params = inference.load(checkpoint)
  settings = train.loss_settings(config)
  input_pipeline.prepare(data_dir, mnist_dir, builder_config)
  report = {'checkpoint': checkpoint, 'splits': {}}
  images = None
  for split in splits:
    data = input_pipeline.load_split(
      split, data_dir, builder_config, shard=False
    )
    images = data.images
    step = config.num_train_steps
    t = time.time()
    result = train.evaluate(
      model,
      params,
      data,
      settings,
      step=step,
      batch_size=batch_size,
      seed=config.seed,
      iwae_samples=iwae_samples,
      max_examples=max_examples,
    )
    report['splits'][split] = {
      'count_accuracy': result.count_accuracy,
      'count_accuracy_sampled': result.count_accuracy_sampled,
      'confusion': result.confusion.tolist(),
      'elbo': result.elbo,
      'iwae': result.iwae,
      'iwae_samples': iwae_samples,
      'num_images': result.num_images,
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
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(report, f, indent=1)


def format_table(report: dict[str, Any]) -> str:
  """A plain-text table of the report."""
  lines = [
    f'{"split":<10} {"images":>7} {"count acc":>9} {"sampled":>8} {"ELBO":>9} {"IWAE":>9}'
  ]
  for name, r in report['splits'].items():
    iwae = f'{r["iwae"]:9.2f}' if r['iwae'] is not None else f'{"-":>9}'
    lines.append(
      f'{name:<10} {r["num_images"]:>7} {r["count_accuracy"]:>9.4f} '
      f'{r["count_accuracy_sampled"]:>8.4f} {r["elbo"]:>9.2f} {iwae}'
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
