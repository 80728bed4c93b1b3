"""Saving and loading runs: config files, exports, orbax checkpoints, models.

A training workdir holds `config.json` and `checkpoints/` (orbax, one folder
per step); an export holds `config.json` and `params.msgpack` (float32
inference parameters, no optimiser state, no baseline network). `load_model`
reads either, checks that the parameters fit the config and are finite, and
falls back to the newest intact checkpoint when newer ones are damaged.

Damaged checkpoints. A step folder that orbax cannot read, or whose
parameters or optimiser state are not finite, is damaged. Readers
(`load_model`: evaluate, infer, export) skip it and say so in one warning
line, changing nothing. A training run (`restore_train_state`) moves it to
`checkpoints/damaged-<step>` (a name orbax does not take for a step, so the
run can save that step again; nothing is deleted) and says so in one line.
Nothing is moved when no checkpoint is usable: that is more likely a
mismatch than damage, and the run stops with one line instead.
"""

import contextlib
import json
import logging as pylogging
import os
import shutil
import sys
import time

from absl import logging
import flax.serialization
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from air_jax import air
from air_jax import configuration
from air_jax import files

__all__ = [
  'CHECKPOINT_DIR',
  'CONFIG_FILE',
  'CheckpointError',
  'DAMAGED_PREFIX',
  'HISTORY_FILE',
  'PARAMS_FILE',
  'TrainingError',
  'all_finite',
  'check_resume_config',
  'check_same_structure',
  'checkpoint_manager',
  'config_json',
  'load_config',
  'load_model',
  'load_valid_config',
  'newest_usable',
  'restore_train_state',
  'save_config',
  'save_params',
  'steps',
]

CONFIG_FILE = 'config.json'
PARAMS_FILE = 'params.msgpack'
CHECKPOINT_DIR = 'checkpoints'
HISTORY_FILE = 'config_history.jsonl'
# Where a damaged step folder is moved, inside CHECKPOINT_DIR.
DAMAGED_PREFIX = 'damaged-'
# orbax's folder of the single item a CheckpointManager saves.
_ITEM_DIR = 'default'


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the message says which and why."""


class TrainingError(RuntimeError):
  """Training cannot go on; the message says why and what is kept."""


def _short(error: BaseException, limit: int = 160) -> str:
  """`Type: first line of the message`, cut to `limit` characters."""
  text = str(error).strip().splitlines()
  first = text[0] if text else ''
  if len(first) > limit:
    first = first[: limit - 3] + '...'
  return f'{type(error).__name__}: {first}' if first else type(error).__name__


# --- Keeping orbax's own reports of a failure off the terminal -------------
# We report each failed restore or save in one line ourselves. orbax logs the
# same failure with a traceback, and a failed read leaves tensorstore
# callbacks that fire on a closed asyncio loop (dozens of unraisable
# "Event loop is closed" tracebacks, and "Task exception was never
# retrieved"). These filters drop exactly those.


class _DropOrbaxRecords(pylogging.Filter):
  def filter(self, record: pylogging.LogRecord) -> bool:
    path = record.pathname or ''
    return not ('orbax' in path or 'tensorstore' in path)


class _DropLostTaskErrors(pylogging.Filter):
  def filter(self, record: pylogging.LogRecord) -> bool:
    return not str(record.msg).startswith('Task exception was never retrieved')


def _is_closed_loop_error(args) -> bool:
  return isinstance(args.exc_value, RuntimeError) and (
    str(args.exc_value) == 'Event loop is closed'
  )


def _install_quiet_hooks() -> None:
  hook = sys.unraisablehook
  if not getattr(hook, '_air_jax_quiet', False):

    def quiet(args, _next=hook):
      if not _is_closed_loop_error(args):
        _next(args)

    quiet._air_jax_quiet = True  # pylint: disable=protected-access
    sys.unraisablehook = quiet
  asyncio_logger = pylogging.getLogger('asyncio')
  if not any(
    isinstance(f, _DropLostTaskErrors) for f in asyncio_logger.filters
  ):
    asyncio_logger.addFilter(_DropLostTaskErrors())


@contextlib.contextmanager
def _quiet_orbax():
  """Drops orbax's log records while a restore or save we report runs."""
  _install_quiet_hooks()
  absl_logger = pylogging.getLogger('absl')
  drop = _DropOrbaxRecords()
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)


