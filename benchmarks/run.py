r"""Speed and memory of AIR at the paper's sizes: `make bench`.

  python -m benchmarks.run [--quick] [--rss=false] \
    [--output=benchmarks/results.json]

Writes the results (JSON; families of numbers as objects keyed by size),
a plot of the cost against max_steps next to them (max_steps.png), and
prints a table. Measured (benchmarks/measure.py; warm-up first, then
several timed blocks, median and best):
  * the jitted one-step train step at batch 16 ... 512, its compile time
    and that it is traced once;
  * the real training loop (experiments.train in a subprocess, full
    dataset, no compilation cache) against its bare compiled K-step
    function, both at batch 64;
  * start-up: process start to the first logged step, with an empty and
    then a filled compilation cache;
  * vmapped sweeps of S seeds (train.train_sweep's program);
  * inference (deterministic guide pass) ms/image at batch 1 and 64;
  * train and inference cost against max_steps (batch 64), for the default
    config and for the crowded one (configs/many_dair.py: 48 x 48, DAIR);
  * the grid model (configs/many.py), whose cost does not depend on the
    number of objects, for 4 x 4, 6 x 6 and 8 x 8 cells;
  * the same on real training canvases with the shipped AIR's parameters
    (pretrained/air), max_steps 3 and 10, finished steps skipped or not;
  * FLOPs of a train step and an inference pass (XLA's cost analysis) and
    this machine's large-matmul FLOP/s, i.e. the hardware floor;
  * the host data pipeline's images/s; the image projection's share of
    batch-64 inference; a rolled `lax.scan` (unroll=1);
  * peak RSS of a real training run on the full dataset (subprocess).
Pyro's numbers (pyro-ppl 1.9.1's AIR on a 2-core CPU) are quoted for
comparison, not re-measured here. The training subprocesses need the
multi_mnist dataset; it is built (if missing) before anything is timed.
"""

import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import numpy as np

from air_jax import visualization
from air_jax.configs import default
from air_jax.configs import many
from air_jax.configs import many_dair
from benchmarks import measure

_OUTPUT = flags.DEFINE_string(
  'output', 'benchmarks/results.json', 'Where to write the results.'
)
_QUICK = flags.DEFINE_bool('quick', False, 'Fewer sizes and repeats.')
_RSS = flags.DEFINE_bool('rss', True, 'Measure peak RSS of a training run.')
_REAL_PARAMS = flags.DEFINE_string(
  'real_params',
  'pretrained/air',
  'A default-config model (workdir or export) whose parameters time the '
  'real-canvas rows: one trained with max_steps 10 shows what a trained '
  'stop costs (pretrained/air never learnt to stop after step 3).',
)

PYRO = {
  'train_images_per_s': 405.0,
  'infer_ms_per_image_b64': 0.40,
  'infer_ms_per_image_b1': 7.1,
  'peak_rss_mib': 1126.0,
}


class _Plan:
  """What a run measures: sizes and repeats (full or --quick)."""

  def __init__(self, quick: bool):
    self.blocks, self.per_block = (3, 5) if quick else (5, 10)
    self.batches = (16, 64, 256) if quick else (16, 32, 64, 128, 256, 512)
    self.max_steps = (1, 3, 10) if quick else tuple(range(1, 11))
    # Logged steps 100 .. loop_steps: the default config's 1,000 steps between
    # evaluations in the full run.
    self.loop_steps = 200 if quick else 1_100
    self.sweep_seeds = (1, 2) if quick else (1, 2, 4, 10)
    self.sweep_per_block = 2


def _config(base=default, **fields):
  """A shipped config (module `base`) with top-level or 'model.<field>'
  overrides. Every step is computed (`skip_finished` off) unless an
  override says otherwise: on random images with initial parameters a
  skip would time whatever the untrained z_pres happens to do."""
  config = base.get_config()
  config.model.skip_finished = False
  for name, value in fields.items():
    if name.startswith('model_'):
      config.model[name[len('model_') :]] = value
    else:
      config[name] = value
  return config


