"""The command-line programs: `air-train`, `air-evaluate`, `air-infer`,
`air-export`, `air-curves` (also `python -m experiments.<name>` in the
repository). Each parses flags and calls one library function; every
failure the user can fix ends with one line `error: ...` on stderr and exit
status 1, before anything is written where the failure can be foreseen.
"""

import contextlib
import logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging
import ml_collections

from air_jax import checkpointing
from air_jax import configuration
from air_jax import files
from air_jax import inference
from air_jax import writers
from air_jax.configs import NAMES
from air_jax.configs import default
from air_jax.configs import path as config_path

CONFIG_HELP = (
  'A config file (configs/*.py or your own) or a shipped name '
  f'({", ".join(NAMES)}); override fields with --config.<field>=<value>. '
  'Every field is documented in air_jax/configs/default.py.'
)
# Errors whose message is the whole story: printed as one line.
USER_ERRORS = (
  configuration.ConfigError,
  checkpointing.CheckpointError,
  checkpointing.TrainingError,
  inference.InputError,
)


def one_line(message: str) -> str:
  """`message` with every run of whitespace (newlines too) made one space."""
  return ' '.join(str(message).split())


# Set by `run`: this process is one of the programs, not a library user.
_IN_PROGRAM = False


def fail(message: str, code: int = 1) -> None:
  """Prints `error: message` (one line) on stderr and exits with `code`.

  In a program (see `run`), stderr is closed after that line: threads of
  orbax and tensorstore that are still winding down after a failed read
  would otherwise print their own tracebacks while the process exits.
  """
  print(f'error: {one_line(message)}', file=sys.stderr)
  sys.stderr.flush()
  if _IN_PROGRAM:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
  sys.exit(code)


def start_quiet(argv: list[str]) -> None:
  """The start of a program whose output is a file or a table: no positional
  arguments, and only warnings and errors logged (ours and the libraries')."""
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}.')
  absl_logging.set_verbosity(absl_logging.WARNING)
  writers.quiet_library_logs()


def describe_os_error(e: OSError) -> str:
  """`path: reason` of an OSError (disk full, permission denied, ...)."""
  where = e.filename if e.filename is not None else ''
  reason = e.strerror or str(e)
  return f'{where}: {reason}' if where else reason


@contextlib.contextmanager
def one_line_errors(*extra):
  """Turns the library's user-facing errors, and failures of the file
  system (a full disk, a folder that cannot be written), into `fail`."""
  try:
    yield
  except USER_ERRORS + tuple(extra) as e:
    fail(str(e))
  except OSError as e:
    fail(describe_os_error(e))


# --- Flags -----------------------------------------------------------------


def resolve_config_arg(argv: list[str]) -> list[str]:
  """`--config=dair` (a shipped name) -> `--config=<its file>`."""
  out = []
  for arg in argv:
    if arg.startswith('--config='):
      value = arg[len('--config=') :]
      name, sep, rest = value.partition(':')
      if name in NAMES:
        arg = f'--config={config_path(name)}{sep}{rest}'
    out.append(arg)
  return out