# --- Config files ----------------------------------------------------------


def config_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


# Config changes accepted by check_resume_config, recorded once the run's
# config.json is rewritten (by save_config, after a successful restore).
_PENDING_HISTORY: dict[str, dict] = {}


def save_config(config: ml_collections.ConfigDict, directory: str) -> None:
  """Writes `directory/config.json` atomically (and records a config change
  that `check_resume_config` accepted for this directory)."""
  files.write_text(os.path.join(directory, CONFIG_FILE), config_json(config))
  record = _PENDING_HISTORY.pop(os.path.abspath(directory), None)
  if record is not None:
    files.append_line(
      os.path.join(directory, HISTORY_FILE), json.dumps(record, default=str)
    )


def load_config(directory: str) -> ml_collections.ConfigDict:
  """Reads `directory/config.json` (CheckpointError if unreadable).

  Older formats are brought up to date by `configuration.upgrade` (fields
  added since take their defaults, which keep the old behaviour), so older
  runs and exports still load; unknown fields are kept, for `validate` to
  reject.
  """
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except FileNotFoundError as e:
    raise CheckpointError(
      f'{directory}: no {CONFIG_FILE}, not an air_jax run or export.'
    ) from e
  except (OSError, ValueError) as e:
    raise CheckpointError(f'{path}: unreadable config ({_short(e)}).') from e
  if not isinstance(raw, dict):
    raise CheckpointError(f'{path}: not a config (a JSON object expected).')
  try:
    config = configuration.upgrade(raw)
  except configuration.ConfigError as e:
    raise CheckpointError(f'{path}: {e}') from e
  return config


# --- Parameters ------------------------------------------------------------


def all_finite(tree) -> bool:
  """Whether every floating leaf of a pytree is finite."""
  for x in jax.tree.leaves(tree):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
      return False
  return True


def _trained_parts(tree):
  """(params, opt_state) of a TrainState or its restored dict, else tree."""
  if isinstance(tree, dict) and 'params' in tree:
    return tree['params'], tree.get('opt_state')
  if hasattr(tree, 'params') and hasattr(tree, 'opt_state'):
    return tree.params, tree.opt_state
  return tree


def save_params(params, directory: str, config: ml_collections.ConfigDict):
  """Writes a standalone inference export: float32 params + config.

  The REINFORCE baseline network (not needed to infer or generate) is
  dropped and `model.use_baseline`/`normalised_baseline` set to False. Each
  file is written atomically, parameters first.

  Raises:
    CheckpointError: the parameters are not finite (nothing is written).
  """
  params = jax.tree.map(
    lambda x: np.asarray(x, np.float32), jax.device_get(params)
  )
  if not all_finite(params):
    raise CheckpointError(
      f'{directory}: the parameters hold NaN or infinite values; not '
      'exporting them.'
    )
  params = {k: v for k, v in params.items() if k != 'baseline'}
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.use_baseline = False
  config.normalised_baseline = False
  data = flax.serialization.msgpack_serialize(params)
  files.write_bytes(os.path.join(directory, PARAMS_FILE), data)
  save_config(config, directory)


def check_same_structure(template, raw) -> None:
  """Raises CheckpointError unless `raw` has `template`'s names and shapes
  and floating-point leaves."""
  want = {
    jax.tree_util.keystr(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_leaves_with_path(template)
  }
  have = {}
  for p, x in jax.tree_util.tree_leaves_with_path(raw):
    name = jax.tree_util.keystr(p)
    if not isinstance(x, np.ndarray | jax.Array | np.generic):
      raise CheckpointError(
        f'parameter {name} is a {type(x).__name__}, not an array.'
      )
    if not np.issubdtype(x.dtype, np.floating):
      raise CheckpointError(
        f'parameter {name} has dtype {x.dtype}, expected floats.'
      )
    have[name] = tuple(np.shape(x))
  if want != have:
    diff = sorted(set(want.items()) ^ set(have.items()))[:3]
    raise CheckpointError(
      'the checkpoint does not fit the config (parameter names or shapes '
      'differ, '
      f'e.g. {diff}).'
    )


# --- Step folders ----------------------------------------------------------


def steps(checkpoint_dir: str) -> list[int]:
  """The steps saved under `checkpoint_dir`, newest first (orbax names a
  finished step's folder by the step; its temp folders and damaged-* are
  not steps)."""
  try:
    names = os.listdir(checkpoint_dir)
  except FileNotFoundError:
    return []
  steps = [
    int(n)
    for n in names
    if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, n))
  ]
  return sorted(steps, reverse=True)


