"""Measurements of AIR's speed and memory, one function each.

`benchmarks/run.py` decides what to measure, in which order, and presents
the results; this module only measures. Every timed function is compiled
and run once first, then timed in blocks of calls: each block gives the
seconds per call, so a caller can take the median and the best block, or
pool blocks measured minutes apart.

Glossary of shapes: B batch, K steps per dispatch, S seeds of a sweep,
M training examples, H, W image.
"""

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from air_jax import air
from air_jax import checkpointing
from air_jax import configuration
from air_jax import evaluation
from air_jax import input_pipeline
from air_jax import train

# The repository root: the training subprocesses run there
# (`python -m experiments.train --config=configs/default.py`).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A period (in steps) beyond any benchmark run: no evaluation, pictures or
# checkpoints but the final step's, which always has them.
FAR = 10_000_000
# Examples of the final step's evaluation in the training subprocesses: it
# comes after everything timed, so it is kept short.
_FINAL_EVAL_EXAMPLES = 250


def time_blocks(fn, num_blocks: int, per_block: int) -> list[float]:
  """Seconds per call of fn() in each block (fn must block until done)."""
  times = []
  for _ in range(num_blocks):
    t = time.perf_counter()
    for _ in range(per_block):
      fn()
    times.append((time.perf_counter() - t) / per_block)
  return times


def median_and_min(times: list[float]) -> tuple[float, float]:
  return float(np.median(times)), float(np.min(times))


