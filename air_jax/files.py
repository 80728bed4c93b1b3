"""Writing files so that a crash never leaves half of one: a temp file beside
the target, fsync, then an atomic rename. Folders are published the same way
(filled under a temp name, then renamed)."""

import contextlib
import os
import shutil
import tempfile

__all__ = [
  'TEMP_PREFIX',
  'append_line',
  'is_within',
  'publish_dir',
  'same_file',
  'staged_bytes',
  'temp_dir_beside',
  'write_bytes',
  'write_text',
]

# Temp names start with this (and end with '.tmp'), beside their target.
TEMP_PREFIX = '.air-tmp-'


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_bytes(path: str, data: bytes) -> None:
  """Replaces `path` with `data` atomically (the old file stays on failure).

  Raises:
    OSError: the folder cannot be written (no temp file is left behind).
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with staged_bytes(path, data) as commit:
    commit()


@contextlib.contextmanager
def staged_bytes(path: str, data: bytes):
  """Writes `data` to a temp file beside `path` (fsynced) and yields a
  function that renames it into place. Leaving the block without calling it
  removes the temp file, so `path` is untouched.

  Use it to make several outputs appear together: stage them all (the part
  that can fail, e.g. on a full disk), then commit each.
  """
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(
    dir=directory,
    prefix=f'{TEMP_PREFIX}{os.path.basename(path)}.',
    suffix='.tmp',
  )
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())

    def commit():
      os.replace(tmp, path)
      _fsync_dir(directory)

    yield commit
  finally:
    with contextlib.suppress(OSError):
      os.unlink(tmp)


def write_text(path: str, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(path, text.encode('utf-8'))


def append_line(path: str, line: str) -> None:
  """Appends one line to a log file and fsyncs it."""
  with open(path, 'a', encoding='utf-8') as f:
    f.write(line.rstrip('\n') + '\n')
    f.flush()
    os.fsync(f.fileno())


@contextlib.contextmanager
def temp_dir_beside(path: str):
  """Yields a new empty folder beside `path` (same file system, so it can be
  renamed onto it); removes it on exit unless it was renamed away."""
  parent = os.path.dirname(os.path.abspath(path))
  tmp = tempfile.mkdtemp(
    dir=parent, prefix=f'{TEMP_PREFIX}{os.path.basename(path)}.', suffix='.tmp'
  )
  try:
    yield tmp
  finally:
    if os.path.lexists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: str, path: str, may_replace=None) -> None:
  """Renames the finished folder `tmp` to `path`.

  Args:
    tmp: a folder from `temp_dir_beside(path)`, its files complete.
    path: where it goes. If it exists it must be an empty folder, or a folder
      for which `may_replace(path)` is true: that one is moved aside and
      deleted only once `tmp` is in place.
    may_replace: see `path`.

  Raises:
    FileExistsError: `path` exists and may not be replaced.
  """
  _fsync_dir(tmp)
  parent = os.path.dirname(os.path.abspath(path))
  old = None
  if os.path.lexists(path):
    is_dir = os.path.isdir(path) and not os.path.islink(path)
    replaceable = is_dir and (
      not os.listdir(path) or (may_replace is not None and may_replace(path))
    )
    if not replaceable:
      raise FileExistsError(f'{path} exists; refusing to replace it.')
    old = tempfile.mkdtemp(
      dir=parent,
      prefix=f'{TEMP_PREFIX}{os.path.basename(path)}.old.',
      suffix='.tmp',
    )
    os.rename(path, os.path.join(old, 'previous'))
  try:
    os.rename(tmp, path)
  except BaseException:
    if old is not None:  # Put the previous folder back.
      os.rename(os.path.join(old, 'previous'), path)
      os.rmdir(old)
    raise
  _fsync_dir(parent)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def same_file(a: str, b: str) -> bool:
  """Whether two paths name the same existing file (or the same path)."""
  if os.path.abspath(a) == os.path.abspath(b):
    return True
  try:
    return os.path.samefile(a, b)
  except OSError:
    return False


def is_within(path: str, directory: str) -> bool:
  """Whether `path` is `directory` or lies under it (symlinks resolved)."""
  path, directory = os.path.realpath(path), os.path.realpath(directory)
  return path == directory or path.startswith(directory.rstrip(os.sep) + os.sep)