def _read_step(checkpoint_dir: str, step: int) -> dict:
  """The raw tree (numpy arrays) saved at `step`; raises if it is damaged."""
  item = os.path.join(checkpoint_dir, str(step), _ITEM_DIR)
  if not os.path.isdir(item):
    raise FileNotFoundError(f'{_ITEM_DIR}/ is missing')
  with _quiet_orbax(), ocp.StandardCheckpointer() as checkpointer:
    path = os.path.abspath(item)
    claimed = _claimed_bytes(checkpointer.metadata(path))
    if claimed > _memory_bytes():
      raise ValueError(
        f'its metadata claims {claimed / 2**30:.1f} GiB of arrays, more '
        'than this machine has'
      )
    raw = checkpointer.restore(path)
  if not isinstance(raw, dict) or not isinstance(raw.get('params'), dict):
    raise ValueError('it holds no parameters')
  return raw


def _memory_bytes() -> int:
  """Half the machine's physical memory: the most a checkpoint may take."""
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') // 2
  except (ValueError, OSError, AttributeError):
    return 8 << 30


def _claimed_bytes(metadata) -> int:
  """The bytes the arrays of a checkpoint's metadata claim (read before
  restoring, so a corrupt size claim is refused, not allocated)."""
  tree = getattr(metadata, 'item_metadata', metadata)
  leaves = jax.tree.leaves(tree, is_leaf=lambda x: hasattr(x, 'shape'))
  total = 0
  for leaf in leaves:
    shape = getattr(leaf, 'shape', None) or ()
    dtype = getattr(leaf, 'dtype', None)
    itemsize = np.dtype(dtype).itemsize if dtype is not None else 8
    total += int(np.prod(shape, dtype=np.float64)) * itemsize
  return total


def _problem(checkpoint_dir: str, step: int, with_optimiser: bool):
  """(raw tree, None) of a usable step, or (None, why it is not)."""
  try:
    raw = _read_step(checkpoint_dir, step)
  except Exception as e:  # pylint: disable=broad-except
    return None, f'unreadable ({_short(e)})'
  parts = (
    (raw['params'], raw.get('opt_state')) if with_optimiser else (raw['params'])
  )
  if not all_finite(parts):
    what = 'parameters or optimiser state' if with_optimiser else 'parameters'
    return None, f'its {what} hold NaN or infinity'
  return raw, None


def newest_usable(checkpoint_dir: str, with_optimiser: bool = False):
  """The newest step that reads back with finite values.

  Args:
    checkpoint_dir: a workdir's `checkpoints/`.
    with_optimiser: also require a finite optimiser state (resuming).

  Returns:
    (step or None, its raw tree or None, [(newer damaged step, why), ...]).
  """
  damaged = []
  for step in steps(checkpoint_dir):
    raw, why = _problem(checkpoint_dir, step, with_optimiser)
    if raw is not None:
      return step, raw, damaged
    damaged.append((step, why))
  return None, None, damaged


def _describe(damaged) -> str:
  return '; '.join(
    f'checkpoint step {s} is damaged ({why})' for s, why in damaged
  )


# --- Loading a model -------------------------------------------------------


def _max_export_bytes(template) -> int:
  """A generous bound on an export's size for a config (float64 + slack)."""
  size = sum(np.prod(x.shape) for x in jax.tree.leaves(template))
  return int(8 * size * 2 + (1 << 20))


def _read_export(params_path: str, template) -> dict:
  size = os.path.getsize(params_path)
  if size > _max_export_bytes(template):
    raise CheckpointError(
      f'{params_path}: {size} bytes, far more than the parameters of its '
      'config take; refusing to read it.'
    )
  try:
    with open(params_path, 'rb') as f:
      return flax.serialization.msgpack_restore(f.read())
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{params_path}: unreadable ({_short(e)}).') from e


