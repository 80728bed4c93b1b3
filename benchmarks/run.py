r"""Speed and memory of AIR at the paper's sizes: `make bench`.

  python -m benchmarks.run [--quick] [--output=benchmarks/results.json]

Measures (warm-up first, then several timed blocks; median and min):
  * training throughput of the jitted train step at batch 16 ... 512;
  * compile time of the step, and that it is traced once;
  * inference (deterministic guide pass) ms/image at batch 1 and 64;
  * the train step's cost against max_steps = 1 ... 8;
  * the data pipeline's images/s;
  * FLOPs of a train step and an inference pass (XLA's cost analysis) and
    this CPU's large-matmul FLOP/s, i.e. the hardware floor;
  * peak RSS of a real training run on the full dataset (subprocess);
  * the image projection's share of batch-64 inference, training and
    inference with a rolled `lax.scan` (unroll=1) instead of the default
    fully unrolled one, and, on CPU, under XLA:CPU's older runtime (a
    subprocess with --xla_cpu_use_thunk_runtime=false).
Pyro's numbers (issue #5, pyro-ppl 1.9.1 on a 2-core CPU) are quoted for
comparison, not re-measured here.
"""

import functools
import json
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from air_jax import evaluation
from air_jax import input_pipeline
from air_jax import train
from configs import default

_OUTPUT = flags.DEFINE_string(
  'output', 'benchmarks/results.json', 'Where to write the results.'
)
_QUICK = flags.DEFINE_bool('quick', False, 'Fewer sizes and repeats.')
_RSS = flags.DEFINE_bool('rss', True, 'Measure peak RSS of a training run.')

PYRO = {
  'train_images_per_s': 405.0,
  'infer_ms_per_image_b64': 0.40,
  'infer_ms_per_image_b1': 7.1,
  'peak_rss_mib': 1126.0,
}


def _blocks(fn, blocks: int, per_block: int) -> list[float]:
  """Seconds per call of fn() in each block (fn must block until done)."""
  times = []
  for _ in range(blocks):
    t = time.perf_counter()
    for _ in range(per_block):
      fn()
    times.append((time.perf_counter() - t) / per_block)
  return times


def _median_and_min(times: list[float]) -> tuple[float, float]:
  return float(np.median(times)), float(np.min(times))


def bench_train(config, blocks, per_block):
  """(seconds per step of each timed block, compile s, traces) of the step."""
  model = train.create_model(config)
  settings = train.loss_settings(config)
  state, tx = train.create_train_state(config, model)
  traces = []

  def counted(state, images):
    traces.append(1)
    return train.train_step(
      state,
      images,
      model=model,
      tx=tx,
      settings=settings,
      seed=0,
      axis_name=None,
    )

  step = jax.jit(counted, donate_argnums=(0,))
  images = jnp.asarray(
    np.random.default_rng(0).random((config.batch_size, 50, 50), np.float32)
  )
  t = time.perf_counter()
  state, metrics = step(state, images)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t
  holder = [state]

  def one():
    holder[0], m = step(holder[0], images)
    jax.block_until_ready(m)

  _blocks(one, 1, 3)  # Warm-up.
  times = _blocks(one, blocks, per_block)
  return times, compile_s, len(traces)


def bench_infer(config, batch, blocks, per_block):
  """ms/image of the inference pass in each timed block."""
  model = train.create_model(config)
  params = train.init_params(model, 0, 50)
  apply = evaluation.inference_pass(model)
  images = jnp.asarray(
    np.random.default_rng(0).random((batch, 50, 50), np.float32)
  )
  jax.block_until_ready(apply(params, images))
  times = _blocks(
    lambda: jax.block_until_ready(apply(params, images)), blocks, per_block
  )
  return [1000 * t / batch for t in times]