def measure_all(plan: _Plan, rss: bool, real_params: str) -> dict:
  """Runs every measurement; returns the results (see the module doc)."""
  base = _config()
  b = base.batch_size
  r = {
    'date': time.strftime('%Y-%m-%d %H:%M'),
    'machine': f'{platform.processor() or platform.machine()}, '
    f'{os.cpu_count()} cores, {jax.devices()[0].device_kind}',
    'jax': jax.__version__,
    'load_average_at_start': os.getloadavg()[0],
    'steps_per_dispatch': base.steps_per_dispatch,
  }
  measure.prepare_dataset(base)  # Before any timing.
  # The headline configuration (batch 64, default max_steps) is timed in
  # several phases minutes apart (batch sweep, max_steps sweep; inference
  # at the start and the end) and the blocks pooled: on a shared machine a
  # slow minute then moves the median less.
  headline_train, headline_infer = [], []
  by_batch, best_by_batch = {}, {}
  for batch in plan.batches:
    timing = measure.train_step_times(
      _config(batch_size=batch), plan.blocks, plan.per_block
    )
    med, low = measure.median_and_min(timing.seconds_per_step)
    by_batch[str(batch)], best_by_batch[str(batch)] = batch / med, batch / low
    r[f'train_images_per_s_b{batch}'] = batch / med
    r[f'train_images_per_s_b{batch}_best'] = batch / low
    if batch == b:
      headline_train += timing.seconds_per_step
      r['compile_s'] = timing.compile_s
      r['train_step_traces'] = timing.traces
      r['train_mflop_per_image'] = timing.mflop_per_image
    print(f'batch {batch}: {batch / med:.0f} images/s', flush=True)
  r['train_images_per_s_by_batch'] = by_batch
  r['train_images_per_s_best_by_batch'] = best_by_batch

  # The loop against its compiled step function, timed before and after
  # the loop's subprocess and pooled.
  data = measure.training_images(base)
  step_timer = measure.train_steps_timer(base, data)
  step_times = step_timer(plan.blocks, plan.per_block)
  loop = measure.loop_images_per_s(base, plan.loop_steps)
  step_times += step_timer(plan.blocks, plan.per_block)
  del step_timer
  r['loop_images_per_s'] = loop.images_per_s
  r['loop_timed_steps'] = loop.timed_steps
  r['step_images_per_s'] = b / float(np.median(step_times))
  r['loop_fraction_of_step'] = r['loop_images_per_s'] / r['step_images_per_s']
  print(
    f'loop {loop.images_per_s:.0f} images/s, step '
    f'{r["step_images_per_s"]:.0f} images/s',
    flush=True,
  )

  for module, suffix in ((default, ''), (many_dair, '_many')):
    timings = _cost_by_max_steps(plan, module)
    if module is default:
      times, infer = timings[str(base.model.max_steps)]
      headline_train += times.seconds_per_step
      headline_infer += infer.ms_per_image
      r['infer_mflop_per_image'] = infer.mflop_per_image
    r[f'train_ms_per_step_by_max_steps{suffix}'] = {
      n: 1000 * float(np.median(t.seconds_per_step))
      for n, (t, _) in timings.items()
    }
    r[f'infer_ms_per_image_by_max_steps{suffix}'] = {
      n: float(np.median(i.ms_per_image)) for n, (_, i) in timings.items()
    }
  for n, ms in r['train_ms_per_step_by_max_steps'].items():
    r[f'train_ms_per_step_max_steps{n}'] = ms
  r.update(_grid_cost(plan))
  r.update(_real_cost(plan, base, real_params))

  # A sweep as train_sweep runs it here (one vmapped program on an
  # accelerator, the members in turn on a CPU), and the other way.
  default_vmapped = jax.default_backend() != 'cpu'
  for key, vmapped in (
    ('sweep_images_per_s', default_vmapped),
    ('sweep_other_mode_images_per_s', not default_vmapped),
  ):
    sweep = {}
    for seeds in plan.sweep_seeds:
      times = measure.sweep_seconds_per_dispatch(
        base, data, seeds, plan.blocks, plan.sweep_per_block, vmapped=vmapped
      )
      images = seeds * base.steps_per_dispatch * b
      sweep[str(seeds)] = images / float(np.median(times))
      print(f'{key} {seeds}: {sweep[str(seeds)]:.0f}', flush=True)
    r[key] = sweep
  r['sweep_vmapped'] = default_vmapped
  # S runs one after another take S times as long as one run alone.
  r['sequential_images_per_s'] = r['step_images_per_s']
  del data

  r['infer_ms_per_image_b1'], r['infer_ms_per_image_b1_best'] = (
    measure.median_and_min(
      measure.infer_times(base, 1, plan.blocks, 20).ms_per_image
    )
  )
  r['infer_b64_projection_ms_per_image'] = measure.projection_ms_per_image(
    base, 64, plan.blocks, 10
  )
  rolled = _config(model_unroll=1)
  r['train_images_per_s_rolled_scan'] = b / float(
    np.median(
      measure.train_step_times(
        rolled, plan.blocks, plan.per_block
      ).seconds_per_step
    )
  )
  r['infer_ms_per_image_b64_rolled_scan'] = float(
    np.median(measure.infer_times(rolled, 64, plan.blocks, 10).ms_per_image)
  )
  r['pipeline_images_per_s'] = measure.pipeline_images_per_s()

  startup = measure.startup_seconds(base, 2)
  r['startup_s_first'], r['startup_s_second'] = startup
  print(f'start-up {startup[0]:.1f} s, then {startup[1]:.1f} s', flush=True)

  headline_infer += measure.infer_times(base, 64, plan.blocks, 10).ms_per_image
  med, low = measure.median_and_min(headline_train)
  r['train_images_per_s'] = b / med
  r['train_images_per_s_best'] = b / low
  r['train_ms_per_step'] = 1000 * med
  r['train_timed_blocks'] = len(headline_train)
  r['infer_ms_per_image_b64'], r['infer_ms_per_image_b64_best'] = (
    measure.median_and_min(headline_infer)
  )
  # A matmul large enough to keep the device busy (GPU: launch costs).
  size = 2048 if jax.default_backend() == 'cpu' else 8192
  r['matmul_gflop_per_s'] = measure.matmul_flop_per_s(size) / 1e9
  peak = r['matmul_gflop_per_s'] * 1e9
  r['train_fraction_of_matmul_peak'] = (
    r['train_images_per_s'] * r['train_mflop_per_image'] * 1e6 / peak
  )
  r['infer_b64_fraction_of_matmul_peak'] = (
    r['infer_mflop_per_image'] * 1e6 / (r['infer_ms_per_image_b64'] / 1000)
  ) / peak
  if rss:
    r['peak_rss_mib'] = measure.peak_rss_mib_of_training()
  r['load_average_at_end'] = os.getloadavg()[0]
  r['pyro_reference'] = PYRO
  return r


