"""A training run's directory and what the loop does there: metrics,
evaluation, pictures, checkpoints and the final export.

Only process 0 of a multi-process run writes files other than checkpoints
(orbax coordinates those itself).
"""

import contextlib
import ctypes
import fcntl
import os
import time

from absl import logging
import jax
import orbax.checkpoint as ocp

from air_jax import checkpointing
from air_jax import evaluation
from air_jax import visualization
from air_jax import writers

__all__ = [
  'RunDir',
  'lock',
  'release_free_memory',
]


@contextlib.contextmanager
def lock(workdir: str):
  """Holds an exclusive lock on the workdir folder itself.

  The kernel releases it when the process ends, however it ends, so a
  crashed or killed run leaves no stale lock; no lock file is written. A
  workdir this call created is removed again if the run leaves it empty.

  Raises:
    checkpointing.TrainingError: the workdir is held by another process,
      or it is not a folder that can be created and written.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise checkpointing.TrainingError(
      f'--workdir {workdir} is a file, not a folder.'
    )
  created = not os.path.exists(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
  except OSError as e:
    raise checkpointing.TrainingError(
      f'--workdir {workdir}: cannot create or open it ({e.strerror or e}).'
    ) from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      raise checkpointing.TrainingError(
        f'{workdir} is in use by another training process; wait for it to '
        'finish or use another --workdir.'
      ) from e
    if not os.access(workdir, os.W_OK):
      raise checkpointing.TrainingError(f'--workdir {workdir} is not writable.')
    try:
      yield
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)
    if created:
      with contextlib.suppress(OSError):
        os.rmdir(workdir)  # Only if the run failed before writing anything.


def release_free_memory() -> None:
  """Returns the C heap's free pages to the OS (glibc only; else a no-op).

  XLA's compiler allocates several hundred MiB of short-lived memory; glibc
  keeps it mapped after it is freed, so everything allocated later would
  stack on top of it in the peak RSS.
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


class RunDir:
  """One training run's directory (the run, or one seed of a sweep): its
  writer and checkpoints, and what the loop asks of it at each event."""

  def __init__(self, config, workdir, model, loss_config, manager):
    self.config, self.workdir, self.model = config, workdir, model
    self.loss_config, self.manager = loss_config, manager
    self.chief = jax.process_index() == 0
    self.writer = writers.MetricWriter(workdir, enabled=self.chief)
    self.eval_name = f'eval_{config.data.eval_split}'

  def log_train(self, step, state, metrics, rate, accuracy):
    consecutive = int(state.consecutive_skipped)
    if consecutive >= self.config.max_consecutive_nonfinite:
      raise checkpointing.TrainingError(
        f'{self.workdir}: {consecutive} consecutive non-finite updates at '
        f'step {step}; stopping. The checkpoints kept hold finite parameters.'
      )
    scalars = {f'train/{k}': v for k, v in metrics.items()}
    scalars['train/unix_time'] = time.time()  # For curves against wall time.
    scalars['train/images_per_s'] = rate
    scalars['train/count_accuracy'] = accuracy
    self.writer.write_scalars(step, scalars, check_finite=False)
    return scalars

  def evaluate(self, step, state, eval_split):
    result = evaluation.evaluate(
      self.model,
      state.params,
      eval_split,
      self.loss_config,
      step=step,
      batch_size=self.config.eval_batch_size,
      seed=self.config.seed,
      max_examples=self.config.eval_max_examples or None,
    )
    self.writer.write_scalars(step, result.scalars(self.eval_name))
    self.writer.write_text(step, 'eval/confusion', str(result.confusion))
    logging.info(
      '%s step %d %s count acc %.4f elbo %.2f confusion\n%s',
      self.workdir,
      step,
      self.eval_name,
      result.count_accuracy,
      result.elbo,
      result.confusion,
    )
    release_free_memory()  # The evaluation pass's compile scratch.

  def pictures(self, step, state, images):
    grid = visualization.reconstructions(self.model, state.params, images)
    if self.chief:
      path = os.path.join(self.workdir, 'pictures', f'step_{step:07d}.png')
      visualization.save_png(path, grid)
      self.writer.write_image(step, 'pictures/reconstructions', grid)
    release_free_memory()

  def save(self, step, state):
    if not checkpointing.all_finite((state.params, state.opt_state)):
      raise checkpointing.TrainingError(
        f'{self.workdir}: parameters are not finite at step {step}: not '
        f'saving; the last checkpoint kept is step '
        f'{self.manager.latest_step()}.'
      )
    try:
      self.manager.save(step, args=ocp.args.StandardSave(state))
    except Exception as e:  # pylint: disable=broad-except
      raise checkpointing.TrainingError(
        f'{self.workdir}: saving the checkpoint of step {step} failed '
        f'({type(e).__name__}: {str(e)[:200]}); earlier checkpoints are kept.'
      ) from e

  def finish(self, state):
    self.manager.wait_until_finished()
    self.writer.close()
    if self.chief:
      checkpointing.save_params(
        state.params, os.path.join(self.workdir, 'export'), self.config
      )
