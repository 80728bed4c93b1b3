"""air-evaluate against bad input and faults: one line, exit 1, nothing
written; a damaged newest checkpoint is skipped; the report is atomic.

Most cases call `air_jax.cli.evaluate.evaluate` (the program without its
flag parsing) in-process; two run the real binary to check that stderr is
exactly one line there too.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from air_jax import air
from air_jax import checkpointing
from air_jax import configuration
from air_jax import evaluation
from air_jax import files
from air_jax.cli import evaluate
from air_jax.configs import test as test_config
from tests import helpers
from tests import robustness_infer_test as shared

FAST = dict(splits=['test'], iwae_samples=0, max_examples=20, batch_size=20)


@pytest.fixture(scope='module')
def originals(tmp_path_factory, small_data_dir):
  """A workdir (checkpoints 1, 2), an all-NaN one and an export, whose
  config reads the session's small multi_mnist build."""
  config = test_config.get_config()
  config.data.data_dir = small_data_dir
  mnist = helpers.mnist_dir()
  config.data.mnist_dir = str(mnist) if mnist else None
  model = configuration.create_model(config)
  params = air.init_params(model, 0)
  root = tmp_path_factory.mktemp('originals')
  shared.make_run(root / 'run', config, params, steps=(1, 2))
  shared.make_run(root / 'nan_run', config, params, (1, 2), nan_steps=(1, 2))
  checkpointing.save_params(params, str(root / 'export'), config)
  return root


@pytest.fixture
def work(tmp_path, originals):
  for name in ('run', 'nan_run', 'export'):
    shutil.copytree(originals / name, tmp_path / name)
  return tmp_path


def test_bad_arguments_one_line_nothing_written(work, capsys, small_data_dir):
  run = str(work / 'run')
  out = str(work / 'report.json')
  (work / 'a_file').write_text('mine')
  os.mkfifo(work / 'fifo')
  before = shared.tree_digest(work)
  data_before = shared.tree_digest(small_data_dir)
  config_file = str(work / 'run' / checkpointing.CONFIG_FILE)
  some_data_file = next(
    str(p) for p in pathlib.Path(small_data_dir).rglob('*') if p.is_file()
  )
  cases = [
    # (arguments, what the line says)
    (dict(checkpoint=run, output=config_file), 'is an input'),
    (
      dict(checkpoint=run, output=some_data_file, data_dir=small_data_dir),
      'is an input',
    ),
    (dict(checkpoint=run, output=str(work)), 'is a folder'),
    (dict(checkpoint=run, output=str(work / 'fifo')), 'not a regular file'),
    (
      dict(checkpoint=run, output=str(work / 'no' / 'r.json')),
      'does not exist',
    ),
    (dict(checkpoint=run, output=None), '--output is required'),
    (dict(checkpoint=str(work / 'nowhere'), output=out), 'no such file'),
    (dict(checkpoint=str(work / 'a_file'), output=out), 'not a folder'),
    (dict(checkpoint=run, output=out, splits=[]), '--splits is empty'),
    (dict(checkpoint=run, output=out, splits=['tset']), "'tset'"),
    (dict(checkpoint=run, output=out, builder_config='smal'), "'smal'"),
    (dict(checkpoint=run, output=out, batch_size=0), '--batch_size'),
    (dict(checkpoint=run, output=out, iwae_samples=-1), '--iwae_samples'),
    (dict(checkpoint=run, output=out, max_examples=-5), '--max_examples'),
    (dict(checkpoint=run, output=out, refine_flips=-1), '--refine_flips'),
    (dict(checkpoint=run, output=out, refine_rounds=-1), '--refine_rounds'),
    (
      dict(checkpoint=run, output=out, refine_rounds=1),
      '--refine_rounds needs --refine_flips',
    ),
    (dict(checkpoint=run, output=out, refine_splits=-1), '--refine_splits'),
    (dict(checkpoint=run, output=out, refine_drops=-1), '--refine_drops'),
    (
      dict(checkpoint=run, output=out, refine_flips=2, refine_drops=1),
      '--refine_drops needs --refine_rounds',
    ),
    (
      dict(checkpoint=run, output=out, refine_flips=2, refine_splits=1),
      '--refine_splits needs --refine_rounds',
    ),
    (
      dict(checkpoint=run, output=out, mnist_dir=str(work / 'nowhere')),
      'no such folder',
    ),
    (
      dict(checkpoint=run, output=out, data_dir=str(work / 'a_file')),
      'not a folder',
    ),
    (dict(checkpoint=str(work / 'nan_run'), output=out, **FAST), 'NaN'),
  ]
  for kwargs, says in cases:
    line = shared.refused(capsys, evaluate.evaluate, **kwargs)
    assert says in line, (kwargs, line)
  assert shared.tree_digest(work) == before
  assert shared.tree_digest(small_data_dir) == data_before