def bench_projection(config, batch, blocks, per_block):
  """ms/image of the image projection alone ([B, H*W] @ [H*W, 4F] + bias).

  The one large matmul of an inference pass: the rest of the pass (the N
  recurrent steps) is the total minus this.
  """
  size = config.model.image_size
  rng = np.random.default_rng(0)
  kernel = jnp.asarray(
    rng.normal(size=(size * size, 4 * config.model.lstm_size)), jnp.float32
  )
  bias = jnp.zeros((4 * config.model.lstm_size,), jnp.float32)
  images = jnp.asarray(rng.random((batch, size * size), np.float32))
  project = jax.jit(lambda x, w, b: x @ w + b)
  jax.block_until_ready(project(images, kernel, bias))
  times = _blocks(
    lambda: jax.block_until_ready(project(images, kernel, bias)),
    blocks,
    per_block,
  )
  return 1000 * float(np.median(times)) / batch


_LEGACY_RUNTIME = '--xla_cpu_use_thunk_runtime=false'


def legacy_runtime_numbers(quick: bool) -> dict[str, float]:
  """Train images/s and batch-64 inference ms/image under XLA:CPU's older
  (non-thunk) runtime, measured in a child process (the flag is global)."""
  code = (
    'import json; from benchmarks import run; from configs import default; '
    f'blocks, per = {(3, 5) if quick else (5, 10)}; '
    'import numpy as np; c = default.get_config(); '
    'med = np.median(run.bench_train(c, blocks, per)[0]); '
    'inf = np.median(run.bench_infer(c, 64, blocks, 10)); '
    'print("RESULT", json.dumps({"train_images_per_s": 64 / med, '
    '"infer_ms_per_image_b64": inf}))'
  )
  env = dict(os.environ, XLA_FLAGS=_LEGACY_RUNTIME)
  proc = subprocess.run(
    [sys.executable, '-c', code],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  lines = [x for x in proc.stdout.splitlines() if x.startswith('RESULT ')]
  if proc.returncode or not lines:
    print(f'legacy runtime not measured: {proc.stderr[-300:]}', flush=True)
    return {}
  return {
    f'{k}_legacy_cpu_runtime': v for k, v in json.loads(lines[0][7:]).items()
  }


def flops(config):
  """XLA's FLOP count of one train step and one inference pass (batch B)."""
  model = train.create_model(config)
  settings = train.loss_settings(config)
  state, tx = train.create_train_state(config, model)
  images = jnp.zeros((config.batch_size, 50, 50), jnp.float32)
  step = jax.jit(
    functools.partial(
      train.train_step,
      model=model,
      tx=tx,
      settings=settings,
      seed=0,
      axis_name=None,
    )
  )
  train_cost = step.lower(state, images).compile().cost_analysis()
  apply = evaluation.inference_pass(model)
  infer_cost = apply.lower(state.params, images).compile().cost_analysis()

  def get(cost):
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', float('nan')))

  return get(train_cost) / config.batch_size, get(
    infer_cost
  ) / config.batch_size


def matmul_flops_per_s(n=2048, blocks=5):
  a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
  f = jax.jit(lambda a: a @ a)
  jax.block_until_ready(f(a))
  times = _blocks(lambda: jax.block_until_ready(f(a)), blocks, 3)
  return 2 * n**3 / float(np.min(times))


def bench_pipeline(blocks=5, per_block=200):
  rng = np.random.default_rng(0)
  split = input_pipeline.Split(
    images=rng.integers(0, 255, (60000, 50, 50), dtype=np.uint8),
    num_objects=rng.integers(0, 3, 60000).astype(np.int32),
    boxes=np.full((60000, 3, 4), -1, np.int32),
    labels=np.full((60000, 3), -1, np.int32),
  )
  it = input_pipeline.TrainIterator(split, 0, 64, 0)
  next(it)
  times = _blocks(lambda: next(it), blocks, per_block)
  return 64 / float(np.median(times))


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


def peak_rss_of_training(steps=300):
  """Peak RSS (MiB) of experiments.train on the full dataset, in a child.

  The child reports its own VmHWM: the rusage of a child forked from this
  (by then large) process would include this process's pages, since Linux
  carries the peak across exec.
  """
  workdir = f'/tmp/air_bench_rss_{os.getpid()}'
  cmd = [
    sys.executable,
    '-c',
    _RSS_CHILD,
    '--config=configs/default.py',
    f'--workdir={workdir}',
    f'--config.num_train_steps={steps}',
    '--config.eval_every_steps=100000',
    '--config.image_every_steps=100000',
    '--config.checkpoint_every_steps=100000',
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  subprocess.run(['rm', '-rf', workdir], check=False)
  lines = [x for x in proc.stdout.splitlines() if x.startswith('VMHWM_KB ')]
  if proc.returncode or not lines:
    raise RuntimeError(f'RSS training run failed: {proc.stderr[-2000:]}')
  return int(lines[-1].split()[1]) / 1024


def main(argv):
  del argv
  quick = _QUICK.value
  blocks, per_block = (3, 5) if quick else (5, 10)
  base = default.get_config()
  results = {
    'date': time.strftime('%Y-%m-%d %H:%M'),
    'machine': f'{platform.processor() or platform.machine()}, '
    f'{os.cpu_count()} cores, {jax.devices()[0].device_kind}',
    'jax': jax.__version__,
  }
  # The headline configuration (batch 64, default max_steps) is timed in
  # several phases minutes apart (batch sweep, max_steps sweep; inference
  # at the start and the end) and the blocks pooled: on a shared machine a
  # slow minute then moves the median less.
  headline_train, headline_infer = [], []
  batches = (16, 64, 256) if quick else (16, 32, 64, 128, 256, 512)
  for b in batches:
    config = default.get_config()
    config.batch_size = b
    times, compile_s, traces = bench_train(config, blocks, per_block)
    med, low = _median_and_min(times)
    results[f'train_images_per_s_b{b}'] = b / med
    results[f'train_images_per_s_b{b}_best'] = b / low
    if b == base.batch_size:
      headline_train += times
      results['compile_s'] = compile_s
      results['train_step_traces'] = traces
    print(f'batch {b}: {b / med:.0f} images/s (best {b / low:.0f})', flush=True)
  headline_infer += bench_infer(base, 64, blocks, 10)
  for n in (1, 2, 3, 4, 6, 8) if not quick else (1, 3, 8):
    config = default.get_config()
    config.model.max_steps = n
    times = bench_train(config, blocks, per_block)[0]
    if n == base.model.max_steps:
      headline_train += times
    ms = 1000 * _median_and_min(times)[0]
    results[f'train_ms_per_step_max_steps{n}'] = ms
    print(f'max_steps {n}: {ms:.1f} ms/step', flush=True)
  med, low = _median_and_min(headline_train)
  results['train_images_per_s'] = base.batch_size / med
  results['train_images_per_s_best'] = base.batch_size / low
  results['train_ms_per_step'] = 1000 * med
  results['train_timed_blocks'] = len(headline_train)
  results['infer_ms_per_image_b1'], results['infer_ms_per_image_b1_best'] = (
    _median_and_min(bench_infer(base, 1, blocks, 20))
  )
  results['infer_b64_projection_ms_per_image'] = bench_projection(
    base, 64, blocks, 10
  )
  config = default.get_config()
  config.model.unroll = 1
  med = float(np.median(bench_train(config, blocks, per_block)[0]))
  results['train_images_per_s_rolled_scan'] = config.batch_size / med
  results['infer_ms_per_image_b64_rolled_scan'] = float(
    np.median(bench_infer(config, 64, blocks, 10))
  )
  if jax.default_backend() == 'cpu':
    results.update(legacy_runtime_numbers(quick))
  results['pipeline_images_per_s'] = bench_pipeline()
  headline_infer += bench_infer(base, 64, blocks, 10)
  results['infer_ms_per_image_b64'], results['infer_ms_per_image_b64_best'] = (
    _median_and_min(headline_infer)
  )
  train_flops, infer_flops = flops(base)
  results['train_mflop_per_image'] = train_flops / 1e6
  results['infer_mflop_per_image'] = infer_flops / 1e6
  # A matmul large enough to keep the device busy (GPU: launch costs).
  size = 2048 if jax.default_backend() == 'cpu' else 8192
  results['matmul_gflop_per_s'] = matmul_flops_per_s(size) / 1e9
  peak = results['matmul_gflop_per_s'] * 1e9
  results['train_fraction_of_matmul_peak'] = (
    results['train_images_per_s'] * train_flops / peak
  )
  results['infer_b64_fraction_of_matmul_peak'] = (
    infer_flops / (results['infer_ms_per_image_b64'] / 1000) / peak
  )
  if _RSS.value:
    results['peak_rss_mib'] = peak_rss_of_training()
  results['pyro_reference'] = PYRO
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  with open(_OUTPUT.value, 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  print(format_table(results))


def format_table(r) -> str:
  rows = [
    (
      'train images/s (batch 64)',
      r['train_images_per_s'],
      PYRO['train_images_per_s'],
    ),
    (
      'infer ms/image (batch 64)',
      r['infer_ms_per_image_b64'],
      PYRO['infer_ms_per_image_b64'],
    ),
    (
      'infer ms/image (batch 1)',
      r['infer_ms_per_image_b1'],
      PYRO['infer_ms_per_image_b1'],
    ),
    (
      'peak RSS MiB (training)',
      r.get('peak_rss_mib', float('nan')),
      PYRO['peak_rss_mib'],
    ),
  ]
  out = [f'{"metric":<28} {"air_jax":>10} {"Pyro":>8} {"ratio":>7}']
  for name, ours, pyro in rows:
    if ours != ours:  # NaN: not measured (--rss=false).
      out.append(f'{name:<28} {"-":>10} {pyro:>8.4g}')
      continue
    ratio = ours / pyro if 'images/s' in name else pyro / ours
    out.append(f'{name:<28} {ours:>10.4g} {pyro:>8.4g} {ratio:>6.1f}x')
  out.append(
    f'compile s: {r["compile_s"]:.1f}, traces: {r["train_step_traces"]}'
  )
  out.append(
    f'FLOPs/image: train {r["train_mflop_per_image"]:.1f} M, infer '
    f'{r["infer_mflop_per_image"]:.1f} M; matmul {r["matmul_gflop_per_s"]:.0f} '
    f'GFLOP/s; train at {100 * r["train_fraction_of_matmul_peak"]:.0f}% and '
    f'infer b64 at {100 * r["infer_b64_fraction_of_matmul_peak"]:.0f}% of it'
  )

  def series(prefix):
    """(size, value) of each key prefix<int>, by increasing size."""
    found = {
      int(k[len(prefix) :]): v
      for k, v in r.items()
      if k.startswith(prefix) and k[len(prefix) :].isdigit()
    }
    return sorted(found.items())

  curve = ', '.join(f'{b}: {v:.0f}' for b, v in series('train_images_per_s_b'))
  out.append(f'train images/s by batch: {curve}')
  steps = ', '.join(
    f'{n}: {v:.1f}' for n, v in series('train_ms_per_step_max_steps')
  )
  out.append(f'train ms/step by max_steps: {steps}')
  out.append(
    f'infer b64: image projection alone '
    f'{r["infer_b64_projection_ms_per_image"]:.4f} ms/image of '
    f'{r["infer_ms_per_image_b64"]:.4f}'
  )
  if 'train_images_per_s_rolled_scan' in r:
    out.append(
      f'with a rolled scan (unroll=1): train '
      f'{r["train_images_per_s_rolled_scan"]:.0f} images/s, infer b64 '
      f'{r["infer_ms_per_image_b64_rolled_scan"]:.4f} ms/image'
    )
  if 'train_images_per_s_legacy_cpu_runtime' in r:
    out.append(
      f'with {_LEGACY_RUNTIME}: train '
      f'{r["train_images_per_s_legacy_cpu_runtime"]:.0f} images/s, infer b64 '
      f'{r["infer_ms_per_image_b64_legacy_cpu_runtime"]:.4f} ms/image'
    )
  out.append(f'data pipeline: {r["pipeline_images_per_s"]:.0f} images/s')
  return '\n'.join(out)


if __name__ == '__main__':
  app.run(main)
