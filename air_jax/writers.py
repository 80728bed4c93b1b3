"""Metric writers (JSON lines + TensorBoard event files) and a progress bar.

TensorBoard files are written with tensorboardX, which needs no TensorFlow.
"""

from collections.abc import Mapping
import json
import logging
import math
import os
import sys
import time

import numpy as np

__all__ = [
  'MetricWriter',
  'NonFiniteMetricError',
  'ProgressBar',
  'quiet_library_logs',
]


class NonFiniteMetricError(FloatingPointError):
  """A logged metric was NaN or infinite."""


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard events.

  Each JSON line is {"step": s, "<prefix>/<name>": value, ...}. With
  `enabled=False` (every process but the first of a multi-process run)
  nothing is written.
  """

  def __init__(
    self, workdir: str, tensorboard: bool = True, enabled: bool = True
  ):
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top

      self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tb'))

  def write_scalars(
    self, step: int, scalars: Mapping[str, float], check_finite: bool = True
  ) -> None:
    """Writes scalars; raises NonFiniteMetricError on NaN/inf if asked."""
    values = {k: float(v) for k, v in scalars.items()}
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if check_finite and bad:
      raise NonFiniteMetricError(f'Non-finite metrics at step {step}: {bad}')
    if self._jsonl is None:
      return
    self._jsonl.write(json.dumps({'step': int(step), **values}) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, int(step))

  def write_image(self, step: int, name: str, image: np.ndarray) -> None:
    """image: [H, W, 3] uint8."""
    if self._tb is not None:
      self._tb.add_image(name, image, int(step), dataformats='HWC')

  def write_text(self, step: int, name: str, text: str) -> None:
    if self._tb is not None:
      self._tb.add_text(name, text, int(step))

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class ProgressBar:
  """A one-line terminal progress bar: step, chosen metrics and images/s."""

  def __init__(
    self,
    total: int,
    start: int = 0,
    stream=sys.stderr,
    width: int = 24,
    enabled: bool = True,
  ):
    self._enabled = enabled
    self._total = max(total, 1)
    self._start_step = start
    self._start_time = time.time()
    self._stream = stream
    self._width = width
    self._tty = hasattr(stream, 'isatty') and stream.isatty()

  def update(self, step: int, fields: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    frac = min(step / self._total, 1.0)
    filled = int(round(frac * self._width))
    bar = '#' * filled + '.' * (self._width - filled)
    elapsed = time.time() - self._start_time
    rate = (step - self._start_step) / max(elapsed, 1e-9)
    eta = (self._total - step) / rate if rate > 0 else float('inf')
    text = ' '.join(f'{k} {v:.4g}' for k, v in fields.items())
    line = f'[{bar}] {step}/{self._total} {text} eta {eta:.0f}s'
    end = '\r' if self._tty else '\n'
    self._stream.write(line + end)
    self._stream.flush()

  def close(self) -> None:
    if self._enabled and self._tty:
      self._stream.write('\n')
      self._stream.flush()


class _DropLibraryRecords(logging.Filter):
  """Drops INFO chatter of checkpointing and dataset libraries."""

  _NOISY = ('orbax', 'tensorflow_datasets', 'array_record', 'etils')

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING:
      return True
    return not any(name in record.pathname for name in self._NOISY)


def quiet_library_logs() -> None:
  """Keeps absl's INFO log for our own messages (orbax logs every save)."""
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(_DropLibraryRecords())
  for handler in logging.getLogger().handlers + absl_logger.handlers:
    handler.addFilter(_DropLibraryRecords())