def test_nan_export_is_refused(work, capsys):
  shared._write_nan_export(work / 'export')  # pylint: disable=protected-access
  before = shared.tree_digest(work)
  line = shared.refused(
    capsys,
    evaluate.evaluate,
    str(work / 'export'),
    str(work / 'report.json'),
    **FAST,
  )
  assert 'NaN' in line and 'params.msgpack' in line
  assert shared.tree_digest(work) == before


def test_damaged_newest_checkpoint_falls_back(work, caplog):
  shared.damage_step(work / 'run', 2)
  before = shared.tree_digest(work / 'run')
  out = work / 'report.json'
  with caplog.at_level('WARNING'):
    report = evaluate.evaluate(str(work / 'run'), str(out), **FAST)
  warnings = [
    r.getMessage() for r in caplog.records if r.levelname == 'WARNING'
  ]
  assert len(warnings) == 1, warnings
  assert 'step 2 is damaged' in warnings[0] and 'using step 1' in warnings[0]
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  assert report['splits']['test']['num_images'] == 20
  assert shared.tree_digest(work / 'run') == before  # A reader moves nothing.
  shared.no_temp_files(work)


def test_a_crash_while_writing_keeps_the_old_report(work, capsys, monkeypatch):
  out = work / 'report.json'
  out.write_text('{"the": "old report"}')
  monkeypatch.setattr(
    evaluation, 'evaluate_checkpoint', lambda *a, **k: {'splits': {}}
  )

  def full_disk(fd):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(files.os, 'fsync', full_disk)
  line = shared.refused(
    capsys, evaluate.evaluate, str(work / 'run'), str(out), **FAST
  )
  assert 'No space left on device' in line
  assert out.read_text() == '{"the": "old report"}'
  shared.no_temp_files(work)


def _binary(*args):
  return subprocess.Popen(
    [sys.executable, '-m', 'experiments.evaluate', *args],
    cwd=helpers.REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def test_binary_stderr_is_one_line(work):
  shared.damage_step(work / 'run', 2)
  fast = [
    '--splits=test',
    '--iwae_samples=0',
    '--max_examples=20',
    '--batch_size=20',
  ]
  runs = {  # Started together: the machine has few cores to wait on.
    'nan': _binary(
      f'--checkpoint={work / "nan_run"}', f'--output={work / "a.json"}', *fast
    ),
    'bad_flag': _binary(
      f'--checkpoint={work / "run"}',
      f'--output={work / "b.json"}',
      '--batch_size=x',
    ),
    'damaged': _binary(
      f'--checkpoint={work / "run"}', f'--output={work / "c.json"}', *fast
    ),
  }
  results = {name: p.communicate(timeout=300) for name, p in runs.items()}
  for name in ('nan', 'bad_flag'):
    err = results[name][1]
    assert runs[name].returncode == 1, (name, err)
    assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  err = results['damaged'][1]
  assert runs['damaged'].returncode == 0, err
  assert len(err.splitlines()) == 1, err
  assert 'step 2 is damaged' in err and 'using step 1' in err, err
  assert not (work / 'a.json').exists() and not (work / 'b.json').exists()
  assert json.loads((work / 'c.json').read_text())['splits']['test']