def _cost_by_max_steps(plan: _Plan, module) -> dict:
  """{'<max_steps>': (TrainTiming, InferTiming)} of a shipped config (batch
  64, random images, every step computed) for each of plan.max_steps."""
  timings = {}
  for n in plan.max_steps:
    config = _config(module, model_max_steps=n)
    times = measure.train_step_times(config, plan.blocks, plan.per_block)
    infer = measure.infer_times(config, 64, plan.blocks, 10)
    timings[str(n)] = (times, infer)
    print(
      f'{module.__name__.rsplit(".", 1)[-1]}, max_steps {n}: train '
      f'{1000 * np.median(times.seconds_per_step):.1f} ms/step, infer '
      f'{np.median(infer.ms_per_image):.4f} ms/image',
      flush=True,
    )
  return timings


def _grid_cost(plan: _Plan) -> dict:
  """Train ms/step and inference ms/image (batch 64) of the grid config
  with R x R cells, keyed by the number of cells R * R (the most objects):
  the same for a canvas of any number of objects."""
  train_ms, infer_ms = {}, {}
  for side in (4, 6, 8):
    config = _config(many, model_grid_size=(side, side))
    times = measure.train_step_times(config, plan.blocks, plan.per_block)
    infer = measure.infer_times(config, 64, plan.blocks, 10)
    cells = str(side * side)
    train_ms[cells] = 1000 * float(np.median(times.seconds_per_step))
    infer_ms[cells] = float(np.median(infer.ms_per_image))
    print(
      f'grid, {cells} cells: train {train_ms[cells]:.1f} ms/step, infer '
      f'{infer_ms[cells]:.4f} ms/image',
      flush=True,
    )
  return {
    'train_ms_per_step_by_cells_grid': train_ms,
    'infer_ms_per_image_by_cells_grid': infer_ms,
  }


def _real_cost(plan: _Plan, base, path: str) -> dict:
  """Train ms/step and inference ms/image on real training canvases (0-2
  digits, 8 batches of 64 in turn) with the parameters of the model at
  `path`, at max_steps 3 and 10, with finished steps skipped (the default)
  or computed: a batch's cost follows its objects, not max_steps."""
  if not os.path.isdir(path):
    print(f'{path} missing: no real-canvas rows', flush=True)
    return {}
  batches = measure.real_batches(base, 8)
  params = measure.trained_params(path, base)
  r = {'real_params': path}
  for skip, suffix in ((True, ''), (False, '_no_skip')):
    train_ms, infer_ms = {}, {}
    for n in (3, 10):
      config = _config(model_max_steps=n, model_skip_finished=skip)
      times = measure.train_step_times(
        config, plan.blocks, plan.per_block, batches, params
      )
      infer = measure.infer_times(config, 64, plan.blocks, 8, batches, params)
      train_ms[str(n)] = 1000 * float(np.median(times.seconds_per_step))
      infer_ms[str(n)] = float(np.median(infer.ms_per_image))
      print(
        f'real canvases, max_steps {n}, skip {skip}: train '
        f'{train_ms[str(n)]:.1f} ms/step, infer {infer_ms[str(n)]:.4f} '
        'ms/image',
        flush=True,
      )
    r[f'train_ms_per_step_real_by_max_steps{suffix}'] = train_ms
    r[f'infer_ms_per_image_real_by_max_steps{suffix}'] = infer_ms
  return r