def _config_file(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config=') :]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _unknown_override(argv: list[str]) -> str | None:
  """A one-line complaint about the first `--config.<name>` that no config
  has, or None."""
  known = configuration.flatten(default.get_config())
  for arg in argv:
    match = re.match(r'--(?:no)?config\.([^=]+)', arg)
    if match and match.group(1) not in known:
      name = match.group(1)
      hint = configuration.closest_key(name, known)
      return f'--config.{name}: no such config field' + (
        f'; did you mean --config.{hint}?' if hint else '.'
      )
  return None


def _last_line(text: str) -> str:
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  return lines[-1] if lines else ''


def _flag_problem(e: Exception, argv: list[str]) -> str:
  """One line saying which flag or config file is wrong and why."""
  source = _config_file(argv)
  unknown = _unknown_override(argv)
  if unknown and isinstance(
    e, flags.UnrecognizedFlagError | AttributeError | KeyError
  ):
    return unknown
  if isinstance(e, flags.Error):
    text = str(e)
    if 'Error whilst parsing config file' in text:
      return f'--config {source}: loading it failed ({_last_line(text)}).'
    return text.splitlines()[0] + (
      f' {_last_line(text)}' if len(text.splitlines()) > 1 else ''
    )
  if isinstance(e, SyntaxError):
    return f'--config {source}: syntax error at line {e.lineno}: {e.msg}.'
  if isinstance(e, AttributeError) and 'get_config' in str(e):
    return f'--config {source}: the file defines no get_config().'
  return f'--config {source}: loading it failed ({type(e).__name__}: {e}).'


def _check_config_flag(argv: list[str]) -> None:
  """Fails unless --config (when given) loaded to a ConfigDict."""
  if 'config' not in flags.FLAGS:
    return
  value = flags.FLAGS['config'].value
  source = _config_file(argv)
  if value is None:
    if source is not None:
      fail(f'--config {source}: get_config() returned None.')
    return
  try:
    value.keys  # noqa: B018  (config_flags defers a load error to here)
  except OSError as e:
    cause = e.__cause__ or e
    return fail(f'--config {source}: cannot load it ({_last_line(cause)}).')
  except AttributeError:
    pass
  if not isinstance(value, ml_collections.ConfigDict):
    fail(
      f'--config {source}: get_config() returned {type(value).__name__}, '
      'not an ml_collections.ConfigDict.'
    )


class _DropConfigFlagsRecords(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.pathname or '').endswith('config_flags.py')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every problem (an unknown flag, a bad value,
  a config file that does not load) reported by `fail` in one line."""
  quiet = _DropConfigFlagsRecords()
  absl_logger = logging.getLogger('absl')
  absl_logger.addFilter(quiet)  # Its warnings repeat what fail() says.
  try:
    args = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    fail(_flag_problem(e, argv))
  finally:
    absl_logger.removeFilter(quiet)
  _check_config_flag(argv)
  return args


def run(main, argv=None) -> None:
  """`app.run(main)` with shipped config names resolved and flag errors in
  one line."""
  global _IN_PROGRAM
  _IN_PROGRAM = True
  argv = resolve_config_arg(list(sys.argv if argv is None else argv))
  app.run(main, argv=argv, flags_parser=parse_flags)


def define_once(define, name: str, default, help_text: str):
  """`define(name, default, help_text)` (a `flags.DEFINE_*`), or the holder
  of the flag of that name when another program's module (imported in the
  same process, e.g. by tests) defined it already."""
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define(name, default, help_text)


def define_string(name: str, default: str | None, help_text: str):
  """`flags.DEFINE_string`, once per process (`define_once`)."""
  return define_once(flags.DEFINE_string, name, default, help_text)


# --- Paths -----------------------------------------------------------------


def _inputs_holding(path: str, inputs) -> str | None:
  """The input that `path` is, or that holds `path` as an existing file."""
  for source in inputs:
    if not source or not os.path.exists(source):
      continue
    if files.same_file(path, source):
      return source
    if (
      os.path.isdir(source)
      and os.path.lexists(path)
      and files.is_within(path, source)
    ):
      return source
  return None


def _check_parent(flag: str, path: str) -> None:
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    fail(f'--{flag} {path}: folder {parent} does not exist.')
  if not os.access(parent, os.W_OK | os.X_OK):
    fail(f'--{flag} {path}: folder {parent} is not writable.')


def check_output_file(flag: str, path: str | None, inputs=()) -> None:
  """Fails (one line) unless `path` names a file that can be written
  atomically and is none of the inputs (nor an existing file inside an input
  folder)."""
  if not path:
    fail(f'--{flag} is required.')
  if os.path.isdir(path):
    fail(f'--{flag} {path} is a folder; name a file.')
  if os.path.lexists(path) and not os.path.isfile(path):
    fail(f'--{flag} {path} exists and is not a regular file.')
  _check_parent(flag, path)
  source = _inputs_holding(path, inputs)
  if source is not None:
    fail(f'--{flag} {path} is an input ({source}); refusing to overwrite it.')


def check_output_folder(flag: str, path: str, inputs=(), may_replace=None):
  """Fails (one line) unless `path` can become a new folder: it does not
  exist, or is an empty folder, or `may_replace(path)` (an earlier output);
  and it is no input, holds none and lies in none as an existing entry."""
  if os.path.lexists(path):
    if not os.path.isdir(path) or os.path.islink(path):
      fail(f'--{flag} {path} exists and is not a folder.')
    if os.listdir(path) and not (may_replace and may_replace(path)):
      fail(
        f'--{flag} {path} is a folder that holds other files; name a new '
        'or empty folder.'
      )
  _check_parent(flag, path)
  for source in inputs:
    if source and os.path.exists(source) and files.is_within(source, path):
      fail(f'--{flag} {path} holds an input ({source}); refusing to use it.')
  source = _inputs_holding(path, inputs)
  if source is not None:
    fail(f'--{flag} {path} is inside an input ({source}); refusing to use it.')


def check_input(flag: str, path: str | None, folder: bool | None = None):
  """Fails (one line) unless `path` exists (a folder if `folder`, a file if
  `folder` is False)."""
  if not path:
    fail(f'--{flag} is required.')
  if not os.path.exists(path):
    fail(f'--{flag} {path}: no such file or folder.')
  if folder is True and not os.path.isdir(path):
    fail(f'--{flag} {path} is not a folder.')
  if folder is False and not os.path.isfile(path):
    fail(f'--{flag} {path} is not a regular file.')