def _image_shape(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(H, W) of config.model.image_size (one int for a square, or two)."""
  size = config.model.image_size
  if isinstance(size, int):
    return size, size
  height, width = size
  return int(height), int(width)


def _random_images(batch: int, config: ml_collections.ConfigDict) -> jax.Array:
  """[batch, H, W] float32 in [0, 1]."""
  rng = np.random.default_rng(0)
  shape = (batch, *_image_shape(config))
  return jnp.asarray(rng.random(shape, np.float32))


def _batch_cycle(
  batches: np.ndarray | None, batch: int, config: ml_collections.ConfigDict
):
  """(the first batch, a function giving the next batch in turn) of
  `batches` [M, batch, H, W] in [0, 1] on the device, or of one batch of
  random images when it is None."""
  if batches is None:
    batches = _random_images(batch, config)[None]
  batches = jnp.asarray(batches, jnp.float32)
  calls = [0]

  def next_batch() -> jax.Array:
    calls[0] += 1
    return batches[calls[0] % len(batches)]

  return batches[0], next_batch


def _flops(compiled) -> float:
  """XLA's FLOP count of a compiled function (NaN if it has none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


class TrainTiming(NamedTuple):
  """Timing of the jitted one-step `train.train_step`.

  Attributes:
    seconds_per_step: of each timed block.
    compile_s: the first call (trace, compile, run).
    traces: how often the step was traced over all calls (1 expected).
    mflop_per_image: XLA's FLOP count of a step / B, in millions.
  """

  seconds_per_step: list[float]
  compile_s: float
  traces: int
  mflop_per_image: float


def train_step_times(
  config: ml_collections.ConfigDict,
  num_blocks: int,
  per_block: int,
  batches: np.ndarray | None = None,
  params=None,
) -> TrainTiming:
  """One jitted `train.train_step` per call, on [B, H, W] float images
  already on the device (the state is donated, as in training).

  Without `batches` every call sees the same random images; with them
  ([M, B, H, W] in [0, 1]) the calls cycle through the M batches. `params`
  (e.g. a trained model's) replace the initial parameters.
  """
  model = configuration.create_model(config)
  loss_config = configuration.loss_config(config)
  state, tx = train.create_train_state(config, model)
  if params is not None:
    params = jax.tree.map(jnp.copy, params)  # The state is donated.
    state = state.replace(params=params, opt_state=tx.init(params))
  traces = []

  def counted(state, images):
    traces.append(1)
    return train.train_step(
      state,
      images,
      model=model,
      tx=tx,
      loss_config=loss_config,
      seed=config.seed,
      axis_name=None,
    )

  step = jax.jit(counted, donate_argnums=(0,))
  images, next_batch = _batch_cycle(batches, config.batch_size, config)
  t = time.perf_counter()
  state, metrics = step(state, images)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  holder = [state]

  def one():
    holder[0], m = step(holder[0], next_batch())
    jax.block_until_ready(m)

  time_blocks(one, 1, 3)  # Warm-up.
  times = time_blocks(one, num_blocks, per_block)
  num_traces = len(traces)
  # After a call, lowering and compiling again hit jit's caches.
  flops = _flops(step.lower(holder[0], images).compile())
  return TrainTiming(times, compile_s, num_traces, flops / 1e6 / len(images))


class InferTiming(NamedTuple):
  """Timing of `evaluation.inference_pass`.

  Attributes:
    ms_per_image: of each timed block.
    mflop_per_image: XLA's FLOP count of a pass / B, in millions.
  """

  ms_per_image: list[float]
  mflop_per_image: float


def infer_times(
  config: ml_collections.ConfigDict,
  batch: int,
  num_blocks: int,
  per_block: int,
  batches: np.ndarray | None = None,
  params=None,
) -> InferTiming:
  """The deterministic inference pass on [batch, H, W] images: random ones,
  or cycling through `batches` [M, batch, H, W]; `params` as in
  `train_step_times`."""
  model = configuration.create_model(config)
  if params is None:
    params = air.init_params(model, config.seed)
  apply = evaluation.inference_pass(model)
  images, next_batch = _batch_cycle(batches, batch, config)
  jax.block_until_ready(apply(params, images))
  times = time_blocks(
    lambda: jax.block_until_ready(apply(params, next_batch())),
    num_blocks,
    per_block,
  )
  flops = _flops(apply.lower(params, images).compile())
  return InferTiming([1000 * t / batch for t in times], flops / 1e6 / batch)


def projection_ms_per_image(
  config: ml_collections.ConfigDict,
  batch: int,
  num_blocks: int,
  per_block: int,
) -> float:
  """Median ms/image of the image projection alone ([B, H*W] @ [H*W, 4F]
  + bias), the one large matmul of an inference pass: the rest of the pass
  (the N recurrent steps) is the total minus this."""
  pixels = int(np.prod(_image_shape(config)))
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(
    rng.normal(size=(pixels, 4 * config.model.lstm_size)), jnp.float32
  )
  bias = jnp.zeros((4 * config.model.lstm_size,), jnp.float32)
  images = jnp.asarray(rng.random((batch, pixels), np.float32))
  project = jax.jit(lambda x, w, b: x @ w + b)
  jax.block_until_ready(project(images, kernel, bias))
  times = time_blocks(
    lambda: jax.block_until_ready(project(images, kernel, bias)),
    num_blocks,
    per_block,
  )
  return 1000 * float(np.median(times)) / batch


def prepare_dataset(config: ml_collections.ConfigDict) -> None:
  """Builds the training config's TFDS data if needed (so that no timed
  run builds it)."""
  data = config.data
  for name in (data.builder_config, *data.extra_train_configs):
    input_pipeline.prepare(data.data_dir, data.mnist_dir, name)


def training_images(config: ml_collections.ConfigDict) -> jax.Array:
  """[M, H, W] uint8: the training split on the device, as the loop has it."""
  data = config.data
  split = input_pipeline.load_split(
    data.train_split,
    data.data_dir,
    [data.builder_config, *data.extra_train_configs],
    shard=False,
  )
  return jnp.asarray(split.images)


def real_batches(config: ml_collections.ConfigDict, count: int) -> np.ndarray:
  """[count, B, H, W] float32: the first count * B canvases of the training
  split, in [0, 1]."""
  data, b = config.data, config.batch_size
  split = input_pipeline.load_split(
    data.train_split, data.data_dir, data.builder_config, shard=False
  )
  images = split.images[: count * b].astype(np.float32) / 255.0
  return images.reshape(count, b, *images.shape[1:])


def trained_params(path: str, config: ml_collections.ConfigDict):
  """The parameters of `config`'s model with those of the model at `path`
  (a workdir or an export) in place; what the export lacks (the baseline
  network) keeps its initial values."""
  _, _, loaded = checkpointing.load_model(path)
  params = dict(air.init_params(configuration.create_model(config), 0))
  params.update(loaded)
  return params


def _index_batches(
  seeds, config: ml_collections.ConfigDict, size: int, count: int
) -> list[jax.Array]:
  """`count` dispatches' [S, K, B] batch indices of each seed (on the
  device), for steps 0, K, 2K, ..."""
  k, b = config.steps_per_dispatch, config.batch_size
  return [
    jnp.asarray(
      np.stack(
        [input_pipeline.batch_indices(s, i * k, k, b, size) for s in seeds]
      )
    )
    for i in range(count)
  ]


def train_steps_timer(config: ml_collections.ConfigDict, data: jax.Array):
  """The training loop's compiled K-step function, to time in phases.

  `train.compile_train_steps` on one device (K = config.steps_per_dispatch
  steps in one scan, each gathering its batch from `data`), called
  back-to-back with indices already on the device: the loop without its
  host side (index computation, logging, evaluation).

  Args:
    config: the run's config.
    data: [M, H, W] uint8 training images on the device.

  Returns:
    A function (num_blocks, per_block) -> seconds per training step of each
    timed block (a call is one dispatch of K steps).
  """
  model = configuration.create_model(config)
  loss_config = configuration.loss_config(config)
  state, tx = train.create_train_state(config, model)
  k, b = config.steps_per_dispatch, config.batch_size
  step_fn = train.compile_train_steps(
    model,
    tx,
    loss_config,
    config.seed,
    1,
    state,
    data,
    jax.ShapeDtypeStruct((1, k, b), jnp.int32),
  )
  # On one device the indices are [1, K, B]: seed config.seed's batches.
  indices = _index_batches([config.seed], config, data.shape[0], 8)
  holder = {'state': state, 'call': 0}

  def dispatch():
    idx = indices[holder['call'] % len(indices)]
    holder['state'], metrics = step_fn(holder['state'], data, idx)
    jax.block_until_ready(metrics)
    holder['call'] += 1

  dispatch()  # Warm-up.

  def timer(num_blocks: int, per_block: int) -> list[float]:
    return [t / k for t in time_blocks(dispatch, num_blocks, per_block)]

  return timer


def sweep_seconds_per_dispatch(
  config: ml_collections.ConfigDict,
  data: jax.Array,
  num_seeds: int,
  num_blocks: int,
  per_block: int,
  vmapped: bool = True,
) -> list[float]:
  """Seconds per call (K steps of each of S seeds) of a sweep's program.

  `sweep.train_sweep`'s programs, built the same way: jit(vmap(train_steps))
  over the members' states, batch indices and seeds (`vmapped`), or one
  jitted train_steps with the seed as an argument applied to each member in
  turn; the data shared. The members start from one state (the seeds still
  give each its own samples and batches); the cost does not depend on the
  parameter values.

  Args:
    config: the run's config.
    data: [M, H, W] uint8 training images on the device.
    num_seeds: S.
    num_blocks: timed blocks.
    per_block: calls per block.

  Returns:
    Seconds per call of each timed block.
  """
  model = configuration.create_model(config)
  loss_config = configuration.loss_config(config)
  state, tx = train.create_train_state(config, model)
  fn = functools.partial(
    train.train_steps,
    model=model,
    tx=tx,
    loss_config=loss_config,
    axis_name=None,
  )

  def member_steps(st, images, idx, seed):
    return fn(st, images, idx, seed=seed)

  seeds = list(range(config.seed, config.seed + num_seeds))
  seed_array = jnp.asarray(seeds, jnp.int32)
  indices = _index_batches(seeds, config, data.shape[0], 4)
  if vmapped:
    state = jax.tree.map(lambda x: jnp.stack([x] * num_seeds), state)
    vmapped_fn = jax.jit(
      jax.vmap(member_steps, in_axes=(0, None, 0, 0)), donate_argnums=(0,)
    )

    def step_fn(st, images, idx, seed_array):
      return vmapped_fn(st, images, idx, seed_array)

  else:
    state = [jax.tree.map(jnp.copy, state) for _ in seeds]
    one_fn = jax.jit(member_steps, donate_argnums=(0,))

    def step_fn(st, images, idx, seed_array):
      out = [
        one_fn(s, images, i, seed) for s, i, seed in zip(st, idx, seed_array)
      ]
      return [s for s, _ in out], [m for _, m in out]

  holder = {'state': state, 'call': 0}

  def dispatch():
    idx = indices[holder['call'] % len(indices)]
    holder['state'], metrics = step_fn(holder['state'], data, idx, seed_array)
    jax.block_until_ready(metrics)
    holder['call'] += 1

  dispatch()  # Compile and warm up.
  return time_blocks(dispatch, num_blocks, per_block)


def matmul_flop_per_s(n: int = 2048, num_blocks: int = 5) -> float:
  """FLOP/s of an [n, n] @ [n, n] float32 matmul (best block)."""
  a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  times = time_blocks(lambda: jax.block_until_ready(f(a)), num_blocks, 3)
  return 2 * n**3 / float(np.min(times))


def pipeline_images_per_s(num_blocks: int = 5, per_block: int = 200) -> float:
  """Images/s of the host-side `input_pipeline.TrainIterator` (batch 64,
  uint8 -> float32 on the host). Training itself gathers its batches on
  the device; the iterator serves host-side readers of the data."""
  rng = np.random.default_rng(0)
  split = input_pipeline.Split(
    images=rng.integers(0, 255, (60000, 50, 50), dtype=np.uint8),
    num_objects=rng.integers(0, 3, 60000).astype(np.int32),
    boxes=np.full((60000, 3, 4), -1, np.int32),
    labels=np.full((60000, 3), -1, np.int32),
  )
  it = input_pipeline.TrainIterator(split, 0, 64, 0)
  next(it)
  times = time_blocks(lambda: next(it), num_blocks, per_block)
  return 64 / float(np.median(times))


def _train_args(workdir: str, overrides: dict, cache: str = '') -> list[str]:
  """Flags of `experiments.train` on configs/default.py with overrides."""
  return [
    '--config=configs/default.py',
    f'--workdir={workdir}',
    f'--compilation_cache={cache}',
    *(f'--config.{k}={v}' for k, v in overrides.items()),
  ]


def _run_training(args: list[str], what: str) -> subprocess.CompletedProcess:
  """Runs `python -m experiments.train <args>` in the repository root."""
  proc = subprocess.run(
    [sys.executable, '-m', 'experiments.train', *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode:
    raise RuntimeError(f'{what} failed: {proc.stderr[-2000:]}')
  return proc


def _train_records(workdir: str) -> list[dict]:
  """The 'train/...' lines of a run's metrics.jsonl, by step."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return sorted(
    (r for r in records if 'train/unix_time' in r), key=lambda r: r['step']
  )


class LoopTiming(NamedTuple):
  """End-to-end throughput of the training loop.

  Attributes:
    images_per_s: images trained between the first and the last logged
      step / the wall time between their log lines.
    timed_steps: steps between those two log lines.
  """

  images_per_s: float
  timed_steps: int


def _no_periodic_work(num_train_steps: int, **more) -> dict:
  """Config overrides for a timed training subprocess: `num_train_steps`,
  evaluation, pictures and checkpoints pushed beyond the run, and `more`."""
  return {
    'num_train_steps': num_train_steps,
    'eval_every_steps': FAR,
    'image_every_steps': FAR,
    'checkpoint_every_steps': FAR,
    **more,
  }


def loop_images_per_s(
  config: ml_collections.ConfigDict, num_steps: int
) -> LoopTiming:
  """Trains configs/default.py for num_steps in a subprocess, on the full
  dataset, without a compilation cache, and times the loop between its
  first and last log lines.

  Evaluation, pictures and checkpoints are pushed beyond the run, so the
  span holds only what every step between evaluations pays: dispatches,
  batch indices and the log lines (every config.log_every_steps). The
  final step evaluates, but after its log line is stamped.
  """
  workdir = tempfile.mkdtemp(prefix='air_bench_loop_')
  overrides = _no_periodic_work(
    num_steps,
    eval_max_examples=_FINAL_EVAL_EXAMPLES,
    # As the step it is compared with.
    **{'model.skip_finished': config.model.skip_finished},
  )
  try:
    _run_training(_train_args(workdir, overrides), 'loop training run')
    records = _train_records(workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  if len(records) < 2:
    raise RuntimeError(
      f'loop run logged {len(records)} steps; need 2 (num_steps {num_steps} '
      f'< 2 * log_every_steps {config.log_every_steps}?).'
    )
  first, last = records[0], records[-1]
  steps = last['step'] - first['step']
  seconds = last['train/unix_time'] - first['train/unix_time']
  return LoopTiming(steps * config.batch_size / seconds, steps)


def startup_seconds(
  config: ml_collections.ConfigDict, num_runs: int = 2
) -> list[float]:
  """Seconds from process start to the first logged step, per run.

  Runs the same short training (configs/default.py, K =
  config.steps_per_dispatch steps, logged at step K) `num_runs` times, each
  in a fresh workdir, all sharing one fresh compilation cache: the first
  run fills it, later ones read it. The clock starts just before the
  process is started and stops at the log line's unix_time. The dataset
  must be built already (`prepare_dataset`), so building is not counted.
  """
  k = config.steps_per_dispatch
  overrides = _no_periodic_work(
    k, log_every_steps=k, eval_max_examples=_FINAL_EVAL_EXAMPLES
  )
  root = tempfile.mkdtemp(prefix='air_bench_startup_')
  cache = os.path.join(root, 'cache')
  seconds = []
  try:
    for run in range(num_runs):
      workdir = os.path.join(root, f'run_{run}')
      start = time.time()
      _run_training(_train_args(workdir, overrides, cache), 'start-up run')
      records = [r for r in _train_records(workdir) if r['step'] == k]
      if not records:
        raise RuntimeError(f'start-up run logged no step {k}.')
      seconds.append(records[0]['train/unix_time'] - start)
  finally:
    shutil.rmtree(root, ignore_errors=True)
  return seconds


# Runs experiments.train, then reports its own peak RSS.
_RSS_CHILD = """
import runpy, sys
sys.argv = ['experiments.train'] + sys.argv[1:]
try:
  runpy.run_module('experiments.train', run_name='__main__')
except SystemExit as e:
  if e.code not in (0, None):
    raise
status = dict(l.split(':', 1) for l in open('/proc/self/status'))
print('VMHWM_KB', status['VmHWM'].split()[0])
"""


def peak_rss_mib_of_training(num_steps: int = 300) -> float:
  """Peak RSS (MiB) of experiments.train (configs/default.py: the full
  training split on the device) in a child process.

  The child reports its own VmHWM: the rusage of a child forked from this
  (by then large) process would include this process's pages, since Linux
  carries the peak across exec. No compilation cache: the run compiles,
  as a first run does, whatever the state of the user's cache.
  """
  workdir = tempfile.mkdtemp(prefix='air_bench_rss_')
  overrides = _no_periodic_work(num_steps)
  try:
    proc = subprocess.run(
      [sys.executable, '-c', _RSS_CHILD, *_train_args(workdir, overrides)],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=False,
    )
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  lines = [x for x in proc.stdout.splitlines() if x.startswith('VMHWM_KB ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'RSS training run failed: {proc.stderr[-2000:]}')
  return int(lines[-1].split()[1]) / 1024