def main(argv):
  del argv
  results = measure_all(_Plan(_QUICK.value), _RSS.value, _REAL_PARAMS.value)
  output = os.path.abspath(_OUTPUT.value)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  with open(output, 'w') as f:
    json.dump(results, f, indent=1, sort_keys=True)
  plot = os.path.join(os.path.dirname(output), 'max_steps.png')
  visualization.save_png(plot, max_steps_png(results))
  print(format_table(results))
  print(f'results: {output}; plot against max_steps: {plot}')


def _by_size(family: dict) -> list[tuple[int, float]]:
  """[(size, value)] of a family {'<size>': value}, by increasing size."""
  return sorted((int(k), v) for k, v in family.items())


def max_steps_png(r) -> np.ndarray:
  """[H, W, 3] uint8: train ms/step and inference ms/image (batch 64)
  against max_steps, side by side."""
  panels = []
  for key, title in (
    ('train_ms_per_step_by_max_steps', 'train ms/step (batch 64)'),
    ('infer_ms_per_image_by_max_steps', 'inference ms/image (batch 64)'),
  ):
    series = []
    for suffix, colour, name in (
      ('', 0, 'default (50x50, AIR)'),
      ('_many', 2, 'many_dair (48x48, DAIR)'),
    ):
      if key + suffix in r:
        points = np.array(_by_size(r[key + suffix]), float)
        colour = visualization.STEP_COLOURS[colour]
        series.append((points[:, 0], points[:, 1], colour, name))
    grid_key = key.replace('by_max_steps', 'by_cells') + '_grid'
    if grid_key in r and series:
      # The grid model costs the same for any count up to its 64 cells.
      flat = r[grid_key]['64']
      x = series[0][0]
      series.append(
        (
          x,
          np.full(len(x), flat),
          visualization.STEP_COLOURS[1],
          'grid (48x48, 64 cells)',
        )
      )
    panels.append(visualization._panel(series, title, 'max_steps'))
  return np.concatenate(panels, axis=1)


def _pyro_rows(r) -> list[str]:
  rows = [
    ('train images/s (batch 64)', 'train_images_per_s'),
    ('infer ms/image (batch 64)', 'infer_ms_per_image_b64'),
    ('infer ms/image (batch 1)', 'infer_ms_per_image_b1'),
    ('peak RSS MiB (training)', 'peak_rss_mib'),
  ]
  out = [f'{"metric":<28} {"air_jax":>10} {"Pyro":>8} {"ratio":>7}']
  for name, key in rows:
    pyro = PYRO[key]
    if key not in r:  # Not measured (--rss=false).
      out.append(f'{name:<28} {"-":>10} {pyro:>8.4g}')
      continue
    ours = r[key]
    ratio = ours / pyro if 'images/s' in name else pyro / ours
    out.append(f'{name:<28} {ours:>10.4g} {pyro:>8.4g} {ratio:>6.1f}x')
  return out


def _series(label: str, family: dict, fmt: str, width: int = 8) -> str:
  """One table line: a label, then a family's values by increasing size."""
  values = ''.join(f'{v:>{width}{fmt}}' for _, v in _by_size(family))
  return f'  {label:<26}{values}'


def _header(label: str, family: dict, width: int = 8) -> str:
  sizes = ''.join(f'{n:>{width}}' for n, _ in _by_size(family))
  return f'  {label:<26}{sizes}'


