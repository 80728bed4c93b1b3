r"""DAIR (difference AIR): the inference network sees image - canvas so far.

Command:
  python -m experiments.train --config=configs/dair.py --workdir=/tmp/dair

Everything else as configs/default.py. Its interest is generalisation to
more objects than seen in training (evaluate on `test_3`).

The shipped pretrained/dair was trained before the normalised baseline
existed: `--config.normalised_baseline=False --config.num_train_steps=10000`
(seed 0; about 16 minutes here with other jobs sharing the 2 cores; DAIR
projects the residual image at every step, so it is slower than AIR).
Measured: test count accuracy 0.98, and 0.93 on `test_3` (3 digits, never
seen in training).
"""

from configs import default


def get_config():
  """DAIR: default AIR with the difference input."""
  config = default.get_config()
  config.model.difference = True
  return config