def load_valid_config(path: str) -> ml_collections.ConfigDict:
  """The config of a workdir or export, validated (CheckpointError naming
  the file otherwise)."""
  if not os.path.isdir(path):
    raise CheckpointError(f'{path}: no such checkpoint directory.')
  config = load_config(path)
  try:
    configuration.validate(config)
  except configuration.ConfigError as e:
    raise CheckpointError(f'{path}/{CONFIG_FILE}: {e}') from e
  return config


def load_model(path: str, step: int | None = None):
  """Loads (config, model, params) from a training workdir or an export.

  Reads only: a damaged newest checkpoint is skipped (one warning line names
  it and the step used instead), never moved.

  Args:
    path: a workdir (config.json + checkpoints/) or an export directory
      (config.json + params.msgpack).
    step: checkpoint step of a workdir (default: the newest usable one).

  Raises:
    CheckpointError: no usable config or checkpoint, parameters that do not
      fit the config, or parameters that are not finite.
  """
  config = load_valid_config(path)
  model = air.hashable(configuration.create_model(config))
  template = jax.eval_shape(lambda: air.init_params(model, 0))
  params_path = os.path.join(path, PARAMS_FILE)
  checkpoint_dir = os.path.join(path, CHECKPOINT_DIR)
  if os.path.isfile(params_path) and step is None:
    raw, where = _read_export(params_path, template), params_path
  elif step is not None:
    if step not in steps(checkpoint_dir):
      raise CheckpointError(f'{path}: no checkpoint of step {step}.')
    raw, why = _problem(checkpoint_dir, step, with_optimiser=False)
    if raw is None:
      raise CheckpointError(f'{path}: checkpoint step {step} is {why}.')
    raw, where = raw['params'], f'{path} step {step}'
  else:
    found, tree, damaged = newest_usable(checkpoint_dir)
    if found is None:
      if damaged:
        raise CheckpointError(
          f'{path}: no usable checkpoint ({_describe(damaged)}).'
        )
      raise CheckpointError(
        f'{path}: neither {PARAMS_FILE} nor a checkpoint under '
        f'{CHECKPOINT_DIR}/.'
      )
    if damaged:
      logging.warning(
        '%s: %s; using step %d, the newest intact checkpoint.',
        path,
        _describe(damaged),
        found,
      )
    raw, where = tree['params'], f'{path} step {found}'
  if not isinstance(raw, dict):
    raise CheckpointError(f'{where}: the parameters are not a tree of arrays.')
  raw = {k: v for k, v in raw.items() if k != 'baseline' or model.use_baseline}
  try:
    check_same_structure(template, raw)
  except CheckpointError as e:
    raise CheckpointError(f'{where}: {e}') from e
  if not all_finite(raw):
    raise CheckpointError(
      f'{where}: the parameters hold NaN or infinite values; refusing them.'
    )
  params = jax.tree.map(
    lambda t, x: jnp.asarray(x, t.dtype),
    template,
    flax.serialization.from_state_dict(template, raw),
  )
  return config, model, params


# --- Training: resuming, saving --------------------------


def check_resume_config(config, workdir: str, allow_config_change: bool):
  """Refuses (one line) to resume a run whose stored config differs, unless
  allowed; then the change is appended to config_history.jsonl when the new
  config.json is written (`save_config`, after a successful restore)."""
  _PENDING_HISTORY.pop(os.path.abspath(workdir), None)
  if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
    return
  old = load_config(workdir)
  changed = configuration.differences(old, config)
  if not changed:
    return
  if not allow_config_change:
    raise TrainingError(
      f'{workdir} holds a run with another config (fields {changed} differ); '
      'use another workdir, or --allow_config_change to resume with the new '
      'values.'
    )
  a, b = configuration.flatten(old), configuration.flatten(config)
  _PENDING_HISTORY[os.path.abspath(workdir)] = {
    'time': time.time(),
    'changed': {k: [a.get(k), b.get(k)] for k in changed},
  }


def _set_aside(checkpoint_dir: str, step: int) -> str:
  """Moves a damaged step folder to `damaged-<step>[-n]`; returns the name."""
  name = f'{DAMAGED_PREFIX}{step}'
  n = 1
  while os.path.lexists(os.path.join(checkpoint_dir, name)):
    n += 1
    name = f'{DAMAGED_PREFIX}{step}-{n}'
  os.rename(
    os.path.join(checkpoint_dir, str(step)), os.path.join(checkpoint_dir, name)
  )
  return name