def format_table(r) -> str:
  """The results as text: the Pyro comparison, then a block per family
  (blocks whose numbers a results file lacks are left out)."""
  out = _pyro_rows(r)
  k = r.get('steps_per_dispatch', 'K')
  if 'loop_images_per_s' in r:
    out += [
      'training images/s, batch 64:',
      f'  {"real loop (experiments.train)":<34}'
      f'{r["loop_images_per_s"]:>8.0f}  ({r["loop_timed_steps"]} steps, '
      'no evaluation)',
      f'  {f"compiled {k}-step function":<34}{r["step_images_per_s"]:>8.0f}',
      f'  {"loop / step":<34}{100 * r["loop_fraction_of_step"]:>7.0f}%',
      f'  {"one train_step per dispatch":<34}{r["train_images_per_s"]:>8.0f}',
    ]
  if 'startup_s_first' in r:
    out += [
      f'start-up s, process start to step {k} logged (dataset prebuilt, '
      'not counted):',
      f'  {"first run (empty cache)":<34}{r["startup_s_first"]:>8.1f}',
      f'  {"second run (cache filled)":<34}{r["startup_s_second"]:>8.1f}',
    ]
  if 'sweep_images_per_s' in r:
    one = r['sequential_images_per_s']
    modes = {True: 'one vmapped program', False: 'members in turn'}
    for key, vmapped in (
      ('sweep_images_per_s', r['sweep_vmapped']),
      ('sweep_other_mode_images_per_s', not r['sweep_vmapped']),
    ):
      sweep = r[key]
      out += [
        f'sweep of S seeds ({modes[vmapped]}), total images/s:',
        _header('S', sweep),
        _series('images/s', sweep, '.0f'),
        _series(
          '/ one run alone', {s: v / one for s, v in sweep.items()}, '.2f'
        ),
      ]
    out.append(f'  (one run alone: {one:.0f}, the {k}-step function above)')
  for suffix, what in (
    ('', ''),
    ('_many', 'crowded DAIR config (configs/many_dair.py), '),
  ):
    if f'train_ms_per_step_by_max_steps{suffix}' in r:
      train_ms = r[f'train_ms_per_step_by_max_steps{suffix}']
      infer_ms = r[f'infer_ms_per_image_by_max_steps{suffix}']
      out += [
        f'{what}cost against max_steps (batch 64):',
        _header('max_steps', train_ms),
        _series('train ms/step', train_ms, '.1f'),
        _series('infer ms/image', infer_ms, '.4f'),
      ]
  if 'train_ms_per_step_by_cells_grid' in r:
    out += [
      'grid config (configs/many.py), cost against its cells, for any '
      'number of objects (batch 64):',
      _header('cells', r['train_ms_per_step_by_cells_grid']),
      _series('train ms/step', r['train_ms_per_step_by_cells_grid'], '.1f'),
      _series('infer ms/image', r['infer_ms_per_image_by_cells_grid'], '.4f'),
    ]
  if 'train_ms_per_step_real_by_max_steps' in r:
    out.append(
      f'real canvases (0-2 digits), parameters of {r["real_params"]}, batch 64:'
    )
    out.append(_header('max_steps', r['train_ms_per_step_real_by_max_steps']))
    for suffix, what in (('', 'skipped'), ('_no_skip', 'computed')):
      out += [
        _series(
          f'train ms/step ({what})',
          r[f'train_ms_per_step_real_by_max_steps{suffix}'],
          '.1f',
        ),
        _series(
          f'infer ms/image ({what})',
          r[f'infer_ms_per_image_real_by_max_steps{suffix}'],
          '.4f',
        ),
      ]
    out.append('  (skipped / computed: the steps after every example stopped)')
  if 'train_images_per_s_by_batch' in r:
    family = r['train_images_per_s_by_batch']
    out += [
      'one train_step per dispatch, images/s by batch:',
      _header('batch', family),
      _series('images/s', family, '.0f'),
    ]
  out.append(
    f'compile s: {r["compile_s"]:.1f}, traces: {r["train_step_traces"]}'
  )
  out.append(
    f'FLOPs/image: train {r["train_mflop_per_image"]:.1f} M, infer '
    f'{r["infer_mflop_per_image"]:.1f} M; matmul {r["matmul_gflop_per_s"]:.0f} '
    f'GFLOP/s; train at {100 * r["train_fraction_of_matmul_peak"]:.0f}% and '
    f'infer b64 at {100 * r["infer_b64_fraction_of_matmul_peak"]:.0f}% of it'
  )
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
  out.append(f'host data pipeline: {r["pipeline_images_per_s"]:.0f} images/s')
  if 'load_average_at_start' in r:
    out.append(
      f'machine: {r["machine"]}; load average {r["load_average_at_start"]:.1f}'
      f' at start, {r["load_average_at_end"]:.1f} at end'
    )
  return '\n'.join(out)


if __name__ == '__main__':
  app.run(main)