def _remove_interrupted_saves(checkpoint_dir: str) -> None:
  """Deletes orbax's temp folders of saves a crash interrupted (`<step>.
  orbax-checkpoint-tmp...`): never a checkpoint, and the caller holds the
  workdir lock, so no save of another process is under way. (orbax's own
  cleanup option runs in a background thread, racing the first save.)"""
  try:
    names = os.listdir(checkpoint_dir)
  except OSError:
    return
  for name in names:
    step, dot, rest = name.partition('.')
    if step.isdigit() and dot and rest.startswith('orbax-checkpoint-tmp'):
      shutil.rmtree(os.path.join(checkpoint_dir, name), ignore_errors=True)


def _sync_processes(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def restore_train_state(manager: ocp.CheckpointManager, state):
  """The newest usable checkpoint restored onto `state` (or `state` itself
  when there is none yet).

  Newer damaged checkpoints (unreadable, or not finite) are moved to
  `checkpoints/damaged-<step>` and reported in one warning line that names
  the step resumed from.

  Raises:
    TrainingError: there are checkpoints but none is usable (nothing is
      moved), or the usable one does not fit `state` (another config).
  """
  checkpoint_dir = os.fspath(manager.directory)
  if jax.process_index() == 0:
    _remove_interrupted_saves(checkpoint_dir)
  step, _, damaged = newest_usable(checkpoint_dir, with_optimiser=True)
  if step is None:
    if damaged:
      raise TrainingError(
        f'no checkpoint under {checkpoint_dir} can be resumed '
        f'({_describe(damaged)}); nothing was changed.'
      )
    return state
  if damaged:
    if jax.process_index() == 0:
      moved = [_set_aside(checkpoint_dir, s) for s, _ in damaged]
    else:
      moved = [f'{DAMAGED_PREFIX}{s}' for s, _ in damaged]
    _sync_processes('air_jax_set_aside_damaged')
    manager.reload()
    logging.warning(
      '%s; moved to %s under %s (nothing deleted); resuming from step %d, '
      'the newest intact checkpoint.',
      _describe(damaged),
      ', '.join(moved),
      checkpoint_dir,
      step,
    )
  try:
    with _quiet_orbax():
      return manager.restore(step, args=ocp.args.StandardRestore(state))
  except Exception as e:  # pylint: disable=broad-except
    raise TrainingError(
      f'checkpoint step {step} under {checkpoint_dir} does not fit this '
      f'config ({_short(e)}).'
    ) from e


class _CheckpointManager(ocp.CheckpointManager):
  """orbax's manager that refuses non-finite states and cleans up after a
  failed save (its temp folder is removed; older steps stay)."""

  def save(self, step, *args, **kwargs):
    item = getattr(kwargs.get('args'), 'item', None)
    if item is not None and not all_finite(_trained_parts(item)):
      raise TrainingError(
        f'the parameters or optimiser state are not finite at step {step}: '
        f'not saving; the newest checkpoint kept is step '
        f'{self.latest_step()}.'
      )
    try:
      with _quiet_orbax():
        return super().save(step, *args, **kwargs)
    except BaseException:
      self._remove_partial(step)
      raise

  def _remove_partial(self, step) -> None:
    """Removes the failed save's temp folder. Writer threads of the failed
    save can still create folders in it for a moment after the error, so
    it is removed until it has stayed absent for 0.2 s (at most 3 s)."""
    directory = os.fspath(self.directory)
    prefix = f'{step}.orbax-checkpoint-tmp'

    def leftovers():
      with contextlib.suppress(OSError):
        return [n for n in os.listdir(directory) if n.startswith(prefix)]
      return []

    for _ in range(15):
      for name in leftovers():
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
      time.sleep(0.2)
      if not leftovers():
        return


def checkpoint_manager(
  workdir: str, max_to_keep: int = 3, create: bool = True
) -> ocp.CheckpointManager:
  """The orbax manager of a workdir's `checkpoints/`: synchronous saves (a
  failing save is reported at that save, its temp folder removed), and
  non-finite states refused."""
  return _CheckpointManager(
    os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      create=create,
      enable_async_checkpointing=False,
    ),
  )
